//! `sdcluster run` end to end: a real supervisor starting real workers on one shared port,
//! driven the ways its users drive it (signals, `sdcluster status/restart/scale`, crashes,
//! `kill -9`), with clients hammering the port throughout.
//!
//! Each test runs its own cluster (own app name, runtime folder and port, see
//! [`Cluster`]), so the tests run in parallel. Waits are generous bounds polled often; no test
//! passes or fails on how fast something happened, only on what happened.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sdcluster_tests::cluster::{
    Cluster, ClusterStatus, PATIENCE, is_alive, private_dir, proc_ids, processes_with_marker, sdcluster_command,
    sdcluster_output, wait_all_gone,
};
use sdcluster_tests::http::{self, Connection};
use sdcluster_tests::load::MixedLoad;
use sdcluster_tests::{TestDir, WorkerCommand, net, signal_pid, wait_until};

/// What the reference worker answers on `/`.
const BODY: &str = "this is dead simple";

// ---------------------------------------------------------------------------------------------
// Helpers

/// Starts `instances` reference workers, notes their pids by instance, and puts them under
/// `fresh` + `kept` clients ([`MixedLoad`]); returns once 100 requests of each kind were
/// answered, so that what the test does next happens while requests flow.
fn workers_under_load(
    name: &str,
    instances: u32,
    fresh: usize,
    kept: usize,
) -> (Cluster, BTreeMap<String, u32>, MixedLoad) {
    let cluster = Cluster::of_workers(name, instances, &[]);
    let before = pids_by_instance(&cluster.status());
    let load = MixedLoad::start(cluster.addr(), fresh, kept);
    load.wait_for_more(100);
    (cluster, before, load)
}

/// One instance of `sh -c 'exit 3'`, which dies as soon as it starts, restarted after
/// `delay` doubling up to `max_delay`: a crash loop.
fn crash_loop(name: &str, delay: &str, max_delay: &str) -> Cluster {
    Cluster::start(
        name,
        &["--instances", "1", "--restart-delay", delay, "--restart-max-delay", max_delay],
        &["/bin/sh", "-c", "exit 3"],
    )
}

/// How a rolling restart is asked for.
#[derive(Debug, Clone, Copy)]
enum Roll {
    /// SIGHUP to the supervisor.
    Sighup,
    /// `sdcluster restart --rolling APP`, which answers when the roll is over.
    Command,
}

/// Rolls the `instances` workers of `cluster` and checks that each was replaced by a new
/// process (all running, none counted as a crash) and that the old ones are gone.
fn roll(cluster: &Cluster, how: Roll, instances: usize) {
    let old = cluster.pids();
    let rolled = |log: &str| log.matches("rolling restart done").count();
    let before = rolled(&cluster.stderr());
    match how {
        Roll::Sighup => {
            cluster.signal(libc::SIGHUP);
            cluster.wait_for_stderr("the end of the roll", |log| (rolled(log) > before).then_some(()));
        }
        Roll::Command => {
            let answer = cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
            assert_eq!(answer.trim(), format!("restarted {instances} instances one at a time"));
        }
    }
    let status = cluster.wait_running(instances);
    let new: Vec<u32> = status.instances.iter().filter_map(|i| i.pid).collect();
    assert!(new.iter().all(|p| !old.contains(p)), "{how:?}: every worker replaced: {old:?} -> {new:?}");
    assert!(status.instances.iter().all(|i| i.restarts == 0), "a planned restart is no crash: {status:?}");
    wait_all_gone(&old, PATIENCE);
}

/// The instance names and pids of `status`, as a map.
fn pids_by_instance(status: &ClusterStatus) -> BTreeMap<String, u32> {
    status.instances.iter().filter_map(|i| Some((i.instance.clone(), i.pid?))).collect()
}

/// Waits until nothing accepts connections on `addr` any more; panics otherwise.
fn wait_refused(addr: SocketAddr) {
    let refused = wait_until(PATIENCE, || match TcpStream::connect(addr) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    });
    assert!(refused.is_some(), "{addr} still accepts connections after {PATIENCE:?}");
}

/// The stderr of a finished command, for messages.
fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A worker command that only leaves a mark: proof, by its absence, that nothing was started.
fn marker_worker(dir: &TestDir) -> (PathBuf, PathBuf) {
    let marker = dir.join("worker-started");
    let script = dir.join("marker-worker.sh");
    std::fs::write(&script, format!("#!/bin/sh\ntouch '{}'\nexit 1\n", marker.display())).expect("write a script");
    make_executable(&script);
    (script, marker)
}

/// `chmod 755 path`.
fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
}

/// A `Duration` as its `Debug` form prints it (`100ms`, `1.6s`, `250µs`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, scale) = [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)]
        .iter()
        .find_map(|&(unit, scale)| Some((text.strip_suffix(unit)?, scale)))?;
    Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`2026-01-02T03:04:05.678901Z`).
fn log_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The fixture written in Python, run through `/usr/bin/env python3`.
fn python_worker() -> Option<Vec<String>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/py-worker.py");
    let found = Command::new("python3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !found.is_ok_and(|s| s.success()) {
        eprintln!("python3 is not installed: skipping");
        return None;
    }
    Some(vec!["/usr/bin/env".into(), "python3".into(), script.display().to_string()])
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Three workers come up on one port, `status` shows them (JSON and table), and the balance
/// table spreads a burst of connections over all three.
#[test]
fn three_workers_share_one_port_and_the_load() {
    let cluster = Cluster::of_workers("spread", 3, &[]);
    let status = cluster.status();
    assert_eq!((status.app.as_str(), status.supervisor.as_str()), ("spread", "sdcluster run"));
    assert_eq!(status.listen, [cluster.addr().to_string()]);
    let names: Vec<&str> = status.instances.iter().map(|i| i.instance.as_str()).collect();
    assert_eq!(names, ["1", "2", "3"]);
    for instance in &status.instances {
        let pid = instance.pid.expect("a running instance has a pid");
        assert!(is_alive(pid), "pid {pid} of instance {} is not running", instance.instance);
        assert_eq!(instance.restarts, 0);
        assert!(instance.memory_bytes.is_some_and(|m| m > 0), "{instance:?}");
    }
    // Each worker's STATUS= reaches the status view (it reports within a second).
    let status = cluster.wait_until("every worker's STATUS= line", |s| {
        let serving = format!("serving {}", cluster.addr());
        s.instances.iter().all(|i| i.status_text.starts_with(&serving)).then(|| s.clone())
    });

    let table = cluster.ctl_ok(&["status", "spread"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "a title, a header and 3 rows:\n{table}");
    assert!(lines[0].starts_with("spread (sdcluster run)"), "{table}");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "INSTANCE", "PID", "STATE", "UPTIME", "RESTARTS", "MEMORY", "CPU", "REQS", "REQ/S", "CONNS", "LAST",
            "EXIT", "STATUS"
        ],
        "{table}"
    );
    for (row, instance) in lines[2..].iter().zip(&status.instances) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], instance.instance, "{table}");
        assert_eq!(cells[1], instance.pid.unwrap().to_string(), "{table}");
        assert_eq!(cells[2], "running", "{table}");
        assert!(row.contains("serving"), "the STATUS column: {table}");
    }

    // A burst of 30 connections, all open at once, then one request on each.
    let mut connections = http::connect_burst(cluster.addr(), 30);
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for connection in &mut connections {
        let response = connection.get("/").expect("an answer");
        assert_eq!((response.status, response.text().as_str()), (200, BODY));
        *spread.entry(response.worker().expect("x-sdcluster-worker").to_owned()).or_default() += 1;
    }
    eprintln!("30 simultaneous keep-alive connections were spread {spread:?}");
    assert_eq!(spread.keys().map(String::as_str).collect::<Vec<_>>(), ["1", "2", "3"], "{spread:?}");
}

