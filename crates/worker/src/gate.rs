//! When a worker may accept its next connection: below its connection cap, and (when it
//! shares one queue with other workers) not ahead of its share of the cluster's connections.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sdcluster_protocol::{BalanceTable, Listener, Slot, now_ms};
use tokio::sync::Notify;

use crate::stats::Stats;

/// How often the slot's heartbeat is renewed, well inside `balance::STALE_AFTER_MS`.
const HEARTBEAT: Duration = Duration::from_millis(200);
/// How often a worker ahead of its share looks again.
const RECHECK: Duration = Duration::from_millis(1);
/// Connections above an even share a worker may take before it waits for its peers.
const SLACK: u64 = 1;

/// A connection's place in the gate: taken when it was accepted (or taken over), given back
/// when this is dropped, on every way a connection ends (closed, handed over, its task
/// panicking or dropped, or an upgraded connection dropped by the app).
pub(crate) struct Open(Arc<Gate>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// Shared by the accept loops and the connection tasks of one worker.
pub(crate) struct Gate {
    stats: Arc<Stats>,
    max_connections: u64,
    room: Notify,
    balance: Option<Balance>,
}

struct Balance {
    table: Arc<BalanceTable>,
    slot: Mutex<Option<Slot>>,
    patience: Duration,
}

impl Gate {
    pub(crate) fn new(
        stats: Arc<Stats>,
        max_connections: u64,
        table: Option<Arc<BalanceTable>>,
        patience: Duration,
    ) -> Self {
        let balance = table.map(|table| {
            let slot = table.claim(std::process::id(), now_ms());
            if slot.is_none() {
                tracing::warn!("the balance table is full; this worker accepts without balancing");
            }
            Balance { table, slot: Mutex::new(slot), patience }
        });
        Self { stats, max_connections, room: Notify::new(), balance }
    }

    /// Waits until this worker should take the next connection from `listener`'s queue.
    pub(crate) async fn wait_turn(&self, listener: &Listener) {
        self.until_open(|open| open < self.max_connections).await;
        let Some(balance) = &self.balance else { return };
        let waited_since = Instant::now();
        while !balance.may_accept(self.stats.open(), queued(listener)) && waited_since.elapsed() < balance.patience {
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// Returns once no connection is open (the end of a drain).
    pub(crate) async fn all_closed(&self) {
        self.until_open(|open| open == 0).await;
    }

    /// Waits, woken by each closing connection, until the open count satisfies `enough`.
    async fn until_open(&self, enough: impl Fn(u64) -> bool) {
        loop {
            let closed = self.room.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if enough(self.stats.open()) {
                return;
            }
            closed.await;
        }
    }

    /// The counters this gate keeps current.
    pub(crate) fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Frees this worker's slot: a draining worker takes no more connections, so its peers
    /// must not wait for it to take its share.
    pub(crate) fn leave_balance(&self) {
        if let Some(balance) = &self.balance {
            *balance.slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Counts a connection open; dropping the returned place counts it closed.
    pub(crate) fn opened(self: &Arc<Self>) -> Open {
        let open = self.stats.connection_opened();
        self.publish(open, true);
        Open(Arc::clone(self))
    }

    fn closed(&self) {
        let open = self.stats.connection_closed();
        self.publish(open, false);
        self.room.notify_waiters();
    }

    fn publish(&self, open: u64, accepted: bool) {
        if let Some(balance) = &self.balance {
            if let Some(slot) = balance.slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                slot.publish_open(open, accepted);
            }
        }
    }

    /// Renews this worker's slot for as long as its runtime runs; a wedged runtime stops
    /// renewing and its peers stop waiting for it.
    pub(crate) async fn keep_slot_alive(self: Arc<Self>) {
        let Some(balance) = &self.balance else { return };
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let now = now_ms();
            let mut slot = balance.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if !balance.table.still_shared() {
                // Truncated under us (it is sealed when a memfd): whatever it says now is
                // nobody's, so accept without it.
                *slot = None;
                drop(slot);
                tracing::warn!(
                    "the balance table shrank under this worker (truncated?): accepting without balancing from now on; restart the app to share a new one"
                );
                return;
            }
            let alive = slot.as_ref().is_some_and(|s| s.heartbeat(now, self.stats.open()));
            if !alive {
                // Presumed dead while stalled (or the table was full): take a slot again.
                *slot = None;
                *slot = balance.table.claim(std::process::id(), now);
            }
        }
    }
}

impl Balance {
    fn may_accept(&self, open: u64, queued: u64) -> bool {
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref().is_none_or(|s| s.may_accept(open, queued, SLACK, now_ms()))
    }
}

/// Connections waiting in a TCP listener's accept queue (the kernel reports it in
/// `tcpi_unacked` for listening sockets); 1 where the kernel does not tell (Unix sockets).
fn queued(listener: &Listener) -> u64 {
    let Listener::Tcp(tcp) = listener else {
        return 1;
    };
    // SAFETY: tcp_info is plain old data and `len` tells the kernel its size.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(tcp.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len);
        if rc == 0 { u64::from(info.tcpi_unacked).max(1) } else { 1 }
    }
}
