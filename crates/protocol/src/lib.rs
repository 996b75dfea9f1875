//! The contract between a supervisor and its workers, shared by every sdcluster crate.
//!
//! A supervisor (systemd, or `sdcluster run` where systemd is not PID 1) hands each worker
//! its listening sockets with the `sd_listen_fds(3)` protocol and may add one shared
//! [`balance`] table so that workers sharing one accept queue take turns fairly. Keeping both
//! sides here means the two supervisors and every worker agree on one definition.

pub mod address;
pub mod balance;
pub mod duration;
pub mod env;
pub mod handover;
pub mod listen_fds;
pub mod metrics;
pub mod notify;
pub mod table;

pub use address::{AddressError, BindError, ListenAddress};
pub use balance::{BalanceTable, Slot};
pub use listen_fds::{Inherited, ListenFdsError, Listener, PassedFd};
pub use metrics::{InstanceMetrics, InstanceSlot, MetricsTable};

/// A worker's exit status for bad input (arguments, environment, passed fds): restarting
/// won't help, so neither supervisor restarts it (`RestartPreventExitStatus=`).
pub const EXIT_BAD_INPUT: u8 = 2;

/// Milliseconds on `CLOCK_MONOTONIC`, the clock every process of the machine shares: the
/// time base of the heartbeats in the [`balance`] and [`metrics`] tables.
pub fn now_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
}

/// A file that exists only as long as its handle, for tests of the shared tables.
#[cfg(test)]
pub(crate) fn scratch_file(label: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "sdcluster-{label}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}
