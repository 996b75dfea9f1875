//! A battery of bad clients against one reference worker, each while a normal client is
//! served: the normal client must get every answer, within its usual latency (p99 at most
//! `max(10 × its p99 before the attack, 50 ms)`); the worker must stay up, keep feeding its
//! watchdog, answer its health check, and give every connection slot back afterwards
//! (`/metrics`: open connections back to the one asking).
//!
//! The attacks run one at a time (latencies are measured), each against a worker of its own
//! with short limits (`--header-timeout`, `--write-timeout` and `--body-timeout` 1 s,
//! `--max-connections` 1000). Each prints a row of the table in docs/security.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use sdcluster_tests::http::{self, Connection};
use sdcluster_tests::{NotifySocket, TestDir, Worker, WorkerCommand, net, wait_until};

/// Generous bound for what must happen: only reached on failure.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long the normal client is measured before and during an attack.
const BASELINE: Duration = Duration::from_secs(1);
const DURING: Duration = Duration::from_secs(2);
/// The floor of the latency bound: a loaded CI machine has hiccups of this size anyway.
const FLOOR: Duration = Duration::from_millis(50);

/// One attack at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A worker under attack.
struct Target {
    worker: Worker,
    addr: SocketAddr,
    notify: NotifySocket,
    _dir: TestDir,
}

fn start() -> Target {
    let dir = TestDir::new("bad-client");
    let notify = NotifySocket::bind(dir.path());
    let addr = net::free_addr();
    // --listen: the worker binds with a backlog of 4096 (a test's std listener has 128).
    let worker = WorkerCommand::new()
        .args(["--instance", "target", "--listen", &addr.to_string(), "--debug-endpoints"])
        .args(["--header-timeout", "1s", "--write-timeout", "1s", "--body-timeout", "1s"])
        .args(["--max-connections", "1000"])
        .env("RUST_LOG", "warn")
        .notify_socket(notify.path())
        .watchdog(200_000)
        .spawn();
    drop(net::wait_for_port(addr, PATIENCE));
    Target { worker, addr, notify, _dir: dir }
}

/// What the normal client saw.
struct Latencies {
    samples: Vec<Duration>,
    failures: Vec<String>,
}

impl Latencies {
    fn p99(&self) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() * 99 / 100).copied().unwrap_or_default()
    }
}

