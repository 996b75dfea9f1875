//! Real servers from Debian's packages as workers, as README.md's "Your existing app" runs
//! them: Node (`nodejs`; its app listens on fd 3 and drains on SIGTERM,
//! `tests/fixtures/node-app.js`) and gunicorn (`gunicorn`, unchanged: it takes `LISTEN_FDS` and
//! sends `READY=1`; `tests/fixtures/wsgi_app.py`), under both supervisors: `sdcluster run` on
//! this host, and `sdcluster install` under a real systemd (a box with those packages,
//! `tests/sdbox`). Each serves one port from every instance, survives `kill -9` of an instance
//! with no refused connection (and none of the killed instance's processes left), and rolls
//! with no failed request. Under systemd also: what the sandbox refuses them and which
//! relaxation lets them run (Node: `--jit`; gunicorn: `--system-call setuid`), and an app's state
//! directory, environment file, credential, working directory and read-write paths work as the
//! spec keys promise (`tests/fixtures/state-app.py`).
//!
//! The host tests need `node` and Debian's `/usr/bin/gunicorn` (`./dev test` installs them);
//! the box tests need root. Either missing is a skip, except on CI (`CI` set): a failure.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sdcluster::status::ClusterStatus;
use sdcluster_tests::cluster::{Cluster, children_of, is_alive};
use sdcluster_tests::deb::on_ci;
use sdcluster_tests::http::Connection;
use sdcluster_tests::load::{Load, LoadReport, Reuse};
use sdcluster_tests::sdbox::{Boot, SdBox};
use sdcluster_tests::{net, sdcluster_binary, signal_pid, wait_until};

/// Generous bound for anything an app does here (start, restart, replace a killed worker).
const PATIENCE: Duration = Duration::from_secs(30);
/// Clients of the loads, each opening a connection per request and never retrying.
const CLIENTS: usize = 4;
/// The packages of the box, beyond tests/sdbox's own (the order names its cached tree).
const PACKAGES: &[&str] = &["nodejs", "gunicorn"];
/// Where the box has sdcluster, and the fixtures.
const GUEST_SDCLUSTER: &str = "/usr/local/bin/sdcluster";
const GUEST_FIXTURES: &str = "/srv";

const NODE_BODY: &str = "this is dead simple";
const GUNICORN_BODY: &str = "hello from gunicorn\n";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// `Some(())`, or `None` with a note when `what` is missing and this isn't CI (where it fails).
fn require(found: bool, what: &str) -> Option<()> {
    if found {
        return Some(());
    }
    assert!(!on_ci(), "{what} is missing (./dev test installs it)");
    eprintln!("SKIPPED: {what} is missing (./dev test installs it)");
    None
}

/// The absolute path of `program` in `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

// ---------------------------------------------------------------------------------------------
// The checks every app gets, under either supervisor

/// An app under one of the two supervisors, as the checks see it.
trait Supervised {
    /// "NAME under SUPERVISOR", for messages.
    fn what(&self) -> String;
    fn name(&self) -> &str;
    fn addr(&self) -> SocketAddr;
    /// `sdcluster ARGS` against this app; its stdout. Panics (with the logs) unless it exits 0.
    fn sdcluster_ok(&self, args: &[&str]) -> String;
    /// The state `status --json` gives a serving instance.
    fn running_state(&self) -> &'static str;
    fn kill9(&self, pid: u32);
    /// The pids of `pid`'s children (gunicorn's own workers).
    fn children(&self, pid: u32) -> Vec<u32>;
    fn alive(&self, pid: u32) -> bool;
    /// The supervisor's and the workers' logs, for failure messages.
    fn logs(&self) -> String;

    /// `sdcluster status APP --json`, parsed; `None` while the supervisor doesn't answer yet.
    fn try_status(&self) -> Option<ClusterStatus>;

    /// [`Supervised::try_status`]; panics with the logs when there is none.
    fn status(&self) -> ClusterStatus {
        self.try_status().unwrap_or_else(|| panic!("{}: no status\n{}", self.what(), self.logs()))
    }

    /// Polls the status until `probe` returns `Some`; panics with `what`, the last status and
    /// the logs after [`PATIENCE`].
    fn wait_status<T>(&self, what: &str, mut probe: impl FnMut(&ClusterStatus) -> Option<T>) -> T {
        let mut last = None;
        let found = wait_until(PATIENCE, || {
            let found = self.try_status().and_then(|status| {
                let found = probe(&status);
                last = Some(status);
                found
            });
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            found
        });
        found.unwrap_or_else(|| {
            panic!("{}: {what}: not within {PATIENCE:?}; last status: {last:#?}\n{}", self.what(), self.logs())
        })
    }

