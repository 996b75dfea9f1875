//! Receiving file descriptors the systemd way (`sd_listen_fds(3)`).
//!
//! [`parse`] is pure so every edge case of the environment protocol is unit-tested; [`take`]
//! reads and clears the real environment, and [`PassedFd::into_listener`] checks that an fd is
//! what a server can accept on before anything is served from it.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};

/// The first passed fd; the protocol fixes it so that no fd numbers need to be sent.
pub const LISTEN_FDS_START: RawFd = 3;
/// The name [`crate::balance`] tables travel under in `LISTEN_FDNAMES`.
pub const BALANCE_FD_NAME: &str = "sdcluster-balance";
/// More fds than this is a corrupted environment, not a configuration.
const MAX_FDS: usize = 4096;

/// What the environment says was handed to this process.
#[derive(Debug, PartialEq, Eq)]
pub enum Inherited {
    /// No `LISTEN_FDS` (or `LISTEN_FDS=0`): the caller binds its own socket.
    Nothing,
    /// The variables name another process (`LISTEN_PID` is not ours, or missing): a parent
    /// leaked them, so the fds are not ours to use. Like `sd_listen_fds`, ignore them.
    ForeignPid {
        /// `LISTEN_PID` as given, `None` when it was missing.
        listen_pid: Option<u32>,
        /// This process.
        own_pid: u32,
    },
    /// Fds 3.. belong to this process, in order.
    Fds(Vec<PassedFd>),
}

/// One passed fd, with its `LISTEN_FDNAMES` entry when names were sent.
#[derive(Debug, PartialEq, Eq)]
pub struct PassedFd {
    /// The fd number (3, 4, ...).
    pub fd: RawFd,
    /// `FileDescriptorName=` of the socket unit, or `None` when no names were passed.
    pub name: Option<String>,
}

/// The environment does not follow the protocol; serving from a guess would be worse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenFdsError {
    /// `LISTEN_FDS` is not a count.
    #[error(
        "LISTEN_FDS={0:?} is not a number of file descriptors (expected 0..={MAX_FDS}); fix the supervisor that started this process or unset LISTEN_FDS"
    )]
    BadCount(String),
    /// `LISTEN_PID` is not a pid.
    #[error("LISTEN_PID={0:?} is not a process id; fix the supervisor that started this process or unset LISTEN_PID")]
    BadPid(String),
    /// `LISTEN_FDNAMES` does not name every fd.
    #[error(
        "LISTEN_FDNAMES={names:?} has {got} names but LISTEN_FDS={expected}; every passed fd needs one name (see sd_listen_fds(3))"
    )]
    NameCount {
        /// The variable as given.
        names: String,
        /// How many names it holds.
        got: usize,
        /// How many fds were passed.
        expected: usize,
    },
    /// A passed fd is not something a server can accept connections on.
    #[error("inherited fd {fd}{} is {what}, not a listening stream socket (TCP or Unix); pass a ListenStream= socket, or start without LISTEN_FDS to bind --listen", fmt_name(.name))]
    NotAListener {
        /// The fd number.
        fd: RawFd,
        /// Its name, if names were passed.
        name: Option<String>,
        /// What it is instead ("a regular file", "not open", ...).
        what: String,
    },
    /// A passed fd named as a handed-over connection is not a connected stream socket.
    #[error("inherited fd {fd}{} is {what}, not a connected stream socket; the previous process's fd store entry is ignored", fmt_name(.name))]
    NotAConnection {
        /// The fd number.
        fd: RawFd,
        /// Its name.
        name: Option<String>,
        /// What it is instead.
        what: String,
    },
}

fn fmt_name(name: &Option<String>) -> String {
    name.as_deref().map(|n| format!(" (named {n:?})")).unwrap_or_default()
}

/// Interprets the three variables as `sd_listen_fds_with_names(3)` does, for process `own_pid`.
pub fn parse(
    listen_fds: Option<&str>,
    listen_pid: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Inherited, ListenFdsError> {
    let Some(count) = listen_fds else {
        return Ok(Inherited::Nothing);
    };
    let count: usize = match count.trim().parse() {
        Ok(n) if n <= MAX_FDS => n,
        _ => return Err(ListenFdsError::BadCount(count.to_owned())),
    };
    let listen_pid = match listen_pid {
        None => None,
        Some(p) => match p.trim().parse::<u32>() {
            Ok(pid) if pid > 0 => Some(pid),
            _ => return Err(ListenFdsError::BadPid(p.to_owned())),
        },
    };
    if listen_pid != Some(own_pid) {
        return Ok(Inherited::ForeignPid { listen_pid, own_pid });
    }
    if count == 0 {
        return Ok(Inherited::Nothing);
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; count],
        Some(all) => {
            let names: Vec<&str> = all.split(':').collect();
            if names.len() != count {
                return Err(ListenFdsError::NameCount { names: all.to_owned(), got: names.len(), expected: count });
            }
            names.into_iter().map(|n| Some(n.to_owned())).collect()
        }
    };
    Ok(Inherited::Fds(
        names.into_iter().enumerate().map(|(i, name)| PassedFd { fd: LISTEN_FDS_START + i as RawFd, name }).collect(),
    ))
}

