//! What the worker tells its supervisor (`sd_notify(3)`): readiness, status, liveness, stopping.
//!
//! All of it is a no-op without `NOTIFY_SOCKET`, so the same binary runs standalone.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::stats::Stats;

/// Sends notifications; cheap to call when no supervisor listens.
#[derive(Clone, Copy)]
pub(crate) struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub(crate) fn from_env() -> Self {
        Self { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("could not notify the supervisor ({e}); check NOTIFY_SOCKET and the unit's NotifyAccess=");
        }
    }

    /// `READY=1`: the listeners are being served.
    pub(crate) fn ready(self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub(crate) fn status(self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub(crate) fn stopping(self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Keeps `STATUS=` current, once a second, only when it changed.
    pub(crate) async fn keep_status_current(self, stats: Arc<Stats>, serving: String) {
        if !self.enabled {
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
    /// the pings and the supervisor kills and restarts the worker.
    pub(crate) async fn keep_watchdog_fed(self) {
        let mut usec = 0;
        if !self.enabled || !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
        loop {
            tick.tick().await;
            self.send(&[NotifyState::Watchdog]);
        }
    }
}

/// The one-line summary shown by `systemctl status` and `sdcluster status`.
pub(crate) fn status_line(serving: &str, stats: &Stats) -> String {
    format!("serving {serving}: {} requests, {} open connections", stats.requests(), stats.open())
}
