//! What the worker tells its supervisor (`sd_notify(3)`): readiness, status, liveness, stopping.
//!
//! All of it is a no-op without `NOTIFY_SOCKET`, so the same binary runs standalone.
//!
//! No send ever blocks the event loop: a supervisor that does not read its socket (stopped,
//! wedged, or just behind: a fresh network namespace queues 10 datagrams,
//! `net.unix.max_dgram_qlen`) would otherwise stop every worker's only thread in `sendto`.
//! So every datagram goes out with `MSG_DONTWAIT`: a `STATUS=` that finds the queue full is
//! dropped (the next one a second later says it again), a `WATCHDOG=1` waits for the next
//! tick, and `READY=1` / `STOPPING=1` are retried, asleep on the runtime's timer, for a while.
//! The fd store's messages (`handover.rs`) wait the same way.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, UnixAddr, sendmsg};

use crate::stats::Stats;

/// How long `READY=1` and `STOPPING=1` are retried while the supervisor's queue is full.
const STATE_PATIENCE: Duration = Duration::from_secs(2);
/// How often they are retried meanwhile.
const RETRY: Duration = Duration::from_millis(5);

/// Sends notifications; cheap to call when no supervisor listens.
#[derive(Clone)]
pub(crate) struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    socket: UnixDatagram,
    addr: UnixAddr,
    /// Datagrams dropped because the supervisor's queue was full.
    dropped: AtomicU64,
}

/// Why a datagram did not go out.
enum Unsent {
    /// The supervisor's queue is full: try again later.
    Full,
    /// Anything else: retrying will not help.
    Failed(Errno),
}

impl Notifier {
    pub(crate) fn from_env() -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Self { inner: None } };
        let inner = notify_addr(path.as_encoded_bytes())
            .ok_or_else(|| format!("NOTIFY_SOCKET={path:?} is neither an absolute path nor @abstract"))
            .and_then(|addr| {
                let socket = UnixDatagram::unbound().map_err(|e| e.to_string())?;
                socket.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(Inner { socket, addr, dropped: AtomicU64::new(0) })
            });
        match inner {
            Ok(inner) => Self { inner: Some(Arc::new(inner)) },
            Err(e) => {
                tracing::warn!("cannot notify the supervisor ({e}): check NOTIFY_SOCKET");
                Self { inner: None }
            }
        }
    }

    /// One datagram, without waiting.
    fn try_send(inner: &Inner, message: &str) -> Result<(), Unsent> {
        let iov = [IoSlice::new(message.as_bytes())];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match sendmsg(inner.socket.as_raw_fd(), &iov, &[], flags, Some(&inner.addr)) {
            Ok(_) => Ok(()),
            // A Unix datagram socket says EAGAIN when the receiver's queue is full.
            Err(Errno::EAGAIN | Errno::ENOBUFS) => Err(Unsent::Full),
            Err(e) => Err(Unsent::Failed(e)),
        }
    }

    fn warn(e: Errno) {
        tracing::warn!("could not notify the supervisor ({e}); check NOTIFY_SOCKET and the unit's NotifyAccess=");
    }

    /// Sends `message` now, or drops it (counted, logged at debug) if the queue is full.
    fn send_or_drop(&self, message: &str) {
        let Some(inner) = &self.inner else { return };
        match Self::try_send(inner, message) {
            Ok(()) => {}
            Err(Unsent::Full) => {
                let dropped = inner.dropped.fetch_add(1, Relaxed) + 1;
                tracing::debug!(dropped, "the supervisor's notify queue is full: dropped {message:?}");
            }
            Err(Unsent::Failed(e)) => Self::warn(e),
        }
    }

    /// Sends `message`, retrying asleep on the runtime's timer while the queue is full, for
    /// up to [`STATE_PATIENCE`].
    async fn send_patiently(&self, message: &str) {
        let Some(inner) = &self.inner else { return };
        let started = Instant::now();
        loop {
            match Self::try_send(inner, message) {
                Ok(()) => return,
                Err(Unsent::Full) if started.elapsed() < STATE_PATIENCE => tokio::time::sleep(RETRY).await,
                Err(Unsent::Full) => {
                    return tracing::warn!(
                        "the supervisor has not read its notify socket for {STATE_PATIENCE:?}: {:?} was not sent",
                        message.lines().next().unwrap_or_default()
                    );
                }
                Err(Unsent::Failed(e)) => return Self::warn(e),
            }
        }
    }

    /// `READY=1`: the listeners are being served.
    pub(crate) async fn ready(&self, status: &str) {
        self.send_patiently(&format!("READY=1\nSTATUS={status}\n")).await;
    }

    pub(crate) fn status(&self, status: &str) {
        self.send_or_drop(&format!("STATUS={status}\n"));
    }

    pub(crate) async fn stopping(&self, status: &str) {
        self.send_patiently(&format!("STOPPING=1\nSTATUS={status}\n")).await;
    }

    /// Keeps `STATUS=` current, once a second, only when it changed.
    pub(crate) async fn keep_status_current(self, stats: Arc<Stats>, serving: String) {
        if self.inner.is_none() {
            return;
        }
        let mut last = String::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = status_line(&serving, &stats);
            if now != last {
                self.status(&now);
                last = now;
            }
        }
    }

    /// Sends `WATCHDOG=1` at half the supervisor's `WATCHDOG_USEC`. It runs as a task on the
    /// worker's own runtime, so a runtime that is wedged (a handler blocking its thread) stops
    /// the pings and the supervisor kills and restarts the worker. A ping that finds the
    /// supervisor's queue full is dropped: the next tick sends the next one.
    pub(crate) async fn keep_watchdog_fed(self) {
        let mut usec = 0;
        if self.inner.is_none() || !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.send_or_drop("WATCHDOG=1\n");
        }
    }
}

