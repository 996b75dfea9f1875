//! Continuous client load for the tests that restart, kill or roll workers while requests
//! flow, and count exactly how each request ended.
//!
//! The clients behave like HTTP/1.1 clients that never retry (Python's `http.client`, most
//! language runtimes' default clients for a POST): every request is counted once, as
//! answered, refused or failed. A kept-alive connection the server closes without having
//! announced it (`Connection: close`) is a failure of the request sent on it, never a silent
//! reconnect. After an announced close the client opens a new connection for its next
//! request; that is counted ([`LoadReport::reconnects`]), not failed. Each client remembers
//! the local port of every connection it opened, so a test can tell connections that
//! survived a restart from connections that were replaced.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::{Connection, IO_TIMEOUT};

/// How the clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A new connection per request (`Connection: close`).
    Fresh,
    /// One keep-alive connection per client, kept until the server announces that it closes
    /// it (`Connection: close`). A kept-alive connection closed or reset under the client
    /// fails the request sent on it.
    KeepAlive,
}

/// Default think time of keep-alive clients between a response and their next request.
pub const THINK: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_millis(30);
/// Default: every third request is a POST.
pub const POST_EVERY: u32 = 3;
/// Default size of a POST's body.
pub const POST_BODY: usize = 512;
/// Default pause between a POST's headers and its body, so that the body arrives apart.
pub const BODY_PAUSE: Duration = Duration::from_millis(1);

/// What one client did: see [`LoadReport::clients`].
#[derive(Default, Clone, PartialEq, Eq)]
pub struct ClientReport {
    /// Local ports of the connections it opened, in order (one per connection).
    pub ports: Vec<u16>,
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
}

impl fmt::Debug for ClientReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A fresh-connection client opens thousands: show the ends.
        let ports = if self.ports.len() <= 6 {
            format!("{:?}", self.ports)
        } else {
            let (head, tail) = (&self.ports[..3], &self.ports[self.ports.len() - 2..]);
            format!("{head:?} .. {tail:?} ({} connections)", self.ports.len())
        };
        write!(f, "{{ok: {}, failed: {}, ports: {ports}}}", self.ok, self.failed)
    }
}

/// How the requests of a [`Load`] ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Answered with 200.
    pub ok: u64,
    /// The connection was refused: nobody listened.
    pub refused: u64,
    /// Anything else: reset, closed before the answer (also on a kept-alive connection),
    /// timeout, a non-200 status.
    pub failed: u64,
    /// POSTs (with a body sent after the headers) among `ok`.
    pub posts: u64,
    /// Connections opened by keep-alive clients after the server announced a close: the
    /// server ended the connection properly, the client went on on a new one.
    pub reconnects: u64,
    /// Responses to keep-alive clients that said `Connection: close` (or had no length).
    pub closed_announced: u64,
    /// Requests on a kept-alive connection (not its first) that failed because the server
    /// had closed or reset it without announcing it: the failure issue 9 is about. Included
    /// in `failed`.
    pub closed_unannounced: u64,
    /// The first few failures, for the assertion message.
    pub samples: Vec<String>,
    /// Each client's requests and the local ports of its connections.
    pub clients: Vec<ClientReport>,
}

impl LoadReport {
    /// Connections the clients opened, over the whole run (a keep-alive client whose
    /// connection survived everything opened one).
    pub fn connections_opened(&self) -> u64 {
        self.clients.iter().map(|c| c.ports.len() as u64).sum()
    }

    /// Every request the clients made: `ok + refused + failed`.
    pub fn requests(&self) -> u64 {
        self.ok + self.refused + self.failed
    }

    /// Whether every client kept the one connection it opened first (its requests all went
    /// over it, whatever happened to the workers meanwhile).
    pub fn every_connection_survived(&self) -> bool {
        self.clients.iter().all(|c| c.ports.len() == 1)
    }

    /// The figures in one line, for logs and assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} ok ({} POST), {} refused, {} failed ({} on kept-alive connections closed unannounced), \
             {} connections opened, {} reconnects after Connection: close; failures {:?}",
            self.ok,
            self.posts,
            self.refused,
            self.failed,
            self.closed_unannounced,
            self.connections_opened(),
            self.reconnects,
            self.samples
        )
    }
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    posts: AtomicU64,
    reconnects: AtomicU64,
    closed_announced: AtomicU64,
    closed_unannounced: AtomicU64,
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

