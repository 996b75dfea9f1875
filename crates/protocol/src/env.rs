//! The `SDCLUSTER_*` environment between a supervisor and its workers: every variable a
//! supervisor (the unit template `systemd/app@.service`, `sdcluster run`) sets for a worker,
//! and every option variable the reference worker reads. Each name is spelled here once; the
//! worker's options, the manager's spec and units, and the tests use these constants.

/// The instance's name (`%i`: `1` … `N`): in responses (`x-sdcluster-worker`), metrics
/// (`instance=`) and in every journal entry of the worker, as the field `SDCLUSTER_INSTANCE=`.
/// Default: the process id.
pub const INSTANCE: &str = "SDCLUSTER_INSTANCE";
/// `1`: refuse to start unless the supervisor passed a socket (`--require-socket`).
pub const REQUIRE_SOCKET: &str = "SDCLUSTER_REQUIRE_SOCKET";
/// How long in-flight requests may take to finish after SIGTERM (`--drain-timeout`,
/// systemd time span).
pub const DRAIN_TIMEOUT: &str = "SDCLUSTER_DRAIN_TIMEOUT";
/// The file all workers of an app share to balance load, in shared mode (`--balance-file`).
pub const BALANCE_FILE: &str = "SDCLUSTER_BALANCE_FILE";
/// A file whose existence when the worker is asked to stop means that the supervisor starts
/// the instance again right away (a restart, not a stop): hand kept-alive connections over.
pub const HANDOVER_FLAG: &str = "SDCLUSTER_HANDOVER_FLAG";
/// How many fds the supervisor keeps for the instance (`FileDescriptorStoreMax=`); 0 or
/// unset turns hand-over off.
pub const FDSTORE_MAX: &str = "SDCLUSTER_FDSTORE_MAX";

/// The file all workers of an app keep their counters in, so that `/metrics` of any of them
/// covers the app (`--metrics-file`); defined with the metrics table.
pub use crate::metrics::METRICS_FILE_ENV as METRICS_FILE;

/// Addresses to bind when no socket was passed (`--listen`, comma-separated).
pub const LISTEN: &str = "SDCLUSTER_LISTEN";
/// Bind `--listen` with `SO_REUSEPORT` (`--reuseport`).
pub const REUSEPORT: &str = "SDCLUSTER_REUSEPORT";
/// Serve only the passed sockets with these `LISTEN_FDNAMES` names (`--listener-name`).
pub const LISTENER_NAMES: &str = "SDCLUSTER_LISTENER_NAMES";
/// Runtime threads (`--threads`).
pub const THREADS: &str = "SDCLUSTER_THREADS";
/// Time a client has to send a request's headers (`--header-timeout`).
pub const HEADER_TIMEOUT: &str = "SDCLUSTER_HEADER_TIMEOUT";
/// Idle time of a kept-alive connection between requests (`--keepalive-timeout`).
pub const KEEPALIVE_TIMEOUT: &str = "SDCLUSTER_KEEPALIVE_TIMEOUT";
/// Time a response may make no write progress (the client does not read) before the
/// connection is closed (`--write-timeout`).
pub const WRITE_TIMEOUT: &str = "SDCLUSTER_WRITE_TIMEOUT";
/// Time the app may wait for the next byte of a request body before the request is
/// answered 408 and the connection closed (`--body-timeout`).
pub const BODY_TIMEOUT: &str = "SDCLUSTER_BODY_TIMEOUT";
/// How long idle connections stay open when a stopping worker has no replacement
/// (`--close-grace`).
pub const CLOSE_GRACE: &str = "SDCLUSTER_CLOSE_GRACE";
/// Bytes of a request body the app left unread that the worker reads away
/// (`--max-unread-body`).
pub const MAX_UNREAD_BODY: &str = "SDCLUSTER_MAX_UNREAD_BODY";
/// Largest request head accepted (`--max-header-bytes`).
pub const MAX_HEADER_BYTES: &str = "SDCLUSTER_MAX_HEADER_BYTES";
/// Open connections one worker holds at most (`--max-connections`).
pub const MAX_CONNECTIONS: &str = "SDCLUSTER_MAX_CONNECTIONS";
/// How long a worker above its fair share leaves a waiting connection to its peers
/// (`--balance-patience`).
pub const BALANCE_PATIENCE: &str = "SDCLUSTER_BALANCE_PATIENCE";
/// Path of the health check, or `off` (`--healthz-path`).
pub const HEALTHZ_PATH: &str = "SDCLUSTER_HEALTHZ_PATH";
/// Path of the Prometheus metrics, or `off` (`--metrics-path`).
pub const METRICS_PATH: &str = "SDCLUSTER_METRICS_PATH";
/// The reference worker's test-only endpoints (`--debug-endpoints`).
pub const DEBUG_ENDPOINTS: &str = "SDCLUSTER_DEBUG_ENDPOINTS";

/// Every variable above.
pub const ALL: &[&str] = &[
    INSTANCE,
    REQUIRE_SOCKET,
    DRAIN_TIMEOUT,
    BALANCE_FILE,
    HANDOVER_FLAG,
    FDSTORE_MAX,
    METRICS_FILE,
    LISTEN,
    REUSEPORT,
    LISTENER_NAMES,
    THREADS,
    HEADER_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    WRITE_TIMEOUT,
    BODY_TIMEOUT,
    CLOSE_GRACE,
    MAX_UNREAD_BODY,
    MAX_HEADER_BYTES,
    MAX_CONNECTIONS,
    BALANCE_PATIENCE,
    HEALTHZ_PATH,
    METRICS_PATH,
    DEBUG_ENDPOINTS,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_distinct_and_prefixed() {
        let mut names = super::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("SDCLUSTER_")));
    }
}