/// `kill -9` of one worker under load: it is restarted (new pid, `restarts` 1), the port never
/// refuses a connection, and only requests the dead worker held can fail.
#[test]
fn a_killed_worker_is_replaced_without_refusing_connections() {
    let (cluster, before, load) = workers_under_load("kill9", 2, 1, 2);
    let victim = before["1"];
    signal_pid(victim, libc::SIGKILL);
    let after = cluster.wait_until("instance 1 replaced", |s| {
        let one = s.instances.iter().find(|i| i.instance == "1")?;
        (one.state == "running" && one.pid.is_some_and(|p| p != victim)).then(|| s.clone())
    });
    load.wait_for_more(100);
    let clients = load.clients() as u64;
    let (fresh, kept) = load.stop();

    let one = &after.instances[0];
    assert_eq!(one.restarts, 1, "{after:?}");
    assert_eq!(after.instances[1].pid, Some(before["2"]), "the other worker was left alone: {after:?}");
    assert_eq!(after.instances[1].restarts, 0);
    assert!(cluster.stderr().contains(&format!("instance 1 (pid {victim}) was killed by SIGKILL")));
    assert_eq!(fresh.refused + kept.refused, 0, "the shared socket stays open while a worker restarts");
    // Each client holds one connection at a time, so at most one request per client was in
    // the dead worker's hands.
    let lost = fresh.failed + kept.failed;
    assert!(lost <= clients, "{lost} requests lost, more than the {clients} clients");
}

/// A worker that exits at once is restarted with a delay that doubles up to the ceiling,
/// while the listening socket keeps accepting connections into its queue.
#[test]
fn a_crash_loop_backs_off_and_the_port_stays_open() {
    let cluster = crash_loop("crashloop", "100ms", "800ms");
    let max = Duration::from_millis(800);
    let restarts = |log: &str| -> Vec<(f64, Duration)> {
        log.lines()
            .filter(|l| l.contains("exited with status 3 (unexpected); restarting in "))
            .filter_map(|l| Some((log_time(l)?, parse_debug_duration(l.rsplit(' ').next()?)?)))
            .collect()
    };
    let first =
        cluster.wait_until("a first restart", |s| (s.instances[0].restarts >= 1).then_some(s.instances[0].restarts));
    // The kernel queues connections while no worker accepts them: connect succeeds.
    let queued: Vec<TcpStream> =
        (0..3).map(|_| TcpStream::connect(cluster.addr()).expect("the port accepts while workers crash")).collect();
    let log = cluster.wait_for_stderr("6 restarts", |log| {
        let seen = restarts(log);
        (seen.len() >= 6).then(|| log.to_owned())
    });
    let seen = restarts(&log);
    let delays: Vec<Duration> = seen.iter().map(|&(_, d)| d).collect();
    let gaps: Vec<f64> = seen.windows(2).map(|w| w[1].0 - w[0].0).collect();
    eprintln!("announced delays {delays:?}; seconds between deaths {gaps:.3?}");
    assert_eq!(delays[0], Duration::from_millis(100), "the first restart waits restart-delay");
    for pair in delays.windows(2) {
        assert_eq!(pair[1], (pair[0] * 2).min(max), "the delay doubles up to restart-max-delay: {delays:?}");
    }
    assert_eq!(*delays.last().unwrap(), max, "{delays:?}");
    for (gap, delay) in gaps.iter().zip(&delays) {
        // Log timestamps have microseconds; allow a millisecond of clock skew.
        assert!(*gap + 0.001 >= delay.as_secs_f64(), "restarted {gap:.3}s after a death, before its {delay:?}");
    }
    let later = cluster.status().instances[0].restarts;
    assert!(later > first, "restarts grows: {first} then {later}");
    assert!(TcpStream::connect(cluster.addr()).is_ok(), "the port still accepts");
    drop(queued);
}

/// Between a crash and its restart, `status` calls the instance `restarting`, as documented
/// on `InstanceStatus::state` (and as the table test in `status.rs` shows).
#[test]
fn an_instance_waiting_to_restart_shows_as_restarting() {
    let cluster = crash_loop("restarting", "500ms", "2s");
    let between = cluster.wait_until("an instance between death and restart", |s| {
        let i = &s.instances[0];
        (i.restarts >= 1 && i.pid.is_none()).then(|| i.state.clone())
    });
    assert_eq!(between, "restarting");
}

/// `--watchdog 1s`: a worker whose event loop is blocked for 5 s stops pinging, is killed
/// with SIGABRT before its handler returns, and is restarted; the other worker is untouched.
#[test]
fn the_watchdog_kills_a_wedged_worker() {
    let cluster = Cluster::of_workers("watchdog", 2, &["--watchdog", "1s"]);
    let before = pids_by_instance(&cluster.status());
    let sent = Instant::now();
    let mut wedged = Connection::connect(cluster.addr()).expect("connect");
    let outcome = wedged.get("/debug/wedge?ms=5000");
    let after_secs = sent.elapsed().as_secs_f64();
    // Had the worker lived until its handler returned, it would have answered "unwedged".
    assert!(outcome.is_err(), "the wedged worker answered: it was not killed: {outcome:?}");
    let status = cluster.wait_until("the wedged worker restarted", |s| {
        let restarted: Vec<_> = s.instances.iter().filter(|i| i.restarts == 1).collect();
        let all_up = s.instances.len() == 2 && s.instances.iter().all(|i| i.state == "running");
        (restarted.len() == 1 && all_up).then(|| s.clone())
    });
    let victim = status.instances.iter().find(|i| i.restarts == 1).unwrap();
    let other = status.instances.iter().find(|i| i.restarts == 0).expect("the other worker was not restarted");
    assert_ne!(victim.pid, Some(before[&victim.instance]), "a new process");
    assert_eq!(other.pid, Some(before[&other.instance]), "the other worker was left alone");
    let log = cluster.stderr();
    let old = before[&victim.instance];
    assert!(log.contains(&format!("instance {} (pid {old}) sent no WATCHDOG=1", victim.instance)), "{log}");
    assert!(log.contains(&format!("(pid {old}) was killed by SIGABRT")), "{log}");
    eprintln!("the wedged worker's connection was cut {after_secs:.2}s after the request (wedge: 5s)");
    let response = http::get(cluster.addr(), "/");
    assert_eq!(response.status, 200);
}

/// Rolling restarts, by SIGHUP and by `sdcluster restart --rolling` in turn, under
/// fresh-connection and keep-alive load: each replaces every worker by a new process, and not
/// one request fails or is refused. (Idle keep-alive connections are closed by a draining
/// worker, and their clients reconnect, which is counted, not failed.)
#[test]
fn rolling_restarts_lose_no_request() {
    let (cluster, _, load) = workers_under_load("roll", 2, 2, 2);
    for how in [Roll::Sighup, Roll::Command, Roll::Sighup, Roll::Command] {
        roll(&cluster, how, 2);
        load.wait_for_more(50);
    }
    load.stop_without_loss("rolling restarts");
}

