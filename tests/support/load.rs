//! Continuous client load for the tests that restart, kill or roll workers while requests
//! flow, and count exactly how each request ended.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::Connection;

/// How the clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A new connection per request (`Connection: close`).
    Fresh,
    /// One keep-alive connection per client, reopened when the server closes it between
    /// requests (what a drain does), which is not a failure.
    KeepAlive,
}

/// How the requests of a [`Load`] ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Answered with 200.
    pub ok: u64,
    /// The connection was refused: nobody listened.
    pub refused: u64,
    /// Anything else: reset, timeout, a non-200 status.
    pub failed: u64,
    /// Kept-alive connections the server closed between requests (a drain closes idle
    /// connections): the request was sent again on a new connection, as HTTP clients do for
    /// idempotent requests. Counted, not failed.
    pub retried: u64,
    /// The first few failures, for the assertion message.
    pub samples: Vec<String>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(what);
        }
    }
}

/// Clients sending `GET path` in a loop until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` threads against `addr`.
    pub fn start(addr: SocketAddr, path: &str, clients: usize, reuse: Reuse) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let clients = (0..clients)
            .map(|_| {
                let (stop, counters, path) = (Arc::clone(&stop), Arc::clone(&counters), path.to_owned());
                std::thread::spawn(move || client(addr, &path, reuse, &stop, &counters))
            })
            .collect();
        Self { stop, counters, clients }
    }

    /// Requests answered so far (to wait until the load is flowing).
    pub fn ok(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests were answered (panics after 30 s).
    pub fn wait_for_more(&self, n: u64) {
        let target = self.ok() + n;
        crate::wait_until(Duration::from_secs(30), || (self.ok() >= target).then_some(()))
            .unwrap_or_else(|| panic!("the load did not get {n} more answers in 30 s"));
    }

    /// Stops the clients and tells how their requests ended.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().expect("load client panicked");
        }
        let c = &self.counters;
        LoadReport {
            ok: c.ok.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            samples: c.samples.lock().unwrap().clone(),
        }
    }
}

fn client(addr: SocketAddr, path: &str, reuse: Reuse, stop: &AtomicBool, counters: &Counters) {
    let mut kept: Option<Connection<std::net::TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let fresh = kept.is_none();
        let mut connection = match kept.take() {
            Some(c) => c,
            None => match Connection::connect(addr) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    counters.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let close = if reuse == Reuse::Fresh { "Connection: close\r\n" } else { "" };
        let raw = format!("GET {path} HTTP/1.1\r\nHost: load\r\n{close}\r\n");
        match connection.send(raw.as_bytes()).and_then(|()| connection.read_response()) {
            Ok(r) if r.status == 200 => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
                if reuse == Reuse::KeepAlive && !r.closes() {
                    kept = Some(connection);
                }
            }
            Ok(r) => counters.fail(format!("status {}", r.status)),
            // A kept connection the server closed while idle (a drain or a restart): the
            // request never reached a worker, a real client retries it on a new connection.
            Err(e) if !fresh && idle_close(&e) => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counters.fail(format!("request: {e}")),
        }
    }
}

/// Errors that mean "the server closed this idle keep-alive connection before reading".
fn idle_close(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

/// Fresh-connection and keep-alive clients requesting `/` side by side, reported apart: the
/// two ways real clients meet a restart (refused or reset connects, idle connections closed).
pub struct MixedLoad {
    fresh: Load,
    kept: Load,
    clients: usize,
}

impl MixedLoad {
    /// Starts `fresh` clients opening a connection per request and `kept` keep-alive clients.
    pub fn start(addr: SocketAddr, fresh: usize, kept: usize) -> Self {
        Self {
            fresh: Load::start(addr, "/", fresh, Reuse::Fresh),
            kept: Load::start(addr, "/", kept, Reuse::KeepAlive),
            clients: fresh + kept,
        }
    }

    /// How many clients there are (each holds at most one request at a time).
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Waits until both kinds of clients got `n` more answers: requests flow through
    /// whatever happens next.
    pub fn wait_for_more(&self, n: u64) {
        self.fresh.wait_for_more(n);
        self.kept.wait_for_more(n);
    }

    /// Stops every client, prints how their requests ended, asserts that both kinds got
    /// answers, and returns the fresh-connection and the keep-alive reports.
    pub fn stop(self) -> (LoadReport, LoadReport) {
        let (fresh, kept) = (self.fresh.stop(), self.kept.stop());
        for (what, r) in [("fresh connections", &fresh), ("keep-alive connections", &kept)] {
            eprintln!(
                "{what}: {} ok, {} refused, {} failed, {} idle kept-alive connections closed by the server (request sent again); failures {:?}",
                r.ok, r.refused, r.failed, r.retried, r.samples
            );
        }
        assert!(fresh.ok > 0 && kept.ok > 0, "every client got answers");
        (fresh, kept)
    }

    /// [`Self::stop`], then asserts that no request was refused or failed `during` what the
    /// test did (a planned restart or scale must lose nothing).
    pub fn stop_without_loss(self, during: &str) {
        let (fresh, kept) = self.stop();
        assert_eq!(fresh.refused + kept.refused, 0, "the shared socket closed during {during}");
        assert_eq!(
            fresh.failed + kept.failed,
            0,
            "failed requests during {during}: {:?} {:?}",
            fresh.samples,
            kept.samples
        );
    }
}