/// One client's state, shared with [`Load::connections`] while it runs.
#[derive(Default)]
struct ClientState {
    report: ClientReport,
    /// Local port of the connection it holds right now.
    current: Option<u16>,
}

/// How a [`Load`]'s clients behave: [`Load::builder`].
#[derive(Debug, Clone)]
pub struct LoadBuilder {
    addr: SocketAddr,
    path: String,
    clients: usize,
    reuse: Reuse,
    think: Option<RangeInclusive<Duration>>,
    post_every: u32,
    post_body: usize,
    body_pause: Duration,
}

impl LoadBuilder {
    /// The path every request goes to (default `/`); POSTs too, so it must answer POST.
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_owned();
        self
    }

    /// How many clients (threads, each with one request at a time); default 1.
    pub fn clients(mut self, clients: usize) -> Self {
        self.clients = clients;
        self
    }

    /// Fresh connections or keep-alive (the default).
    pub fn reuse(mut self, reuse: Reuse) -> Self {
        self.reuse = reuse;
        self
    }

    /// A random pause in `think` after each response (default [`THINK`] for keep-alive
    /// clients, none for fresh connections); a kept-alive connection sits idle meanwhile.
    pub fn think(mut self, think: RangeInclusive<Duration>) -> Self {
        self.think = Some(think);
        self
    }

    /// Every `n`th request of a client is a POST with a body (default [`POST_EVERY`]);
    /// 0: GETs only.
    pub fn post_every(mut self, n: u32) -> Self {
        self.post_every = n;
        self
    }

    /// The POST body's size (default [`POST_BODY`]) and the pause between the headers and
    /// the body (default [`BODY_PAUSE`]): two writes, the body arrives after the headers.
    pub fn post_body(mut self, size: usize, pause: Duration) -> Self {
        self.post_body = size;
        self.body_pause = pause;
        self
    }

    /// Starts the clients.
    pub fn start(self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let think = self.think.clone().unwrap_or(match self.reuse {
            Reuse::KeepAlive => THINK,
            Reuse::Fresh => Duration::ZERO..=Duration::ZERO,
        });
        let settings = Arc::new(Settings {
            addr: self.addr,
            path: self.path,
            reuse: self.reuse,
            think,
            post_every: self.post_every,
            body: vec![b'x'; self.post_body],
            body_pause: self.body_pause,
        });
        let states: Vec<Arc<Mutex<ClientState>>> = (0..self.clients).map(|_| Arc::default()).collect();
        let clients = states
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let (stop, counters, state, settings) =
                    (Arc::clone(&stop), Arc::clone(&counters), Arc::clone(state), Arc::clone(&settings));
                std::thread::spawn(move || client(index, &settings, &stop, &counters, &state))
            })
            .collect();
        Load { stop, counters, states, clients }
    }
}

struct Settings {
    addr: SocketAddr,
    path: String,
    reuse: Reuse,
    think: RangeInclusive<Duration>,
    post_every: u32,
    body: Vec<u8>,
    body_pause: Duration,
}

/// Clients sending requests in a loop until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    states: Vec<Arc<Mutex<ClientState>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `clients` clients against `addr` sending to `path` (which must answer GET and
    /// POST), with the defaults of [`Load::builder`]: every third request a POST with a
    /// 512-byte body sent after its headers; keep-alive clients think 0–30 ms between
    /// requests, fresh-connection clients do not.
    pub fn start(addr: SocketAddr, path: &str, clients: usize, reuse: Reuse) -> Self {
        Self::builder(addr).path(path).clients(clients).reuse(reuse).start()
    }

    /// Clients against `addr` to configure: one keep-alive client on `/` unless told.
    pub fn builder(addr: SocketAddr) -> LoadBuilder {
        LoadBuilder {
            addr,
            path: "/".to_owned(),
            clients: 1,
            reuse: Reuse::KeepAlive,
            think: None,
            post_every: POST_EVERY,
            post_body: POST_BODY,
            body_pause: BODY_PAUSE,
        }
    }

    /// Requests answered so far (to wait until the load is flowing).
    pub fn ok(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }

    /// The local port of the connection each client holds right now (`None`: between
    /// connections), to compare before and after a restart.
    pub fn connections(&self) -> Vec<Option<u16>> {
        self.states.iter().map(|s| s.lock().unwrap().current).collect()
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
            posts: c.posts.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            closed_announced: c.closed_announced.load(Ordering::Relaxed),
            closed_unannounced: c.closed_unannounced.load(Ordering::Relaxed),
            samples: c.samples.lock().unwrap().clone(),
            clients: self.states.iter().map(|s| s.lock().unwrap().report.clone()).collect(),
        }
    }
}