    /// Waits until `n` instances are listed, each serving with a pid; their pids.
    fn wait_running(&self, n: usize) -> Vec<u32> {
        let running = self.running_state();
        self.wait_status(&format!("{n} instances {running}"), |s| {
            let all = s.instances.len() == n && s.instances.iter().all(|i| i.state == running && i.pid.is_some());
            all.then(|| s.instances.iter().filter_map(|i| i.pid).collect())
        })
    }
}

/// How an app's instance is made.
#[derive(Clone, Copy, PartialEq)]
enum Processes {
    /// One process (Node).
    One,
    /// A main process with children of its own (gunicorn's arbiter and its worker).
    Forks,
}

/// Every check of the issue, in order: all instances running, all of them answering on the one
/// port, `kill -9` of one replaced with nothing refused, a rolling restart with nothing failed.
fn behaves_like_any_worker(app: &impl Supervised, instances: usize, body: &str, processes: Processes) {
    app.wait_running(instances);
    every_instance_answers(app, instances, body);
    a_killed_instance_is_replaced_and_nothing_refused(app, processes);
    a_rolling_restart_fails_nothing(app, instances);
}

/// Bursts of connections opened at once (each asks `Connection: close`) until every instance
/// answered one (`x-sdcluster-worker`, set by the fixtures from `SDCLUSTER_INSTANCE`).
fn every_instance_answers(app: &impl Supervised, instances: usize, body: &str) {
    let expected: BTreeSet<String> = (1..=instances).map(|k| k.to_string()).collect();
    let mut seen = BTreeSet::new();
    let all = wait_until(PATIENCE, || {
        let mut burst: Vec<Connection<_>> = (0..20)
            .map(|_| Connection::connect(app.addr()).unwrap_or_else(|e| panic!("{}: connect: {e}", app.what())))
            .collect();
        for connection in &mut burst {
            connection.send(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send a request");
            let response = connection
                .read_response()
                .unwrap_or_else(|e| panic!("{}: no answer to GET /: {e}\n{}", app.what(), app.logs()));
            assert_eq!(response.status, 200, "{}: {response:?}", app.what());
            assert!(response.text().contains(body), "{}: {:?} is not the app's", app.what(), response.text());
            seen.insert(response.header("x-sdcluster-worker").unwrap_or("none").to_owned());
        }
        (seen == expected).then_some(())
    });
    assert!(all.is_some(), "{}: only instances {seen:?} answered\n{}", app.what(), app.logs());
}

/// Clients opening a connection per request, counting every request, no retries.
fn fresh_load(app: &impl Supervised) -> Load {
    let load = Load::builder(app.addr()).clients(CLIENTS).reuse(Reuse::Fresh).start();
    load.wait_for_more(100);
    load
}

fn stop_load(app: &impl Supervised, load: Load, during: &str) -> LoadReport {
    load.wait_for_more(100);
    let report = load.stop();
    eprintln!("{}: {during}: {}", app.what(), report.summary());
    report
}

fn a_killed_instance_is_replaced_and_nothing_refused(app: &impl Supervised, processes: Processes) {
    let before = app.status();
    let victim = before.instances[0].pid.expect("instance 1 runs");
    let children = app.children(victim);
    if processes == Processes::Forks {
        assert!(!children.is_empty(), "{}: instance 1 ({victim}) has no children\n{}", app.what(), app.logs());
    }
    let load = fresh_load(app);
    app.kill9(victim);
    let running = app.running_state();
    app.wait_status("instance 1 replaced after kill -9", |s| {
        let one = &s.instances[0];
        let replaced = one.pid.is_some_and(|p| p != victim) && one.state == running;
        (replaced && one.restarts > before.instances[0].restarts).then_some(())
    });
    let report = stop_load(app, load, "kill -9 of instance 1");
    assert_eq!(report.refused, 0, "{}: connections refused after kill -9: {report:?}\n{}", app.what(), app.logs());
    // Only the requests the killed process had in flight may fail.
    assert!(report.failed <= CLIENTS as u64, "{}: {report:?}\n{}", app.what(), app.logs());
    // Nothing of the killed instance lives on (gunicorn's own worker would still accept).
    let gone = wait_until(PATIENCE, || children.iter().all(|&c| !app.alive(c)).then_some(()));
    assert!(gone.is_some(), "{}: children {children:?} of the killed {victim} still run\n{}", app.what(), app.logs());
}

fn a_rolling_restart_fails_nothing(app: &impl Supervised, instances: usize) {
    let before = app.wait_running(instances);
    let load = fresh_load(app);
    let out = app.sdcluster_ok(&["restart", "--rolling", app.name()]);
    assert!(out.contains(&format!("restarted {instances} instances")), "{}: {out}", app.what());
    let report = stop_load(app, load, "a rolling restart");
    let after = app.wait_running(instances);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "{}: not every instance replaced: {before:?} -> {after:?}",
        app.what()
    );
    assert_eq!(
        (report.refused, report.failed),
        (0, 0),
        "{}: requests lost in a rolling restart: {report:?}\n{}",
        app.what(),
        app.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Under `sdcluster run`, on this host

/// A cluster of `sdcluster run` and what the checks need of it.
struct Run {
    cluster: Cluster,
}

impl Run {
    fn start(name: &str, args: &[&str], command: &[&str]) -> Self {
        Self { cluster: Cluster::start(name, args, command) }
    }
}

impl Supervised for Run {
    fn what(&self) -> String {
        format!("{} under sdcluster run", self.cluster.name())
    }
    fn name(&self) -> &str {
        self.cluster.name()
    }
    fn addr(&self) -> SocketAddr {
        self.cluster.addr()
    }
    fn sdcluster_ok(&self, args: &[&str]) -> String {
        self.cluster.ctl_ok(args)
    }
    fn try_status(&self) -> Option<ClusterStatus> {
        self.cluster.try_status()
    }
    fn running_state(&self) -> &'static str {
        "running"
    }
    fn kill9(&self, pid: u32) {
        signal_pid(pid, libc::SIGKILL);
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        children_of(pid)
    }
    fn alive(&self, pid: u32) -> bool {
        is_alive(pid)
    }
    fn logs(&self) -> String {
        format!("--- stderr of sdcluster run and its workers\n{}", self.cluster.stderr())
    }
}

impl Drop for Run {
    /// The cluster's guard kills the workers it started, not their own children (gunicorn's
    /// worker); each worker leads a process group of its own: those go whole, while the
    /// supervisor is frozen so that it starts no replacement meanwhile.
    fn drop(&mut self) {
        let supervisor = self.cluster.pid();
        // SAFETY: kill(2) on our own unreaped child and on its children's process groups.
        unsafe {
            libc::kill(supervisor as libc::pid_t, libc::SIGSTOP);
            for worker in children_of(supervisor) {
                libc::kill(-(worker as libc::pid_t), libc::SIGKILL);
            }
        }
    }
}

/// Node with `--ready exec` (it speaks no sd_notify): two instances on one port.
#[test]
fn node_serves_under_sdcluster_run() {
    let Some(node) = which("node") else {
        require(false, "node (Debian package nodejs)");
        return;
    };
    let app = fixture("node-app.js");
    let command = [node.to_str().expect("a UTF-8 path"), app.to_str().expect("a UTF-8 path")];
    let run = Run::start("node", &["--instances", "2", "--ready", "exec"], &command);
    behaves_like_any_worker(&run, 2, NODE_BODY, Processes::One);
}

/// gunicorn as it comes: its arbiter takes the socket from LISTEN_FDS and sends READY=1 (it
/// sends no WATCHDOG=1, hence `--watchdog off`); two instances of one worker each.
#[test]
fn gunicorn_serves_under_sdcluster_run() {
    let gunicorn = Path::new("/usr/bin/gunicorn");
    if require(gunicorn.exists(), "/usr/bin/gunicorn (Debian package gunicorn)").is_none() {
        return;
    }
    let dir = fixture("");
    let command = ["/usr/bin/gunicorn", "--workers", "1", "--chdir", dir.to_str().expect("UTF-8"), "wsgi_app:app"];
    // (No __pycache__ in the source tree.)
    let args = ["--instances", "2", "--watchdog", "off", "--env", "PYTHONDONTWRITEBYTECODE=1"];
    let run = Run::start("gunicorn", &args, &command);
    behaves_like_any_worker(&run, 2, GUNICORN_BODY, Processes::Forks);
}

// ---------------------------------------------------------------------------------------------
// Under systemd, in a box with Debian's nodejs and gunicorn

/// The box of this test binary, with [`PACKAGES`], sdcluster and the fixtures; booted by the
/// first test that asks, halted once the test process is gone.
fn sdbox() -> Option<&'static SdBox> {
    static BOX: OnceLock<Option<SdBox>> = OnceLock::new();
    BOX.get_or_init(|| {
        let name = format!("existing-apps-{}", std::process::id());
        let sdbox = SdBox::up_with_packages(&name, &Boot::default(), PACKAGES)?;
        sdbox.copy_in(sdcluster_binary(), GUEST_SDCLUSTER);
        for file in ["node-app.js", "wsgi_app.py", "state-app.py"] {
            sdbox.copy_in(fixture(file), &format!("{GUEST_FIXTURES}/{file}"));
        }
        Some(sdbox)
    })
    .as_ref()
}