/// Reads the protocol variables of this process and removes them so that children don't
/// take fds meant for us; passed fds are marked close-on-exec for the same reason.
///
/// # Safety
/// Changes the environment: call it before any other thread exists (before building a
/// multi-threaded runtime).
pub unsafe fn take() -> Result<Inherited, ListenFdsError> {
    let var = |k| std::env::var(k).ok();
    let inherited = parse(
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    for key in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees that no other thread reads the environment.
        unsafe { std::env::remove_var(key) };
    }
    if let Ok(Inherited::Fds(fds)) = &inherited {
        for passed in fds {
            if let Some(fd) = passed.borrow() {
                // An fd that is not open is reported by `into_listener`.
                let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
            }
        }
    }
    inherited
}

/// A listening socket a server can accept on, in non-blocking mode.
#[derive(Debug)]
pub enum Listener {
    /// `AF_INET` or `AF_INET6`.
    Tcp(std::net::TcpListener),
    /// `AF_UNIX`.
    Unix(UnixListener),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl fmt::Display for Listener {
    /// The local address, as an operator would type it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => write!(f, "{a}"),
                Err(_) => f.write_str("tcp:?"),
            },
            Listener::Unix(l) => {
                match l.local_addr().ok().as_ref().and_then(|a| a.as_pathname().map(|p| p.display().to_string())) {
                    Some(p) => write!(f, "unix:{p}"),
                    None => f.write_str("unix:(unnamed)"),
                }
            }
        }
    }
}

impl PassedFd {
    /// The fd, if it is open in this process.
    fn borrow(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: only used for fcntl/fstat; an fd that is not open yields EBADF, not UB.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        fcntl(fd, FcntlArg::F_GETFD).ok().map(|_| fd)
    }

    /// Takes ownership of the fd as a balance table file (any regular file or memfd).
    pub fn into_file(self) -> Result<File, ListenFdsError> {
        let what = self.describe();
        if what != "a regular file" {
            return Err(ListenFdsError::NotAListener { fd: self.fd, name: self.name, what });
        }
        // SAFETY: the protocol hands this fd to us alone; it is open and a regular file.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(self.fd) }))
    }

