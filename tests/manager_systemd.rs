//! `sdcluster` operating units under a real systemd (PID 1 of a throw-away box,
//! `tests/sdbox`): install, serve, survive kills, crash loops and wedges, roll, scale, report.
//!
//! Needs root (skipped otherwise, unless `CI` is set: then it fails). One box for this test
//! binary, shared by its tests: each installs its own app on its own port.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sdcluster::status::ClusterStatus;
use sdcluster_tests::http;
use sdcluster_tests::load::{Load, MixedLoad, Reuse};
use sdcluster_tests::sdbox::SdBox;
use sdcluster_tests::{net, sdcluster_binary, wait_until};

const GUEST_SDCLUSTER: &str = "/usr/local/bin/sdcluster";
const PATIENCE: Duration = Duration::from_secs(30);

/// An app installed in the shared box for one test, uninstalled at the end.
struct App {
    sdbox: &'static SdBox,
    name: String,
    addr: SocketAddr,
}

impl App {
    /// Installs and starts `name` with `instances` workers of the reference worker and any
    /// extra `sdcluster install` flags; waits until every instance is active.
    fn install(name: &str, instances: u32, flags: &[&str]) -> Option<Self> {
        Self::install_with(name, instances, flags, None)
    }

    /// [`App::install`] with `command` as the worker (default: the reference worker).
    fn install_with(name: &str, instances: u32, flags: &[&str], command: Option<&[&str]>) -> Option<Self> {
        let app = Self::install_unwaited(name, instances, flags, command)?;
        for k in 1..=instances {
            app.sdbox.wait_active(&app.unit(k));
        }
        Some(app)
    }

    /// [`App::install_with`], without waiting for the instances: for workers that never
    /// become active.
    fn install_unwaited(name: &str, instances: u32, flags: &[&str], command: Option<&[&str]>) -> Option<Self> {
        let sdbox = SdBox::shared()?;
        let worker = sdbox.install_worker();
        static COPIED: std::sync::Once = std::sync::Once::new();
        COPIED.call_once(|| sdbox.copy_in(sdcluster_binary(), GUEST_SDCLUSTER));
        let addr = net::free_addr();
        let listen = addr.to_string();
        let count = instances.to_string();
        let mut args = vec![GUEST_SDCLUSTER, "install", "--name", name, "--listen", &listen, "--instances", &count];
        args.extend(flags);
        args.extend(["--now", "--"]);
        args.extend(command.unwrap_or(&[worker, "--debug-endpoints"]));
        sdbox.exec_ok(&args);
        Some(Self { sdbox, name: name.into(), addr })
    }

    fn unit(&self, k: u32) -> String {
        format!("{}@{k}.service", self.name)
    }

    fn sdcluster(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec![GUEST_SDCLUSTER];
        argv.extend(args);
        self.sdbox.exec(&argv)
    }

    fn sdcluster_ok(&self, args: &[&str]) -> String {
        let mut argv = vec![GUEST_SDCLUSTER];
        argv.extend(args);
        self.sdbox.exec_ok(&argv)
    }

    fn status(&self) -> ClusterStatus {
        let json = self.sdcluster_ok(&["status", &self.name, "--json"]);
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {json}"))
    }

    fn main_pid(&self, k: u32) -> u32 {
        self.sdbox.property(&self.unit(k), "MainPID").parse().expect("MainPID is a number")
    }

    /// The instances systemd runs now (`list-units`: active, whatever wants them).
    fn running(&self) -> Vec<String> {
        let pattern = format!("{}@*.service", self.name);
        let out = self.sdbox.systemctl(&["list-units", "--plain", "--no-legend", "--state=active", &pattern]);
        out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
    }

    /// Waits until the journal of instance `k` has `line` `times` times.
    fn wait_journal(&self, k: u32, line: &str, times: usize) {
        let unit = self.unit(k);
        self.wait(&format!("{times} × {line:?} in the journal of {unit}"), || {
            let journal = self.sdbox.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", &unit]);
            journal.lines().filter(|l| l.contains(line)).count() >= times
        });
    }