/// SIGTERM: a slow request in flight is finished (200), then the supervisor exits 0 with no
/// worker left and the port closed.
#[test]
fn sigterm_drains_requests_in_flight_and_exits_0() {
    let mut cluster = Cluster::of_workers("drain", 2, &[]);
    let pids = cluster.pids();
    let mut slow = Connection::connect(cluster.addr()).expect("connect");
    slow.send_get("/debug/sleep?ms=2000").expect("send");
    cluster.wait_until("the slow request taken (STATUS=)", |s| {
        s.instances.iter().any(|i| i.status_text.ends_with(" 1 open connections")).then_some(())
    });
    cluster.signal(libc::SIGTERM);
    let response = slow.read_response().expect("the request in flight is answered");
    assert_eq!((response.status, response.text().as_str()), (200, "slept\n"));
    assert!(response.closes(), "a draining worker closes the connection: {response:?}");
    let exit = cluster.wait_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "stderr:\n{}", cluster.stderr());
    let log = cluster.stderr();
    assert!(log.contains("draining 1 open connections"), "{log}");
    assert!(log.contains("all workers stopped"), "{log}");
    for pid in &pids {
        assert!(!is_alive(*pid), "worker {pid} outlived its supervisor");
    }
    wait_refused(cluster.addr());
    assert!(!cluster.runtime_dir().join("drain.control").exists(), "the control socket is removed");
}

/// SIGKILL of the supervisor (no chance to clean up): its workers go too, and the port closes.
#[test]
fn no_worker_outlives_a_killed_supervisor() {
    let mut cluster = Cluster::of_workers("orphans", 2, &[]);
    let pids = cluster.pids();
    cluster.signal(libc::SIGKILL);
    cluster.wait_exit(PATIENCE);
    wait_all_gone(&pids, PATIENCE);
    wait_refused(cluster.addr());
}

/// A worker in Python (tests/fixtures/py-worker.py): sd_listen_fds and sd_notify are all
/// `sdcluster run` asks of a program.
#[test]
fn a_python_worker_runs_under_sdcluster() {
    let Some(command) = python_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start("python", &["--instances", "2"], &command);
    let status = cluster.wait_running(2);
    for instance in &status.instances {
        assert_eq!(instance.status_text, format!("py-worker {}: 0 requests", instance.instance), "{status:?}");
    }
    // Both serve: keep bursting concurrent connections until each has answered.
    let mut seen = BTreeSet::new();
    let both = wait_until(PATIENCE, || {
        let mut burst = http::connect_burst(cluster.addr(), 20);
        for connection in &mut burst {
            let response = connection.get("/").expect("an answer");
            assert_eq!((response.status, response.text().as_str()), (200, "hello from python\n"));
            seen.insert(response.worker().expect("x-sdcluster-worker").to_owned());
        }
        (seen.len() == 2).then_some(())
    });
    assert!(both.is_some(), "only {seen:?} answered");
    // STATUS= updates after READY=1 reach the status view too.
    cluster.wait_until("STATUS= counting requests", |s| {
        s.instances.iter().all(|i| !i.status_text.ends_with(": 0 requests")).then_some(())
    });
    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "stderr:\n{}", cluster.stderr());
    let log = cluster.stderr();
    assert!(log.contains("py-worker 1: stopped") && log.contains("py-worker 2: stopped"), "{log}");
}