/// An app `sdcluster install`ed in the box, uninstalled at the end.
struct Installed {
    sdbox: &'static SdBox,
    name: String,
    addr: SocketAddr,
}

impl Installed {
    /// `sdcluster install [CONFIG] --name NAME --listen 127.0.0.1:PORT --instances N FLAGS
    /// --now -- COMMAND` in the box; waits until every instance is active.
    fn install(name: &str, instances: u32, config: Option<&str>, flags: &[&str], command: &[&str]) -> Option<Self> {
        let sdbox = sdbox()?;
        let app = Self::install_only(sdbox, name, instances, config, flags, command);
        for k in 1..=instances {
            let unit = app.unit(k);
            let active = wait_until(PATIENCE, || match sdbox.property(&unit, "ActiveState").as_str() {
                "active" => Some(true),
                "failed" => Some(false),
                _ => None,
            });
            assert_eq!(active, Some(true), "{unit} is not active\n{}", app.logs());
        }
        // Active is not enough (gunicorn's arbiter is ready before its worker boots, and exits
        // when that fails): no instance restarts on its own meanwhile.
        std::thread::sleep(Duration::from_secs(2));
        for k in 1..=instances {
            let restarts = app.property(k, "NRestarts");
            assert_eq!(restarts, "0", "{} restarted by itself: a crash loop?\n{}", app.unit(k), app.logs());
        }
        Some(app)
    }