/// A normal client: one kept-alive connection (made before any attack, as a client's pool
/// has it), `GET /` every millisecond for `how_long`; a failure reconnects.
fn normal_client(conn: &mut Connection<TcpStream>, addr: SocketAddr, how_long: Duration) -> Latencies {
    let mut out = Latencies { samples: Vec::new(), failures: Vec::new() };
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        let sent = Instant::now();
        match conn.get("/") {
            Ok(response) if response.status == 200 => out.samples.push(sent.elapsed()),
            Ok(response) => out.failures.push(format!("status {}", response.status)),
            Err(e) => {
                out.failures.push(e.to_string());
                *conn = Connection::connect(addr).expect("reconnect");
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    out
}

/// `sdcluster_connections_open` of the worker, counting the asking connection.
fn open_connections(addr: SocketAddr) -> u64 {
    let response = http::get(addr, "/metrics");
    let text = response.text();
    text.lines()
        .find_map(|line| line.strip_prefix("sdcluster_connections_open{")?.split_once("} ")?.1.parse().ok())
        .unwrap_or_else(|| panic!("no sdcluster_connections_open in {response:?} {:?}", response.body.len()))
}

/// The worker's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok()))
        .unwrap_or(0)
}

/// Runs `attack` (until told to stop; it returns what it saw) against a fresh worker while
/// the normal client is measured; asserts what the module's documentation says.
fn battery(name: &str, attack: impl FnOnce(SocketAddr, u32, &AtomicBool) -> String + Send) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut target = start();
    let addr = target.addr;
    let pid = target.worker.pid();
    let mut normal = Connection::connect(addr).expect("connect");
    let _ = normal_client(&mut normal, addr, Duration::from_millis(200)); // warm up
    let baseline = normal_client(&mut normal, addr, BASELINE);
    assert!(baseline.failures.is_empty(), "before the attack: {:?}", baseline.failures);
    let bound = (baseline.p99() * 10).max(FLOOR);

    let stop = AtomicBool::new(false);
    let (seen, during, pings) = thread::scope(|s| {
        let attacker = s.spawn(|| attack(addr, pid, &stop));
        let notify = &mut target.notify;
        let pings = s.spawn(move || {
            let from = notify.received().len();
            notify.receive_until(Instant::now() + DURING + Duration::from_millis(300));
            notify.received()[from..].iter().filter(|n| n.has("WATCHDOG=1")).map(|n| n.at).collect::<Vec<_>>()
        });
        thread::sleep(Duration::from_millis(300)); // the attack gets going
        let during = normal_client(&mut normal, addr, DURING);
        stop.store(true, Ordering::SeqCst);
        (attacker.join().expect("the attack"), during, pings.join().expect("the watchdog's pings"))
    });
    eprintln!(
        "| {name} | {seen} | {:.2} ms | {:.2} ms | {} |",
        baseline.p99().as_secs_f64() * 1e3,
        during.p99().as_secs_f64() * 1e3,
        during.samples.len()
    );
    assert!(during.failures.is_empty(), "{name}: the normal client failed: {:?}", during.failures);
    assert!(
        during.p99() <= bound,
        "{name}: the normal client's p99 went from {:?} to {:?} (bound {bound:?})",
        baseline.p99(),
        during.p99()
    );
    assert!(target.worker.is_running(), "{name}: the worker died; stderr:\n{}", target.worker.stderr());
    let longest_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(pings.len() >= 10 && longest_gap < Duration::from_millis(600), "{name}: watchdog pings {pings:?}");
    let health = http::get(addr, "/healthz");
    assert_eq!((health.status, health.text().as_str()), (200, "ok\n"), "{name}");
    drop(normal);
    if wait_until(PATIENCE, || (open_connections(addr) == 1).then_some(())).is_none() {
        panic!("{name}: the slots did not come back: {} connections open", open_connections(addr));
    }
}

/// Whether the server has closed `stream` (EOF or reset), looking for at most `wait`; else
/// how many bytes came meanwhile.
fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> Result<(), usize> {
    stream.set_read_timeout(Some(wait)).expect("a read timeout");
    let mut buf = [0; 65536];
    let mut read = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => read += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(read);
            }
            Err(_) => return Ok(()),
        }
    }
}

