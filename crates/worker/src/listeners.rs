//! Where the sockets come from: passed by the supervisor, or bound here when nothing was.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use sdcluster_protocol::listen_fds::{BALANCE_FD_NAME, Inherited};
use sdcluster_protocol::{ListenFdsError, Listener};
use socket2::{Domain, Socket, Type};

use crate::options::Options;

/// Kernel backlog for sockets we bind ourselves (capped by `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// The sockets to serve, plus the balance table file when the supervisor shares one.
#[derive(Debug)]
pub struct Acquired {
    /// Listening sockets, non-blocking.
    pub listeners: Vec<Listener>,
    /// The shared table workers on one queue balance through (see `sdcluster_protocol::balance`).
    pub balance: Option<File>,
    /// Whether the sockets were passed (true) or bound by this process.
    pub inherited: bool,
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
    /// `--listen` is not an address.
    #[error("--listen {addr:?} is not an address ({reason}); use HOST:PORT, [IPV6]:PORT or unix:/PATH")]
    BadAddress {
        /// As given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something else holds the address.
    #[error(
        "{addr} is already in use by another process: stop that process, choose another --listen, or (for several workers of one app) pass the socket from systemd or `sdcluster run`"
    )]
    InUse {
        /// The address.
        addr: String,
    },
    /// The port needs privileges this process lacks.
    #[error(
        "binding {addr} is not permitted ({source}); ports below 1024 need CAP_NET_BIND_SERVICE: let systemd bind it with a socket unit, or choose a port ≥ 1024"
    )]
    Denied {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Any other failure to bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Turns what the supervisor passed into listeners, or binds `--listen` when it passed nothing.
pub fn acquire(inherited: Inherited, opts: &Options) -> Result<Acquired, ListenError> {
    let passed = match inherited {
        Inherited::Fds(fds) => fds,
        Inherited::Nothing => return bind_all(opts),
        Inherited::ForeignPid { listen_pid, own_pid } => {
            tracing::warn!(
                "LISTEN_FDS was meant for process {} but this is {own_pid}: ignoring the passed fds and binding --listen",
                listen_pid.map_or("(LISTEN_PID unset)".to_owned(), |p| p.to_string())
            );
            return bind_all(opts);
        }
    };
    let mut acquired = Acquired { listeners: Vec::new(), balance: None, inherited: true };
    let mut names = Vec::new();
    for fd in passed {
        let name = fd.name.clone().unwrap_or_default();
        if name == BALANCE_FD_NAME {
            acquired.balance = Some(fd.into_file()?);
        } else if opts.listener_names.is_empty() || opts.listener_names.contains(&name) {
            acquired.listeners.push(fd.into_listener()?);
        } else {
            names.push(name);
        }
    }
    if acquired.listeners.is_empty() {
        return Err(ListenError::NoneNamed { wanted: opts.listener_names.clone(), passed: names });
    }
    Ok(acquired)
}

fn bind_all(opts: &Options) -> Result<Acquired, ListenError> {
    let listeners = opts.listen.iter().map(|addr| bind(addr, opts.reuseport)).collect::<Result<_, _>>()?;
    Ok(Acquired { listeners, balance: None, inherited: false })
}

/// Binds one `--listen` address.
pub fn bind(addr: &str, reuseport: bool) -> Result<Listener, ListenError> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return bind_unix(addr, Path::new(path));
    }
    let resolved: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| ListenError::BadAddress { addr: addr.into(), reason: e.to_string() })?
        .next()
        .ok_or_else(|| ListenError::BadAddress { addr: addr.into(), reason: "it resolves to nothing".into() })?;
    let fail = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { addr: resolved.to_string() },
        io::ErrorKind::PermissionDenied => ListenError::Denied { addr: resolved.to_string(), source },
        _ => ListenError::Bind { addr: resolved.to_string(), source },
    };
    let socket =
        Socket::new(Domain::for_address(resolved), Type::STREAM.nonblocking().cloexec(), None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    if reuseport {
        socket.set_reuse_port(true).map_err(fail)?;
    }
    socket.bind(&resolved.into()).map_err(fail)?;
    socket.listen(BACKLOG).map_err(fail)?;
    Ok(Listener::Tcp(socket.into()))
}

fn bind_unix(addr: &str, path: &Path) -> Result<Listener, ListenError> {
    if !path.is_absolute() {
        return Err(ListenError::BadAddress {
            addr: addr.into(),
            reason: "a Unix socket path must be absolute".into(),
        });
    }
    // A socket file nobody answers on is left over from a crash: replace it. Anything else
    // at that path is someone's, and stays.
    if path.exists() && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused) {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { addr: addr.into() },
        io::ErrorKind::PermissionDenied => ListenError::Denied { addr: addr.into(), source },
        _ => ListenError::Bind { addr: addr.into(), source },
    })?;
    listener.set_nonblocking(true).map_err(|source| ListenError::Bind { addr: addr.into(), source })?;
    Ok(Listener::Unix(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_says_so() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind(&addr, false).unwrap_err();
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("{addr} is already in use")));
    }

    #[test]
    fn reuseport_workers_share_a_port() {
        let one = bind("127.0.0.1:0", true).unwrap();
        let two = bind(&one.to_string(), true).unwrap();
        assert_eq!(one.to_string(), two.to_string());
    }

    #[test]
    fn bad_addresses_say_what_to_type() {
        for bad in ["8080", "localhost:http-alt", "unix:relative.sock", "127.0.0.1:99999"] {
            let err = bind(bad, false).unwrap_err();
            assert!(matches!(err, ListenError::BadAddress { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_but_a_live_one_is_not() {
        let path = std::env::temp_dir().join(format!("sdcluster-bind-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let addr = format!("unix:{}", path.display());
        drop(bind(&addr, false).unwrap()); // leaves the file behind, like a crash
        let live = bind(&addr, false).unwrap();
        assert!(matches!(bind(&addr, false), Err(ListenError::InUse { .. })));
        drop(live);
        std::fs::remove_file(&path).unwrap();
    }
}
