//! The worker under a real systemd (PID 1 of a throw-away box, `tests/sdbox`), with
//! hand-written units: systemd owns the listening socket, template instances share it.
//!
//! Needs root (skipped otherwise, unless `CI` is set: then it fails). One box per run of this
//! binary, shared by its tests: each uses its own unit names and port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sdcluster_tests::load::{Load, Reuse};
use sdcluster_tests::sdbox::SdBox;
use sdcluster_tests::{http, net, wait_until};

#[test]
fn the_box_runs_systemd_as_pid_1() {
    let Some(sdbox) = SdBox::shared() else { return };

    assert_eq!(sdbox.exec_ok(&["cat", "/proc/1/comm"]), "systemd");
    let state = sdbox.exec(&["systemctl", "is-system-running"]);
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(matches!(state.trim(), "running" | "degraded"), "system state {state:?}");
    let version = sdbox.systemctl(&["--version"]);
    let version: u32 = version.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("systemd version");
    assert!(version >= 249, "systemd {version}");

    // Exit statuses, stdout and stdin pass through.
    let out = sdbox.sh("echo out; echo err >&2; exit 3");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(sdbox.sh_ok("hostname"), sdbox.name());

    sdbox.write_file("/tmp/sdbox-test/written", "one\ntwo\n");
    assert_eq!(sdbox.exec_ok(&["cat", "/tmp/sdbox-test/written"]), "one\ntwo");
    let worker = sdbox.install_worker();
    assert_eq!(sdbox.sh_ok(&format!("stat -c %a {worker}")), "755");
}

/// Two instances of a template share the socket systemd binds; both answer, report their
/// status to systemd, and a killed one is restarted while the other keeps serving.
#[test]
fn socket_activated_workers_share_the_port_and_survive_a_kill() {
    let Some(sdbox) = SdBox::shared() else { return };
    let cluster = Cluster::start(sdbox, "smoke", true);
    let _report = ReportOnPanic { sdbox, units: "smoke*" };

    // The port is systemd's, the workers answer on it: fresh connections reach both.
    let seen = answers_until_both(cluster.addr);
    eprintln!("answers per worker: {seen:?}");

    // Each worker reports to systemd what it serves (STATUS=), and keeps it current.
    let show = props(sdbox, "smoke@1.service");
    assert_eq!(show["NRestarts"], "0");
    assert!(show["StatusText"].starts_with("serving "), "StatusText={:?}", show["StatusText"]);
    let status = wait_until(Duration::from_secs(5), || {
        let text = sdbox.property("smoke@1.service", "StatusText");
        (!text.contains(": 0 requests")).then_some(text)
    });
    assert!(status.is_some(), "smoke@1's STATUS= never counted its requests");

    cluster.kill_one_under_load();
    answers_until_both(cluster.addr);

    // A stop drains and exits cleanly.
    sdbox.systemctl(&["stop", "smoke@1.service", "smoke@2.service", "smoke.socket"]);
    for unit in ["smoke@1.service", "smoke@2.service"] {
        let show = props(sdbox, unit);
        assert_eq!((show["ActiveState"].as_str(), show["Result"].as_str()), ("inactive", "success"), "{unit}");
    }
}

/// Without `NonBlocking=yes` each start of an instance clears O_NONBLOCK on the listening
/// socket all instances share (one open file description): the others then block in
/// `accept()`, stop answering and feeding the watchdog, and are killed in turn, so one crash
/// becomes a chain of restarts; the worker's accept timeout and flag repair prevent that.
#[test]
fn a_restart_does_not_wedge_the_other_workers_without_nonblocking() {
    let Some(sdbox) = SdBox::shared() else { return };
    let cluster = Cluster::start(sdbox, "blocking", false);
    let _report = ReportOnPanic { sdbox, units: "blocking*" };
    answers_until_both(cluster.addr);
    cluster.kill_one_under_load();
    sdbox.systemctl(&["stop", "blocking@1.service", "blocking@2.service", "blocking.socket"]);
}

/// `NAME.socket` on a free loopback port, shared by `NAME@1` and `NAME@2`.
struct Cluster<'a> {
    sdbox: &'a SdBox,
    name: &'static str,
    addr: SocketAddr,
}

/// The units' `WatchdogSec=`.
const WATCHDOG: Duration = Duration::from_secs(2);

