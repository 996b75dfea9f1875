//! A table in shared memory through which workers on one accept queue share their load.
//!
//! Processes sharing a listening socket do not share its connections fairly: the process
//! that is awake when a burst arrives drains the whole queue (64 keep-alive connections onto
//! two workers went 63/1, see docs/design.md). The supervisor passes every worker the same
//! file (fd name [`crate::listen_fds::BALANCE_FD_NAME`]: a memfd under `sdcluster run`, a file
//! under `/run` under systemd); each worker claims a [`Slot`], publishes its open connections
//! and a heartbeat there, and accepts only while it holds no more than its share.
//!
//! The file needs no set-up: all zeroes is an empty table, and each worker sizes it. A
//! memfd comes sized and sealed ([`BalanceTable::create_memfd`]); a file that shrinks under
//! its workers is noticed (see [`crate::table`]) and they go on unbalanced.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::listen_fds::BALANCE_FD_NAME;
use crate::table::{Access, SharedMap};

/// Slots in a table; instances beyond this run unbalanced (and say so).
pub const SLOTS: usize = 256;
/// One cache line per slot, so that workers do not slow each other down by sharing lines.
const SLOT_BYTES: usize = 64;
/// The size every worker gives the file.
pub const TABLE_BYTES: u64 = (SLOTS * SLOT_BYTES) as u64;
/// A slot whose heartbeat is older than this belongs to a dead or wedged worker.
pub const STALE_AFTER_MS: u64 = 1000;
/// A heartbeat further than this in the future is no process's (every process reads the same
/// clock): the slot counts as dead, rather than live forever.
pub const MAX_FUTURE_MS: u64 = 100;

/// Whether a heartbeat at `heartbeat_ms` is recent at `now_ms`: at most [`STALE_AFTER_MS`]
/// old and at most [`MAX_FUTURE_MS`] ahead.
pub fn heartbeat_is_recent(heartbeat_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(heartbeat_ms) <= STALE_AFTER_MS && heartbeat_ms <= now_ms.saturating_add(MAX_FUTURE_MS)
}

/// One worker's published state; lives in the shared mapping.
#[repr(C, align(64))]
struct RawSlot {
    pid: AtomicU32,
    heartbeat_ms: AtomicU64,
    open: AtomicU64,
    accepted: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<RawSlot>() == SLOT_BYTES);

/// The shared table, mapped into this process.
pub struct BalanceTable {
    map: SharedMap,
}

impl BalanceTable {
    /// Maps `file` shared, sizing it to [`TABLE_BYTES`] if it is empty (a new file); a file
    /// that is shorter but not empty (truncated, or not a table) is refused.
    pub fn open(file: &File) -> io::Result<Self> {
        crate::table::prepare(file, TABLE_BYTES, "balance table")?;
        Ok(Self { map: SharedMap::file(file, TABLE_BYTES as usize, Access::Write)? })
    }

    /// A new, empty table as a supervisor passes it: a memfd named [`BALANCE_FD_NAME`],
    /// sized and sealed against shrinking and growing, close-on-exec.
    pub fn create_memfd() -> io::Result<OwnedFd> {
        crate::table::sealed_memfd(BALANCE_FD_NAME, TABLE_BYTES)
    }

    /// Whether the table is still shared with the other workers: false once its file shrank
    /// (this process then holds a private copy of zeroes, safe to use and useless to
    /// balance with). One `fstat`: call it at a heartbeat.
    pub fn still_shared(&self) -> bool {
        self.map.still_mapped()
    }

    fn slots(&self) -> &[RawSlot] {
        debug_assert!(self.map.len() >= TABLE_BYTES as usize);
        // SAFETY: the mapping is page-aligned, TABLE_BYTES long, lives as long as `self`
        // (a truncated file's pages are replaced in place, never unmapped: crate::table),
        // and RawSlot is made of atomics, valid for any bit pattern.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<RawSlot>(), SLOTS) }
    }

    fn is_live(slot: &RawSlot, now_ms: u64) -> bool {
        slot.pid.load(Ordering::Acquire) != 0 && heartbeat_is_recent(slot.heartbeat_ms.load(Ordering::Acquire), now_ms)
    }

