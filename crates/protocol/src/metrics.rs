//! A table in shared memory where every worker of an app keeps its counters, so that any
//! worker can answer `/metrics` (and `sdcluster status` can read them) for the whole app.
//!
//! It lives beside the [`crate::balance`] table and follows its rules: the supervisor passes
//! every worker the same file (fd name [`METRICS_FD_NAME`]: a memfd under `sdcluster run`; the
//! file named by [`METRICS_FILE_ENV`] under `/run` under systemd); all zeroes is an empty
//! table, each worker sizes it, and it is only ever touched through atomics.
//!
//! A slot is keyed by instance name, not by process: a restarted process of an instance
//! takes the slot its predecessor had and adds to its counters, so per-instance series and
//! app-wide totals stay monotonic across restarts, and a dead (or scaled-down) instance's
//! counts are carried in the totals instead of being lost. While an old process drains and
//! its successor already serves, both add to the one slot; the gauges (pid, heartbeat, open
//! connections) belong to the newest.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::table::{Access, SharedMap};

/// The fd name of the table in `LISTEN_FDNAMES` (under `sdcluster run`).
pub const METRICS_FD_NAME: &str = "sdcluster-metrics";
/// The environment variable naming the table's file (under systemd); created if missing.
pub const METRICS_FILE_ENV: &str = "SDCLUSTER_METRICS_FILE";

/// Slots in a table: instances beyond this count only into a table of their own.
pub const SLOTS: usize = 64;
/// Longest instance name a slot keeps; longer names are cut (at a character boundary).
pub const NAME_BYTES: usize = 64;
/// A slot whose heartbeat is older than this belongs to an instance not running now.
pub const STALE_AFTER_MS: u64 = crate::balance::STALE_AFTER_MS;
/// The first status code counted; codes below or from `FIRST_STATUS + STATUSES` are not.
pub const FIRST_STATUS: u16 = 100;
/// Status codes counted: 100..=599.
pub const STATUSES: usize = 500;
/// Upper bounds (seconds) of the request duration histogram's buckets, `+Inf` not included.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Reasons a request may be refused before the app saw it (see the worker's `Rejected`).
pub const REJECT_REASONS: [&str; 3] = ["malformed", "too_large", "header_timeout"];

/// Bumped whenever the layout changes: a table of another layout is refused, not misread.
const LAYOUT: u64 = 0x5344_434d_0000_0001; // "SDCM" v1
const HEADER_BYTES: usize = 64;
const SLOT_BYTES: usize = 4096 + 512;
/// The size every worker gives the file.
pub const TABLE_BYTES: u64 = (HEADER_BYTES + SLOTS * SLOT_BYTES) as u64;

const FREE: u32 = 0;
const NAMING: u32 = 1;
const NAMED: u32 = 2;

#[repr(C, align(64))]
struct Header {
    layout: AtomicU64,
}

/// One instance's counters; lives in the shared mapping.
#[repr(C, align(64))]
struct RawSlot {
    state: AtomicU32,
    pid: AtomicU32,
    name_len: AtomicU64,
    name: [AtomicU64; NAME_BYTES / 8],
    heartbeat_ms: AtomicU64,
    starts: AtomicU64,
    open: AtomicU64,
    accepted: AtomicU64,
    drains: AtomicU64,
    handed_over: AtomicU64,
    taken_over: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    unread_discarded: AtomicU64,
    unread_closed: AtomicU64,
    rejected: [AtomicU64; REJECT_REASONS.len()],
    /// Per bucket of [`LATENCY_BUCKETS`] plus `+Inf`, not cumulative (that is done at render).
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    by_status: [AtomicU64; STATUSES],
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<RawSlot>() <= SLOT_BYTES);
const _: () = assert!(SLOT_BYTES % 64 == 0);

pub use crate::now_ms;

/// The shared table, mapped into this process.
pub struct MetricsTable {
    map: SharedMap,
}

