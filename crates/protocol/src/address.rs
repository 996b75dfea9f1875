//! Listen addresses as operators write them, and binding them.
//!
//! One parser serves the worker's `--listen`, `sdcluster run` and the unit generator, so an
//! address that works in one place works in all of them.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;

use socket2::{Domain, Socket, Type};

use crate::Listener;

/// Kernel backlog for sockets bound here (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 4096;

/// Where to listen: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// `HOST:PORT`, `[V6]:PORT`, `localhost:PORT` or `*:PORT` (all IPv4 addresses).
    Tcp(SocketAddr),
    /// `unix:/ABSOLUTE/PATH`.
    Unix(PathBuf),
}

/// An address that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a listen address ({reason}); use HOST:PORT, [IPV6]:PORT, *:PORT or unix:/PATH")]
pub struct AddressError {
    /// As given.
    pub given: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Why an address could not be bound; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something else holds the address.
    #[error(
        "{0} is already in use by another process: stop that process or choose another address (`ss -ltnp` shows who holds it)"
    )]
    InUse(ListenAddress),
    /// The port needs privileges this process lacks.
    #[error(
        "binding {0} is not permitted ({1}); ports below 1024 need CAP_NET_BIND_SERVICE: let systemd bind it with a socket unit, or choose a port ≥ 1024"
    )]
    Denied(ListenAddress, io::Error),
    /// Something other than a socket is at a Unix socket's path: it is left alone.
    #[error("{} exists and is not a socket; remove it or choose another path", .0.display())]
    NotASocket(PathBuf),
    /// Any other failure.
    #[error("cannot listen on {0}: {1}")]
    Other(ListenAddress, io::Error),
}

impl FromStr for ListenAddress {
    type Err = AddressError;

    fn from_str(given: &str) -> Result<Self, AddressError> {
        let err = |reason| AddressError { given: given.to_owned(), reason };
        if let Some(path) = given.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            return if path.is_absolute() {
                Ok(Self::Unix(path))
            } else {
                Err(err("a Unix socket path must be absolute"))
            };
        }
        if let Ok(addr) = given.parse::<SocketAddr>() {
            return Ok(Self::Tcp(addr));
        }
        let (host, port) = given.rsplit_once(':').ok_or_else(|| err("no :PORT"))?;
        let port: u16 = port.parse().map_err(|_| err("the port must be a number from 0 to 65535"))?;
        let ip = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            "*" | "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => return Err(err("the host must be an IP address, localhost or *")),
        };
        Ok(Self::Tcp(SocketAddr::new(ip, port)))
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddress {
    /// Binds and listens, non-blocking and close-on-exec; with `reuseport`, several
    /// processes may each bind the same TCP address (`SO_REUSEPORT`).
    pub fn bind(&self, reuseport: bool) -> Result<Listener, BindError> {
        let fail = |e: io::Error| match e.kind() {
            io::ErrorKind::AddrInUse => BindError::InUse(self.clone()),
            io::ErrorKind::PermissionDenied => BindError::Denied(self.clone(), e),
            _ => BindError::Other(self.clone(), e),
        };
        match self {
            Self::Tcp(addr) => {
                let socket = Socket::new(Domain::for_address(*addr), Type::STREAM.nonblocking().cloexec(), None)
                    .map_err(fail)?;
                socket.set_reuse_address(true).map_err(fail)?;
                if addr.is_ipv6() {
                    // What is listed is what is served: `[::]:80` is IPv6 only, and `*:80`
                    // beside it can bind (units say BindIPv6Only=ipv6-only likewise).
                    socket.set_only_v6(true).map_err(fail)?;
                }
                if reuseport {
                    socket.set_reuse_port(true).map_err(fail)?;
                }
                socket.bind(&(*addr).into()).map_err(fail)?;
                socket.listen(BACKLOG).map_err(fail)?;
                Ok(Listener::Tcp(socket.into()))
            }
            Self::Unix(path) => {
                remove_stale_socket(path).map_err(|e| match e {
                    Stale::NotASocket => BindError::NotASocket(path.clone()),
                    Stale::Io(e) => fail(e),
                })?;
                let listener = UnixListener::bind(path).map_err(fail)?;
                listener.set_nonblocking(true).map_err(fail)?;
                Ok(Listener::Unix(listener))
            }
        }
    }
}

