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

pub use address::{AddressError, BindError, ListenAddress};
pub use balance::{BalanceTable, Slot};
pub use listen_fds::{Inherited, ListenFdsError, Listener, PassedFd};
pub use metrics::{InstanceMetrics, InstanceSlot, MetricsTable};