/// What a table says about one instance, as of one [`MetricsTable::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceMetrics {
    /// The instance's name (`--instance`, the unit's `%i`).
    pub instance: String,
    /// The process that claimed the slot last.
    pub pid: u32,
    /// Whether that process beat within [`STALE_AFTER_MS`].
    pub live: bool,
    /// Processes of this instance started so far (restarts are `starts - 1`).
    pub starts: u64,
    /// Requests answered, any status.
    pub requests: u64,
    /// Connections open now (0 when not live).
    pub open_connections: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Kept-alive connections handed to the next process.
    pub handed_over: u64,
    /// Kept-alive connections taken from the previous process.
    pub taken_over: u64,
    /// Drains begun (SIGTERM received).
    pub drains: u64,
    /// Unread request bodies read and thrown away (connection kept).
    pub unread_discarded: u64,
    /// Unread request bodies answered with `Connection: close`.
    pub unread_closed: u64,
    /// Requests refused before the app saw them, by [`REJECT_REASONS`].
    pub rejected: [u64; REJECT_REASONS.len()],
    /// Requests answered, by status code; only codes with a count.
    pub by_status: Vec<(u16, u64)>,
    /// Request durations per bucket of [`LATENCY_BUCKETS`] and `+Inf`, not cumulative.
    pub latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of request durations, in seconds.
    pub latency_sum_seconds: f64,
}

impl MetricsTable {
    /// Maps `file` shared and writable, sizing it to [`TABLE_BYTES`] if it is empty (a new
    /// file); a file that is shorter but not empty, or of another layout, is refused.
    pub fn open(file: &File) -> io::Result<Self> {
        crate::table::prepare(file, TABLE_BYTES, "metrics table")?;
        Self::checked(SharedMap::file(file, TABLE_BYTES as usize, Access::Write)?)
    }

    /// Maps the table at `path` for reading (`sdcluster status`); an error if it is missing,
    /// shorter than a table (it is never read past its end) or of another layout.
    pub fn open_existing(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        crate::table::check_len(file.metadata()?.len(), TABLE_BYTES, "metrics table")
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Self::checked(SharedMap::file(&file, TABLE_BYTES as usize, Access::Read)?)
    }

    /// A new, empty table as a supervisor passes it: a memfd named [`METRICS_FD_NAME`],
    /// sized and sealed against shrinking and growing, close-on-exec.
    pub fn create_memfd() -> io::Result<std::os::fd::OwnedFd> {
        crate::table::sealed_memfd(METRICS_FD_NAME, TABLE_BYTES)
    }

    /// A table of this process alone, for a worker that was given none (or a full one).
    pub fn private() -> io::Result<Self> {
        Self::checked(SharedMap::private(TABLE_BYTES as usize)?)
    }

    /// Whether the table is still shared with the other workers: false once its file shrank
    /// (this process then counts into a private copy of zeroes). One `fstat`: call it at a
    /// heartbeat.
    pub fn still_shared(&self) -> bool {
        self.map.still_mapped()
    }