    /// Takes a free slot, or the slot of a dead worker, for process `pid`.
    pub fn claim(self: &Arc<Self>, pid: u32, now_ms: u64) -> Option<Slot> {
        for (index, slot) in self.slots().iter().enumerate() {
            let current = slot.pid.load(Ordering::Acquire);
            let free = current == 0 || current == pid || !Self::is_live(slot, now_ms);
            if free && slot.pid.compare_exchange(current, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                slot.heartbeat_ms.store(now_ms, Ordering::Release);
                slot.open.store(0, Ordering::Release);
                slot.accepted.store(0, Ordering::Release);
                return Some(Slot { table: Arc::clone(self), index, pid });
            }
        }
        None
    }

    /// Open connections of the live workers other than `me`, and how many there are.
    fn peers(&self, me: usize, now_ms: u64) -> (u64, u64) {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != me && Self::is_live(s, now_ms))
            .fold((0, 0), |(count, open), (_, s)| (count + 1, open + s.open.load(Ordering::Acquire)))
    }
}

/// This worker's slot in a [`BalanceTable`]; released when dropped.
pub struct Slot {
    table: Arc<BalanceTable>,
    index: usize,
    pid: u32,
}

impl Slot {
    fn raw(&self) -> &RawSlot {
        &self.table.slots()[self.index]
    }

    /// Proves this worker alive; a worker that stops calling this is left out of the shares.
    /// Returns false if the slot was taken over meanwhile (this worker was presumed dead);
    /// the caller then claims a new one.
    pub fn heartbeat(&self, now_ms: u64, open: u64) -> bool {
        let raw = self.raw();
        if raw.pid.load(Ordering::Acquire) != self.pid {
            return false;
        }
        raw.open.store(open, Ordering::Release);
        raw.heartbeat_ms.store(now_ms, Ordering::Release);
        true
    }

