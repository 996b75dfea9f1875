//! The worker as a library: the crate's examples (an axum app with a synchronous `main`, and
//! one inside `#[tokio::main]` with a WebSocket route) built and run as `sdcluster run`
//! runs any worker, and talked to over real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sdcluster_tests::cluster::{Cluster, PATIENCE};
use sdcluster_tests::http::{self, Connection};
use sdcluster_tests::wait_until;
use sdcluster_tests::worker_example;

/// A cluster of `instances` of the example `name` (with `args`), all running.
fn cluster_of(example: &str, cluster: &str, instances: u32, args: &[&str]) -> Cluster {
    let binary = worker_example(example);
    let binary = binary.to_str().expect("a UTF-8 path");
    let count = instances.to_string();
    let cluster = Cluster::start(cluster, &["--instances", &count], &[&[binary][..], args].concat());
    cluster.wait_running(instances as usize);
    cluster
}

/// Asserts a 200 with `body`, answered by one of the cluster's instances.
fn assert_answers(addr: SocketAddr, path: &str, body: &str) {
    let response = http::get(addr, path);
    assert_eq!(response.status, 200, "GET {path}: {response:?}");
    assert_eq!(response.text(), body, "GET {path}");
    assert!(response.worker().is_some_and(|w| w == "1" || w == "2"), "GET {path}: {response:?}");
}

/// A value of `/metrics`: the sample `series` (with its labels, as printed).
fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The metrics of the whole app, from whichever worker answers `path`.
fn app_metric(addr: SocketAddr, path: &str, series: &str) -> u64 {
    let metrics = http::get(addr, path).text();
    sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

// ---------------------------------------------------------------------------------------------
// A WebSocket client, just enough of RFC 6455 to see an echo.

/// The handshake's key and the accept value the server must derive from it (RFC 6455 1.3).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Opens a WebSocket on `path`; panics unless the server switches protocols.
fn websocket(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(http::IO_TIMEOUT)).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    // Byte by byte up to the blank line: nothing of the first frame is read with the head.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        stream.read_exact(&mut byte).expect("the handshake's answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains(&format!("sec-websocket-accept: {}", WS_ACCEPT.to_ascii_lowercase())), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    stream
}

/// Sends one masked frame (`opcode`: 1 text, 8 close) with a short payload.
fn send_frame(stream: &mut TcpStream, opcode: u8, payload: &[u8]) {
    assert!(payload.len() < 126);
    let mask = [0x5a, 0x13, 0xc7, 0x02];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).unwrap();
}

/// Reads one short unmasked frame from the server: (opcode, payload).
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0; 2];
    stream.read_exact(&mut head).expect("a frame");
    assert_eq!(head[1] & 0x80, 0, "a server's frames are not masked");
    let len = usize::from(head[1] & 0x7f);
    assert!(len < 126, "a short frame");
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).unwrap();
    (head[0] & 0x0f, payload)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn an_axum_app_with_a_sync_main_serves_with_the_workers_endpoints() {
    let cluster = cluster_of("axum", "lib-axum", 2, &["--greeting", "hi there"]);
    let addr = cluster.addr();
    assert_answers(addr, "/", "hi there\n");
    assert_answers(addr, "/healthz", "ok\n");
    assert_eq!(http::get(addr, "/nowhere").status, 404);
    assert!(app_metric(addr, "/metrics", "sdcluster_app_http_requests_total{status=\"200\"}") >= 2);
    assert_eq!(app_metric(addr, "/metrics", "sdcluster_app_http_requests_total{status=\"404\"}"), 1);
}