    fn checked(map: SharedMap) -> io::Result<Self> {
        if map.len() < TABLE_BYTES as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the metrics table file is too small"));
        }
        let table = Self { map };
        let layout = &table.header().layout;
        let found = match table.map.access() {
            Access::Read => layout.load(Ordering::Acquire),
            _ => layout.compare_exchange(0, LAYOUT, Ordering::AcqRel, Ordering::Acquire).unwrap_or_else(|v| v),
        };
        if found != LAYOUT && found != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the metrics table has another layout ({found:#x}, expected {LAYOUT:#x}): from another sdcluster version?"
                ),
            ));
        }
        Ok(table)
    }

    fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, at least TABLE_BYTES long (checked when made),
        // lives as long as `self`, and Header is made of atomics, valid for any bit pattern.
        unsafe { &*self.base().cast::<Header>() }
    }

    fn slots(&self) -> impl Iterator<Item = &RawSlot> {
        // SAFETY: as in `header`: slot i starts at HEADER_BYTES + i * SLOT_BYTES, a multiple
        // of 64 (RawSlot's alignment), and ends within TABLE_BYTES.
        (0..SLOTS).map(|i| unsafe { &*self.base().add(HEADER_BYTES + i * SLOT_BYTES).cast::<RawSlot>() })
    }

    fn slot(&self, index: usize) -> &RawSlot {
        self.slots().nth(index).expect("a slot index below SLOTS")
    }

    /// Takes the slot of `instance` (the one its previous processes counted into), or a free
    /// one, for process `pid`; counts a start. `None` when the table is full or read-only.
    pub fn claim(self: &Arc<Self>, instance: &str, pid: u32, now_ms: u64) -> Option<InstanceSlot> {
        if self.map.access() == Access::Read {
            return None;
        }
        let name = name_bytes(instance);
        let index = self.find(&name).or_else(|| self.take_free(&name))?;
        let raw = self.slot(index);
        raw.pid.store(pid, Ordering::Release);
        raw.open.store(0, Ordering::Release);
        raw.heartbeat_ms.store(now_ms, Ordering::Release);
        raw.starts.fetch_add(1, Ordering::AcqRel);
        Some(InstanceSlot { table: Arc::clone(self), index, pid })
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.slots().position(|s| s.state.load(Ordering::Acquire) == NAMED && s.name() == name)
    }

    fn take_free(&self, name: &[u8]) -> Option<usize> {
        for (index, slot) in self.slots().enumerate() {
            if slot.state.compare_exchange(FREE, NAMING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                let mut padded = [0u8; NAME_BYTES];
                padded[..name.len()].copy_from_slice(name);
                for (word, chunk) in slot.name.iter().zip(padded.chunks_exact(8)) {
                    word.store(u64::from_le_bytes(chunk.try_into().expect("8 bytes")), Ordering::Relaxed);
                }
                slot.name_len.store(name.len() as u64, Ordering::Relaxed);
                slot.state.store(NAMED, Ordering::Release);
                // Two processes of one name naming two slots at once: keep the first.
                return Some(self.find(name).unwrap_or(index));
            }
        }
        None
    }

    /// Every instance the table has counted, live or not, in slot order.
    pub fn snapshot(&self, now_ms: u64) -> Vec<InstanceMetrics> {
        self.slots().filter(|s| s.state.load(Ordering::Acquire) == NAMED).map(|s| s.read(now_ms)).collect()
    }
}

/// `instance` as a slot keeps it: at most [`NAME_BYTES`], cut at a character boundary.
fn name_bytes(instance: &str) -> Vec<u8> {
    let mut end = instance.len().min(NAME_BYTES);
    while !instance.is_char_boundary(end) {
        end -= 1;
    }
    instance.as_bytes()[..end].to_vec()
}

impl RawSlot {
    fn name(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.name.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
        bytes.truncate((self.name_len.load(Ordering::Relaxed) as usize).min(NAME_BYTES));
        bytes
    }

    fn live(&self, now_ms: u64) -> bool {
        self.pid.load(Ordering::Acquire) != 0
            && crate::balance::heartbeat_is_recent(self.heartbeat_ms.load(Ordering::Acquire), now_ms)
    }

    fn read(&self, now_ms: u64) -> InstanceMetrics {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_status: Vec<(u16, u64)> = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((FIRST_STATUS + i as u16, Some(load(c)).filter(|n| *n > 0)?)))
            .collect();
        let live = self.live(now_ms);
        InstanceMetrics {
            instance: String::from_utf8_lossy(&self.name()).into_owned(),
            pid: self.pid.load(Ordering::Acquire),
            live,
            starts: load(&self.starts),
            requests: by_status.iter().map(|(_, n)| n).sum(),
            open_connections: if live { load(&self.open) } else { 0 },
            accepted: load(&self.accepted),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            handed_over: load(&self.handed_over),
            taken_over: load(&self.taken_over),
            drains: load(&self.drains),
            unread_discarded: load(&self.unread_discarded),
            unread_closed: load(&self.unread_closed),
            rejected: std::array::from_fn(|i| load(&self.rejected[i])),
            by_status,
            latency_buckets: std::array::from_fn(|i| load(&self.latency[i])),
            latency_sum_seconds: load(&self.latency_sum_us) as f64 / 1e6,
        }
    }
}

/// One instance's slot in a [`MetricsTable`], held by its current process.
pub struct InstanceSlot {
    table: Arc<MetricsTable>,
    index: usize,
    pid: u32,
}

impl InstanceSlot {
    fn raw(&self) -> &RawSlot {
        self.table.slot(self.index)
    }

    fn mine(&self) -> bool {
        self.raw().pid.load(Ordering::Acquire) == self.pid
    }

    /// The table this slot is in.
    pub fn table(&self) -> &Arc<MetricsTable> {
        &self.table
    }

