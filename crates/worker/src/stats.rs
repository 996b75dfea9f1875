//! Counters a worker keeps, for `/metrics`, `STATUS=` and the balance table.
//!
//! They live in this instance's slot of the app's shared [`MetricsTable`] (see
//! `sdcluster_protocol::metrics`), so `/metrics` from any worker renders every instance, and
//! a restarted process of an instance goes on counting where its predecessor stopped. A
//! worker given no table (standalone) counts into a private one: one code path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sdcluster_protocol::Listener;
use sdcluster_protocol::metrics::{
    InstanceMetrics, InstanceSlot, LATENCY_BUCKETS, MetricsTable, REJECT_REASONS, now_ms,
};

/// How often the slot's heartbeat is renewed, well inside `metrics::STALE_AFTER_MS`.
const HEARTBEAT: Duration = Duration::from_millis(200);

/// Counters shared by every connection task of a worker.
pub struct Stats {
    instance: String,
    started: Instant,
    /// This process's open connections (the slot's gauge follows them).
    open: AtomicU64,
    /// Connections this process handed over (it waits for the fd store when any).
    handed_over: AtomicU64,
    slot: InstanceSlot,
    /// Copies of the TCP listeners, to report their accept queues; emptied at the drain.
    queues: Mutex<Vec<(String, OwnedFd)>>,
}

/// Requests hyper refused before any app saw them (it answers or closes by itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Not HTTP (400).
    Malformed,
    /// A request head over `--max-header-bytes` (431).
    TooLarge,
    /// Headers not complete within `--header-timeout` (slowloris): closed.
    HeaderTimeout,
}

// The table names the reasons in this order.
const _: () = assert!(Rejected::Malformed as usize == 0 && Rejected::HeaderTimeout as usize == 2);
const _: () = assert!(REJECT_REASONS.len() == 3);

impl Rejected {
    /// What a connection's error says about its last request, if it was refused.
    pub(crate) fn of(error: &hyper::Error) -> Option<Self> {
        if error.is_parse_too_large() {
            Some(Rejected::TooLarge)
        } else if error.is_parse() {
            Some(Rejected::Malformed)
        } else if error.is_timeout() {
            Some(Rejected::HeaderTimeout)
        } else {
            None
        }
    }
}

impl Stats {
    /// Counters for the worker named `instance`, in a table of its own.
    pub fn new(instance: String) -> Self {
        Self::in_table(instance, None)
    }

    /// Counters for the worker named `instance`, in its slot of `table` (the app's shared
    /// table) when there is one and it has room, else in a table of its own.
    pub fn in_table(instance: String, table: Option<Arc<MetricsTable>>) -> Self {
        let pid = std::process::id();
        let shared = table.and_then(|t| {
            let slot = t.claim(&instance, pid, now_ms());
            if slot.is_none() {
                tracing::warn!("the metrics table is full: /metrics of this worker shows only itself");
            }
            slot
        });
        let slot = shared.unwrap_or_else(|| {
            let private = MetricsTable::private().map(Arc::new).expect("an anonymous mapping of a few hundred KiB");
            private.claim(&instance, pid, now_ms()).expect("an empty table has room")
        });
        Self {
            instance,
            started: Instant::now(),
            open: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            slot,
            queues: Mutex::new(Vec::new()),
        }
    }

    /// The worker's name, as given by `--instance`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The table the counters are in.
    pub fn table(&self) -> &Arc<MetricsTable> {
        self.slot.table()
    }

    /// Connections this process holds open now.
    pub fn open(&self) -> u64 {
        self.open.load(Relaxed)
    }

    /// Requests this instance answered so far (across restarts when the table is shared).
    pub fn requests(&self) -> u64 {
        self.slot.read(now_ms()).requests
    }

    pub(crate) fn connection_opened(&self) -> u64 {
        self.slot.accepted();
        let open = self.open.fetch_add(1, Relaxed) + 1;
        self.slot.set_open(open);
        open
    }

    pub(crate) fn connection_closed(&self) -> u64 {
        let open = self.open.fetch_sub(1, Relaxed) - 1;
        self.slot.set_open(open);
        open
    }

    pub(crate) fn rejected(&self, why: Rejected) {
        self.slot.rejected(why as usize);
    }

