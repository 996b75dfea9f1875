//! Helpers for the tests that run the real binaries: finding (and building) them, starting
//! them the ways a supervisor does, talking HTTP and `sd_notify` with them, and cleaning up.
//!
//! Everything here uses real processes, sockets and fds; nothing is mocked. Tests run in
//! parallel, so each one gets its own folder ([`TestDir`]), ports and sockets.

mod binary;
pub mod cluster;
pub mod deb;
pub mod http;
pub mod load;
pub mod net;
mod notify;
mod process;
pub mod sdbox;
mod tempdir;

use std::time::{Duration, Instant};

pub use binary::{build_binary, sdcluster_binary, worker_binary, worker_example};
pub use notify::{Notification, NotifySocket};
pub use process::{ChildGuard, StderrLog, Worker, WorkerCommand, signal_pid};
pub use tempdir::TestDir;

/// Calls `probe` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