/// The Python fixture on its own: it refuses fds meant for another process, and reports to an
/// abstract `NOTIFY_SOCKET` (`@name`).
#[test]
fn the_python_worker_follows_the_protocols() {
    let Some(command) = python_worker() else { return };
    let listener = net::listener();
    let addr = net::addr_of(&listener);
    let name = format!("sdcluster-test-{}-py", std::process::id());
    let notify = {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        std::os::unix::net::UnixDatagram::bind_addr(&address).expect("bind an abstract socket")
    };
    notify.set_read_timeout(Some(PATIENCE)).expect("timeout");
    // The fixture with the listener as fd 3, LISTEN_FDS=1 and LISTEN_PID its own pid, as a
    // supervisor starts it.
    let fixture = || {
        WorkerCommand::new()
            .program(&command)
            .pass_fds(vec![net::dup(&listener)], None)
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env("SDCLUSTER_INSTANCE", "solo")
    };

    let mut foreign = fixture().env("LISTEN_PID", "1").spawn();
    assert_eq!(foreign.exit_code(PATIENCE), 2, "{}", foreign.stderr());
    assert!(foreign.stderr().contains("is not this process"), "{}", foreign.stderr());

    let mut worker = fixture().spawn();
    let mut buf = [0; 4096];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification on @{name} ({e}); stderr:\n{}", worker.stderr()));
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(first, "READY=1\nSTATUS=py-worker solo: 0 requests");
    let response = http::get(addr, "/");
    assert_eq!((response.status, response.worker()), (200, Some("solo")));
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.exit_code(PATIENCE), 0, "exits 0 on SIGTERM; stderr:\n{}", worker.stderr());
    // Sent before it exited, so already waiting in the socket.
    notify.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let sent: Vec<String> = std::iter::from_fn(|| {
        let n = notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .collect();
    assert!(sent.iter().any(|n| n.starts_with("STOPPING=1\n")), "no STOPPING=1 among {sent:?}");
}

/// Bad configurations fail fast with a message naming the problem, exit non-zero, and start
/// nothing.
#[test]
fn bad_configs_are_refused_before_anything_starts() {
    let dir = TestDir::new("run-bad");
    let (script, marker) = marker_worker(&dir);
    let script = script.display().to_string();
    let port = net::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = net::addr_of(&taken).to_string();
    let toml = dir.join("bad.toml");
    std::fs::write(
        &toml,
        format!("name = \"bad-toml\"\ncommand = \"{script}\"\nlisten = [\"{listen}\"]\ninstance = 3\n"),
    )
    .expect("write the config");
    let toml = toml.display().to_string();

    let cases: [(&str, Vec<&str>, &[&str]); 6] = [
        (
            "no instances",
            vec!["--name", "bad", "--listen", &listen, "--instances", "0", "--", &script],
            &["instances", "would serve nothing"],
        ),
        (
            "relative command",
            vec!["--name", "bad", "--listen", &listen, "--", "sdcluster-worker"],
            &["not an absolute path"],
        ),
        (
            "missing command",
            vec!["--name", "bad", "--listen", &listen, "--", "/nonexistent/worker"],
            &["/nonexistent/worker", "No such file"],
        ),
        (
            "port in use",
            vec!["--name", "bad", "--listen", &taken_addr, "--", &script],
            &[&taken_addr, "already in use"],
        ),
        ("bad name", vec!["--name", "a b", "--listen", &listen, "--", &script], &["\"a b\"", "can't name units"]),
        ("unknown TOML key", vec![&toml], &["bad.toml", "line 4", "unknown field `instance`"]),
    ];
    for (what, args, expected) in cases {
        let runtime = private_dir("run-bad-rt");
        let output = sdcluster_output(runtime.path(), &[&["run"][..], &args].concat());
        let stderr = stderr_of(&output);
        eprintln!("{what}: {}", stderr.trim());
        assert!(!output.status.success(), "{what}: sdcluster run succeeded:\n{stderr}");
        for needle in expected {
            assert!(stderr.contains(needle), "{what}: {needle:?} not in:\n{stderr}");
        }
        assert!(!marker.exists(), "{what}: a worker was started");
        let left: Vec<_> =
            std::fs::read_dir(runtime.path()).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{what}: sockets were created: {left:?}");
    }
    drop(taken);

    // A second `sdcluster run` of a running app: refused, and the first one is unharmed.
    let first = Cluster::of_workers("twice", 1, &[]);
    let pids = first.pids();
    let port = net::free_port().to_string();
    let output = sdcluster_output(
        first.runtime_dir(),
        &["run", "--name", "twice", "--listen", &format!("127.0.0.1:{port}"), "--", &script],
    );
    let stderr = stderr_of(&output);
    eprintln!("second run: {}", stderr.trim());
    assert!(!output.status.success(), "a second sdcluster run succeeded:\n{stderr}");
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(!marker.exists(), "the second run started a worker");
    assert_eq!(first.pids(), pids, "the first cluster still answers, with the same workers");
}

/// `sdcluster scale`: down from 3 to 1 (the two others drain and exit 0, and no request under
/// way fails), then back up to 2.
#[test]
fn scale_down_drains_and_scale_up_adds() {
    let (cluster, before, load) = workers_under_load("scale", 3, 1, 1);

    assert_eq!(cluster.ctl_ok(&["scale", "scale", "1"]).trim(), "1 instances");
    let status = cluster.wait_running(1);
    assert_eq!(pids_by_instance(&status), BTreeMap::from([("1".to_owned(), before["1"])]), "instance 1 stays");
    let stopped = [before["2"], before["3"]];
    wait_all_gone(&stopped, PATIENCE);
    let log = cluster.stderr();
    for (name, pid) in [("2", stopped[0]), ("3", stopped[1])] {
        assert!(log.contains(&format!("instance {name} (pid {pid}) exited with status 0")), "{log}");
    }
    load.wait_for_more(50);

    assert_eq!(cluster.ctl_ok(&["scale", "scale", "2"]).trim(), "2 instances");
    let status = cluster.wait_running(2);
    assert_eq!(status.instances[0].pid, Some(before["1"]));
    assert!(status.instances.iter().all(|i| i.restarts == 0), "{status:?}");
    load.wait_for_more(50);
    load.stop_without_loss("scaling");
    // The new instance serves: a burst of simultaneous connections reaches it.
    let new = status.instances[1].instance.clone();
    let reached = wait_until(PATIENCE, || {
        let mut burst = http::connect_burst(cluster.addr(), 10);
        burst.iter_mut().any(|c| c.get("/").expect("an answer").worker() == Some(new.as_str())).then_some(())
    });
    assert!(reached.is_some(), "instance {new} never answered");
}

// ---------------------------------------------------------------------------------------------
// The file descriptor store, hand-over intent and rolling-restart failures
// (tests/fixtures/fdstore-worker.py)

/// The fd-store fixture, run through `/usr/bin/env python3`; `None` without python3.
fn fdstore_worker() -> Option<Vec<String>> {
    let mut command = python_worker()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fdstore-worker.py");
    *command.last_mut().expect("a script") = script.display().to_string();
    Some(command)
}

/// Sends one command line to whichever worker accepts it; returns the connection, its
/// reading end, and the first answer line.
fn fixture_command(addr: SocketAddr, line: &str) -> (std::io::BufReader<TcpStream>, String) {
    use std::io::{BufRead, Write};
    let mut stream = TcpStream::connect(addr).expect("connect to the fixture");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream.write_all(format!("{line}\n").as_bytes()).expect("send a command");
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap_or_else(|e| panic!("no answer to {line:?}: {e}"));
    (reader, answer.trim_end().to_owned())
}

/// `fixture_command`, expecting "ok".
fn fixture_ok(addr: SocketAddr, line: &str) {
    assert_eq!(fixture_command(addr, line).1, "ok", "{line}");
}

/// What the worker that answered got from the store: its pid and `NAME=WHAT,...`.
fn fixture_report(addr: SocketAddr) -> (u32, String) {
    let (_, answer) = fixture_command(addr, "report");
    let field = |key: &str| {
        answer
            .split(' ')
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {answer:?}"))
            .to_owned()
    };
    (field("pid=").parse().expect("a pid"), field("fds="))
}

/// The next line on a held connection (empty at its end).
fn next_line(reader: &mut std::io::BufReader<TcpStream>) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap_or_else(|e| panic!("reading a held connection: {e}"));
    line.trim_end().to_owned()
}

/// A held connection (stored by its worker on SIGTERM) in instance `pid`, trying new
/// connections until that worker takes one.
fn hold_in(addr: SocketAddr, pid: u32, name: &str) -> std::io::BufReader<TcpStream> {
    let mut others = Vec::new();
    for _ in 0..200 {
        let (reader, answer) = fixture_command(addr, &format!("hold {name}"));
        if answer == format!("held by {pid}") {
            return reader;
        }
        others.push(reader);
    }
    panic!("worker {pid} never took a connection");
}

/// After `sdcluster restart --rolling`, the next process of the instance gets what the old
/// one stored, after its listeners and under its names: a connected TCP socket (on which it
/// writes, so the client sees the same connection carry on) and memfds; a stored pipe that
/// hung up is dropped, one stored with FDPOLL=0 is not. The worker knew it was a restart
/// (the hand-over flag). FDSTOREREMOVE=1 drops a name; a crash restart keeps the rest.
#[test]
fn stored_fds_reach_the_next_process_of_the_instance() {
    let Some(command) = fdstore_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let cluster = Cluster::start("fdstore", &["--instances", "1"], &command);
    cluster.wait_running(1);
    let addr = cluster.addr();
    let (first, fds) = fixture_report(addr);
    assert_eq!(fds, "", "a first start has an empty store");
    let (mut held, answer) = fixture_command(addr, "hold x");
    assert_eq!(answer, format!("held by {first}"));
    fixture_ok(addr, "store blob 2");
    fixture_ok(addr, "pipe hup");
    fixture_ok(addr, "pipe kept nopoll");

    let answer = cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
    assert_eq!(answer.trim(), "restarted 1 instances one at a time");
    assert_eq!(next_line(&mut held), "stopping flag=yes", "a rolling restart sets the hand-over flag");
    let (second, fds) = fixture_report(addr);
    assert_ne!(second, first);
    assert_eq!(next_line(&mut held), format!("resumed by {second}"), "the same connection, served by the new process");
    assert_eq!(fds, "blob=blob-0,blob=blob-1,x=sock,kept=pipe", "in the order stored, without the hung-up pipe");
    let log = cluster.stderr();
    assert!(log.contains("stored fd \"hup\" hung up"), "{log}");
    assert!(!log.contains("stored fd \"kept\" hung up"), "FDPOLL=0: {log}");

    fixture_ok(addr, "remove blob");
    signal_pid(second, libc::SIGKILL);
    cluster.wait_until("instance 1 restarted after kill -9", |s| {
        let one = &s.instances[0];
        (one.state == "running" && one.pid.is_some_and(|p| p != second)).then_some(())
    });
    let (third, fds) = fixture_report(addr);
    assert_eq!(fds, "x=sock,kept=pipe", "FDSTOREREMOVE=1 dropped blob; a crash restart kept the rest");
    assert_eq!(next_line(&mut held), format!("resumed by {third}"));
}