    /// [`Installed::install`] without waiting for the instances.
    fn install_only(
        sdbox: &'static SdBox,
        name: &str,
        instances: u32,
        config: Option<&str>,
        flags: &[&str],
        command: &[&str],
    ) -> Self {
        let addr = net::free_addr();
        let (listen, count) = (addr.to_string(), instances.to_string());
        let mut argv = vec![GUEST_SDCLUSTER, "install"];
        argv.extend(config);
        argv.extend(["--name", name, "--listen", &listen, "--instances", &count]);
        argv.extend(flags);
        argv.extend(["--now", "--"]);
        argv.extend(command);
        let app = Self { sdbox, name: name.to_owned(), addr };
        let out = sdbox.exec(&argv);
        assert!(
            out.status.success(),
            "`{}` failed ({}): {}{}\n{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            app.logs()
        );
        app
    }

    fn unit(&self, k: u32) -> String {
        format!("{}@{k}.service", self.name)
    }

    fn property(&self, k: u32, property: &str) -> String {
        self.sdbox.property(&self.unit(k), property)
    }

    /// `systemd-analyze security` of instance 1: its overall exposure, and the report.
    fn exposure(&self) -> (f64, String) {
        let report = self.sdbox.exec_ok(&["systemd-analyze", "security", "--no-pager", &self.unit(1)]);
        let exposure = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure in:\n{report}"));
        (exposure, report)
    }

    /// GET `path` from the app, a 200 answer's body; panics with the logs otherwise.
    fn get(&self, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        let response = sdcluster_tests::http::request(self.addr, request.as_bytes())
            .unwrap_or_else(|e| panic!("{}: GET {path}: {e}\n{}", self.what(), self.logs()));
        assert_eq!(response.status, 200, "{}: GET {path}: {response:?}\n{}", self.what(), self.logs());
        response.text()
    }
}