/// `NOTIFY_SOCKET` as an address: a path, or `@name` for the abstract namespace.
pub(crate) fn notify_addr(value: &[u8]) -> Option<UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.first()? {
        b'/' => UnixAddr::new(std::ffi::OsStr::from_bytes(value)).ok(),
        b'@' => UnixAddr::new_abstract(&value[1..]).ok(),
        _ => None,
    }
}

/// The one-line summary shown by `systemctl status` and `sdcluster status`.
pub(crate) fn status_line(serving: &str, stats: &Stats) -> String {
    format!("serving {serving}: {} requests, {} open connections", stats.requests(), stats.open())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notify socket nobody reads, its queue filled up: no send waits for it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_never_blocks_the_loop() {
        let path = std::env::temp_dir().join(format!("sdcluster-notify-full-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        while filler.send_to(b"X=1", &path).is_ok() {}
        let inner = Inner {
            socket: UnixDatagram::unbound().unwrap(),
            addr: notify_addr(path.as_os_str().as_encoded_bytes()).unwrap(),
            dropped: AtomicU64::new(0),
        };
        inner.socket.set_nonblocking(true).unwrap();
        let notifier = Notifier { inner: Some(Arc::new(inner)) };
        let started = Instant::now();
        notifier.status("dropped");
        notifier.send_or_drop("WATCHDOG=1\n");
        assert_eq!(notifier.inner.as_ref().unwrap().dropped.load(Relaxed), 2);
        // READY=1 waits, asleep: once the supervisor reads, it goes out.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            receiver.set_nonblocking(true).unwrap();
            let mut buf = [0; 64];
            while receiver.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"X=1") {}
            receiver
        });
        notifier.ready("up").await;
        assert!(started.elapsed() < STATE_PATIENCE, "{:?}", started.elapsed());
        let receiver = reader.await.unwrap();
        let mut buf = [0; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up\n");
        let _ = std::fs::remove_file(&path);
    }
}