/// A connection a client holds: where it comes from, how many requests it carried.
struct Held {
    connection: Connection<TcpStream>,
    port: u16,
    served: u64,
}

/// xorshift64*: think times need no quality, only spread, and the tests have no rand crate.
struct Rng(u64);

impl Rng {
    fn new(index: usize) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self((nanos ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    fn pick(&mut self, range: &RangeInclusive<Duration>) -> Duration {
        let (lo, hi) = (range.start().as_micros() as u64, range.end().as_micros() as u64);
        if hi <= lo { Duration::from_micros(lo) } else { Duration::from_micros(lo + self.below(hi - lo + 1)) }
    }
}

fn connect(addr: SocketAddr) -> io::Result<(Connection<TcpStream>, u16)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let port = stream.local_addr()?.port();
    Ok((Connection::new(stream), port))
}

/// Errors that mean the server closed or reset the connection.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn client(index: usize, s: &Settings, stop: &AtomicBool, counters: &Counters, state: &Mutex<ClientState>) {
    let mut rng = Rng::new(index);
    let mut held: Option<Held> = None;
    // The previous connection ended with an announced close: the next one is a reconnect.
    let mut announced = false;
    let mut sent: u64 = 0;
    let close = if s.reuse == Reuse::Fresh { "Connection: close\r\n" } else { "" };
    while !stop.load(Ordering::Relaxed) {
        let mut h = match held.take() {
            Some(h) => h,
            None => match connect(s.addr) {
                Ok((connection, port)) => {
                    if std::mem::take(&mut announced) {
                        counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut state = state.lock().unwrap();
                    state.report.ports.push(port);
                    state.current = Some(port);
                    Held { connection, port, served: 0 }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    counters.fail(format!("client {index}: connect: {e}"));
                    state.lock().unwrap().report.failed += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            },
        };
        sent += 1;
        let post = s.post_every > 0 && sent % u64::from(s.post_every) == 0;
        let method = if post { "POST" } else { "GET" };
        let outcome = exchange(&mut h.connection, s, close, post);
        let reused = h.served > 0;
        h.served += 1;
        let mut keep = false;
        match outcome {
            Ok(r) if r.status == 200 => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
                if post {
                    counters.posts.fetch_add(1, Ordering::Relaxed);
                }
                state.lock().unwrap().report.ok += 1;
                if s.reuse == Reuse::KeepAlive {
                    if r.closes() || r.header("content-length").is_none() {
                        counters.closed_announced.fetch_add(1, Ordering::Relaxed);
                        announced = true;
                    } else {
                        keep = true;
                    }
                }
            }
            Ok(r) => {
                counters.fail(format!("client {index}, port {}: {method} answered {}", h.port, r.status));
                state.lock().unwrap().report.failed += 1;
                // The status line says nothing about the connection: a new one, announced or not.
                announced = r.closes();
            }
            Err((stage, e)) => {
                let kept = if reused {
                    format!("kept-alive connection (request {} on it)", h.served)
                } else {
                    "new connection".into()
                };
                if reused && closed(&e) {
                    counters.closed_unannounced.fetch_add(1, Ordering::Relaxed);
                }
                counters.fail(format!("client {index}, port {}, {kept}: {method}: {stage}: {e}", h.port));
                state.lock().unwrap().report.failed += 1;
            }
        }
        if keep {
            held = Some(h);
        } else {
            state.lock().unwrap().current = None;
        }
        let think = rng.pick(&s.think);
        if !think.is_zero() {
            std::thread::sleep(think);
        }
    }
}

/// One request and its response; the error tells at which stage it failed.
fn exchange(
    connection: &mut Connection<TcpStream>,
    s: &Settings,
    close: &str,
    post: bool,
) -> Result<crate::http::Response, (&'static str, io::Error)> {
    let path = &s.path;
    if post {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: load\r\n{close}Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            s.body.len()
        );
        connection.send(head.as_bytes()).map_err(|e| ("sending the headers", e))?;
        if !s.body_pause.is_zero() {
            std::thread::sleep(s.body_pause);
        }
        connection.send(&s.body).map_err(|e| ("sending the body", e))?;
    } else {
        let head = format!("GET {path} HTTP/1.1\r\nHost: load\r\n{close}\r\n");
        connection.send(head.as_bytes()).map_err(|e| ("sending the request", e))?;
    }
    connection.read_response().map_err(|e| ("reading the response", e))
}