/// `--handover-max 3`: a fourth and fifth stored fd are closed with a warning; the next
/// process gets three.
#[test]
fn the_fd_store_is_capped() {
    let Some(command) = fdstore_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let cluster = Cluster::start("fdcap", &["--instances", "1", "--handover-max", "3"], &command);
    cluster.wait_running(1);
    fixture_ok(cluster.addr(), "store blob 5");
    cluster.wait_for_stderr("the cap's warning", |log| {
        log.contains("the fd store is full (handover-max 3)").then_some(())
    });
    cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
    let (_, fds) = fixture_report(cluster.addr());
    assert_eq!(fds, "blob=blob-0,blob=blob-1,blob=blob-2");
}

/// Scale-down and shutdown stop instances for good: no hand-over flag, and whatever the
/// worker stores anyway is closed (its client sees the end of the connection); the hand-over
/// folder is removed on exit.
#[test]
fn the_store_is_dropped_when_its_instance_stays_stopped() {
    let Some(command) = fdstore_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start("fddrop", &["--instances", "2"], &command);
    let status = cluster.wait_running(2);
    let pids = pids_by_instance(&status);
    let addr = cluster.addr();
    let mut in_two = hold_in(addr, pids["2"], "x");
    let mut in_one = hold_in(addr, pids["1"], "x");

    assert_eq!(cluster.ctl_ok(&["scale", cluster.name(), "1"]).trim(), "1 instances");
    assert_eq!(next_line(&mut in_two), "stopping flag=no", "scale-down is no restart");
    assert_eq!(next_line(&mut in_two), "", "the stored connection is closed");
    cluster.wait_running(1);
    let log = cluster.stderr();
    assert!(log.contains("instance 2 stays stopped: closed the 1 fds of its store"), "{log}");

    let handover = cluster.runtime_dir().join("fddrop.handover");
    assert!(handover.is_dir(), "the hand-over folder exists while the cluster runs");
    cluster.signal(libc::SIGTERM);
    assert_eq!(next_line(&mut in_one), "stopping flag=no", "shutdown is no restart");
    assert_eq!(next_line(&mut in_one), "", "the stored connection is closed");
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "{}", cluster.stderr());
    assert!(!handover.exists(), "the hand-over folder is removed on exit");
}

/// A rolling restart onto a release that exits at once stops at the first instance:
/// `sdcluster restart --rolling` fails naming it, the other instances keep their processes
/// and serve; once the release is fixed the instance comes back and a roll succeeds.
#[test]
fn a_rolling_restart_stops_at_an_instance_that_does_not_come_back() {
    let Some(command) = fdstore_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let marker_dir = TestDir::new("broken-release");
    let broken = marker_dir.join("broken");
    let env = format!("FDSTORE_WORKER_BROKEN={}", broken.display());
    let cluster = Cluster::start("badroll", &["--instances", "3", "--env", &env, "--restart-delay", "200ms"], &command);
    let before = pids_by_instance(&cluster.wait_running(3));

    // A release that does not start at all fails in the canary: no instance is touched.
    std::fs::write(&broken, "").expect("break the release");
    let output = cluster.ctl(&["restart", "--rolling", cluster.name()]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "the failed roll succeeded: {stderr}");
    assert!(stderr.contains("the release does not start: the canary"), "{stderr}");
    assert!(stderr.contains("no instance was restarted, 3 keep their old processes"), "{stderr}");
    let status = cluster.wait_until("the canary gone", |s| (s.instances.len() == 3).then(|| s.clone()));
    assert_eq!(pids_by_instance(&status), before, "{status:?}");

    // One that starts as the canary but not as instance 1: the roll stops at instance 1.
    std::fs::write(&broken, "1\n").expect("break instance 1");
    let output = cluster.ctl(&["restart", "--rolling", cluster.name()]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "the failed roll succeeded: {stderr}");
    assert!(
        stderr.contains(
            "instance 1 did not come back ready: exited with status 1; 2 instances still run the old version"
        ),
        "{stderr}"
    );
    let status = cluster.status();
    let after = pids_by_instance(&status);
    assert_eq!((after.get("2"), after.get("3")), (before.get("2"), before.get("3")), "{status:?}");
    for _ in 0..10 {
        let (pid, _) = fixture_report(cluster.addr());
        assert!(pid == before["2"] || pid == before["3"], "answered by {pid}, not an old process");
    }
    assert!(cluster.stderr().contains("rolling restart stopped: instance 1 did not come back ready"));

    std::fs::remove_file(&broken).expect("fix the release");
    let status = cluster.wait_running(3);
    assert_ne!(status.instances[0].pid, Some(before["1"]));
    let answer = cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
    assert_eq!(answer.trim(), "restarted 3 instances one at a time");
}

/// While the cluster drains for shutdown, `scale` and `restart` are refused (and exit
/// non-zero); the drain carries on and the supervisor exits 0.
#[test]
fn scale_is_refused_while_the_cluster_shuts_down() {
    let Some(command) = fdstore_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start("latescale", &["--instances", "1"], &command);
    cluster.wait_running(1);
    fixture_ok(cluster.addr(), "linger 3");
    cluster.signal(libc::SIGTERM);
    cluster.wait_for_stderr("the shutdown", |log| log.contains("SIGTERM: stopping 1 workers").then_some(()));
    for args in [&["scale", "latescale", "2"][..], &["restart", "--rolling", "latescale"]] {
        let output = cluster.ctl(args);
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{args:?} succeeded during shutdown");
        assert!(stderr.contains("the cluster is shutting down"), "{args:?}: {stderr}");
    }
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "{}", cluster.stderr());
}

// ---------------------------------------------------------------------------------------------
// Any server as a worker: readiness at exec, exit statuses, the keys of a unit's process
// (tests/fixtures/exec-worker.py, a server that knows nothing of sd_notify)

/// The exec-worker fixture, run through `/usr/bin/env python3`; `None` without python3.
fn exec_worker() -> Option<Vec<String>> {
    let mut command = python_worker()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/exec-worker.py");
    *command.last_mut().expect("a script") = script.display().to_string();
    Some(command)
}

/// Writes `dir/app.toml` with `lines` and returns its path, for `sdcluster run FILE`.
fn spec_file(dir: &TestDir, lines: &str) -> String {
    let path = dir.join("app.toml");
    std::fs::write(&path, lines).expect("write the spec");
    path.display().to_string()
}

/// `GET path` on the cluster's port: the body, asserting a 200.
fn body(cluster: &Cluster, path: &str) -> String {
    let response = http::get(cluster.addr(), path);
    assert_eq!(response.status, 200, "GET {path}: {response:?}");
    response.text()
}