impl Supervised for Installed {
    fn what(&self) -> String {
        format!("{} under systemd", self.name)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn sdcluster_ok(&self, args: &[&str]) -> String {
        let mut argv = vec![GUEST_SDCLUSTER];
        argv.extend(args);
        let out = self.sdbox.exec(&argv);
        assert!(
            out.status.success(),
            "`sdcluster {}` failed ({}): {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn try_status(&self) -> Option<ClusterStatus> {
        let json = self.sdcluster_ok(&["status", &self.name, "--json"]);
        Some(
            serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("status --json is not a ClusterStatus ({e}):\n{json}")),
        )
    }
    fn running_state(&self) -> &'static str {
        "active/running"
    }
    fn kill9(&self, pid: u32) {
        self.sdbox.exec_ok(&["kill", "-9", &pid.to_string()]);
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        let out = self.sdbox.exec(&["pgrep", "-P", &pid.to_string()]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }
    fn alive(&self, pid: u32) -> bool {
        // A zombie is no worker: `ps` shows its state.
        let out = self.sdbox.exec(&["ps", "-o", "stat=", "-p", &pid.to_string()]);
        out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().starts_with('Z')
    }
    fn logs(&self) -> String {
        self.sdbox.diagnose(&format!("{}*", self.name))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let out = self.sdbox.exec(&[GUEST_SDCLUSTER, "uninstall", &self.name]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("uninstall {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The Node command in the box.
const GUEST_NODE: &[&str] = &["/usr/bin/node", "/srv/node-app.js"];

/// Node under systemd: `--ready exec --jit`, the sandbox otherwise as for any worker.
#[test]
fn node_serves_under_systemd() {
    let flags = ["--ready", "exec", "--jit"];
    let Some(app) = Installed::install("nodeapp", 2, None, &flags, GUEST_NODE) else { return };
    assert_eq!(app.property(1, "Type"), "exec");
    assert_eq!(app.property(1, "MemoryDenyWriteExecute"), "no", "--jit lifts it");
    assert_eq!(app.property(1, "WatchdogUSec"), "0", "no watchdog for a program that can't feed it");
    let (exposure, report) = app.exposure();
    eprintln!("systemd-analyze security nodeapp@1 (--jit): {exposure}\n{report}");
    behaves_like_any_worker(&app, 2, NODE_BODY, Processes::One);
}

/// Without `--jit` the sandbox keeps `MemoryDenyWriteExecute=yes`, and V8 can't run under it:
/// the flag is needed, and nothing else lifts it.
#[test]
fn node_needs_jit_under_systemd() {
    let Some(sdbox) = sdbox() else { return };
    let app = Installed::install_only(sdbox, "nodenojit", 1, None, &["--ready", "exec"], GUEST_NODE);
    assert_eq!(app.property(1, "MemoryDenyWriteExecute"), "yes");
    let journal = || sdbox.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "nodenojit@1.service"]);
    let crashed = wait_until(PATIENCE, || {
        let restarts: u32 = app.property(1, "NRestarts").parse().unwrap_or(0);
        (restarts >= 1 && journal().contains("MemoryChunk allocation failed")).then_some(())
    });
    assert!(crashed.is_some(), "Node ran without --jit under MemoryDenyWriteExecute=yes?\n{}", app.logs());
}

/// gunicorn in the box, Debian's, unchanged.
const GUEST_GUNICORN: &[&str] = &["/usr/bin/gunicorn", "--workers", "1", "--chdir", GUEST_FIXTURES, "wsgi_app:app"];

/// gunicorn under systemd, as README.md gives it: `--watchdog off` (it sends READY=1, not
/// WATCHDOG=1) and `--system-call setuid` (its workers call `setuid()` with their own uid,
/// which `SystemCallFilter=~@privileged` refuses).
#[test]
fn gunicorn_serves_under_systemd() {
    let flags = ["--watchdog", "off", "--system-call", "setuid"];
    let Some(app) = Installed::install("gunicornapp", 2, None, &flags, GUEST_GUNICORN) else {
        return;
    };
    assert_eq!(app.property(1, "Type"), "notify", "gunicorn says READY=1 itself");
    assert_eq!(app.property(1, "MemoryDenyWriteExecute"), "yes", "no JIT, no exception");
    let (exposure, report) = app.exposure();
    eprintln!("systemd-analyze security gunicornapp@1 (--system-call setuid): {exposure}\n{report}");
    behaves_like_any_worker(&app, 2, GUNICORN_BODY, Processes::Forks);
}

/// Without `--system-call setuid`, gunicorn's worker fails to boot in the sandbox: what
/// README.md says. (Should the sandbox ever allow `setuid()` by itself, update README.md.)
#[test]
fn gunicorn_needs_setuid_under_systemd() {
    let Some(sdbox) = sdbox() else { return };
    let app = Installed::install_only(sdbox, "gunicornbare", 1, None, &["--watchdog", "off"], GUEST_GUNICORN);
    let journal = || sdbox.exec_ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "gunicornbare@1.service"]);
    let failed = wait_until(PATIENCE, || {
        let log = journal();
        (log.contains("os.setuid(uid)") && log.contains("Worker failed to boot")).then_some(())
    });
    assert!(failed.is_some(), "gunicorn booted without --system-call setuid: update README.md\n{}", app.logs());
}

/// The spec keys an app's data needs: `state-directory` (kept across restarts), `environment-file`
/// (read into the environment at each start), `credentials` (a copy the worker reads, of a file
/// it can't), `working-directory`, `read-write-paths` (and nothing else writable).
#[test]
fn state_directory_environment_file_and_credentials_under_systemd() {
    let Some(sdbox) = sdbox() else { return };
    // What the app tries to write: its read-write path, and a directory beside it that
    // only Unix permissions would let it write (ProtectSystem=strict doesn't).
    let writes = "WRITE_PATHS=/srv/scratch/note:/srv/other/note";
    sdbox.write_file(
        "/etc/stateapp/env",
        &format!("GREETING=hello from the environment file\nSECRET_SOURCE=/etc/stateapp/secret\n{writes}\n"),
    );
    sdbox.write_file("/etc/stateapp/secret", "s3cret\n");
    sdbox.exec_ok(&["chmod", "0600", "/etc/stateapp/secret"]);
    sdbox.exec_ok(&["sh", "-c", "mkdir -p /srv/scratch /srv/other && chmod 1777 /srv/scratch /srv/other"]);
    sdbox.write_file(
        "/etc/sdcluster/stateapp.toml",
        r#"command = ["/usr/bin/python3", "/srv/state-app.py"]
watchdog = "off"
state-directory = "stateapp"
environment-file = "/etc/stateapp/env"
working-directory = "/srv"
credentials = { secret = "/etc/stateapp/secret" }
read-write-paths = ["/srv/scratch"]
"#,
    );
    let Some(app) = Installed::install("stateapp", 1, Some("stateapp"), &[], &[]) else { return };
    let report = |app: &Installed| -> serde_json::Value {
        let text = app.get("/report");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("/report is not JSON ({e}): {text}"))
    };
    let first = report(&app);
    let show = |what: &str, v: &serde_json::Value| format!("{what}: {v}\n{}", app.logs());
    assert_eq!(first["state_directory"], "/var/lib/stateapp", "{}", show("state directory", &first));
    assert_eq!(first["visits"], 1, "{}", show("a fresh state directory", &first));
    assert_eq!(first["greeting"], "hello from the environment file", "{}", show("environment file", &first));
    assert_eq!(first["credential"], "s3cret", "{}", show("credential", &first));
    assert_eq!(first["cwd"], "/srv", "{}", show("working directory", &first));
    assert_ne!(first["uid"], 0, "{}", show("not root", &first));
    assert_eq!(first["writes"]["/srv/scratch/note"], "ok", "{}", show("a read-write path", &first));
    let other = first["writes"]["/srv/other/note"].as_str().unwrap_or_default();
    assert!(other.contains("Read-only file system"), "{}", show("ProtectSystem=strict elsewhere", &first));
    let source = first["source"].as_str().unwrap_or_default();
    assert!(
        source.contains("Permission denied"),
        "{}",
        show("the credential's source is not the worker's to read", &first)
    );
    assert_eq!(report(&app)["visits"], 2);

    // A new process of the instance finds its state, and the files read anew.
    let pid = app.property(1, "MainPID");
    sdbox.write_file("/etc/stateapp/env", &format!("GREETING=read again at the start\n{writes}\n"));
    sdbox.systemctl(&["restart", &app.unit(1)]);
    let started = Instant::now();
    while app.property(1, "ActiveState") != "active" {
        assert!(started.elapsed() < PATIENCE, "stateapp@1 did not come back\n{}", app.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(app.property(1, "MainPID"), pid, "a new process");
    let after = report(&app);
    assert_eq!(after["visits"], 3, "{}", show("the state directory outlives a restart", &after));
    assert_eq!(after["greeting"], "read again at the start", "{}", show("environment file at each start", &after));
    assert_eq!(after["credential"], "s3cret", "{}", show("credential after a restart", &after));
    // Where systemd keeps it (a dynamic user's state lives under /var/lib/private).
    let visits = sdbox.exec_ok(&["cat", "/var/lib/stateapp/visits"]);
    assert_eq!(visits, "3");
}