/// Fresh-connection and keep-alive clients requesting `/` side by side, reported apart: the
/// two ways real clients meet a restart (refused or reset connects, idle connections closed).
pub struct MixedLoad {
    fresh: Load,
    kept: Load,
    clients: usize,
}

impl MixedLoad {
    /// Starts `fresh` clients opening a connection per request and `kept` keep-alive clients
    /// (the defaults of [`Load::start`]: every third request a POST, keep-alive clients
    /// thinking 0–30 ms).
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

    /// The keep-alive clients' current connections ([`Load::connections`]).
    pub fn kept_connections(&self) -> Vec<Option<u16>> {
        self.kept.connections()
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
            eprintln!("{what}: {}", r.summary());
        }
        eprintln!("keep-alive clients: {:?}", kept.clients);
        assert!(fresh.ok > 0 && kept.ok > 0, "every client got answers");
        (fresh, kept)
    }

    /// [`Self::stop`], then asserts that no request was refused or failed `during` what the
    /// test did (a planned restart or scale must lose nothing), a request on a kept-alive
    /// connection closed under the client included.
    pub fn stop_without_loss(self, during: &str) {
        let (fresh, kept) = self.stop();
        assert_eq!(fresh.refused + kept.refused, 0, "the shared socket closed during {during}");
        assert_eq!(
            fresh.failed + kept.failed,
            0,
            "failed requests during {during} ({} on kept-alive connections closed unannounced): {:?} {:?}",
            kept.closed_unannounced,
            fresh.samples,
            kept.samples
        );
    }
}

#[cfg(test)]
mod tests {
    //! The client against tiny servers that misbehave on purpose.