#[test]
fn slowloris_on_the_headers() {
    battery("slowloris, headers (200 connections, a header line every 200 ms)", |addr, _, stop| {
        let started = Instant::now();
        let mut conns: Vec<(TcpStream, Option<Duration>)> = (0..200)
            .map(|_| {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").expect("send");
                (s, None)
            })
            .collect();
        while !stop.load(Ordering::SeqCst) {
            for (s, cut) in conns.iter_mut().filter(|(_, cut)| cut.is_none()) {
                if s.write_all(b"X-Slow: yes\r\n").is_err() {
                    *cut = Some(started.elapsed());
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        let cut: Vec<Duration> = conns.iter().filter_map(|(_, cut)| *cut).collect();
        assert_eq!(cut.len(), 200, "every slow head is cut");
        let last = cut.iter().max().unwrap();
        assert!(*last < Duration::from_secs(2), "cut by {last:?} with --header-timeout 1s");
        format!("all 200 cut within {:.1} s (--header-timeout 1s), no answer", last.as_secs_f64())
    });
}

#[test]
fn slowloris_on_the_body() {
    battery("slowloris, body (100 read by the app, 100 not)", |addr, _, stop| {
        let started = Instant::now();
        let mut conns: Vec<(TcpStream, bool)> = (0..200)
            .map(|i| {
                let mut s = TcpStream::connect(addr).expect("connect");
                let path = if i % 2 == 0 { "/debug/echo" } else { "/" };
                let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789");
                s.write_all(head.as_bytes()).expect("send");
                (s, i % 2 == 0)
            })
            .collect();
        let mut answers = std::collections::BTreeMap::<String, usize>::new();
        let mut last = Duration::ZERO;
        for (s, _read) in &mut conns {
            // Nothing after the first 10 bytes of 100 000.
            let mut buf = Vec::new();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let _ = s.read_to_end(&mut buf);
            last = last.max(started.elapsed());
            let status = String::from_utf8_lossy(buf.get(9..12).unwrap_or(b"---")).into_owned();
            *answers.entry(status).or_default() += 1;
        }
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(answers.get("408"), Some(&100), "the app waited for the body: 408 then close: {answers:?}");
        assert_eq!(answers.get("200"), Some(&100), "the app did not read it: answered, then close: {answers:?}");
        assert!(last < Duration::from_secs(3), "all closed by {last:?}");
        format!("all 200 closed within {:.1} s: 408 where the app waited for the body, {answers:?}", last.as_secs_f64())
    });
}

#[test]
fn clients_that_never_read() {
    battery(
        "never reads (20 connections: one asks for 5000 pipelined /metrics, 19 for 4 × 16 MiB)",
        |addr, _, stop| {
            let started = Instant::now();
            let mut conns: Vec<TcpStream> = (0..20)
                .map(|i| {
                    let mut s = TcpStream::connect(addr).expect("connect");
                    // One scrape-flooder (each /metrics costs a millisecond of CPU in a debug
                    // build: more of them would measure CPU, not slots), the rest big bodies.
                    let ask: &[u8] = if i == 0 {
                        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                    } else {
                        b"GET /debug/big?kb=16384 HTTP/1.1\r\nHost: x\r\n\r\n"
                    };
                    s.write_all(&ask.repeat(if i == 0 { 5000 } else { 4 })).expect("send");
                    s
                })
                .collect();
            // The worker cuts them all by itself (nothing is read here): only the normal client
            // and the asking one stay.
            let all_cut = wait_until(PATIENCE, || (open_connections(addr) <= 2).then(|| started.elapsed()));
            let all_cut = all_cut.expect("every connection that reads nothing is cut after --write-timeout");
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(10));
            }
            let outcomes: Vec<Result<(), usize>> =
                conns.iter_mut().map(|s| closed_by_server(s, Duration::from_secs(5))).collect();
            assert!(outcomes.iter().all(Result::is_ok), "every connection that reads nothing is cut: {outcomes:?}");
            format!(
                "all 20 reset by the worker within {:.1} s (--write-timeout 1s; a response still being made is not a stall)",
                all_cut.as_secs_f64()
            )
        },
    );
}

#[test]
fn ten_thousand_idle_connections() {
    battery("10 000 idle connections (--max-connections 1000)", |addr, _, stop| {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
        assert!(hard >= 10_500, "RLIMIT_NOFILE's hard limit {hard} is too low for this test");
        let mut conns = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            // Non-blocking connects: those beyond the backlog wait in SYN retries, not here.
            let socket = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("a socket");
            let to = nix::sys::socket::SockaddrIn::from(match addr {
                SocketAddr::V4(v4) => v4,
                SocketAddr::V6(_) => unreachable!("a loopback IPv4 address"),
            });
            let _ = nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &to);
            conns.push(socket);
        }
        let mut most = 0;
        while !stop.load(Ordering::SeqCst) {
            most = most.max(open_connections(addr));
            thread::sleep(Duration::from_millis(100));
        }
        assert!(most <= 1000, "the worker held {most} connections, above --max-connections");
        drop(conns);
        format!("the worker held at most {most}, each cut after --header-timeout; the rest waited in the queue")
    });
}

#[test]
fn the_http2_preface() {
    battery("HTTP/2 preface (PRI * HTTP/2.0), 200 times", |addr, _, stop| {
        let mut outcomes = std::collections::BTreeSet::new();
        let mut slowest = Duration::ZERO;
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) && n < 200 {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("send");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = Vec::new();
            let outcome = match s.read_to_end(&mut buf) {
                Ok(_) if buf.is_empty() => "closed without an answer".to_owned(),
                Ok(_) => String::from_utf8_lossy(&buf[..buf.len().min(12)]).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
                Err(e) => panic!("the preface hung: {e}"),
            };
            assert!(
                outcome == "closed without an answer"
                    || outcome == "reset"
                    || outcome.starts_with("HTTP/1.1 4")
                    || outcome.starts_with("HTTP/1.1 5"),
                "{outcome}"
            );
            slowest = slowest.max(started.elapsed());
            outcomes.insert(outcome);
            n += 1;
        }
        assert!(slowest < Duration::from_millis(500), "took {slowest:?}");
        format!("{outcomes:?} at once (slowest {:.1} ms)", slowest.as_secs_f64() * 1e3)
    });
}