    /// Takes ownership of the fd as a client connection handed over by a previous process
    /// (see [`crate::handover`]): a connected stream socket, not a listener.
    pub fn into_connection(self) -> Result<OwnedFd, ListenFdsError> {
        let not = |what: String| ListenFdsError::NotAConnection { fd: self.fd, name: self.name.clone(), what };
        let Some(fd) = self.borrow() else {
            return Err(not("not open".into()));
        };
        let is_socket = fstat(fd).is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode).contains(SFlag::S_IFSOCK));
        if !is_socket {
            return Err(not(self.describe()));
        }
        match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::Stream) => {}
            Ok(kind) => return Err(not(format!("a {kind:?} socket"))),
            Err(e) => return Err(not(format!("a socket of unknown type ({e})"))),
        }
        if getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
            return Err(not("a listening socket".into()));
        }
        // SAFETY: the protocol hands this fd to us alone and it is an open socket.
        Ok(unsafe { OwnedFd::from_raw_fd(self.fd) })
    }

    /// Takes ownership of the fd as a listener, refusing anything a server can't accept on.
    pub fn into_listener(self) -> Result<Listener, ListenFdsError> {
        let not = |what: String| ListenFdsError::NotAListener { fd: self.fd, name: self.name.clone(), what };
        let Some(fd) = self.borrow() else {
            return Err(not("not open".into()));
        };
        if !SFlag::from_bits_truncate(fstat(fd).map_err(|e| not(format!("unreadable ({e})")))?.st_mode)
            .contains(SFlag::S_IFSOCK)
        {
            return Err(not(self.describe()));
        }
        let kind = getsockopt(&fd, sockopt::SockType).map_err(|e| not(format!("a socket of unknown type ({e})")))?;
        if kind != SockType::Stream {
            return Err(not(format!("a {kind:?} socket")));
        }
        if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
            return Err(not("a stream socket that is not listening".into()));
        }
        let family = getsockname::<SockaddrStorage>(self.fd).ok().and_then(|a| a.family());
        // SAFETY: the protocol hands this fd to us alone and it is an open socket.
        let owned = unsafe { OwnedFd::from_raw_fd(self.fd) };
        let listener = match family {
            Some(AddressFamily::Inet | AddressFamily::Inet6) => Listener::Tcp(owned.into()),
            Some(AddressFamily::Unix) => Listener::Unix(owned.into()),
            other => {
                std::mem::forget(owned);
                return Err(not(format!("a listening socket of family {other:?}")));
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
        .map_err(|e| ListenFdsError::NotAListener {
            fd: self.fd,
            name: self.name,
            what: format!("a listener that refuses non-blocking mode ({e})"),
        })?;
        Ok(listener)
    }

    /// Plain words for what the fd is, for error messages.
    fn describe(&self) -> String {
        let Some(fd) = self.borrow() else {
            return "not open".into();
        };
        let Ok(st) = fstat(fd) else {
            return "unreadable".into();
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        match kind {
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFCHR => "a character device",
            SFlag::S_IFBLK => "a block device",
            SFlag::S_IFIFO => "a pipe or FIFO",
            SFlag::S_IFSOCK => "a socket",
            SFlag::S_IFLNK => "a symlink",
            _ => "of unknown type",
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(names: &[Option<&str>]) -> Inherited {
        Inherited::Fds(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| PassedFd { fd: 3 + i as RawFd, name: n.map(str::to_owned) })
                .collect(),
        )
    }

    #[test]
    fn nothing_passed() {
        assert_eq!(parse(None, None, None, 7), Ok(Inherited::Nothing));
        assert_eq!(parse(None, Some("7"), Some("http"), 7), Ok(Inherited::Nothing));
    }

    #[test]
    fn count_zero_is_nothing() {
        assert_eq!(parse(Some("0"), Some("7"), None, 7), Ok(Inherited::Nothing));
    }

    #[test]
    fn one_fd_for_us() {
        assert_eq!(parse(Some("1"), Some("7"), None, 7), Ok(fds(&[None])));
    }

    #[test]
    fn several_fds_with_names() {
        assert_eq!(
            parse(Some("3"), Some("7"), Some("http:https:sdcluster-balance"), 7),
            Ok(fds(&[Some("http"), Some("https"), Some("sdcluster-balance")]))
        );
    }

    #[test]
    fn empty_names_are_names() {
        assert_eq!(parse(Some("2"), Some("7"), Some(":x"), 7), Ok(fds(&[Some(""), Some("x")])));
    }

    #[test]
    fn wrong_pid_is_ignored_not_used() {
        assert_eq!(parse(Some("1"), Some("8"), None, 7), Ok(Inherited::ForeignPid { listen_pid: Some(8), own_pid: 7 }));
    }

    #[test]
    fn missing_pid_is_ignored_not_used() {
        assert_eq!(parse(Some("2"), None, None, 7), Ok(Inherited::ForeignPid { listen_pid: None, own_pid: 7 }));
    }

    #[test]
    fn foreign_pid_wins_over_bad_names() {
        // Variables meant for someone else are not ours to judge.
        assert!(matches!(parse(Some("2"), Some("8"), Some("a"), 7), Ok(Inherited::ForeignPid { .. })));
    }

    #[test]
    fn bad_numbers_are_errors() {
        for bad in ["", "x", "-1", "1.5", "99999999999999999999", "5000"] {
            assert_eq!(parse(Some(bad), Some("7"), None, 7), Err(ListenFdsError::BadCount(bad.into())), "{bad:?}");
        }
        for bad in ["", "0", "abc", "-7", "7x"] {
            assert_eq!(parse(Some("1"), Some(bad), None, 7), Err(ListenFdsError::BadPid(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn whitespace_around_numbers_is_tolerated() {
        assert_eq!(parse(Some(" 1 "), Some("7\n"), None, 7), Ok(fds(&[None])));
    }

    #[test]
    fn name_count_must_match() {
        let err = parse(Some("2"), Some("7"), Some("http"), 7).unwrap_err();
        assert_eq!(err, ListenFdsError::NameCount { names: "http".into(), got: 1, expected: 2 });
        assert!(err.to_string().contains("has 1 names but LISTEN_FDS=2"));
    }

    #[test]
    fn a_file_is_not_a_listener() {
        use std::os::fd::IntoRawFd;
        let fd = File::open("/proc/self/status").unwrap().into_raw_fd();
        let err = PassedFd { fd, name: Some("http".into()) }.into_listener().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "inherited fd {fd} (named \"http\") is a regular file, not a listening stream socket (TCP or Unix); pass a ListenStream= socket, or start without LISTEN_FDS to bind --listen"
            )
        );
        // SAFETY: the fd is still ours; the failed conversion did not take it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn a_connected_socket_is_not_a_listener() {
        use std::os::fd::IntoRawFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.into_raw_fd();
        let err = PassedFd { fd, name: None }.into_listener().unwrap_err();
        assert!(err.to_string().contains("a stream socket that is not listening"), "{err}");
        // SAFETY: `fd` came from `into_raw_fd` above and is owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn a_closed_fd_is_reported() {
        let err = PassedFd { fd: 987, name: None }.into_listener().unwrap_err();
        assert!(err.to_string().starts_with("inherited fd 987 is not open"), "{err}");
    }

    #[test]
    fn listeners_of_both_families_are_taken() {
        use std::os::fd::IntoRawFd;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let l = PassedFd { fd: tcp.into_raw_fd(), name: None }.into_listener().unwrap();
        assert!(matches!(l, Listener::Tcp(_)));
        assert_eq!(l.to_string(), addr.to_string());

        let dir = std::env::temp_dir().join(format!("sdcluster-proto-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let unix = UnixListener::bind(&dir).unwrap();
        let l = PassedFd { fd: unix.into_raw_fd(), name: None }.into_listener().unwrap();
        assert_eq!(l.to_string(), format!("unix:{}", dir.display()));
        std::fs::remove_file(&dir).unwrap();
    }
}