    /// A kept-alive connection went to the next process through the fd store.
    pub(crate) fn handed_over(&self) {
        self.handed_over.fetch_add(1, Relaxed);
        self.slot.handed_over();
    }

    /// A connection came from the previous process through the fd store.
    pub(crate) fn taken_over(&self) {
        self.slot.taken_over();
    }

    /// Connections this process handed to the next one so far.
    pub fn handed_over_count(&self) -> u64 {
        self.handed_over.load(Relaxed)
    }

    /// A request body the app left unread: `discarded` when it was read and thrown away so
    /// that the connection stays usable, else the response announced `Connection: close`.
    pub(crate) fn unread_body(&self, discarded: bool) {
        self.slot.unread_body(discarded);
    }

    /// A response with `status`, whose head was ready `took` after the request's.
    pub(crate) fn answered(&self, status: u16, took: Duration) {
        self.slot.answered(status, took);
    }

    /// The drain began.
    pub(crate) fn draining(&self) {
        self.slot.drained();
        self.queues.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    pub(crate) fn bytes_in(&self, n: usize) {
        self.slot.bytes_in(n as u64);
    }

    pub(crate) fn bytes_out(&self, n: usize) {
        self.slot.bytes_out(n as u64);
    }

    /// Reports the accept queues of these listeners (TCP only) in `/metrics`.
    pub(crate) fn watch_queues(&self, listeners: &[Listener]) {
        let copies = listeners
            .iter()
            .filter(|l| matches!(l, Listener::Tcp(_)))
            .filter_map(|l| Some((l.to_string(), l.as_fd().try_clone_to_owned().ok()?)));
        *self.queues.lock().unwrap_or_else(PoisonError::into_inner) = copies.collect();
    }

    /// Keeps this instance shown live in the table; runs until the runtime ends.
    pub(crate) async fn keep_alive(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut shared = true;
        loop {
            tick.tick().await;
            if shared && !self.table().still_shared() {
                shared = false;
                tracing::warn!(
                    "the metrics table shrank under this worker (truncated?): /metrics shows no instance from now on; restart the app to share a new one"
                );
            }
            self.slot.heartbeat(now_ms(), self.open());
        }
    }

    /// Every instance of the table in Prometheus' text format: per-instance series (label
    /// `instance`) for the live ones, and app-wide totals (`sdcluster_app_*`, no instance
    /// label) over all of them, the dead included, so that they never go down.
    pub fn render_prometheus(&self) -> String {
        let all = self.table().snapshot(now_ms());
        let queues: Vec<(String, Option<u64>)> = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, fd)| (name.clone(), queued(fd)))
            .collect();
        let mut out = render(&all, &queues);
        let me = escape(&self.instance);
        let _ = write!(
            out,
            "# HELP sdcluster_uptime_seconds Seconds since the worker that answered this scrape started.\n# TYPE sdcluster_uptime_seconds gauge\n\
             sdcluster_uptime_seconds{{instance=\"{me}\"}} {:.3}\n\
             # HELP sdcluster_scrape_worker_info The worker that answered this scrape.\n# TYPE sdcluster_scrape_worker_info gauge\n\
             sdcluster_scrape_worker_info{{instance=\"{me}\",pid=\"{}\",version=\"{}\"}} 1\n",
            self.started.elapsed().as_secs_f64(),
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
        );
        out
    }
}

/// Connections waiting in a TCP listener's accept queue (`tcpi_unacked` of a listening socket).
fn queued(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: tcp_info is plain old data and `len` tells the kernel its size.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len);
        (rc == 0).then_some(u64::from(info.tcpi_unacked))
    }
}

type Values = fn(&InstanceMetrics) -> Vec<(String, u64)>;

