//! A fault soak of `sdcluster run`: steady keep-alive and fresh-connection load (clients
//! that never retry, every request counted) while a seeded random schedule injects faults
//! one after another: `kill -9` of a worker, SIGSTOP/SIGCONT of a worker (shorter than the
//! watchdog) and of the supervisor (up to longer than the watchdog), rolling restarts, and
//! scale changes 2 <-> 3. Afterwards nothing may have leaked and nothing may have failed
//! but what a `kill -9` takes with it:
//!
//! - no request refused; failed requests only for killed workers, at most one per client
//!   per kill (each client has one request in flight at a time);
//! - every process below the supervisor is an instance's main process (none left over);
//! - the supervisor's open fds and resident memory are where they were (steady state);
//! - exactly the expected instances run, and `/metrics` lists exactly their slots.
//!
//! The same schedule runs under systemd too (PID 1 of the shared box, `tests/sdbox`; skipped
//! where it can't boot), less the stalls of the supervisor (systemd is the box's PID 1): there
//! it checks the requests, that each instance's cgroup holds its main process alone, the
//! instances and the metrics slots.
//!
//! Each runs `SDCLUSTER_SOAK_SECS` seconds (default [`DEFAULT_SECS`], for CI), with the seed
//! `SDCLUSTER_SOAK_SEED` (default: from the clock; printed, so that a failing schedule can be
//! replayed), and prints one summary line (`soak: ...`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sdcluster_tests::cluster::{Cluster, ClusterStatus, PATIENCE, descendants_of, fd_count, rss_kib, wait_all_gone};
use sdcluster_tests::http;
use sdcluster_tests::load::{Load, LoadReport, Reuse};
use sdcluster_tests::sdbox::SdBox;
use sdcluster_tests::{net, sdcluster_binary, signal_pid, wait_until};

/// How long each soak runs on CI, in seconds, unless `SDCLUSTER_SOAK_SECS` says otherwise
/// (the two run side by side).
const DEFAULT_SECS: u64 = 120;
/// The workers' watchdog: a worker is stopped for less, the supervisor for up to more.
const WATCHDOG: Duration = Duration::from_secs(2);
/// Clients of each kind.
const FRESH_CLIENTS: usize = 3;
const KEPT_CLIENTS: usize = 3;
/// How much the supervisor's resident memory may grow over the soak.
const RSS_MARGIN_KIB: u64 = 2 * 1024;

/// xorshift64*: a schedule needs spread and a seed to replay, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The kinds of fault, as the summary names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    WorkerStop,
    SupervisorStop,
    Roll,
    Scale,
}

impl Fault {
    const ALL: [Fault; 5] = [Fault::Kill9, Fault::WorkerStop, Fault::SupervisorStop, Fault::Roll, Fault::Scale];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill-9",
            Fault::WorkerStop => "worker-sigstop",
            Fault::SupervisorStop => "supervisor-sigstop",
            Fault::Roll => "rolling-restart",
            Fault::Scale => "scale",
        }
    }
}

/// The supervisor's steady state: open fds and resident memory.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fds: usize,
    rss_kib: u64,
}

fn footprint(pid: u32) -> Footprint {
    Footprint { fds: fd_count(pid), rss_kib: rss_kib(pid).expect("the supervisor's VmRSS") }
}

/// `(instance, pid)` of every `sdcluster_worker_info` series of `/metrics`: the slots with a
/// live heartbeat.
fn metrics_slots(addr: std::net::SocketAddr) -> Vec<(String, u32)> {
    let text = http::get(addr, "/metrics").text();
    let mut slots: Vec<(String, u32)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("sdcluster_worker_info{instance=\""))
        .filter_map(|rest| {
            let (instance, rest) = rest.split_once("\",pid=\"")?;
            Some((instance.to_owned(), rest.split_once('"')?.0.parse().ok()?))
        })
        .collect();
    slots.sort();
    slots
}

/// Waits until the supervisor lists `n` running instances, and gives the load a moment to
/// flow through them.
fn settle(cluster: &Cluster, load: &[&Load], n: usize) {
    cluster.wait_running(n);
    for l in load {
        l.wait_for_more(5);
    }
}

