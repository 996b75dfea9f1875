//! The supervisor's end of `sd_notify(3)`: a datagram socket a worker reports to.

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
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Self { socket, path, received: Vec::new() }
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

    /// Receives one datagram unless `deadline` passes first; false when it did.
    fn receive_one(&mut self, deadline: Instant) -> bool {
        let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
            return false;
        };
        self.socket.set_read_timeout(Some(left)).expect("set a read timeout");
        let mut buf = [0; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.received.push(Notification { text, at: Instant::now() });
                true
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
            Err(e) => panic!("receiving on {}: {e}", self.path.display()),
        }
    }
}
