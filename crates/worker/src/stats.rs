//! Counters a worker keeps about itself, for `/metrics`, `STATUS=` and the balance table.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

/// Lock-free counters, shared by every connection task of a worker.
pub struct Stats {
    instance: String,
    started: Instant,
    open: AtomicU64,
    accepted: AtomicU64,
    by_status: Vec<AtomicU64>,
    rejected: [AtomicU64; Rejected::ALL.len()],
    handed_over: AtomicU64,
    taken_over: AtomicU64,
    unread_bodies: [AtomicU64; 2],
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

impl Rejected {
    const ALL: [Rejected; 3] = [Rejected::Malformed, Rejected::TooLarge, Rejected::HeaderTimeout];

    fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::TooLarge => "too_large",
            Rejected::HeaderTimeout => "header_timeout",
        }
    }

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
    /// Counters for the worker named `instance`.
    pub fn new(instance: String) -> Self {
        Self {
            instance,
            started: Instant::now(),
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            by_status: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            rejected: Default::default(),
            handed_over: AtomicU64::new(0),
            taken_over: AtomicU64::new(0),
            unread_bodies: Default::default(),
        }
    }

    /// The worker's name, as given by `--instance`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Relaxed)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.by_status.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub(crate) fn connection_opened(&self) -> u64 {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed) + 1
    }

    pub(crate) fn connection_closed(&self) -> u64 {
        self.open.fetch_sub(1, Relaxed) - 1
    }

    pub(crate) fn rejected(&self, why: Rejected) {
        self.rejected[why as usize].fetch_add(1, Relaxed);
    }

    /// A kept-alive connection went to the next process through the fd store.
    pub(crate) fn handed_over(&self) {
        self.handed_over.fetch_add(1, Relaxed);
    }

    /// A connection came from the previous process through the fd store.
    pub(crate) fn taken_over(&self) {
        self.taken_over.fetch_add(1, Relaxed);
    }

    /// Connections handed to the next process so far.
    pub fn handed_over_count(&self) -> u64 {
        self.handed_over.load(Relaxed)
    }

    /// A request body the app left unread: `discarded` when it was read and thrown away so
    /// that the connection stays usable, else the response announced `Connection: close`.
    pub(crate) fn unread_body(&self, discarded: bool) {
        self.unread_bodies[usize::from(discarded)].fetch_add(1, Relaxed);
    }

    pub(crate) fn answered(&self, status: u16) {
        if let Some(counter) = status.checked_sub(FIRST_STATUS).and_then(|i| self.by_status.get(usize::from(i))) {
            counter.fetch_add(1, Relaxed);
        }
    }

    /// The counters in Prometheus' text format. The label is `worker`, not `instance`, which
    /// Prometheus reserves for the scrape target.
    pub fn render_prometheus(&self) -> String {
        let w = escape(&self.instance);
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP sdcluster_http_requests_total HTTP requests answered, by status code.\n# TYPE sdcluster_http_requests_total counter\n");
        for (i, counter) in self.by_status.iter().enumerate() {
            let n = counter.load(Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "sdcluster_http_requests_total{{worker=\"{w}\",status=\"{}\"}} {n}",
                    i + usize::from(FIRST_STATUS)
                );
            }
        }
        out.push_str("# HELP sdcluster_http_rejected_total Requests refused before the app saw them, by reason.\n# TYPE sdcluster_http_rejected_total counter\n");
        for why in Rejected::ALL {
            let n = self.rejected[why as usize].load(Relaxed);
            let _ = writeln!(out, "sdcluster_http_rejected_total{{worker=\"{w}\",reason=\"{}\"}} {n}", why.label());
        }
        let _ = write!(
            out,
            "# HELP sdcluster_connections_open Connections this worker holds open.\n# TYPE sdcluster_connections_open gauge\n\
             sdcluster_connections_open{{worker=\"{w}\"}} {}\n\
             # HELP sdcluster_connections_accepted_total Connections this worker accepted.\n# TYPE sdcluster_connections_accepted_total counter\n\
             sdcluster_connections_accepted_total{{worker=\"{w}\"}} {}\n\
             # HELP sdcluster_handover_connections_total Kept-alive connections passed through the fd store across a restart, by direction.\n# TYPE sdcluster_handover_connections_total counter\n\
             sdcluster_handover_connections_total{{worker=\"{w}\",direction=\"sent\"}} {}\n\
             sdcluster_handover_connections_total{{worker=\"{w}\",direction=\"received\"}} {}\n\
             # HELP sdcluster_unread_bodies_total Request bodies the app did not read: discarded (connection kept) or closed (Connection: close).\n# TYPE sdcluster_unread_bodies_total counter\n\
             sdcluster_unread_bodies_total{{worker=\"{w}\",outcome=\"discarded\"}} {}\n\
             sdcluster_unread_bodies_total{{worker=\"{w}\",outcome=\"closed\"}} {}\n\
             # HELP sdcluster_uptime_seconds Seconds since this worker started.\n# TYPE sdcluster_uptime_seconds gauge\n\
             sdcluster_uptime_seconds{{worker=\"{w}\"}} {:.3}\n\
             # HELP sdcluster_worker_info This worker's pid and version.\n# TYPE sdcluster_worker_info gauge\n\
             sdcluster_worker_info{{worker=\"{w}\",pid=\"{}\",version=\"{}\"}} 1\n",
            self.open(),
            self.accepted.load(Relaxed),
            self.handed_over.load(Relaxed),
            self.taken_over.load(Relaxed),
            self.unread_bodies[1].load(Relaxed),
            self.unread_bodies[0].load(Relaxed),
            self.started.elapsed().as_secs_f64(),
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
        );
        out
    }
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
        s.answered(200);
        s.answered(200);
        s.answered(404);
        s.answered(42); // not a status: ignored rather than miscounted
        s.rejected(Rejected::TooLarge);
        assert_eq!((s.open(), s.requests()), (1, 3));
        let text = s.render_prometheus();
        assert!(text.contains("sdcluster_http_requests_total{worker=\"web\\\"1\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("status=\"404\"} 1\n"));
        assert!(text.contains("sdcluster_connections_open{worker=\"web\\\"1\"} 1\n"));
        assert!(text.contains("sdcluster_connections_accepted_total{worker=\"web\\\"1\"} 2\n"));
        assert!(!text.contains("status=\"500\""));
        assert!(text.contains("sdcluster_http_rejected_total{worker=\"web\\\"1\",reason=\"too_large\"} 1\n"), "{text}");
        assert!(text.contains("reason=\"malformed\"} 0\n"));
        s.handed_over();
        s.unread_body(true);
        let text = s.render_prometheus();
        assert!(text.contains("direction=\"sent\"} 1\n") && text.contains("direction=\"received\"} 0\n"), "{text}");
        assert!(text.contains("outcome=\"discarded\"} 1\n") && text.contains("outcome=\"closed\"} 0\n"), "{text}");
    }
}
