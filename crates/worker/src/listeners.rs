//! Where the sockets come from: passed by the supervisor, or bound here when nothing was.

use std::fs::File;

use sdcluster_protocol::listen_fds::{BALANCE_FD_NAME, Inherited};
use sdcluster_protocol::metrics::{METRICS_FD_NAME, METRICS_FILE_ENV};
use sdcluster_protocol::{AddressError, BindError, ListenAddress, ListenFdsError, Listener};

use crate::handover::{TakenOver, split_stored, take_over};
use crate::options::Options;

/// The sockets to serve, plus the balance table file when the supervisor shares one.
#[derive(Debug)]
pub struct Acquired {
    /// Listening sockets, non-blocking.
    pub listeners: Vec<Listener>,
    /// The shared table workers on one queue balance through (see `sdcluster_protocol::balance`).
    pub balance: Option<File>,
    /// The shared table where every worker of the app keeps its counters
    /// (see `sdcluster_protocol::metrics`).
    pub metrics: Option<File>,
    /// Kept-alive connections the previous process of this instance handed over.
    pub taken_over: Vec<TakenOver>,
    /// Names of stored fds of ours that were unusable, to clear from the supervisor's store.
    pub(crate) stale: Vec<String>,
}

/// Why there is nothing to serve; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The sd_listen_fds environment or a passed fd is wrong.
    #[error(transparent)]
    Protocol(#[from] ListenFdsError),
    /// `--listener-name` matched none of the passed sockets.
    #[error(
        "none of the passed sockets is named {wanted:?} (passed: {passed:?}); fix --listener-name or the socket unit's FileDescriptorName="
    )]
    NoneNamed {
        /// The names asked for.
        wanted: Vec<String>,
        /// The names passed.
        passed: Vec<String>,
    },
    /// A supervisor should have passed a socket and did not.
    #[error(
        "no socket was passed ({0}) but --require-socket (SDCLUSTER_REQUIRE_SOCKET) is set: under systemd, check that the unit has Sockets= and that the socket unit is active (systemctl status APP.socket)"
    )]
    NothingPassed(String),
    /// `--listen` is not an address.
    #[error("--listen: {0}")]
    Address(#[from] AddressError),
    /// `--listen` could not be bound.
    #[error("--listen: {0}")]
    Bind(#[from] BindError),
}

/// Turns what the supervisor passed into listeners, or binds `--listen` when it passed nothing.
pub fn acquire(inherited: Inherited, opts: &Options) -> Result<Acquired, ListenError> {
    let passed = match inherited {
        Inherited::Fds(fds) => fds,
        Inherited::Nothing if opts.require_socket => {
            return Err(ListenError::NothingPassed("LISTEN_FDS is unset".into()));
        }
        Inherited::ForeignPid { listen_pid, own_pid } if opts.require_socket => {
            return Err(ListenError::NothingPassed(format!(
                "LISTEN_PID={} is not this process, {own_pid}",
                listen_pid.map_or("(unset)".to_owned(), |p| p.to_string())
            )));
        }
        Inherited::Nothing => return bind_all(opts),
        Inherited::ForeignPid { listen_pid, own_pid } => {
            tracing::warn!(
                "LISTEN_FDS was meant for process {} but this is {own_pid}: ignoring the passed fds and binding --listen",
                listen_pid.map_or("(LISTEN_PID unset)".to_owned(), |p| p.to_string())
            );
            return bind_all(opts);
        }
    };
    let (passed, stored) = split_stored(passed);
    let (taken_over, stale) = take_over(stored);
    let mut acquired = Acquired { listeners: Vec::new(), balance: None, metrics: None, taken_over, stale };
    let mut names = Vec::new();
    for fd in passed {
        let name = fd.name.clone().unwrap_or_default();
        if name == BALANCE_FD_NAME {
            acquired.balance = Some(fd.into_file()?);
        } else if name == METRICS_FD_NAME {
            acquired.metrics = Some(fd.into_file()?);
        } else if opts.listener_names.is_empty() || opts.listener_names.contains(&name) {
            acquired.listeners.push(fd.into_listener()?);
        } else {
            names.push(name);
        }
    }
    if acquired.listeners.is_empty() {
        return Err(ListenError::NoneNamed { wanted: opts.listener_names.clone(), passed: names });
    }
    if let (None, Some(path)) = (&acquired.balance, &opts.balance_file) {
        match File::options().read(true).write(true).create(true).truncate(false).open(path) {
            Ok(file) => acquired.balance = Some(file),
            Err(e) => tracing::warn!(
                "cannot open the balance file {} ({e}): serving without balancing; check the unit's RuntimeDirectory= or unset SDCLUSTER_BALANCE_FILE",
                path.display()
            ),
        }
    }
    if acquired.metrics.is_none() {
        acquired.metrics = metrics_file(opts);
    }
    Ok(acquired)
}

/// The file `--metrics-file` names, created if missing; `None` (and a warning) if it can't be.
fn metrics_file(opts: &Options) -> Option<File> {
    let path = opts.metrics_file.as_ref()?;
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| {
            tracing::warn!(
                "cannot open the metrics file {} ({e}): /metrics shows this worker only; check the unit's RuntimeDirectory= or unset {METRICS_FILE_ENV}",
                path.display()
            );
        })
        .ok()
}

fn bind_all(opts: &Options) -> Result<Acquired, ListenError> {
    let mut listeners = Vec::new();
    for addr in &opts.listen {
        listeners.push(addr.parse::<ListenAddress>()?.bind(opts.reuseport)?);
    }
    Ok(Acquired { listeners, balance: None, metrics: metrics_file(opts), taken_over: Vec::new(), stale: Vec::new() })
}