/// The duration and the seed of a soak, from the environment; the seed is printed.
fn schedule(what: &str) -> (u64, u64, Rng) {
    let secs = std::env::var("SDCLUSTER_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SECS);
    let seed = std::env::var("SDCLUSTER_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("soak ({what}): {secs} s, seed {seed} (SDCLUSTER_SOAK_SEED={seed} replays the schedule)");
    (secs, seed, Rng(seed | 1))
}

/// The faults injected, by kind, as the summary lists them.
fn faults_line(injected: &BTreeMap<Fault, u64>, kinds: &[Fault]) -> String {
    let mut faults = String::new();
    for &kind in kinds {
        let sep = if faults.is_empty() { "" } else { ", " };
        let _ = write!(faults, "{sep}{} {}", kind.name(), injected.get(&kind).unwrap_or(&0));
    }
    faults
}

#[test]
fn sdcluster_run_survives_a_fault_soak() {
    let (secs, seed, mut rng) = schedule("sdcluster run");

    let watchdog = format!("{}s", WATCHDOG.as_secs());
    let cluster = Cluster::of_workers("soak", 2, &["--watchdog", &watchdog]);
    let supervisor = cluster.pid();
    let fresh = Load::builder(cluster.addr()).clients(FRESH_CLIENTS).reuse(Reuse::Fresh).start();
    let kept = Load::builder(cluster.addr()).clients(KEPT_CLIENTS).reuse(Reuse::KeepAlive).start();
    let loads = [&fresh, &kept];
    fresh.wait_for_more(100);
    kept.wait_for_more(100);

    // Warm-up: one of each planned change, so that what the supervisor allocates once is
    // in the baseline, not counted as growth.
    cluster.ctl_ok(&["restart", "--rolling", "soak"]);
    cluster.ctl_ok(&["scale", "soak", "3"]);
    settle(&cluster, &loads, 3);
    cluster.ctl_ok(&["scale", "soak", "2"]);
    settle(&cluster, &loads, 2);
    std::thread::sleep(Duration::from_secs(2));
    let before = footprint(supervisor);

    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut instances = 2;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let fault = Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize];
        match fault {
            Fault::Kill9 => {
                let pids = cluster.pids();
                let victim = pids[rng.below(pids.len() as u64) as usize];
                signal_pid(victim, libc::SIGKILL);
                cluster.wait_until("the killed worker replaced", |s| {
                    let back = s.instances.len() == instances
                        && s.instances.iter().all(|i| i.state == "running" && i.pid.is_some_and(|p| p != victim));
                    back.then_some(())
                });
            }
            Fault::WorkerStop => {
                let pids = cluster.pids();
                let victim = pids[rng.below(pids.len() as u64) as usize];
                signal_pid(victim, libc::SIGSTOP);
                // A ping is at most half a watchdog old: a quarter more leaves a quarter to spare.
                std::thread::sleep(rng.millis(100, WATCHDOG.as_millis() as u64 / 4));
                signal_pid(victim, libc::SIGCONT);
            }
            Fault::SupervisorStop => {
                cluster.signal(libc::SIGSTOP);
                std::thread::sleep(rng.millis(300, WATCHDOG.as_millis() as u64 * 3 / 2));
                cluster.signal(libc::SIGCONT);
            }
            Fault::Roll => {
                let answer = cluster.ctl_ok(&["restart", "--rolling", "soak"]);
                assert!(answer.starts_with("restarted "), "{answer}");
            }
            Fault::Scale => {
                instances = if instances == 2 { 3 } else { 2 };
                cluster.ctl_ok(&["scale", "soak", &instances.to_string()]);
            }
        }
        *injected.entry(fault).or_default() += 1;
        settle(&cluster, &loads, instances);
        std::thread::sleep(rng.millis(100, 800));
    }
    let ran = started.elapsed();

    // Back to where it started, and quiet for longer than a slot's heartbeat (1 s).
    if instances != 2 {
        cluster.ctl_ok(&["scale", "soak", "2"]);
        *injected.entry(Fault::Scale).or_default() += 1;
    }
    settle(&cluster, &loads, 2);
    std::thread::sleep(Duration::from_secs(3));
    let after = footprint(supervisor);
    let status = cluster.wait_running(2);
    let slots = metrics_slots(cluster.addr());
    let tree = descendants_of(supervisor);
    let (fresh, kept): (LoadReport, LoadReport) = (fresh.stop(), kept.stop());

    let kills = injected.get(&Fault::Kill9).copied().unwrap_or(0);
    let clients = (FRESH_CLIENTS + KEPT_CLIENTS) as u64;
    let allowed = kills * clients;
    let failed = fresh.failed + kept.failed;
    let requests = fresh.requests() + kept.requests();
    let mut faults = String::new();
    for kind in Fault::ALL {
        let _ = write!(
            faults,
            "{}{} {}",
            if faults.is_empty() { "" } else { ", " },
            kind.name(),
            injected.get(&kind).unwrap_or(&0)
        );
    }
    println!(
        "soak: sdcluster run, {:.0} s of faults (seed {seed}): {faults}; {requests} requests ({} fresh-connection, {} keep-alive), \
         {failed} failed (at most {allowed} allowed: {clients} clients x {kills} kill -9), {} refused; supervisor fds {} -> {}, \
         VmRSS {} -> {} KiB; {} instances running, {} metrics slots, {} processes below the supervisor",
        ran.as_secs_f64(),
        fresh.requests(),
        kept.requests(),
        fresh.refused + kept.refused,
        before.fds,
        after.fds,
        before.rss_kib,
        after.rss_kib,
        status.instances.len(),
        slots.len(),
        tree.len(),
    );
    eprintln!("fresh connections: {}", fresh.summary());
    eprintln!("keep-alive connections: {}", kept.summary());

    assert_eq!(fresh.refused + kept.refused, 0, "the shared socket never refuses");
    assert!(
        failed <= allowed,
        "{failed} failed requests, more than the {allowed} a kill -9 may take along: {:?} {:?}",
        fresh.samples,
        kept.samples
    );
    let pids: Vec<u32> = status.instances.iter().filter_map(|i| i.pid).collect();
    let mut sorted = pids.clone();
    sorted.sort_unstable();
    assert_eq!(tree, sorted, "every process below the supervisor is an instance's main process");
    let expected_slots: Vec<(String, u32)> =
        status.instances.iter().map(|i| (i.instance.clone(), i.pid.expect("a pid"))).collect();
    assert_eq!(slots, expected_slots, "the metrics slots with a heartbeat are the running instances'");
    assert!(after.fds <= before.fds, "the supervisor's fds grew: {} -> {}", before.fds, after.fds);
    assert!(
        after.rss_kib <= before.rss_kib + RSS_MARGIN_KIB,
        "the supervisor's VmRSS grew: {} -> {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    assert!(!cluster.stderr().contains("sent no WATCHDOG=1"), "no worker was judged by a stalled supervisor");

    // Once it stops, nothing it started is left.
    let mut cluster = cluster;
    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.wait_exit(PATIENCE).code(), Some(0), "{}", cluster.stderr());
    wait_all_gone(&pids, PATIENCE);
}