#[test]
fn an_axum_app_in_tokio_main_serves_websockets_and_its_own_healthz() {
    let cluster = cluster_of("axum_tokio_main", "lib-tokio", 2, &[]);
    let addr = cluster.addr();
    assert_answers(addr, "/", "hello from axum in tokio::main\n");
    assert_answers(addr, "/livez", "ok\n");
    // Moved: /healthz is the app's route now.
    assert_answers(addr, "/healthz", "the app's own /healthz\n");

    let open = "sdcluster_app_connections_open";
    let mut ws = websocket(addr, "/ws");
    for message in ["hello", "and again"] {
        send_frame(&mut ws, 1, message.as_bytes());
        assert_eq!(read_frame(&mut ws), (1, message.as_bytes().to_vec()));
    }
    // The upgraded connection counts as open (with the one asking; earlier ones may still be
    // closing).
    let counted = wait_until(PATIENCE, || (app_metric(addr, "/metrics", open) == 2).then_some(()));
    assert!(counted.is_some(), "the WebSocket is not counted open: {}", app_metric(addr, "/metrics", open));
    // The client closes; the server answers the close and the connection is given back.
    send_frame(&mut ws, 8, &[0x03, 0xe8]);
    assert_eq!(read_frame(&mut ws).0, 8);
    let mut rest = Vec::new();
    let _ = ws.read_to_end(&mut rest);
    let freed = wait_until(PATIENCE, || (app_metric(addr, "/metrics", open) == 1).then_some(()));
    assert!(freed.is_some(), "the closed WebSocket is still counted open");
    // Plain requests still work on both kinds of connection.
    let mut kept = Connection::connect(addr).unwrap();
    for _ in 0..3 {
        assert_eq!(kept.get("/").unwrap().status, 200);
    }
}

#[test]
fn a_panicking_handler_answers_500_and_gives_its_connection_slot_back() {
    // One worker holding at most two connections: a leaked slot per panic would stop it
    // after two.
    let cluster = cluster_of("axum", "lib-panic", 1, &["--max-connections", "2"]);
    let addr = cluster.addr();
    let pid = cluster.pids();
    for _ in 0..10 {
        let response = http::get(addr, "/panic");
        assert_eq!(response.status, 500, "{response:?}");
        assert_eq!(response.text(), "internal server error\n");
    }
    // A panic after the response head: nothing to answer with; the connection is dropped.
    for _ in 0..10 {
        let answered = http::request(addr, b"GET /panic-in-body HTTP/1.1\r\nHost: test\r\n\r\n");
        // (hyper drops the head it had buffered; were it sent, the body would still be cut.)
        assert!(answered.as_ref().map_or(true, |r| r.body.is_empty()), "{answered:?}");
    }
    let started = Instant::now();
    let mut connections: Vec<_> = (0..2).map(|_| Connection::connect(addr).unwrap()).collect();
    for connection in &mut connections {
        assert_eq!(connection.get("/").unwrap().text(), "hello from axum\n");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    drop(connections);
    assert_eq!(app_metric(addr, "/metrics", "sdcluster_app_http_requests_total{status=\"500\"}"), 10);
    assert_eq!(cluster.pids(), pid, "the worker did not restart");
}

#[test]
fn a_websocket_lives_through_the_drain_until_the_app_closes_it_and_the_worker_exits_0() {
    let mut cluster = cluster_of("axum_tokio_main", "lib-ws-drain", 1, &[]);
    let mut ws = websocket(cluster.addr(), "/ws");
    send_frame(&mut ws, 1, b"before");
    assert_eq!(read_frame(&mut ws), (1, b"before".to_vec()));
    cluster.signal(libc::SIGTERM);
    // Not cut, nor handed over: the app learns of the drain (`Worker::draining`) and says
    // goodbye on the upgraded connection itself, with 1001 "going away".
    let (opcode, payload) = read_frame(&mut ws);
    assert_eq!(opcode, 8, "a close frame");
    assert_eq!(&payload[..2], &[0x03, 0xe9], "code 1001");
    assert_eq!(&payload[2..], b"restarting");
    cluster.wait_for_stderr("the drain", |log| log.contains("draining 1 open connections").then_some(()));
    send_frame(&mut ws, 8, &[0x03, 0xe9]);
    let status = cluster.wait_exit(PATIENCE);
    assert!(status.success(), "{status:?}; stderr:\n{}", cluster.stderr());
    assert!(cluster.stderr().contains("drained; exiting"), "{}", cluster.stderr());
}