#[test]
fn request_smuggling() {
    battery("request smuggling (CL+TE, TE+CL, two Content-Lengths, TE: gzip)", |addr, _, stop| {
        let smuggle = |head: &str| {
            let raw =
                format!("POST / HTTP/1.1\r\nHost: x\r\n{head}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(raw.as_bytes()).expect("send");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf); // the connection must end: a hang fails here
            String::from_utf8_lossy(&buf).into_owned()
        };
        let mut seen = Vec::new();
        let mut rounds = 0;
        while !stop.load(Ordering::SeqCst) {
            for (what, head) in [
                ("CL+TE", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
                ("TE+CL", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
                ("two CL", "Content-Length: 5\r\nContent-Length: 6\r\n"),
                ("TE: gzip", "Transfer-Encoding: gzip\r\n"),
            ] {
                let answer = smuggle(head);
                let answers = answer.matches("HTTP/1.1 ").count();
                assert_eq!(answers, 1, "{what}: one answer, the smuggled request is never served: {answer}");
                let status = &answer[9..12];
                match what {
                    // RFC 9112 6.3: TE overrides CL, and the connection is closed after the answer
                    // (or the request is refused): hyper does the former.
                    "CL+TE" | "TE+CL" => assert!(
                        status == "400" || answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
                        "{what}: {answer}"
                    ),
                    _ => assert_eq!(status, "400", "{what}: {answer}"),
                }
                if rounds == 0 {
                    seen.push(format!("{what}: {status}"));
                }
            }
            rounds += 1;
        }
        format!("{} (CL+TE: answered by TE, then closed, per RFC 9112 6.3); never a second request", seen.join(", "))
    });
}

#[test]
fn huge_header_counts() {
    battery("header count over the limit (200 headers), and 1000", |addr, _, stop| {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            for count in [200, 1000] {
                let headers: String = (0..count).map(|i| format!("X-H{i}: v\r\n")).collect();
                let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
                let response = http::request(addr, raw.as_bytes()).expect("an answer");
                assert_eq!(response.status, 431, "{count} headers: {response:?}");
                assert!(response.closes());
            }
            n += 2;
        }
        format!("431 and close, {n} times")
    });
}

#[test]
fn pipelined_floods() {
    battery("pipelined flood (5000 GETs on one connection, repeated)", |addr, pid, stop| {
        let before = rss_kib(pid);
        let mut floods = 0;
        let mut most = before;
        while !stop.load(Ordering::SeqCst) || floods == 0 {
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_read_timeout(Some(http::IO_TIMEOUT)).unwrap();
            let mut writer = stream.try_clone().expect("a second handle");
            let mut conn = Connection::new(stream);
            let sender = thread::spawn(move || {
                let mut all = Vec::new();
                for i in 0..5000 {
                    let path = if i % 2 == 0 { "/" } else { "/nowhere" };
                    all.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                }
                writer.write_all(&all).expect("send the flood");
            });
            for i in 0..5000 {
                let response = conn.read_response().expect("an answer");
                let expected = if i % 2 == 0 { 200 } else { 404 };
                assert_eq!(response.status, expected, "answer {i} is out of order");
            }
            sender.join().unwrap();
            most = most.max(rss_kib(pid));
            floods += 1;
        }
        let grew = most.saturating_sub(before);
        assert!(grew < 64 * 1024, "the worker grew by {grew} KiB");
        format!("{floods} × 5000 answered in order; worker RSS {before} KiB, at most +{grew} KiB")
    });
}

#[test]
fn a_panicking_handler() {
    battery("panicking handler (GET /debug/panic, kept-alive)", |addr, _, stop| {
        let mut conn = Connection::connect(addr).expect("connect");
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let response = conn.get("/debug/panic").expect("an answer on the same connection");
            assert_eq!(response.status, 500, "{response:?}");
            assert!(!response.closes(), "{response:?}");
            n += 1;
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(conn.get("/").expect("the connection lives on").status, 200);
        format!("500 × {n}, connection kept, slot kept")
    });
}