impl<'a> Cluster<'a> {
    fn start(sdbox: &'a SdBox, name: &'static str, nonblocking: bool) -> Self {
        let worker = sdbox.install_worker();
        let port = net::free_port();
        let nonblocking = if nonblocking {
            "# Every start of an instance sets the O_NONBLOCK flag of the shared socket to this\n\
             # (default: clears it), under the feet of the instances already running.\n\
             NonBlocking=yes\n"
        } else {
            ""
        };
        sdbox.write_file(
            &format!("/etc/systemd/system/{name}.socket"),
            &format!(
                "[Unit]\n\
                 Description=sdcluster test {name}: the shared socket\n\
                 [Socket]\n\
                 ListenStream=127.0.0.1:{port}\n\
                 # A socket whose only services are template instances refuses to start (its\n\
                 # implicit {name}.service doesn't exist): name an instance. The test starts both.\n\
                 Service={name}@1.service\n"
            ),
        );
        sdbox.write_file(
            &format!("/etc/systemd/system/{name}@.service"),
            &format!(
                "[Unit]\n\
                 Description=sdcluster test {name}: worker %i\n\
                 # The default start limit fails the worker, and then the socket, after 5 restarts.\n\
                 StartLimitIntervalSec=0\n\
                 [Service]\n\
                 Type=notify\n\
                 NotifyAccess=main\n\
                 ExecStart={worker} --instance %i\n\
                 Sockets={name}.socket\n\
                 {nonblocking}\
                 Restart=always\n\
                 RestartSec=100ms\n\
                 WatchdogSec={}s\n\
                 DynamicUser=yes\n",
                WATCHDOG.as_secs()
            ),
        );
        sdbox.systemctl(&["daemon-reload"]);
        sdbox.systemctl(&["start", &format!("{name}.socket")]);
        sdbox.systemctl(&["start", &format!("{name}@1.service"), &format!("{name}@2.service")]);
        sdbox.wait_active(&format!("{name}@1.service"));
        sdbox.wait_active(&format!("{name}@2.service"));
        Cluster { sdbox, name, addr: ([127, 0, 0, 1], port).into() }
    }

    /// `kill -9` of instance 1 while a client keeps connecting: systemd restarts it, the
    /// socket (systemd's all along) never refuses a connection, and instance 2 serves
    /// throughout, for longer than a watchdog period after the restart.
    fn kill_one_under_load(&self) {
        let (one, two) = (format!("{}@1.service", self.name), format!("{}@2.service", self.name));
        let first_pid = props(self.sdbox, &one)["MainPID"].clone();
        assert_ne!(first_pid, "0");
        let client = Load::start(self.addr, "/", 1, Reuse::Fresh);
        wait_until(Duration::from_secs(5), || (client.ok() > 10).then_some(())).expect("no answers before the kill");
        self.sdbox.exec_ok(&["kill", "-9", &first_pid]);
        let killed = Instant::now();
        let restarted = wait_until(Duration::from_secs(10), || {
            let show = props(self.sdbox, &one);
            (show["ActiveState"] == "active" && show["MainPID"] != "0" && show["MainPID"] != first_pid).then_some(show)
        })
        .unwrap_or_else(|| panic!("{one} was not restarted within 10s"));
        let restart = killed.elapsed();
        assert_eq!(restarted["NRestarts"], "1");
        // A peer wedged by the restart would stop feeding the watchdog and be killed by now.
        std::thread::sleep(WATCHDOG + Duration::from_secs(1));
        let outcome = client.stop();
        eprintln!("{one} active again {restart:?} after kill -9; meanwhile the client saw {outcome:?}");
        assert_eq!(outcome.refused, 0, "connections were refused: {outcome:?}");
        // The connection instance 1 held when it died can be reset; all others are answered.
        assert!(outcome.failed <= 1, "{outcome:?}");
        assert_eq!(props(self.sdbox, &one)["NRestarts"], "1", "{one} restarted again");
        assert_eq!(props(self.sdbox, &two)["NRestarts"], "0", "{two} restarted too");
        assert_eq!(self.sdbox.property(&format!("{}.socket", self.name), "ActiveState"), "active");
    }
}

/// Opens fresh connections to `addr` until both workers (instances 1 and 2) have answered;
/// how many answers each gave.
fn answers_until_both(addr: SocketAddr) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    let both = wait_until(Duration::from_secs(15), || {
        let response = http::get(addr, "/");
        assert_eq!(response.status, 200);
        let worker = response.worker().expect("an x-sdcluster-worker header").to_owned();
        *seen.entry(worker).or_insert(0) += 1;
        (seen.contains_key("1") && seen.contains_key("2")).then_some(())
    });
    assert!(both.is_some(), "not both workers answered in 15s: {seen:?}");
    assert_eq!(seen.len(), 2, "answers from unexpected workers: {seen:?}");
    seen
}

/// `systemctl show` of the properties these tests look at.
fn props(sdbox: &SdBox, unit: &str) -> BTreeMap<String, String> {
    let out = sdbox.systemctl(&["show", "-p", "ActiveState,Result,NRestarts,MainPID,StatusText", unit]);
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// On a failing test, prints the units' status and journal from the box.
struct ReportOnPanic<'a> {
    sdbox: &'a SdBox,
    units: &'a str,
}

impl Drop for ReportOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.sdbox.diagnose(self.units));
        }
    }
}