    use super::*;
    use std::collections::BTreeSet;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// How a test server treats its connections.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        /// Keep-alive, forever.
        KeepAlive,
        /// Closes a connection that stays idle for this long, without announcing it.
        IdleClose(Duration),
        /// Answers every request with `Connection: close` and closes.
        AnnouncedClose,
    }

    /// What a test server saw.
    #[derive(Default)]
    struct Seen {
        gets: u64,
        /// Body sizes of the POSTs, and whether the body was still to come when the headers
        /// had been read.
        posts: Vec<(usize, bool)>,
        bodies_ok: bool,
        /// Peer ports of the connections it accepted.
        peers: BTreeSet<u16>,
    }

    fn server(mode: Mode) -> (SocketAddr, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen { bodies_ok: true, ..Seen::default() }));
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let seen = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, mode, &seen));
            }
        });
        (addr, seen)
    }

    fn serve(stream: TcpStream, mode: Mode, seen: &Mutex<Seen>) {
        seen.lock().unwrap().peers.insert(stream.peer_addr().unwrap().port());
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        loop {
            if let Mode::IdleClose(idle) = mode {
                reader.get_ref().set_read_timeout(Some(idle)).unwrap();
            }
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return, // the client closed, or idle too long: close.
                Ok(_) => {}
            }
            reader.get_ref().set_read_timeout(None).unwrap();
            let post = line.starts_with("POST ");
            let mut length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            if post {
                let later = reader.buffer().is_empty();
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let mut seen = seen.lock().unwrap();
                seen.posts.push((length, later));
                seen.bodies_ok &= body.iter().all(|&b| b == b'x');
            } else {
                seen.lock().unwrap().gets += 1;
            }
            let close = mode == Mode::AnnouncedClose;
            let connection = if close { "Connection: close\r\n" } else { "" };
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{connection}\r\nok");
            if writer.write_all(answer.as_bytes()).is_err() || close {
                return;
            }
        }
    }

    fn run(addr: SocketAddr, clients: usize, answers: u64) -> LoadReport {
        let load = Load::builder(addr).clients(clients).start();
        load.wait_for_more(answers);
        load.stop()
    }

    #[test]
    fn idle_connections_closed_unannounced_are_failures() {
        // The clients think 0–30 ms; the server drops connections idle for 10 ms.
        let (addr, _) = server(Mode::IdleClose(Duration::from_millis(10)));
        let report = run(addr, 4, 100);
        eprintln!("{}", report.summary());
        assert!(report.failed > 0 && report.closed_unannounced > 0, "{report:?}");
        assert_eq!(report.reconnects, 0, "an unannounced close is no reconnect: {report:?}");
        assert!(report.samples.iter().any(|s| s.contains("kept-alive connection")), "{:?}", report.samples);
        // A client goes on on a new connection after the failure.
        assert!(report.connections_opened() > 4, "{report:?}");
    }

    #[test]
    fn announced_closes_are_reconnects_not_failures() {
        let (addr, seen) = server(Mode::AnnouncedClose);
        let report = run(addr, 4, 60);
        eprintln!("{}", report.summary());
        assert_eq!((report.failed, report.refused), (0, 0), "{report:?}");
        assert!(report.reconnects >= report.ok - 4, "{report:?}");
        assert_eq!(report.closed_announced, report.ok);
        // One connection per request, each from its own port.
        assert_eq!(report.connections_opened(), report.ok, "{report:?}");
        // The ports recorded are those the server saw (a port can come again once free).
        let ports: BTreeSet<u16> = report.clients.iter().flat_map(|c| c.ports.iter().copied()).collect();
        assert!(ports.is_subset(&seen.lock().unwrap().peers));
    }

    #[test]
    fn posts_send_their_body_after_the_headers() {
        let (addr, seen) = server(Mode::KeepAlive);
        let load = Load::builder(addr).clients(2).think(Duration::ZERO..=Duration::from_millis(2)).start();
        load.wait_for_more(60);
        let report = load.stop();
        let seen = seen.lock().unwrap();
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(report.posts, seen.posts.len() as u64);
        assert_eq!(report.ok, seen.gets + report.posts);
        // Every third request of each client.
        for client in &report.clients {
            assert!(client.ok >= 3);
        }
        let expected: u64 = report.clients.iter().map(|c| c.ok / 3).sum();
        assert_eq!(report.posts, expected, "{report:?}");
        assert!(seen.posts.iter().all(|&(len, _)| len == POST_BODY), "{:?}", seen.posts);
        assert!(seen.bodies_ok);
        // The body came apart from the headers (a 1 ms pause on loopback: nearly always).
        let later = seen.posts.iter().filter(|(_, later)| *later).count();
        assert!(later * 2 > seen.posts.len(), "{later} of {} bodies after their headers", seen.posts.len());
    }

    #[test]
    fn keep_alive_clients_keep_one_connection_and_record_its_port() {
        let (addr, seen) = server(Mode::KeepAlive);
        let load = Load::builder(addr).clients(5).start();
        load.wait_for_more(50);
        let during = load.connections();
        let report = load.stop();
        assert_eq!(report.failed, 0, "{report:?}");
        assert!(report.every_connection_survived(), "{report:?}");
        assert_eq!(report.connections_opened(), 5);
        let ports: BTreeSet<u16> = report.clients.iter().map(|c| c.ports[0]).collect();
        assert_eq!(ports, seen.lock().unwrap().peers, "the server saw the ports the clients recorded");
        assert_eq!(during, report.clients.iter().map(|c| Some(c.ports[0])).collect::<Vec<_>>());
    }

    #[test]
    fn fresh_clients_open_a_connection_per_request() {
        let (addr, seen) = server(Mode::KeepAlive);
        let load = Load::start(addr, "/", 2, Reuse::Fresh);
        load.wait_for_more(30);
        let report = load.stop();
        // The server keeps the connection; the client closes it after each answer.
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(report.connections_opened(), report.ok);
        assert_eq!(report.reconnects, 0);
        assert_eq!(seen.lock().unwrap().peers.len() as u64, report.ok);
    }

    #[test]
    fn nobody_listening_is_refused() {
        let addr = crate::net::free_addr();
        let load = Load::builder(addr).clients(2).start();
        crate::wait_until(Duration::from_secs(5), || (load.counters.refused.load(Ordering::Relaxed) > 3).then_some(()))
            .unwrap();
        let report = load.stop();
        assert!(report.refused > 3 && report.failed == 0 && report.ok == 0, "{report:?}");
        assert_eq!(report.connections_opened(), 0);
    }
}
