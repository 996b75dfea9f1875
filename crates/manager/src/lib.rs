//! sdcluster: run a network service on every CPU, with systemd as the supervisor.
//!
//! One [`spec::Spec`] describes an app. Where systemd is PID 1 it becomes units (a socket, a
//! worker template, a target); elsewhere [`supervisor::Supervisor`] (`sdcluster run`) plays
//! systemd's part with the same protocol. Either way [`status`] reports the same view.

pub mod control;
pub mod generator;
pub mod install;
pub mod logs;
pub mod spec;
pub mod status;
pub mod supervisor;
pub mod systemctl;
pub mod systemd;
pub mod units;