    /// Records a change of this worker's open connections (+1 on accept, -1 on close).
    pub fn publish_open(&self, open: u64, accepted_one: bool) {
        let raw = self.raw();
        raw.open.store(open, Ordering::Release);
        if accepted_one {
            raw.accepted.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether this worker, holding `open` connections with `queued` more waiting in the
    /// shared queue, may take one: true while it holds less than an even share of all
    /// connections (open and queued) plus `slack`.
    pub fn may_accept(&self, open: u64, queued: u64, slack: u64, now_ms: u64) -> bool {
        let (peers, peers_open) = self.table.peers(self.index, now_ms);
        let workers = peers + 1;
        let share = (peers_open + open + queued.max(1)).div_ceil(workers);
        open < share + slack
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Only a slot still ours is freed; one taken over belongs to its new owner.
        let _ = self.raw().pid.compare_exchange(self.pid, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<BalanceTable> {
        let file = tempfile();
        Arc::new(BalanceTable::open(&file).unwrap())
    }

    fn tempfile() -> File {
        crate::scratch_file("balance")
    }

    #[test]
    fn an_empty_file_becomes_an_empty_table() {
        let file = tempfile();
        let t = BalanceTable::open(&file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), TABLE_BYTES);
        assert_eq!(t.peers(usize::MAX, 10_000), (0, 0));
    }

    #[test]
    fn a_lone_worker_always_may_accept() {
        let t = table();
        let me = t.claim(10, 5_000).unwrap();
        for open in [0, 1, 100, 10_000] {
            assert!(me.may_accept(open, 1, 1, 5_000));
        }
    }

    #[test]
    fn a_worker_ahead_of_its_share_waits() {
        let t = table();
        let a = t.claim(10, 5_000).unwrap();
        let b = t.claim(11, 5_000).unwrap();
        b.publish_open(0, false);
        // 64 queued: A may take up to its half before B has taken any.
        assert!(a.may_accept(31, 33, 1, 5_000));
        assert!(a.may_accept(32, 32, 1, 5_000));
        // Queue drained to B: A holds 33, B 0, one more waiting: it is B's.
        assert!(!a.may_accept(33, 1, 1, 5_000));
        b.publish_open(30, true);
        assert!(a.may_accept(31, 1, 1, 5_000));
    }

    #[test]
    fn dead_workers_are_left_out_and_their_slots_reused() {
        let t = table();
        let a = t.claim(10, 5_000).unwrap();
        let b = t.claim(11, 5_000).unwrap();
        b.publish_open(0, false);
        assert!(!a.may_accept(5, 0, 1, 5_500));
        // B stops beating: after STALE_AFTER_MS it no longer holds A back.
        assert!(a.may_accept(5, 0, 1, 5_000 + STALE_AFTER_MS + 1));
        std::mem::forget(b); // killed: its Drop never runs
        assert!(a.heartbeat(5_000 + STALE_AFTER_MS, 5));
        let c = t.claim(12, 5_000 + STALE_AFTER_MS + 1).unwrap();
        assert_eq!(c.index, 1, "the dead worker's slot is reused");
    }

    #[test]
    fn a_slot_taken_over_is_noticed() {
        let t = table();
        let a = t.claim(10, 1_000).unwrap();
        let _b = t.claim(11, 1_000 + STALE_AFTER_MS + 5).unwrap();
        assert_eq!(_b.index, 0, "a's slot was stale");
        assert!(!a.heartbeat(3_000, 0));
        drop(a);
        assert!(_b.heartbeat(3_000, 0), "dropping the old owner leaves the new one alone");
    }

    #[test]
    fn dropping_frees_the_slot() {
        let t = table();
        drop(t.claim(10, 1_000).unwrap());
        assert_eq!(t.claim(11, 1_000).unwrap().index, 0);
    }

    #[test]
    fn a_heartbeat_in_the_future_counts_as_dead() {
        let t = table();
        let a = t.claim(10, 5_000).unwrap();
        let b = t.claim(11, 5_000).unwrap();
        b.publish_open(0, false);
        assert!(b.heartbeat(5_000 + MAX_FUTURE_MS, 0), "a little ahead: clocks are read at different moments");
        assert!(!a.may_accept(5, 0, 1, 5_000), "b is live");
        assert!(b.heartbeat(1_000_000_000, 0));
        assert!(a.may_accept(5, 0, 1, 5_000), "a heartbeat far ahead is nobody's: b holds a back no more");
        assert!(!heartbeat_is_recent(u64::MAX, 5_000));
        let c = t.claim(12, 5_000).unwrap();
        assert_eq!(c.index, b.index, "its slot is taken");
    }

    #[test]
    fn a_short_file_is_refused_and_a_memfd_comes_sealed() {
        let file = tempfile();
        file.set_len(100).unwrap();
        let err = BalanceTable::open(&file).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("the balance table is 100 bytes"), "{err}");
        let memfd = File::from(BalanceTable::create_memfd().unwrap());
        assert_eq!(memfd.metadata().unwrap().len(), TABLE_BYTES);
        assert!(memfd.set_len(0).is_err(), "sealed against shrinking");
        let t = Arc::new(BalanceTable::open(&memfd).unwrap());
        assert!(t.claim(1, 0).is_some() && t.still_shared());
    }

    #[test]
    fn a_table_whose_file_shrinks_is_left_not_faulted_on() {
        let file = tempfile();
        let one = Arc::new(BalanceTable::open(&file).unwrap());
        let a = one.claim(10, 2_000).unwrap();
        assert!(one.still_shared());
        file.set_len(0).unwrap();
        // Touching the slots now would fault; it is caught, and the slots read as zeroes.
        assert!(!a.heartbeat(2_100, 3), "the slot is gone with the file");
        assert!(!one.still_shared());
        assert!(a.may_accept(100, 1, 1, 2_100));
    }

    #[test]
    fn two_mappings_of_one_file_see_each_other() {
        let file = tempfile();
        let one = Arc::new(BalanceTable::open(&file).unwrap());
        let two = Arc::new(BalanceTable::open(&file).unwrap());
        let a = one.claim(10, 2_000).unwrap();
        let b = two.claim(11, 2_000).unwrap();
        assert_ne!(a.index, b.index);
        b.publish_open(7, true);
        assert_eq!(one.peers(a.index, 2_000), (1, 7));
    }
}