/// Why the path of a Unix socket to bind cannot be cleared.
enum Stale {
    NotASocket,
    Io(io::Error),
}

/// Clears `path` for a new socket when it holds a socket file nobody answers on (left over
/// from a crash). Nothing else is ever deleted: a live socket stays (the bind then says it is
/// in use), and anything that is not a socket (`lstat`: a symbolic link is not followed) is
/// an error.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), Stale> {
    use std::os::unix::fs::FileTypeExt;
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Stale::Io(e)),
    };
    if !kind.is_socket() {
        return Err(Stale::NotASocket);
    }
    if UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused) {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Stale::Io(e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ListenAddress, AddressError> {
        s.parse()
    }

    #[test]
    fn forms_operators_write() {
        assert_eq!(parse("127.0.0.1:80").unwrap().to_string(), "127.0.0.1:80");
        assert_eq!(parse("[::1]:8080").unwrap().to_string(), "[::1]:8080");
        assert_eq!(parse("localhost:8080").unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(parse("*:8080").unwrap().to_string(), "0.0.0.0:8080");
        assert_eq!(parse("unix:/run/app.sock").unwrap(), ListenAddress::Unix("/run/app.sock".into()));
    }

    #[test]
    fn bad_addresses_say_why() {
        for (bad, why) in [
            ("8080", "no :PORT"),
            ("127.0.0.1:99999", "the port must be a number from 0 to 65535"),
            ("example.com:80", "the host must be an IP address, localhost or *"),
            ("unix:relative.sock", "a Unix socket path must be absolute"),
        ] {
            assert_eq!(parse(bad).unwrap_err().reason, why, "{bad}");
        }
    }

    #[test]
    fn a_port_in_use_says_so() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = parse(&taken.local_addr().unwrap().to_string()).unwrap();
        let err = addr.bind(false).unwrap_err();
        assert!(matches!(err, BindError::InUse(_)), "{err}");
        assert!(err.to_string().starts_with(&format!("{addr} is already in use")));
    }

    #[test]
    fn ipv4_and_ipv6_wildcards_bind_side_by_side() {
        let v4 = parse("0.0.0.0:0").unwrap().bind(false).unwrap();
        let port = v4.to_string().rsplit_once(':').unwrap().1.to_owned();
        let v6 = parse(&format!("[::]:{port}")).unwrap().bind(false);
        // Hosts without IPv6 refuse the address itself; anything else must bind.
        if let Err(BindError::Other(_, e)) = &v6 {
            assert_eq!(e.raw_os_error(), Some(nix::errno::Errno::EAFNOSUPPORT as i32), "{e}");
            return;
        }
        v6.unwrap();
    }

    #[test]
    fn reuseport_workers_share_a_port() {
        let one = parse("127.0.0.1:0").unwrap().bind(true).unwrap();
        let two = parse(&one.to_string()).unwrap().bind(true).unwrap();
        assert_eq!(one.to_string(), two.to_string());
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_but_a_live_one_is_not() {
        let path = std::env::temp_dir().join(format!("sdcluster-bind-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let addr = ListenAddress::Unix(path.clone());
        drop(addr.bind(false).unwrap()); // leaves the file behind, like a crash
        let live = addr.bind(false).unwrap();
        assert!(matches!(addr.bind(false), Err(BindError::InUse(_))));
        drop(live);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn what_is_not_a_socket_is_never_deleted() {
        let dir = std::env::temp_dir().join(format!("sdcluster-bind-not-socket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, "precious").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        for path in [&file, &link, &sub] {
            let err = ListenAddress::Unix(path.clone()).bind(false).unwrap_err();
            assert!(matches!(err, BindError::NotASocket(_)), "{}: {err}", path.display());
            assert_eq!(
                err.to_string(),
                format!("{} exists and is not a socket; remove it or choose another path", path.display())
            );
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(sub.is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
