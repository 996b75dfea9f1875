//! Handing kept-alive connections from a stopping worker to the next process of its
//! instance, through the supervisor's file descriptor store.
//!
//! A worker that drains because a replacement comes (its supervisor says so with the
//! [`HANDOVER_FLAG_ENV`] file) sends every connection that sits idle at a request boundary
//! to its supervisor with `FDSTORE=1` + `FDNAME=` ([`connection_name`]), and the bytes it had
//! already read from it, if any, as a sealed memfd ([`bytes_name`]). The next process finds
//! both after its listeners in `LISTEN_FDS`, removes them from the store
//! (`FDSTOREREMOVE=1`) and serves them as if it had accepted them. systemd and
//! `sdcluster run` implement the same store (see systemd's `FILE_DESCRIPTOR_STORE.md`).

/// Environment: the hand-over flag file ([`crate::env::HANDOVER_FLAG`]).
pub const HANDOVER_FLAG_ENV: &str = crate::env::HANDOVER_FLAG;
/// Environment: the fd store's size for the worker ([`crate::env::FDSTORE_MAX`]).
pub const FDSTORE_MAX_ENV: &str = crate::env::FDSTORE_MAX;
/// Environment set by systemd ≥ 254 itself to `FileDescriptorStoreMax=`.
pub const SYSTEMD_FDSTORE_ENV: &str = "FDSTORE";

const CONNECTION_PREFIX: &str = "sdcluster-conn.";
const BYTES_PREFIX: &str = "sdcluster-bytes.";

/// The store name of connection `seq` handed over by process `pid`.
pub fn connection_name(pid: u32, seq: u64) -> String {
    format!("{CONNECTION_PREFIX}{pid}.{seq}")
}

/// The store name of the bytes already read from connection `seq` of process `pid`.
pub fn bytes_name(pid: u32, seq: u64) -> String {
    format!("{BYTES_PREFIX}{pid}.{seq}")
}

/// What a stored fd of ours is, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredFd {
    /// A client connection; the key pairs it with its bytes.
    Connection(String),
    /// The bytes already read from the connection with this key.
    Bytes(String),
}

/// Recognises the names [`connection_name`] and [`bytes_name`] give; `None` for any other
/// name (a listener, the balance table, somebody else's stored fd).
pub fn parse_stored(name: &str) -> Option<StoredFd> {
    let key_ok = |key: &str| {
        let mut parts = key.split('.');
        let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
    };
    if let Some(key) = name.strip_prefix(CONNECTION_PREFIX) {
        return key_ok(key).then(|| StoredFd::Connection(key.to_owned()));
    }
    if let Some(key) = name.strip_prefix(BYTES_PREFIX) {
        return key_ok(key).then(|| StoredFd::Bytes(key.to_owned()));
    }
    None
}

/// The store's capacity as the environment gives it: systemd's own `FDSTORE` when set,
/// else [`FDSTORE_MAX_ENV`]; 0 when neither is a number.
pub fn store_capacity(systemd: Option<&str>, ours: Option<&str>) -> usize {
    systemd.or(ours).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_stored(&connection_name(42, 7)), Some(StoredFd::Connection("42.7".into())));
        assert_eq!(parse_stored(&bytes_name(42, 7)), Some(StoredFd::Bytes("42.7".into())));
        assert!(crate::notify::valid_fd_name(&connection_name(u32::MAX, u64::MAX)));
    }

    #[test]
    fn other_names_are_not_ours() {
        for name in [
            "http",
            "sdcluster-balance",
            "sdcluster-conn.",
            "sdcluster-conn.1",
            "sdcluster-conn.1.x",
            "sdcluster-conn.1.2.3",
            "conn0",
        ] {
            assert_eq!(parse_stored(name), None, "{name}");
        }
    }

    #[test]
    fn capacity_prefers_systemds_own() {
        assert_eq!(store_capacity(Some("16"), Some("4096")), 16);
        assert_eq!(store_capacity(None, Some("4096")), 4096);
        assert_eq!(store_capacity(None, None), 0);
        assert_eq!(store_capacity(None, Some("lots")), 0);
    }
}