/// The families every instance has: name, type, help, and its samples as (extra labels, value).
const FAMILIES: &[(&str, &str, &str, Values)] = &[
    ("sdcluster_http_requests_total", "counter", "HTTP requests answered, by status code.", |m| {
        m.by_status.iter().map(|(s, n)| (format!("status=\"{s}\""), *n)).collect()
    }),
    ("sdcluster_http_rejected_total", "counter", "Requests refused before the app saw them, by reason.", |m| {
        REJECT_REASONS.iter().zip(m.rejected).map(|(r, n)| (format!("reason=\"{r}\""), n)).collect()
    }),
    ("sdcluster_connections_open", "gauge", "Connections held open now.", |m| {
        vec![(String::new(), m.open_connections)]
    }),
    ("sdcluster_connections_accepted_total", "counter", "Connections accepted.", |m| vec![(String::new(), m.accepted)]),
    (
        "sdcluster_handover_connections_total",
        "counter",
        "Kept-alive connections passed through the fd store across a restart, by direction.",
        |m| vec![("direction=\"sent\"".into(), m.handed_over), ("direction=\"received\"".into(), m.taken_over)],
    ),
    (
        "sdcluster_unread_bodies_total",
        "counter",
        "Request bodies the app did not read: discarded (connection kept) or closed (Connection: close).",
        |m| vec![("outcome=\"discarded\"".into(), m.unread_discarded), ("outcome=\"closed\"".into(), m.unread_closed)],
    ),
    ("sdcluster_bytes_received_total", "counter", "Bytes read from clients.", |m| vec![(String::new(), m.bytes_in)]),
    ("sdcluster_bytes_sent_total", "counter", "Bytes written to clients.", |m| vec![(String::new(), m.bytes_out)]),
    ("sdcluster_worker_starts_total", "counter", "Processes started (restarts are starts - 1).", |m| {
        vec![(String::new(), m.starts)]
    }),
    ("sdcluster_drains_total", "counter", "Drains begun (SIGTERM received).", |m| vec![(String::new(), m.drains)]),
];

/// Renders a table's snapshot `all` (and the listeners' accept queues).
fn render(all: &[InstanceMetrics], queues: &[(String, Option<u64>)]) -> String {
    let live: Vec<&InstanceMetrics> = all.iter().filter(|m| m.live).collect();
    let mut out = String::with_capacity(4096);
    for (name, kind, help, values) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in &live {
            let instance = escape(&m.instance);
            for (labels, n) in values(m) {
                let sep = if labels.is_empty() { "" } else { "," };
                let _ = writeln!(out, "{name}{{instance=\"{instance}\"{sep}{labels}}} {n}");
            }
        }
    }
    histogram(&mut out, "sdcluster_http_request_duration_seconds", &live, |m| {
        Some(escape(&m.instance)).map(|i| format!("instance=\"{i}\","))
    });
    let _ = writeln!(
        out,
        "# HELP sdcluster_worker_info A live instance and its process.\n# TYPE sdcluster_worker_info gauge"
    );
    for m in &live {
        let _ = writeln!(out, "sdcluster_worker_info{{instance=\"{}\",pid=\"{}\"}} 1", escape(&m.instance), m.pid);
    }

    // App-wide totals: every slot, live or not.
    for (name, kind, help, values) in FAMILIES {
        let name = name.replacen("sdcluster_", "sdcluster_app_", 1);
        let _ = writeln!(out, "# HELP {name} {help} All instances of the app.\n# TYPE {name} {kind}");
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for m in all {
            for (labels, n) in values(m) {
                *sums.entry(labels).or_default() += n;
            }
        }
        if sums.is_empty() && *kind == "gauge" {
            sums.insert(String::new(), 0);
        }
        for (labels, n) in sums {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {n}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {n}");
            }
        }
    }
    let every: Vec<&InstanceMetrics> = all.iter().collect();
    let total = sum_histograms(&every);
    histogram(&mut out, "sdcluster_app_http_request_duration_seconds", &[&total], |_| Some(String::new()));
    let _ = writeln!(
        out,
        "# HELP sdcluster_app_instances Instances running now.\n# TYPE sdcluster_app_instances gauge\nsdcluster_app_instances {}",
        live.len()
    );
    let _ = writeln!(
        out,
        "# HELP sdcluster_connections_queued Connections waiting in a listening socket's accept queue.\n# TYPE sdcluster_connections_queued gauge"
    );
    for (listener, n) in queues {
        if let Some(n) = n {
            let _ = writeln!(out, "sdcluster_connections_queued{{listener=\"{}\"}} {n}", escape(listener));
        }
    }
    out
}