/// The permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// `ready = "exec"`: a server that never sends READY=1 is running once its program runs,
/// serves, and rolls; `LISTEN_FDS` counts only its socket (the fixture takes every counted
/// fd for a socket, as gunicorn does, and would exit 1 otherwise). Without it (notify), the
/// same server serves but stays `starting`.
#[test]
fn a_server_without_sd_notify_is_ready_once_executed() {
    let Some(command) = exec_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = TestDir::new("execready");
    let toml = spec_file(&dir, "ready = \"exec\"\n");
    let cluster = Cluster::start("execready", &[&toml, "--instances", "2"], &command);
    let status = cluster.wait_running(2);
    assert!(status.instances.iter().all(|i| i.restarts == 0 && i.last_exit.is_none()), "{status:?}");
    assert_eq!(body(&cluster, "/"), "hello from exec-worker\n");
    assert_eq!(body(&cluster, "/fds"), "LISTEN_FDS=1 LISTEN_FDNAMES=http", "only the socket is counted");
    let answer = cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
    assert_eq!(answer.trim(), "restarted 2 instances one at a time");
    cluster.wait_for_stderr("exec readiness in the log", |log| {
        log.contains("its program runs (ready = exec)").then_some(())
    });

    let notify = Cluster::start("execnotify", &["--instances", "1"], &command);
    let served = wait_until(PATIENCE, || {
        let response = http::request(notify.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        (response.status == 200).then_some(())
    });
    assert!(served.is_some(), "the server never answered: {}", notify.stderr());
    let status = notify.status();
    assert_eq!(status.instances[0].state, "starting", "no READY=1, no ready: {status:?}");
}

/// A program that cannot be executed (its interpreter is missing) is reported with the
/// step and the errno, in the log and in `status`, not as an anonymous `exit 127`; it is
/// restarted with backoff, as systemd restarts a unit whose exec failed.
#[test]
fn a_program_that_cannot_be_executed_says_why() {
    let dir = TestDir::new("noexec");
    let script = dir.join("server.js");
    std::fs::write(&script, "#!/nonexistent/nodee\nlisten({fd: 3})\n").expect("write the script");
    make_executable(&script);
    let script = script.display().to_string();
    let cluster = Cluster::start(
        "noexec",
        &["--instances", "1", "--restart-delay", "100ms", "--restart-max-delay", "400ms"],
        &[&script],
    );
    let expected = format!("cannot execute {script}: No such file or directory");
    let status = cluster.wait_until("two failed execs", |s| (s.instances[0].restarts >= 2).then(|| s.clone()));
    let exit = status.instances[0].last_exit.clone().expect("a last exit");
    assert_eq!((exit.reason.as_str(), exit.message.as_deref()), ("exec", Some(expected.as_str())), "{status:?}");
    let log = cluster.wait_for_stderr("the failed exec in the log", |log| {
        log.contains(&format!("{expected} (unexpected); restarting in")).then(|| log.to_owned())
    });
    assert!(log.contains(&format!("): {expected}")), "{log}");
    assert!(log.contains(&format!("{expected} (unexpected); restarting in")), "{log}");
    assert!(!log.contains("exited with status 127"), "{log}");
    let table = cluster.ctl_ok(&["status", cluster.name()]);
    assert!(table.contains(&expected), "{table}");
}

/// Exit status 2 means bad input: the instance is not restarted, `status` says so (JSON and
/// table), the other instance serves on; `restart --rolling` starts it again, and says so.
#[test]
fn bad_input_is_not_restarted_until_a_rolling_restart() {
    let Some(command) = exec_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = TestDir::new("badinput");
    let bad = dir.join("exit-status");
    let toml = spec_file(&dir, "ready = \"exec\"\n");
    let env = format!("EXEC_WORKER_EXIT={}", bad.display());
    let cluster = Cluster::start("badinput", &[&toml, "--instances", "2", "--env", &env], &command);
    let before = pids_by_instance(&cluster.wait_running(2));

    // Bad input for instance 1 only (`ready = exec`: instance 2 may not have read it yet).
    std::fs::write(&bad, "2\n1\n").expect("a release with bad input");
    signal_pid(before["1"], libc::SIGKILL);
    let status = cluster.wait_until("instance 1 failed", |s| (s.instances[0].state == "failed").then(|| s.clone()));
    let one = &status.instances[0];
    assert_eq!(one.failed.as_deref(), Some("exited 2 (bad input), not restarted"), "{status:?}");
    let exit = one.last_exit.clone().expect("a last exit");
    assert_eq!((exit.reason.as_str(), exit.code, one.pid, one.restarts), ("exited", Some(2), None, 1));
    std::thread::sleep(Duration::from_millis(500));
    let status = cluster.status();
    assert_eq!((status.instances[0].state.as_str(), status.instances[0].restarts), ("failed", 1), "not restarted");
    assert_eq!(status.instances[1].pid, Some(before["2"]), "the other one serves on");
    assert_eq!(body(&cluster, "/"), "hello from exec-worker\n");
    let table = cluster.ctl_ok(&["status", cluster.name()]);
    let row = table.lines().find(|l| l.starts_with("1 ")).expect("row 1");
    assert!(row.contains(" failed ") && row.ends_with("failed: exited 2 (bad input), not restarted"), "{table}");
    cluster.wait_for_stderr("the failure in the log", |log| log.contains("not restarted").then_some(()));

    std::fs::remove_file(&bad).expect("fix the release");
    let answer = cluster.ctl_ok(&["restart", "--rolling", cluster.name()]);
    assert_eq!(answer.trim(), "restarted 1 instances one at a time, and started 1 failed instance again (1)");
    let status = cluster.wait_running(2);
    assert!(status.instances.iter().all(|i| i.failed.is_none()), "{status:?}");
}

/// `working-directory`, `environment-file` (systemd's syntax; over the spec's environment,
/// which is over the inherited one; read at each start), `credentials` (copied at each
/// start into a private folder, gone when the cluster stops) and `state-directory` (kept
/// across restarts) under `sdcluster run`; a missing environment file fails the start,
/// saying so.
#[test]
fn the_keys_of_a_units_process_hold_under_run() {
    let Some(command) = exec_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = TestDir::new("unitkeys");
    let work = dir.join("work");
    std::fs::create_dir(&work).expect("a working directory");
    let env_file = dir.join("app.env");
    let write_env = |both: &str| {
        let text = format!("# comment\n; another\n\nBOTH={both}\nSPEC_VS_FILE=\"from the file\"\nQUOTED='a  b'\n");
        std::fs::write(&env_file, text).expect("write the environment file");
    };
    write_env("file");
    let secret = dir.join("secret");
    std::fs::write(&secret, "s3cret\n").expect("write the secret");
    let state_base = dir.join("state");
    let toml = spec_file(
        &dir,
        &format!(
            "ready = \"exec\"\nworking-directory = \"{}\"\nenvironment-file = \"{}\"\n\
             credentials = {{ token = \"{}\" }}\nstate-directory = \"unitkeys/data\"\n\
             environment = {{ SPEC_VS_INHERITED = \"spec\", SPEC_VS_FILE = \"spec\" }}\n",
            work.display(),
            env_file.display(),
            secret.display()
        ),
    );
    let state_base_text = state_base.display().to_string();
    let inherited = [
        ("FROM_ENV", "inherited"),
        ("BOTH", "inherited"),
        ("SPEC_VS_INHERITED", "inherited"),
        ("SDCLUSTER_STATE_DIR", state_base_text.as_str()),
    ];
    let mut cluster = Cluster::start_with_env("unitkeys", &inherited, &[&toml, "--instances", "1"], &command);
    let pid = cluster.wait_running(1).instances[0].pid.expect("a pid");

    assert_eq!(Path::new(&body(&cluster, "/cwd")), work.canonicalize().unwrap());
    for (name, value) in [
        ("FROM_ENV", "inherited"),
        ("SPEC_VS_INHERITED", "spec"),
        ("SPEC_VS_FILE", "from the file"),
        ("BOTH", "file"),
        ("QUOTED", "a  b"),
    ] {
        assert_eq!(body(&cluster, &format!("/env/{name}")), value, "{name}");
    }
    assert_eq!(body(&cluster, "/credential/token"), "s3cret\n");
    let credentials = PathBuf::from(body(&cluster, "/env/CREDENTIALS_DIRECTORY"));
    assert!(credentials.starts_with(cluster.runtime_dir()), "{}", credentials.display());
    assert_eq!((mode_of(&credentials), mode_of(&credentials.join("token"))), (0o700, 0o400));
    let state = PathBuf::from(body(&cluster, "/env/STATE_DIRECTORY"));
    assert_eq!(state, state_base.join("unitkeys/data"));
    assert_eq!((mode_of(&state), body(&cluster, "/starts").as_str()), (0o700, "1"));

    // The next start reads the environment file and the credential again; the state stays.
    write_env("edited");
    std::fs::write(&secret, "rotated\n").expect("rotate the secret");
    signal_pid(pid, libc::SIGKILL);
    let pid = cluster.wait_until("instance 1 back", |s| {
        let one = &s.instances[0];
        (one.state == "running" && one.pid.is_some_and(|p| p != pid)).then(|| one.pid.unwrap())
    });
    assert_eq!(body(&cluster, "/env/BOTH"), "edited");
    assert_eq!(body(&cluster, "/credential/token"), "rotated\n");
    assert_eq!(body(&cluster, "/starts"), "2", "the state directory outlives a restart");

    // No environment file: the start fails, saying why, and is tried again.
    std::fs::remove_file(&env_file).expect("remove the environment file");
    signal_pid(pid, libc::SIGKILL);
    let exit = cluster.wait_until("a start without the environment file", |s| {
        let one = &s.instances[0];
        one.last_exit.clone().filter(|e| e.reason == "resources" && one.restarts >= 2)
    });
    let message = exit.message.unwrap_or_default();
    assert_eq!(message, format!("cannot read the environment file {}: No such file or directory", env_file.display()));
    let logged = format!("cannot start instance 1: {message}");
    cluster.wait_for_stderr("the failed start in the log", |log| log.contains(&logged).then_some(()));
    write_env("back");
    cluster.wait_running(1);
    assert_eq!(body(&cluster, "/env/BOTH"), "back");

    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "{}", cluster.stderr());
    assert!(!credentials.exists(), "the credentials are removed with their instance");
    assert!(state.join("starts").exists(), "the state directory stays");
}