    /// Proves this process alive, with its open connections; does nothing once a newer
    /// process of the instance claimed the slot.
    pub fn heartbeat(&self, now_ms: u64, open: u64) {
        if self.mine() {
            self.raw().open.store(open, Ordering::Release);
            self.raw().heartbeat_ms.store(now_ms, Ordering::Release);
        }
    }

    /// Publishes this process's open connections (if the slot is still its own).
    pub fn set_open(&self, open: u64) {
        if self.mine() {
            self.raw().open.store(open, Ordering::Release);
        }
    }

    /// Counts an accepted connection.
    pub fn accepted(&self) {
        self.raw().accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response with `status` that took `took` from the request to its head.
    pub fn answered(&self, status: u16, took: Duration) {
        let raw = self.raw();
        let Some(counter) = status.checked_sub(FIRST_STATUS).and_then(|i| raw.by_status.get(usize::from(i))) else {
            return; // not a status: ignored rather than miscounted
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|le| seconds <= *le).unwrap_or(LATENCY_BUCKETS.len());
        raw.latency[bucket].fetch_add(1, Ordering::Relaxed);
        raw.latency_sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a request refused for [`REJECT_REASONS`]`[reason]`.
    pub fn rejected(&self, reason: usize) {
        if let Some(c) = self.raw().rejected.get(reason) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request body left unread: `discarded` (connection kept) or closed.
    pub fn unread_body(&self, discarded: bool) {
        let raw = self.raw();
        if discarded { &raw.unread_discarded } else { &raw.unread_closed }.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection handed to the next process.
    pub fn handed_over(&self) {
        self.raw().handed_over.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection taken from the previous process.
    pub fn taken_over(&self) {
        self.raw().taken_over.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a drain begun.
    pub fn drained(&self) {
        self.raw().drains.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes read from a client.
    pub fn bytes_in(&self, n: u64) {
        self.raw().bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes written to a client.
    pub fn bytes_out(&self, n: u64) {
        self.raw().bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// This instance's counters now.
    pub fn read(&self, now_ms: u64) -> InstanceMetrics {
        self.raw().read(now_ms)
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        // Gone at once rather than after STALE_AFTER_MS; the counters stay.
        if self.mine() {
            self.raw().heartbeat_ms.store(0, Ordering::Release);
            self.raw().open.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempfile() -> File {
        crate::scratch_file("metrics")
    }

    #[test]
    fn an_empty_file_becomes_an_empty_table() {
        let file = tempfile();
        let t = MetricsTable::open(&file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), TABLE_BYTES);
        assert!(t.snapshot(1_000).is_empty());
    }

    #[test]
    fn two_processes_see_each_other() {
        let file = tempfile();
        let one = Arc::new(MetricsTable::open(&file).unwrap());
        let two = Arc::new(MetricsTable::open(&file).unwrap());
        let a = one.claim("1", 10, 5_000).unwrap();
        let b = two.claim("2", 11, 5_000).unwrap();
        a.answered(200, Duration::from_millis(3));
        b.answered(404, Duration::from_secs(20));
        b.bytes_in(7);
        b.set_open(3);
        let seen = one.snapshot(5_100);
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].instance.as_str(), seen[0].pid, seen[0].live), ("1", 10, true));
        assert_eq!(seen[0].by_status, vec![(200, 1)]);
        assert_eq!(seen[0].latency_buckets[3], 1, "3 ms is in the 5 ms bucket");
        assert_eq!((seen[1].requests, seen[1].bytes_in, seen[1].open_connections), (1, 7, 3));
        assert_eq!(seen[1].latency_buckets[LATENCY_BUCKETS.len()], 1, "20 s is in +Inf");
        assert_eq!(seen, two.snapshot(5_100));
    }

    #[test]
    fn a_restart_keeps_the_counts() {
        let file = tempfile();
        let t = Arc::new(MetricsTable::open(&file).unwrap());
        let first = t.claim("web", 10, 1_000).unwrap();
        first.answered(200, Duration::ZERO);
        first.set_open(5);
        std::mem::forget(first); // killed
        assert!(!t.snapshot(1_000 + STALE_AFTER_MS + 1)[0].live);
        assert_eq!(t.snapshot(1_000 + STALE_AFTER_MS + 1)[0].open_connections, 0, "a dead worker holds nothing");
        let again = Arc::new(MetricsTable::open(&file).unwrap());
        let second = again.claim("web", 11, 3_000).unwrap();
        second.answered(200, Duration::ZERO);
        let seen = t.snapshot(3_000);
        assert_eq!(seen.len(), 1, "one slot per name");
        assert_eq!((seen[0].pid, seen[0].starts, seen[0].requests, seen[0].live), (11, 2, 2, true));
    }

    #[test]
    fn an_old_process_still_counts_but_does_not_own_the_gauges() {
        let t = Arc::new(MetricsTable::private().unwrap());
        let old = t.claim("a", 10, 1_000).unwrap();
        let new = t.claim("a", 11, 1_000).unwrap();
        old.answered(200, Duration::ZERO);
        old.set_open(9);
        new.set_open(1);
        drop(old);
        let seen = t.snapshot(1_000);
        assert_eq!((seen[0].pid, seen[0].open_connections, seen[0].requests, seen[0].live), (11, 1, 1, true));
    }

    #[test]
    fn a_full_table_says_so() {
        let t = Arc::new(MetricsTable::private().unwrap());
        let slots: Vec<_> = (0..SLOTS).map(|i| t.claim(&i.to_string(), 1, 0).unwrap()).collect();
        assert!(t.claim("one too many", 1, 0).is_none());
        assert!(t.claim("7", 2, 0).is_some(), "a known name still has its slot");
        drop(slots);
        assert_eq!(t.snapshot(0).len(), SLOTS, "names stay: their counts are carried");
    }

    #[test]
    fn long_names_are_cut_at_a_character() {
        let t = Arc::new(MetricsTable::private().unwrap());
        let name = "é".repeat(40); // 80 bytes
        t.claim(&name, 1, 0).unwrap();
        assert_eq!(t.snapshot(0)[0].instance, "é".repeat(32));
    }

    #[test]
    fn a_short_or_foreign_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("sdcluster-metrics-short-{}", std::process::id()));
        std::fs::write(&dir, [0u8; 100]).unwrap();
        let err = MetricsTable::open_existing(&dir).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::write(&dir, vec![0xffu8; TABLE_BYTES as usize]).unwrap();
        assert!(MetricsTable::open_existing(&dir).is_err(), "another layout");
        let file = File::options().read(true).write(true).open(&dir).unwrap();
        assert!(MetricsTable::open(&file).is_err());
        std::fs::remove_file(&dir).unwrap();
        assert!(MetricsTable::open_existing(&dir).is_err(), "missing");
    }

    #[test]
    fn a_heartbeat_in_the_future_is_not_live() {
        let t = Arc::new(MetricsTable::private().unwrap());
        let slot = t.claim("ahead", 1, 1_000_000).unwrap();
        assert!(t.snapshot(1_000_000)[0].live);
        assert!(!t.snapshot(1_000)[0].live, "a heartbeat far ahead of the clock is nobody's");
        drop(slot);
    }

    #[test]
    fn a_truncated_table_is_left_not_faulted_on() {
        let file = tempfile();
        let t = Arc::new(MetricsTable::open(&file).unwrap());
        let slot = t.claim("cut", 1, 1_000).unwrap();
        slot.answered(200, Duration::ZERO);
        file.set_len(10).unwrap();
        slot.answered(200, Duration::ZERO); // faults: caught, counted into zero pages
        assert!(!t.still_shared());
        assert!(t.snapshot(1_000).is_empty(), "this process's copy is empty now");
        let memfd = File::from(MetricsTable::create_memfd().unwrap());
        assert!(memfd.set_len(10).is_err(), "a memfd comes sealed");
        assert!(MetricsTable::open(&memfd).is_ok());
    }

    #[test]
    fn a_reader_sees_and_cannot_claim() {
        let path = std::env::temp_dir().join(format!("sdcluster-metrics-reader-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let t = Arc::new(MetricsTable::open(&file).unwrap());
        let slot = t.claim("x", 5, 100).unwrap();
        slot.accepted();
        let reader = Arc::new(MetricsTable::open_existing(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(reader.snapshot(100)[0].accepted, 1);
        assert!(reader.claim("y", 6, 100).is_none());
    }
}