/// One histogram family; `labels` gives each series' labels before `le`, comma included.
fn histogram(
    out: &mut String,
    name: &str,
    of: &[&InstanceMetrics],
    labels: impl Fn(&InstanceMetrics) -> Option<String>,
) {
    let _ = writeln!(out, "# HELP {name} Time from a request to its response head.\n# TYPE {name} histogram");
    for m in of {
        let Some(l) = labels(m) else { continue };
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(m.latency_buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{l}le=\"{le}\"}} {cumulative}");
        }
        cumulative += m.latency_buckets[LATENCY_BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{l}le=\"+Inf\"}} {cumulative}");
        let bare = l.trim_end_matches(',');
        let braces = if bare.is_empty() { String::new() } else { format!("{{{bare}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", m.latency_sum_seconds);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

fn sum_histograms(of: &[&InstanceMetrics]) -> InstanceMetrics {
    let mut total = InstanceMetrics {
        instance: String::new(),
        pid: 0,
        live: false,
        starts: 0,
        requests: 0,
        open_connections: 0,
        accepted: 0,
        bytes_in: 0,
        bytes_out: 0,
        handed_over: 0,
        taken_over: 0,
        drains: 0,
        unread_discarded: 0,
        unread_closed: 0,
        rejected: Default::default(),
        by_status: Vec::new(),
        latency_buckets: Default::default(),
        latency_sum_seconds: 0.0,
    };
    for m in of {
        for (t, n) in total.latency_buckets.iter_mut().zip(m.latency_buckets) {
            *t += n;
        }
        total.latency_sum_seconds += m.latency_sum_seconds;
    }
    total
}

/// Label values escaped as the exposition format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let s = Stats::new("web\"1".into());
        s.connection_opened();
        s.connection_opened();
        s.connection_closed();
        s.answered(200, Duration::from_millis(1));
        s.answered(200, Duration::from_millis(1));
        s.answered(404, Duration::from_secs(1));
        s.answered(42, Duration::ZERO); // not a status: ignored rather than miscounted
        s.rejected(Rejected::TooLarge);
        assert_eq!((s.open(), s.requests()), (1, 3));
        let text = s.render_prometheus();
        assert!(text.contains("sdcluster_http_requests_total{instance=\"web\\\"1\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("sdcluster_app_http_requests_total{status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("status=\"404\"} 1\n"));
        assert!(text.contains("sdcluster_connections_open{instance=\"web\\\"1\"} 1\n"));
        assert!(text.contains("sdcluster_connections_accepted_total{instance=\"web\\\"1\"} 2\n"));
        assert!(text.contains("sdcluster_app_connections_accepted_total 2\n"), "{text}");
        assert!(!text.contains("status=\"500\""));
        assert!(
            text.contains("sdcluster_http_rejected_total{instance=\"web\\\"1\",reason=\"too_large\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("reason=\"malformed\"} 0\n"));
        assert!(
            text.contains("sdcluster_http_request_duration_seconds_bucket{instance=\"web\\\"1\",le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("sdcluster_app_http_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("sdcluster_app_http_request_duration_seconds_count 3\n"), "{text}");
        assert!(text.contains("sdcluster_worker_starts_total{instance=\"web\\\"1\"} 1\n"), "{text}");
        s.handed_over();
        s.unread_body(true);
        let text = s.render_prometheus();
        assert!(text.contains("direction=\"sent\"} 1\n") && text.contains("direction=\"received\"} 0\n"), "{text}");
        assert!(text.contains("outcome=\"discarded\"} 1\n") && text.contains("outcome=\"closed\"} 0\n"), "{text}");
    }

    #[test]
    fn totals_carry_dead_instances_and_series_show_live_ones() {
        let table = Arc::new(MetricsTable::private().unwrap());
        let dead = table.claim("gone", 1, 0).unwrap();
        dead.answered(200, Duration::ZERO);
        std::mem::forget(dead); // killed: its heartbeat at 0 is long stale
        let s = Stats::in_table("here".into(), Some(Arc::clone(&table)));
        s.answered(200, Duration::ZERO);
        let text = s.render_prometheus();
        assert!(!text.contains("instance=\"gone\""), "{text}");
        assert!(text.contains("sdcluster_http_requests_total{instance=\"here\",status=\"200\"} 1\n"), "{text}");
        assert!(text.contains("sdcluster_app_http_requests_total{status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("sdcluster_app_instances 1\n"), "{text}");
    }
}