/// When an instance's main process dies, what is left of its process group (a child it
/// started, as gunicorn's master starts its workers) is killed too (`KillMode=mixed`).
#[test]
fn the_process_group_goes_with_its_main_process() {
    let Some(command) = exec_worker() else { return };
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let dir = TestDir::new("pgroup");
    let toml = spec_file(&dir, "ready = \"exec\"\n");
    let cluster = Cluster::start("pgroup", &[&toml, "--instances", "1", "--env", "EXEC_WORKER_CHILD=1"], &command);
    let pid = cluster.wait_running(1).instances[0].pid.expect("a pid");
    let child: u32 = body(&cluster, "/child").parse().expect("the child's pid");
    assert!(is_alive(child));
    signal_pid(pid, libc::SIGKILL);
    wait_all_gone(&[child], PATIENCE);
    cluster.wait_until("instance 1 back", |s| {
        s.instances[0].pid.filter(|&p| p != pid && s.instances[0].state == "running")
    });
}

// ---------------------------------------------------------------------------------------------
// Hostile input and faults: the runtime directory, the control socket's peers, odd bytes,
// what workers leave behind, a stalled supervisor

/// The runtime directory is private: `sdcluster run` makes it with mode 0700, and refuses,
/// before anything starts and saying what to do, one that another user owns, one that others
/// may write into, and a symbolic link (whoever made those could take over or watch the
/// control socket).
#[test]
fn the_runtime_directory_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = private_dir("rtdir");
    let (script, marker) = marker_worker(&dir);
    let script = script.display().to_string();
    let listen = format!("127.0.0.1:{}", net::free_port());
    let run = ["run", "--name", "rtdir", "--listen", &listen, "--", &script];

    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let foreign = dir.join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let open = dir.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let link = dir.join("link");
    let target = dir.join("target");
    std::fs::create_dir(&target).expect("mkdir");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let mut cases = vec![(&open, "has mode 0777: group or others may"), (&link, "is a symbolic link: refusing it")];
    if root {
        // Another user (nobody) made it first, as anyone can in /tmp.
        std::os::unix::fs::chown(&foreign, Some(65534), None).expect("chown");
        cases.push((&foreign, "belongs to uid 65534, not to this user"));
    }
    for (runtime, expected) in cases {
        let output = sdcluster_output(runtime, &run);
        let stderr = stderr_of(&output);
        eprintln!("{}: {}", runtime.display(), stderr.trim());
        assert!(!output.status.success(), "{}: sdcluster run used it:\n{stderr}", runtime.display());
        assert!(stderr.contains(expected) && stderr.contains("SDCLUSTER_RUNTIME_DIR"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!marker.exists(), "{}: a worker was started", runtime.display());
        assert!(!runtime.join("rtdir.control").exists(), "no socket in it");
    }

    // A missing one is made, mode 0700, its sockets in it.
    let fresh = dir.join("fresh/sdcluster");
    let worker = sdcluster_tests::worker_binary().display().to_string();
    let fresh_run = ["run", "--name", "rtdir", "--listen", &listen, "--", &worker];
    let mut cluster = sdcluster_tests::ChildGuard::spawn(
        sdcluster_command(&fresh).args(fresh_run),
        "sdcluster run in a fresh runtime directory".into(),
    );
    cluster.wait_for_stderr("instance 1 ready", PATIENCE);
    assert_eq!(mode_of(&fresh), 0o700);
    assert_eq!(mode_of(&fresh.join("rtdir.control")), 0o600, "the control socket is the user's alone");
    assert_eq!(mode_of(&fresh.join("rtdir.handover")), 0o700);
    assert_eq!(mode_of(&fresh.join("rtdir.credentials")), 0o700);
    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.exit_code(PATIENCE), 0);
}

