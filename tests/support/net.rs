//! Sockets and fds the tests create, hand to workers, and watch.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::wait_until;

/// A listening TCP socket on a free loopback port, as a supervisor would create it.
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")
}

/// A loopback port nobody listens on right now, for workers that bind `--listen` themselves.
pub fn free_port() -> u16 {
    listener().local_addr().expect("local address").port()
}

/// A loopback address with a free port (see [`free_port`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The local address of `listener`.
pub fn addr_of(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("local address")
}

/// A second fd for the same open file (socket, file, memfd), to pass to a child while the
/// test keeps its own.
pub fn dup(fd: impl AsFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().expect("dup an fd")
}

/// An anonymous shared-memory file, as `sdcluster run` creates for the balance table.
pub fn memfd(name: &std::ffi::CStr) -> OwnedFd {
    // SAFETY: a valid C string and flags; a non-negative result is a new fd we own.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Connects to `addr` until something accepts the handshake, for up to `timeout`; panics
/// otherwise. Under `systemd-socket-activate` this first connection also starts the worker.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> TcpStream {
    wait_until(timeout, || TcpStream::connect(addr).ok())
        .unwrap_or_else(|| panic!("nothing listens on {addr} after {timeout:?}"))
}

/// Takes a connection waiting in `listener`'s queue, if one arrives within `timeout`: proof
/// that no worker accepted it.
pub fn accept_waiting(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).expect("non-blocking listener");
    wait_until(timeout, || listener.accept().ok().map(|(stream, _)| stream))
}