    fn restarts(&self, k: u32) -> u32 {
        self.sdbox.property(&self.unit(k), "NRestarts").parse().expect("NRestarts is a number")
    }

    /// Waits until `probe` holds, showing the app's units and journal if it never does.
    fn wait(&self, what: &str, mut probe: impl FnMut() -> bool) {
        if wait_until(PATIENCE, || probe().then_some(())).is_none() {
            panic!(
                "{}: {what} did not happen in {PATIENCE:?}\n{}",
                self.name,
                self.sdbox.diagnose(&format!("{}*", self.name))
            );
        }
    }

    /// The workers that answer `n` connections opened at once (the balance spreads them).
    fn workers_answering(&self, n: usize) -> BTreeSet<String> {
        http::connect_burst(self.addr, n)
            .iter_mut()
            .map(|c| c.get("/").expect("GET /").worker().expect("x-sdcluster-worker").to_owned())
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let out = self.sdcluster(&["uninstall", &self.name]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("uninstall {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn instances_share_one_port_and_status_matches_systemctl() {
    let Some(app) = App::install("share", 3, &[]) else { return };
    assert_eq!(app.workers_answering(30), set(&["1", "2", "3"]));

    let status = app.status();
    assert_eq!(status.supervisor, "systemd");
    assert_eq!(status.listen, [app.addr.to_string()]);
    assert_eq!(status.instances.len(), 3);
    for (k, instance) in (1..=3).zip(&status.instances) {
        assert_eq!(instance.instance, k.to_string());
        assert_eq!(instance.pid, Some(app.main_pid(k)), "status --json pid = systemctl show MainPID");
        assert_eq!(instance.restarts, app.restarts(k));
        assert_eq!(instance.state, "active/running");
        assert!(instance.status_text.starts_with(&format!("serving {}", app.addr)), "{:?}", instance.status_text);
        assert!(instance.memory_bytes.is_some_and(|m| m > 0));
        // Each answered a request of workers_answering: the metrics table says so.
        assert!(instance.requests.is_some_and(|r| r >= 1), "requests of {instance:?}");
        assert!(instance.open_connections.is_some(), "open connections of {instance:?}");
    }
    let table = app.sdcluster_ok(&["status", "share"]);
    assert!(table.contains("REQS") && table.contains("CONNS"), "{table}");
    // --watch under systemd too: one table per interval on a pipe, until SIGINT (status 0).
    let watch = format!("timeout --preserve-status -s INT 3 {GUEST_SDCLUSTER} status share --watch --interval 300ms");
    let watched = app.sdbox.exec_ok(&["sh", "-c", &watch]);
    assert!(watched.matches("share (systemd), listening on").count() >= 2, "{watched}");
    assert!(table.lines().nth(1).is_some_and(|h| h.starts_with("INSTANCE  PID")), "{table}");
    assert_eq!(table.lines().count(), 5, "title, header, 3 instances:\n{table}");

    // Every instance's log lines, from the journal, in one place, each starting with its
    // instance; and the journal field that selects one instance's lines.
    let logs = app.sdcluster_ok(&["logs", "share", "--lines", "200"]);
    for k in 1..=3 {
        let pid = app.main_pid(k);
        let serving = format!("[{pid}] serving {}", app.addr);
        assert!(
            logs.lines().any(|l| l.starts_with(&format!("share@{k} ")) && l.contains(&serving)),
            "worker {k} missing:\n{logs}"
        );
    }
    assert!(logs.lines().any(|l| l.starts_with("share.socket ")), "the socket's lines:\n{logs}");
    let two = app.sdbox.exec_ok(&["journalctl", "SDCLUSTER_INSTANCE=2", "-u", "share@*.service", "-o", "cat"]);
    assert!(two.contains(&format!("serving {}", app.addr)), "{two}");
    let pids = app.sdbox.exec_ok(&["journalctl", "SDCLUSTER_INSTANCE=2", "-o", "json", "--output-fields=_PID"]);
    let pid = |k: u32| format!("\"_PID\":\"{}\"", app.main_pid(k));
    assert!(pids.contains(&pid(2)) && !pids.contains(&pid(1)), "{pids}");
}

#[test]
fn a_killed_worker_is_restarted_and_no_connection_is_refused() {
    let Some(app) = App::install("kill", 2, &[]) else { return };
    let load = Load::start(app.addr, "/", 4, Reuse::Fresh);
    load.wait_for_more(200);
    let victim = app.main_pid(1);
    app.sdbox.exec_ok(&["kill", "-9", &victim.to_string()]);
    app.wait("a new worker 1 with NRestarts=1", || app.restarts(1) == 1 && app.main_pid(1) != victim);
    app.sdbox.wait_active(&app.unit(1));
    load.wait_for_more(200);
    let report = load.stop();
    eprintln!("kill -9 under load: {report:?}");
    assert_eq!(report.refused, 0, "{report:?}");
    // Only requests the killed worker had in flight may fail.
    assert!(report.failed <= 4, "{report:?}");
    assert!(app.workers_answering(10).contains("1"));
    // status shows how the previous worker 1 ended (from the journal: systemd forgot it).
    let shown = |s: &ClusterStatus| s.instances[0].last_exit.as_ref().map(ToString::to_string);
    app.wait("status: worker 1 killed by SIGKILL", || shown(&app.status()).as_deref() == Some("killed by SIGKILL"));
    assert_eq!(app.status().instances[1].last_exit, None);
}

#[test]
fn a_crash_loop_leaves_the_socket_listening() {
    // /bin/false exits at once: the worst crash loop there is.
    let Some(app) = App::install_unwaited("crashy", 1, &[], Some(&["/bin/false"])) else { return };
    let (sdbox, addr) = (app.sdbox, app.addr);
    app.wait("20 restarts", || app.restarts(1) >= 20);
    assert_eq!(sdbox.property("crashy.socket", "ActiveState"), "active", "{}", sdbox.diagnose("crashy*"));
    // The kernel still queues connections for the next worker: nothing is refused.
    std::net::TcpStream::connect(addr).expect("connect while the workers crash");
    let restart_sec = sdbox.property("crashy@1.service", "RestartUSec");
    assert_eq!(restart_sec, "100ms");
}

/// Exit status 2 is the worker's "bad input": restarting won't help, so systemd leaves the
/// instance failed (`RestartPreventExitStatus=2`), `status` says why, and a rolling restart
/// starts it again once the input is fixed.
#[test]
fn a_worker_exiting_with_bad_input_is_not_restarted() {
    const PROGRAM: &str = "/usr/local/bin/picky-worker";
    let Some(sdbox) = SdBox::shared() else { return };
    let real = sdbox.install_worker();
    // A flag the worker does not know: clap's usage error, exit status 2.
    sdbox.write_file(
        PROGRAM,
        &format!("#!/bin/sh\n[ -e /run/picky-fixed ] && exec {real}\nexec {real} --no-such-flag\n"),
    );
    sdbox.exec_ok(&["chmod", "755", PROGRAM]);
    let Some(app) = App::install_unwaited("picky", 1, &[], Some(&[PROGRAM])) else { return };
    app.wait("picky@1 failed", || sdbox.property("picky@1.service", "ActiveState") == "failed");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(app.restarts(1), 0, "{}", sdbox.diagnose("picky*"));
    assert_eq!(sdbox.property("picky@1.service", "ExecMainStatus"), "2");
    let status = app.status();
    let failed = status.instances[0].failed.as_deref();
    assert_eq!(failed, Some("exited 2 (bad input), not restarted"), "{status:?}");
    let table = app.sdcluster_ok(&["status", "picky"]);
    assert!(table.contains("failed: exited 2 (bad input), not restarted"), "{table}");
    // Fixed: a rolling restart starts the failed instance again.
    sdbox.exec_ok(&["touch", "/run/picky-fixed"]);
    let out = app.sdcluster_ok(&["restart", "--rolling", "picky"]);
    assert!(out.contains("restarted 1"), "{out}");
    sdbox.wait_active("picky@1.service");
    assert_eq!(app.status().instances[0].failed, None);
    assert_eq!(app.workers_answering(2), set(&["1"]));
}

#[test]
fn a_wedged_worker_is_killed_by_the_watchdog() {
    let Some(app) = App::install("wedge", 2, &["--watchdog", "2s"]) else { return };
    let pid = app.main_pid(1);
    // Connections opened at once spread over both workers; wedge worker 1.
    let mut connections = http::connect_burst(app.addr, 10);
    let on_one = connections
        .iter_mut()
        .position(|c| c.get("/").unwrap().worker() == Some("1"))
        .expect("a connection served by worker 1");
    connections[on_one].send_get("/debug/wedge?ms=20000").unwrap();
    app.wait("the watchdog restart", || app.restarts(1) == 1 && app.main_pid(1) != pid);
    let journal = app.sdbox.exec_ok(&["journalctl", "-u", "wedge@1.service", "--no-pager"]);
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    app.sdbox.wait_active(&app.unit(1));
    let reason = || app.status().instances.swap_remove(0).last_exit.map(|e| e.reason);
    app.wait("status: worker 1's last exit the watchdog", || reason().as_deref() == Some("watchdog"));
    assert_eq!(http::get(app.addr, "/").status, 200);
}

#[test]
fn rolling_restart_under_load_fails_no_request() {
    let Some(app) = App::install("roll", 3, &[]) else { return };
    let load = MixedLoad::start(app.addr, 3, 3);
    load.wait_for_more(200);
    let before: Vec<u32> = (1..=3).map(|k| app.main_pid(k)).collect();
    let out = app.sdcluster_ok(&["restart", "--rolling", "roll"]);
    assert!(out.contains("restarted 3 instances"), "{out}");
    let after: Vec<u32> = (1..=3).map(|k| app.main_pid(k)).collect();
    assert!(before.iter().zip(&after).all(|(b, a)| b != a), "every worker replaced: {before:?} -> {after:?}");
    load.wait_for_more(200);
    load.stop_without_loss("a rolling restart");
}

#[test]
fn scale_up_and_down_is_live_and_persisted() {
    let Some(app) = App::install("scale", 2, &[]) else { return };
    assert!(app.sdcluster_ok(&["scale", "scale", "4"]).contains("2 -> 4"));
    for k in 3..=4 {
        app.sdbox.wait_active(&app.unit(k));
    }
    assert_eq!(app.workers_answering(40), set(&["1", "2", "3", "4"]));
    assert_eq!(app.status().instances.len(), 4);
    assert!(app.sdcluster_ok(&["scale", "scale", "1"]).contains("4 -> 1"));
    for k in 2..=4 {
        assert_eq!(app.sdbox.property(&app.unit(k), "ActiveState"), "inactive");
        assert_eq!(app.sdbox.exec(&["systemctl", "is-enabled", &app.unit(k)]).status.code(), Some(1), "disabled");
    }
    assert_eq!(app.workers_answering(10), set(&["1"]));
    let zero = app.sdcluster(&["scale", "scale", "0"]);
    assert!(!zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("would serve nothing"));
}

#[test]
fn the_socket_restarts_and_a_stopped_app_starts_on_demand() {
    let Some(app) = App::install("ondemand", 2, &[]) else { return };
    app.sdbox.systemctl(&["restart", "ondemand.socket"]);
    for k in 1..=2 {
        app.sdbox.wait_active(&app.unit(k));
    }
    assert_eq!(http::get(app.addr, "/").status, 200);
    // Every worker stopped: a connection is queued, not refused, and starts the app.
    app.sdbox.systemctl(&["stop", "ondemand.target"]);
    // `systemctl stop` waits for the target's job, not for the workers' (PartOf=), whose
    // stop hooks and drain take a moment.
    for k in 1..=2 {
        app.wait("the workers stopped", || app.sdbox.property(&app.unit(k), "ActiveState") == "inactive");
    }
    assert_eq!(http::get(app.addr, "/").status, 200);
    app.sdbox.wait_active("ondemand.target");
}

#[test]
fn workers_are_sandboxed_safe() {
    let Some(app) = App::install("secure", 1, &[]) else { return };
    let report = app.sdbox.exec_ok(&["systemd-analyze", "security", "--no-pager", &app.unit(1)]);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in:\n{report}"));
    eprintln!("systemd-analyze security {}: {exposure}", app.unit(1));
    assert!(exposure <= 1.0, "{report}");
    // No root, no capabilities: the port was bound by systemd.
    let pid = app.main_pid(1).to_string();
    let owner = app.sdbox.exec_ok(&["ps", "-o", "user=", "-p", &pid]);
    assert_ne!(owner, "root");
    let caps = app.sdbox.exec_ok(&["grep", "CapEff", &format!("/proc/{pid}/status")]);
    assert!(caps.ends_with("0000000000000000"), "{caps}");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let Some(sdbox) = SdBox::shared() else { return };
    sdbox.copy_in(sdcluster_binary(), GUEST_SDCLUSTER);
    let worker = sdbox.install_worker();
    let run = |args: &[&str]| {
        let mut argv = vec![GUEST_SDCLUSTER, "install"];
        argv.extend(args);
        let out = sdbox.exec(&argv);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--name", "a b", "--", worker]).contains("can't name units"));
    assert!(run(&["--name", "zero", "--instances", "0", "--", worker]).contains("would serve nothing"));
    assert!(run(&["--name", "rel", "--", "sdcluster-worker"]).contains("not an absolute path"));
    assert!(run(&["--name", "gone", "--", "/no/such/worker"]).contains("No such file"));
    assert!(run(&["--name", "port", "--listen", "127.0.0.1:70000", "--", worker]).contains("0 to 65535"));
    let taken = net::listener();
    let taken_addr = net::addr_of(&taken).to_string();
    assert!(run(&["--name", "taken", "--listen", &taken_addr, "--", worker]).contains("already in use"));
    sdbox.write_file("/etc/sdcluster/typo.toml", "command = \"/bin/true\"\ninstance = 2\n");
    let err = run(&["typo"]);
    assert!(err.contains("line 2") && err.contains("unknown field `instance`"), "{err}");
    let listing = sdbox.exec_ok(&["ls", "/etc/systemd/system"]);
    for name in ["a b", "zero", "rel", "gone", "port", "taken", "typo"] {
        assert!(!listing.contains(&format!("{name}.socket")), "{name} left units behind:\n{listing}");
    }
}

#[test]
fn an_edited_unit_is_not_overwritten_without_force() {
    let Some(app) = App::install("edited", 1, &[]) else { return };
    let path = "/etc/systemd/system/edited@.service";
    let edited = app.sdbox.exec_ok(&["sed", "-i", "s/^RestartSec=.*/RestartSec=1s/", path]);
    assert!(edited.is_empty());
    let worker = app.sdbox.install_worker();
    let listen = app.addr.to_string();
    let again =
        ["install", "--name", "edited", "--listen", &listen, "--instances", "1", "--", worker, "--debug-endpoints"];
    let out = app.sdcluster(&again);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(path) && err.contains("--force"), "{err}");
    assert!(app.sdbox.exec_ok(&["cat", path]).contains("RestartSec=1s"), "the edit survives");
    let mut forced = again.to_vec();
    forced.insert(1, "--force");
    assert!(app.sdcluster_ok(&forced).contains("overwrote edited"));
    assert!(app.sdbox.exec_ok(&["cat", path]).contains("RestartSec=100ms"));
}

/// The mission's sequence: instances started by hand beyond the spec's count are shown,
/// restarted and scaled like the others, and status lists every listen address.
#[test]
fn status_restart_and_scale_act_on_every_instance_systemd_runs() {
    let second = net::free_addr().to_string();
    let Some(app) = App::install("mission", 2, &["--listen", &second]) else { return };
    app.sdbox.systemctl(&["stop", "mission.target"]);
    app.sdbox.systemctl(&["start", "mission@1.service", "mission@2.service", "mission@3.service", "mission@4.service"]);
    let status = app.status();
    assert_eq!(status.listen, [app.addr.to_string(), second]);
    let shown: Vec<&str> = status.instances.iter().map(|i| i.instance.as_str()).collect();
    assert_eq!(shown, ["1", "2", "3", "4"], "{status:?}");
    assert!(status.instances.iter().all(|i| i.state == "active/running"), "{status:?}");

    let before: Vec<u32> = (1..=4).map(|k| app.main_pid(k)).collect();
    let out = app.sdcluster_ok(&["restart", "--rolling", "mission"]);
    assert!(out.contains("restarted 4 instances"), "{out}");
    let after: Vec<u32> = (1..=4).map(|k| app.main_pid(k)).collect();
    assert!(before.iter().zip(&after).all(|(b, a)| b != a && *a != 0), "4 new pids: {before:?} -> {after:?}");

    let out = app.sdcluster_ok(&["scale", "mission", "3"]);
    assert!(out.contains("4 -> 3"), "{out}");
    assert_eq!(app.running(), ["mission@1.service", "mission@2.service", "mission@3.service"]);
    assert_eq!(app.status().instances.len(), 3);
    assert_eq!(app.workers_answering(30), set(&["1", "2", "3"]));
}

/// A new version that can't start: the first instance shows it, the others keep serving on
/// the old one.
#[test]
fn a_rolling_restart_stops_at_the_first_instance_that_does_not_come_back() {
    const PROGRAM: &str = "/usr/local/bin/doomed-worker";
    let Some(sdbox) = SdBox::shared() else { return };
    sdbox.exec_ok(&["cp", sdbox.install_worker(), PROGRAM]);
    let Some(app) = App::install_with("doomed", 3, &[], Some(&[PROGRAM])) else { return };
    let before: Vec<u32> = (1..=3).map(|k| app.main_pid(k)).collect();
    // Replaced as a package would: a new file renamed over the old one.
    sdbox.write_file(&format!("{PROGRAM}.new"), "#!/bin/sh\nexit 1\n");
    sdbox.exec_ok(&["chmod", "755", &format!("{PROGRAM}.new")]);
    sdbox.exec_ok(&["mv", &format!("{PROGRAM}.new"), PROGRAM]);

    // The canary (doomed@0) does not start: no worker is touched.
    let out = app.sdcluster(&["restart", "--rolling", "doomed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the release does not start: doomed@0.service"), "{err}");
    assert!(err.contains("no worker was restarted"), "{err}");
    assert!(!err.contains("restarting doomed@1"), "{err}");
    assert_eq!((1..=3).map(|k| app.main_pid(k)).collect::<Vec<_>>(), before);
    assert_eq!(app.sdbox.property("doomed@0.service", "ActiveState"), "inactive", "the canary is stopped");
    assert_eq!(app.workers_answering(30), set(&["1", "2", "3"]));

    // A release that starts as the canary but not as worker 1: the roll stops at worker 1.
    let real = "/usr/local/bin/doomed-worker.real";
    sdbox.exec_ok(&["cp", sdbox.install_worker(), real]);
    let script = format!("#!/bin/sh\n[ \"$SDCLUSTER_INSTANCE\" = 0 ] && exec {real} \"$@\"\nexit 1\n");
    sdbox.write_file(&format!("{PROGRAM}.new"), &script);
    sdbox.exec_ok(&["chmod", "755", &format!("{PROGRAM}.new")]);
    sdbox.exec_ok(&["mv", &format!("{PROGRAM}.new"), PROGRAM]);
    let out = app.sdcluster(&["restart", "--rolling", "doomed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("doomed@1.service did not come back ready"), "{err}");
    assert!(err.contains("left doomed@2.service, doomed@3.service on their old processes"), "{err}");
    assert!(!err.contains("restarting doomed@2"), "{err}");
    assert_eq!(app.main_pid(2), before[1]);
    assert_eq!(app.main_pid(3), before[2]);
    assert_ne!(app.main_pid(1), before[0]);
    let served = app.workers_answering(20);
    assert!(!served.is_empty() && served.is_subset(&set(&["2", "3"])), "{served:?}");
}

/// A worker that reports, at SIGTERM, whether its hand-over flag exists.
const FLAG_WORKER: &str = r#"
import os, signal, socket, sys
FLAG = os.environ.get("SDCLUSTER_HANDOVER_FLAG", "")
NAME = os.environ.get("SDCLUSTER_INSTANCE", "?")
def on_term(*_):
    try:
        os.stat(FLAG)
        seen = "present"
    except FileNotFoundError:
        seen = "absent"
    except OSError as e:
        seen = f"unreadable ({e})"
    print(f"flag-worker {NAME}: SIGTERM, flag {seen}, store {os.environ.get('SDCLUSTER_FDSTORE_MAX')}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
address = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect("\0" + address[1:] if address.startswith("@") else address)
    s.sendall(b"READY=1")
while True:
    signal.pause()
"#;

/// The workers' stop hook: the flag exists when the worker gets SIGTERM for a restart job
/// (`systemctl restart`, a rolling restart, a restart of the target) and not for a stop job
/// (`systemctl stop`, scale down), even when a stale one was left; and the store is sized.
#[test]
fn the_stop_hook_flags_restarts_and_not_stops() {
    const SCRIPT: &str = "/usr/local/lib/flag-worker.py";
    let Some(sdbox) = SdBox::shared() else { return };
    sdbox.write_file(SCRIPT, FLAG_WORKER);
    let flags = ["--watchdog", "off", "--handover-max", "16"];
    let Some(app) = App::install_with("hook", 2, &flags, Some(&["/usr/bin/python3", SCRIPT])) else { return };
    assert_eq!(app.sdbox.property("hook@1.service", "FileDescriptorStoreMax"), "16");
    let flag = |k: u32| format!("/run/sdcluster/hook/handover/{k}");
    let exists = |k: u32| app.sdbox.exec(&["test", "-e", &flag(k)]).status.success();
    let present = "SIGTERM, flag present, store 16";
    let absent = "SIGTERM, flag absent, store 16";

    app.sdbox.systemctl(&["restart", "hook@1.service"]);
    app.wait_journal(1, present, 1);
    app.sdbox.wait_active("hook@1.service");
    assert!(!exists(1), "the flag outlived the restart");

    // A stale flag (a hook that never ran after it) does not survive a stop.
    app.sdbox.write_file(&flag(2), "stale\n");
    app.sdbox.systemctl(&["stop", "hook@2.service"]);
    app.wait_journal(2, absent, 1);
    assert!(!exists(2));

    let out = app.sdcluster_ok(&["restart", "--rolling", "hook"]);
    assert!(out.contains("restarted 2 instances"), "{out}");
    app.wait_journal(1, present, 2);
    app.sdbox.systemctl(&["restart", "hook.target"]);
    app.wait_journal(1, present, 3);
    app.wait_journal(2, present, 1);

    assert!(app.sdcluster_ok(&["scale", "hook", "1"]).contains("2 -> 1"));
    app.wait_journal(2, absent, 2);
    let journal = app.sdbox.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "hook@*.service"]);
    assert!(!journal.contains("unreadable"), "{journal}");
}

/// Keep-alive clients that never retry, every third request a POST whose body follows its
/// headers; returns once they are flowing.
fn keep_alive_clients(app: &App, clients: usize) -> Load {
    let load = Load::builder(app.addr).clients(clients).reuse(Reuse::KeepAlive).start();
    load.wait_for_more(200);
    load
}

#[test]
fn rolling_restarts_fail_nothing_and_hand_every_connection_over() {
    let Some(app) = App::install("handover", 4, &[]) else { return };
    let load = keep_alive_clients(&app, 16);
    for round in 1..=3 {
        let before: Vec<u32> = (1..=4).map(|k| app.main_pid(k)).collect();
        app.sdcluster_ok(&["restart", "--rolling", "handover"]);
        let after: Vec<u32> = (1..=4).map(|k| app.main_pid(k)).collect();
        assert!(before.iter().zip(&after).all(|(b, a)| b != a), "round {round}: {before:?} -> {after:?}");
        load.wait_for_more(200);
    }
    let report = load.stop();
    eprintln!("3 rolling restarts under systemd: {}", report.summary());
    assert!(report.posts > 0);
    assert_eq!((report.failed, report.refused), (0, 0), "{}", report.summary());
    // The clients' connections were handed over, not replaced: one local port each.
    assert!(report.every_connection_survived(), "{report:?}");
    let journal = app.sdbox.exec_ok(&["journalctl", "-u", "handover@*", "--no-pager", "-o", "cat"]);
    assert!(journal.contains("kept-alive connections over"), "{journal}");
}

#[test]
fn scaling_down_under_load_fails_nothing() {
    let Some(app) = App::install("shrink", 4, &[]) else { return };
    let load = keep_alive_clients(&app, 16);
    assert!(app.sdcluster_ok(&["scale", "shrink", "2"]).contains("4 -> 2"));
    for k in 3..=4 {
        app.wait(&format!("{} stopped", app.unit(k)), || app.sdbox.property(&app.unit(k), "ActiveState") == "inactive");
    }
    load.wait_for_more(300);
    let report = load.stop();
    eprintln!("scale 4 -> 2 under systemd: {}", report.summary());
    assert_eq!((report.failed, report.refused), (0, 0), "{}", report.summary());
}

/// Values with the characters unit files quote, escape or expand (`$`, `%`, quotes,
/// backslashes, spaces) reach the worker under systemd exactly as written, as they do
/// under `sdcluster run`: `Environment=` and `ExecStart=` are quoted each by its own rules.
#[test]
fn environment_values_and_arguments_reach_the_worker_as_written() {
    const SCRIPT: &str = "/usr/local/lib/quoting-worker.py";
    // The empty one not last: the reading below trims the end.
    let values = ["a$b", "100%", "x\"y", "back\\slash", "", "two words", "%i", "$HOME", "it's"];
    let Some(sdbox) = SdBox::shared() else { return };
    // Any worker that gets ready and waits: what it was given is read from /proc.
    sdbox.write_file(SCRIPT, FLAG_WORKER);
    let env: Vec<String> = values.iter().enumerate().map(|(i, v)| format!("QUOTED_{i}={v}")).collect();
    let mut flags = vec!["--watchdog", "off"];
    for kv in &env {
        flags.extend(["--env", kv.as_str()]);
    }
    let mut command = vec!["/usr/bin/python3", SCRIPT];
    command.extend(values);
    let Some(app) = App::install_with("quoting", 1, &flags, Some(&command)) else { return };
    let pid = app.main_pid(1).to_string();
    let read = |what: &str| app.sdbox.exec_ok(&["sh", "-c", &format!("tr '\\0' '\\n' < /proc/{pid}/{what}")]);
    let environ = read("environ");
    for kv in &env {
        assert!(environ.lines().any(|l| l == kv), "the worker has no {kv:?}:\n{environ}");
    }
    let argv: Vec<String> = read("cmdline").split('\n').map(str::to_owned).collect();
    assert_eq!(argv[2..].iter().map(String::as_str).collect::<Vec<_>>(), values, "{argv:?}");
}