/// The control socket answers its own user and root only (`SO_PEERCRED`): another user who
/// reaches it (the runtime directory and the socket are opened up here on purpose, as a
/// careless umask or chmod would) is refused, and the refusal is logged.
#[test]
fn the_control_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot act as another user; skipping");
        return;
    }
    let runuser = Command::new("runuser").args(["-u", "nobody", "--", "true"]).status();
    if !runuser.is_ok_and(|s| s.success()) {
        eprintln!("runuser -u nobody does not work here; skipping");
        return;
    }
    let binary = sdcluster_tests::sdcluster_binary();
    let reachable = Command::new("runuser").args(["-u", "nobody", "--"]).arg(binary).arg("--version").output();
    if !reachable.is_ok_and(|o| o.status.success()) {
        eprintln!("nobody cannot execute {}; skipping", binary.display());
        return;
    }
    let cluster = Cluster::of_workers("peers", 1, &[]);
    let dir = cluster.runtime_dir();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(dir.join("peers.control"), std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for args in [&["status", "peers", "--json"][..], &["scale", "peers", "3"], &["restart", "--rolling", "peers"]] {
        let output = Command::new("runuser")
            .args(["-u", "nobody", "--", "env"])
            .arg(format!("SDCLUSTER_RUNTIME_DIR={}", dir.display()))
            .arg(binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("runuser");
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{args:?} as nobody succeeded: {}", String::from_utf8_lossy(&output.stdout));
        assert!(stderr.contains("refused: uid 65534 may not control this cluster"), "{args:?}: {stderr}");
    }
    cluster.wait_for_stderr("the refusal in the log", |log| {
        log.contains("refused a control connection from uid 65534").then_some(())
    });
    let status = cluster.wait_running(1);
    assert_eq!(status.instances[0].restarts, 0, "nothing was done for nobody");
}

/// Odd bytes from outside never panic the supervisor: an inherited variable that is not
/// UTF-8 reaches the workers byte for byte; a NUL byte in an argument, a variable or a path
/// of the spec is refused before anything starts, naming it.
#[test]
fn odd_bytes_pass_through_or_are_refused_never_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let value = std::ffi::OsStr::from_bytes(b"caf\xe9 \xff\xfe");
    let worker = sdcluster_tests::worker_binary().display().to_string();
    let cluster = Cluster::start_with_os_env("oddbytes", &[("ODD_BYTES", value)], &["--instances", "1"], &[&worker]);
    let pid = cluster.wait_running(1).instances[0].pid.expect("a pid");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the worker's environment");
    assert!(
        environ.split(|&b| b == 0).any(|var| var == b"ODD_BYTES=caf\xe9 \xff\xfe"),
        "{}",
        String::from_utf8_lossy(&environ)
    );

    let dir = TestDir::new("nul");
    let (script, marker) = marker_worker(&dir);
    let listen = format!("127.0.0.1:{}", net::free_port());
    let head = format!("name = \"nul\"\nlisten = [\"{listen}\"]\n");
    for (what, body) in [
        ("an argument", format!("command = [\"{}\", \"a\\u0000b\"]\n", script.display())),
        ("a variable", format!("command = [\"{}\"]\nenvironment = {{ A = \"x\\u0000y\" }}\n", script.display())),
        ("a path", format!("command = [\"{}\"]\nworking-directory = \"/tmp/a\\u0000b\"\n", script.display())),
    ] {
        let toml = dir.join("nul.toml");
        std::fs::write(&toml, format!("{head}{body}")).expect("write the spec");
        let runtime = private_dir("nul-rt");
        let output = sdcluster_output(runtime.path(), &["run", &toml.display().to_string()]);
        let stderr = stderr_of(&output);
        eprintln!("a NUL in {what}: {}", stderr.trim());
        assert!(!output.status.success(), "{what}: sdcluster run succeeded");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(stderr.contains("NUL") || stderr.contains("control character"), "{what}: {stderr}");
        assert!(!marker.exists(), "{what}: a worker was started");
    }
}

/// Kills what carries `marker` when dropped: a failing test leaves no daemon behind.
struct KillMarked(String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        for pid in processes_with_marker(&self.0) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A worker that daemonizes a child (`setsid` and a double fork: a session and a process
/// group of its own, its parent gone, as `daemon(3)` does) leaves nothing behind: the
/// supervisor, a child subreaper, adopts the daemon and kills it once the worker it came from
/// ended (`kill -9`, or a stop by scale-down), the other instance's daemon living on; once
/// the supervisor stopped, no process it started is left.
#[test]
fn what_a_worker_daemonizes_goes_with_it() {
    let marker = format!("sdcluster-test-daemon-{}", std::process::id());
    let _cleanup = KillMarked(marker.clone());
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/daemonizing-worker.sh");
    let fixture = fixture.display().to_string();
    let worker = sdcluster_tests::worker_binary().display().to_string();
    let mut cluster = Cluster::start("daemons", &["--instances", "2"], &[&fixture, &marker, &worker]);
    let before = pids_by_instance(&cluster.wait_running(2));
    let daemon_of = |instance: &str| -> Option<u32> {
        let found = processes_with_marker(&format!("{marker}-{instance}"));
        (found.len() == 1).then(|| found[0])
    };
    let (one, two) = wait_until(PATIENCE, || Some((daemon_of("1")?, daemon_of("2")?))).unwrap_or_else(|| {
        panic!("the daemons did not start: {:?}\n{}", processes_with_marker(&marker), cluster.stderr())
    });
    let (_, group, session) = proc_ids(one).expect("the daemon's ids");
    assert!(group != before["1"] && session != before["1"], "the daemon left the worker's group and session");
    assert_eq!(proc_ids(one).map(|ids| ids.0), Some(cluster.pid()), "adopted by the supervisor, not by PID 1");

    signal_pid(before["1"], libc::SIGKILL);
    wait_all_gone(&[one], PATIENCE);
    assert!(is_alive(two), "the daemon of instance 2, which runs, is left alone");
    cluster.wait_until("instance 1 back", |s| s.instances[0].pid.filter(|&p| p != before["1"]));
    let again = wait_until(PATIENCE, || daemon_of("1")).expect("the new instance 1 daemonized again");
    cluster.wait_for_stderr("the kill in the log", |log| {
        log.contains(&format!("killing pid {one} (sleep), left behind by instance 1's ended process")).then_some(())
    });

    // A stop (scale-down) takes its daemon along too.
    cluster.ctl_ok(&["scale", "daemons", "1"]);
    wait_all_gone(&[two], PATIENCE);
    assert!(is_alive(again));

    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "{}", cluster.stderr());
    wait_all_gone(&[again], PATIENCE);
    assert_eq!(processes_with_marker(&marker), Vec::<u32>::new(), "nothing it started outlives the supervisor");
}

/// A supervisor stopped (SIGSTOP) for longer than the watchdog does not kill its workers when
/// it goes on (SIGCONT): it reads what they sent meanwhile before it judges their watchdogs,
/// and does not count its own stall against them. The workers serve throughout: every
/// request is answered.
#[test]
fn a_stalled_supervisor_kills_no_worker() {
    let cluster = Cluster::of_workers("stalled", 3, &["--watchdog", "1s"]);
    let before = cluster.pids();
    let load = MixedLoad::start(cluster.addr(), 2, 2);
    load.wait_for_more(50);
    for stall in [Duration::from_millis(3_000), Duration::from_millis(1_500)] {
        cluster.signal(libc::SIGSTOP);
        std::thread::sleep(stall);
        cluster.signal(libc::SIGCONT);
        // Longer than the watchdog: a worker wrongly judged would be killed by now.
        std::thread::sleep(Duration::from_millis(1_500));
        load.wait_for_more(50);
    }
    let status = cluster.wait_running(3);
    let log = cluster.stderr();
    assert!(!log.contains("sent no WATCHDOG=1"), "{log}");
    assert!(status.instances.iter().all(|i| i.restarts == 0), "{status:?}");
    assert_eq!(cluster.pids(), before, "the same processes");
    assert!(log.contains("the supervisor did not run for"), "the stall is logged: {log}");
    load.stop_without_loss("a stalled supervisor");
}