// ---------------------------------------------------------------------------------------------
// The same under systemd

const GUEST_SDCLUSTER: &str = "/usr/local/bin/sdcluster";

/// `sdcluster ARGS` in the box; its stdout. Panics unless it succeeds.
fn guest_sdcluster(sdbox: &SdBox, args: &[&str]) -> String {
    let mut argv = vec![GUEST_SDCLUSTER];
    argv.extend(args);
    sdbox.exec_ok(&argv)
}

fn guest_status(sdbox: &SdBox, app: &str) -> ClusterStatus {
    let json = guest_sdcluster(sdbox, &["status", app, "--json"]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {json}"))
}

/// Waits until `APP@1` .. `APP@n` are active with a main process each, and no other
/// instance is; returns their main pids.
fn guest_running(sdbox: &SdBox, app: &str, n: usize) -> Vec<u32> {
    let found = wait_until(PATIENCE, || {
        let status = guest_status(sdbox, app);
        let all = status.instances.len() == n
            && status.instances.iter().all(|i| i.state == "active/running" && i.pid.is_some_and(|p| p > 0));
        all.then(|| status.instances.iter().filter_map(|i| i.pid).collect::<Vec<u32>>())
    });
    found.unwrap_or_else(|| panic!("{n} instances of {app} did not run\n{}", sdbox.diagnose(&format!("{app}*"))))
}

/// Uninstalls the app when dropped.
struct Installed<'a>(&'a SdBox, &'static str);

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = self.0.exec(&[GUEST_SDCLUSTER, "uninstall", self.1]);
    }
}

