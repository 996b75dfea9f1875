//! The supervisor's end of `sd_notify(3)`: a datagram socket a worker reports to.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One datagram a worker sent, with when the test received it.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The datagram, e.g. `READY=1\nSTATUS=serving ...`.
    pub text: String,
    /// When it was received.
    pub at: Instant,
}

impl Notification {
    /// Whether one of its lines is exactly `line` (`READY=1`), or starts with it when it
    /// ends in `=` (`STATUS=`).
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| if line.ends_with('=') { l.starts_with(line) } else { l == line })
    }

    /// The value of `KEY=` in it, if present.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A `NOTIFY_SOCKET` bound in a test's folder that keeps every notification it received.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<Notification>,
    /// Fds sent with `FDSTORE=1`, by `FDNAME=`, as a supervisor's fd store keeps them.
    stored: Vec<(String, OwnedFd)>,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Self { socket, path, received: Vec::new(), stored: Vec::new() }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything received so far, oldest first.
    pub fn received(&self) -> &[Notification] {
        &self.received
    }

    /// Receives until `deadline`, keeping what arrives; returns how many arrived.
    pub fn receive_until(&mut self, deadline: Instant) -> usize {
        let before = self.received.len();
        while self.receive_one(deadline) {}
        self.received.len() - before
    }

    /// Returns the `n`th notification (1-based, counting from the first ever received) that
    /// has `line`, waiting up to `timeout` for it; panics with everything received otherwise.
    pub fn wait_for_nth(&mut self, line: &str, n: usize, timeout: Duration) -> Notification {
        self.wait_for_nth_where(n, timeout, line, |m| m.has(line))
    }

    /// The first notification with `line`, waiting up to `timeout`; see [`Self::wait_for_nth`].
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> Notification {
        self.wait_for_nth(line, 1, timeout)
    }

    /// The first notification whose `STATUS=` contains `text`, waiting up to `timeout`.
    pub fn wait_for_status(&mut self, text: &str, timeout: Duration) -> Notification {
        self.wait_for_nth_where(1, timeout, &format!("STATUS=...{text}..."), |m| {
            m.value("STATUS").is_some_and(|status| status.contains(text))
        })
    }

    fn wait_for_nth_where(
        &mut self,
        n: usize,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&Notification) -> bool,
    ) -> Notification {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.received.iter().filter(|m| matches(m)).nth(n - 1) {
                return found.clone();
            }
            if !self.receive_one(deadline) {
                panic!("no {n}th {what:?} within {timeout:?}; received: {:#?}", self.received);
            }
        }
    }

    /// Takes the fds stored so far with `FDSTORE=1`, each with its `FDNAME=`.
    pub fn take_stored(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.stored)
    }

    /// Receives one datagram unless `deadline` passes first; false when it did. Fds sent
    /// along are kept when the datagram says `FDSTORE=1`, and closed otherwise (which is
    /// how a `BARRIER=1` is answered).
    fn receive_one(&mut self, deadline: Instant) -> bool {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            return false;
        };
        self.socket.set_read_timeout(Some(left)).expect("set a read timeout");
        let mut buf = [0; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let flags = nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC;
        let received = nix::sys::socket::recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut cmsg), flags);
        let (n, fds) = match received {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().into_iter().flatten() {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds in this process for us.
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                (msg.bytes, fds)
            }
            Err(nix::errno::Errno::EAGAIN) => return false,
            Err(e) => panic!("receiving on {}: {e}", self.path.display()),
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let notification = Notification { text, at: Instant::now() };
        if notification.has("FDSTORE=1") {
            let name = notification.value("FDNAME").unwrap_or("stored").to_owned();
            self.stored.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        }
        self.received.push(notification);
        true
    }
}