#[test]
fn systemd_survives_a_fault_soak() {
    const APP: &str = "soaksd";
    let Some(sdbox) = SdBox::shared() else { return };
    let (secs, seed, mut rng) = schedule("systemd");
    let worker = sdbox.install_worker();
    sdbox.copy_in(sdcluster_binary(), GUEST_SDCLUSTER);
    let addr = net::free_addr();
    let listen = addr.to_string();
    let watchdog = format!("{}s", WATCHDOG.as_secs());
    let install = [GUEST_SDCLUSTER, "install", "--name", APP, "--listen", &listen, "--instances", "2"];
    sdbox.exec_ok(&[&install[..], &["--watchdog", &watchdog, "--now", "--", worker]].concat());
    let _installed = Installed(sdbox, APP);
    guest_running(sdbox, APP, 2);
    let fresh = Load::builder(addr).clients(FRESH_CLIENTS).reuse(Reuse::Fresh).start();
    let kept = Load::builder(addr).clients(KEPT_CLIENTS).reuse(Reuse::KeepAlive).start();
    let loads = [&fresh, &kept];
    fresh.wait_for_more(100);
    kept.wait_for_more(100);

    // systemd is the box's PID 1: it can't be stopped from inside it.
    let kinds = [Fault::Kill9, Fault::WorkerStop, Fault::Roll, Fault::Scale];
    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut instances = 2;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let fault = kinds[rng.below(kinds.len() as u64) as usize];
        match fault {
            Fault::Kill9 => {
                let pids = guest_running(sdbox, APP, instances);
                let victim = pids[rng.below(pids.len() as u64) as usize];
                sdbox.exec_ok(&["kill", "-9", &victim.to_string()]);
                wait_until(PATIENCE, || {
                    let pids = guest_running(sdbox, APP, instances);
                    (!pids.contains(&victim)).then_some(())
                })
                .expect("the killed worker replaced");
            }
            Fault::WorkerStop => {
                let pids = guest_running(sdbox, APP, instances);
                let victim = pids[rng.below(pids.len() as u64) as usize].to_string();
                let pause = rng.millis(100, WATCHDOG.as_millis() as u64 / 4);
                let script = format!("kill -STOP {victim}; sleep {:.3}; kill -CONT {victim}", pause.as_secs_f64());
                sdbox.sh_ok(&script);
            }
            Fault::Roll => {
                let answer = guest_sdcluster(sdbox, &["restart", "--rolling", APP]);
                assert!(answer.contains("restarted "), "{answer}");
            }
            Fault::Scale => {
                instances = if instances == 2 { 3 } else { 2 };
                guest_sdcluster(sdbox, &["scale", APP, &instances.to_string()]);
            }
            Fault::SupervisorStop => unreachable!("not under systemd"),
        }
        *injected.entry(fault).or_default() += 1;
        guest_running(sdbox, APP, instances);
        for l in &loads {
            l.wait_for_more(5);
        }
        std::thread::sleep(rng.millis(100, 800));
    }
    let ran = started.elapsed();
    if instances != 2 {
        guest_sdcluster(sdbox, &["scale", APP, "2"]);
        *injected.entry(Fault::Scale).or_default() += 1;
    }
    let pids = guest_running(sdbox, APP, 2);
    for l in &loads {
        l.wait_for_more(5);
    }
    std::thread::sleep(Duration::from_secs(3));
    let status = guest_status(sdbox, APP);
    let slots = metrics_slots(addr);
    // Each instance's cgroup: its main process alone (the processes whose /proc/PID/cgroup
    // names the unit, however the box mounts cgroups).
    let cgroups: Vec<Vec<String>> = (1..=2)
        .map(|k| {
            let script = format!("grep -ls '/{APP}@{k}.service$' /proc/[0-9]*/cgroup || true");
            let files = sdbox.sh_ok(&script);
            files.lines().filter_map(|l| Some(l.strip_prefix("/proc/")?.split('/').next()?.to_owned())).collect()
        })
        .collect();
    let (fresh, kept): (LoadReport, LoadReport) = (fresh.stop(), kept.stop());

    let kills = injected.get(&Fault::Kill9).copied().unwrap_or(0);
    let clients = (FRESH_CLIENTS + KEPT_CLIENTS) as u64;
    let allowed = kills * clients;
    let failed = fresh.failed + kept.failed;
    println!(
        "soak: systemd, {:.0} s of faults (seed {seed}): {}; {} requests ({} fresh-connection, {} keep-alive), \
         {failed} failed (at most {allowed} allowed: {clients} clients x {kills} kill -9), {} refused; \
         {} instances running, {} metrics slots",
        ran.as_secs_f64(),
        faults_line(&injected, &kinds),
        fresh.requests() + kept.requests(),
        fresh.requests(),
        kept.requests(),
        fresh.refused + kept.refused,
        status.instances.len(),
        slots.len(),
    );
    eprintln!("fresh connections: {}", fresh.summary());
    eprintln!("keep-alive connections: {}", kept.summary());
    assert_eq!(fresh.refused + kept.refused, 0, "the socket never refuses");
    assert!(failed <= allowed, "{failed} failed, more than {allowed}: {:?} {:?}", fresh.samples, kept.samples);
    for (cgroup, pid) in cgroups.iter().zip(&pids) {
        assert_eq!(cgroup, &[pid.to_string()], "the cgroup holds the worker alone");
    }
    let expected: Vec<(String, u32)> =
        status.instances.iter().map(|i| (i.instance.clone(), i.pid.expect("a pid"))).collect();
    assert_eq!(slots, expected, "the metrics slots with a heartbeat are the running instances'");
}
