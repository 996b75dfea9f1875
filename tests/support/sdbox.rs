//! A throw-away machine with systemd as PID 1, for tests: the Rust face of `tests/sdbox`.
//!
//! `SdBox::shared()` boots one box per test binary (booting is the slow part) and leaves it
//! up until the test process exits; `SdBox::up(name)` boots a box of one's own, halted on drop.
//! Either way `tests/sdbox` halts a box by itself once the test process is gone, so a test
//! that crashes or is killed leaves nothing behind.
//!
//! Booting needs root. When it can't boot, a test is skipped (`None`, with a note on stderr)
//! only when it runs as another user outside CI; as root, or when `CI` is set, it fails.
//!
//! By default a box shares the host's network namespace: the test connects from the host to
//! the ports the box's socket units bind.
//!
//! [`SdBox::up_with`] boots a box of one's own with [`Boot`] options: `persistent` keeps what
//! the guest writes across [`SdBox::reboot`], `cpus` pins the guest to some CPUs,
//! `private_network` gives it a network of its own. [`SdBox::up_with_packages`] adds Debian
//! packages to the box's root file system (real servers as workers: Node, gunicorn).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{wait_until, worker_binary};

/// The script this wraps.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sdbox");

/// Where [`SdBox::install_worker`] puts the worker in the box.
pub const GUEST_WORKER: &str = "/usr/local/bin/sdcluster-worker";

/// How [`SdBox::up_with`] boots a box.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// Keep what the guest writes (packages, enabled units, files) across [`SdBox::reboot`];
    /// it is gone once the box is down (`SDBOX_PERSIST=1`).
    pub persistent: bool,
    /// Run the guest on these CPUs only, a list such as `0` or `0,2-3` (`SDBOX_CPU_AFFINITY`):
    /// its systemd, and so whatever counts "one per CPU" there, sees only these.
    pub cpus: Option<String>,
    /// Give the box a network namespace of its own, with only its own loopback: ports there
    /// can't collide with the host's, and tests reach them from inside (`SDBOX_PRIVATE_NET=1`).
    pub private_network: bool,
}

impl Boot {
    /// The `tests/sdbox` environment for these options: every variable they stand for, set,
    /// so that none comes from the test's own environment.
    fn env(&self) -> Vec<(&'static str, String)> {
        let flag = |on: bool| if on { "1" } else { "0" }.to_owned();
        vec![
            ("SDBOX_PERSIST", flag(self.persistent)),
            ("SDBOX_CPU_AFFINITY", self.cpus.clone().unwrap_or_default()),
            ("SDBOX_PRIVATE_NET", flag(self.private_network)),
        ]
    }
}

/// A running box; see the module documentation.
#[derive(Debug)]
pub struct SdBox {
    name: String,
    /// Halted on drop (false for the shared box, which lives as long as the process).
    owned: bool,
    /// Set once the worker is in the box.
    worker: OnceLock<()>,
}

impl SdBox {
    /// Boots (or joins, if already up) the box `name` ([A-Za-z0-9-]); it is halted on drop.
    /// `None`: skipped, because this test can't be root here and isn't running on CI.
    pub fn up(name: &str) -> Option<SdBox> {
        Self::up_with(name, &Boot::default())
    }

    /// [`SdBox::up`] with [`Boot`] options.
    pub fn up_with(name: &str, options: &Boot) -> Option<SdBox> {
        let booted = boot(name, "up", &options.env()).map(|()| SdBox {
            name: name.to_owned(),
            owned: true,
            worker: OnceLock::new(),
        });
        Unavailable::skip_or_fail(booted)
    }

    /// [`SdBox::up_with`] on a root file system with these Debian packages too, such as
    /// `nodejs` or `gunicorn` (`SDBOX_INCLUDE`, dependencies included). Each list gets a tree
    /// of its own, built once and cached (a minute or two the first time); boxes booted with
    /// the same list, in the same order, share it.
    pub fn up_with_packages(name: &str, options: &Boot, packages: &[&str]) -> Option<SdBox> {
        let mut env = options.env();
        env.push(("SDBOX_INCLUDE", packages.join(",")));
        let booted =
            boot(name, "up", &env).map(|()| SdBox { name: name.to_owned(), owned: true, worker: OnceLock::new() });
        Unavailable::skip_or_fail(booted)
    }

    /// Halts the box cleanly and boots it again with `options` (CPUs, network: what a new
    /// boot may change) and with everything the guest wrote, which needs a box booted with
    /// [`Boot::persistent`]. Panics if the box does not come up again.
    pub fn reboot(&self, options: &Boot) {
        if let Err(Unavailable::Fail(why) | Unavailable::Skip(why)) = boot(&self.name, "reboot", &options.env()) {
            panic!("[{}] reboot: {why}", self.name);
        }
    }

    /// The box of this test binary, booted by the first test that asks and shared by all its
    /// tests (so give their units distinct names and ports). It is halted shortly after the
    /// process exits. `None`: skipped, as for [`SdBox::up`].
    pub fn shared() -> Option<&'static SdBox> {
        static SHARED: OnceLock<Result<SdBox, Unavailable>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let name = format!("{}-{}", binary_stem(), std::process::id());
            boot(&name, "up", &[]).map(|()| SdBox { name, owned: false, worker: OnceLock::new() })
        });
        Unavailable::skip_or_fail(shared.as_ref())
    }

    /// The box's name (also its host name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `argv` in the box (its namespaces, a clean environment) and returns what it did,
    /// whatever its exit status; panics only when the command can't be run at all.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_with_input(argv, &[])
    }

    /// [`SdBox::exec`] with `input` on the command's stdin.
    pub fn exec_with_input(&self, argv: &[&str], input: &[u8]) -> Output {
        let mut cmd = self.script();
        cmd.arg("exec").args(argv).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("[{}] cannot run {SCRIPT}: {e}", self.name));
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        // Fed from a thread, so that a command writing much before it reads can't deadlock us;
        // one that doesn't read its stdin closes the pipe: not our failure.
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output();
        let _ = feeder.join();
        out.unwrap_or_else(|e| panic!("[{}] waiting for `{}`: {e}", self.name, argv.join(" ")))
    }

    /// Runs `argv` in the box; its stdout, with trailing whitespace trimmed. Panics, showing
    /// the command, its exit status, stdout and stderr, unless it exits 0.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        self.checked(&argv.join(" "), out)
    }

    /// Runs the shell `script` (`sh -c`) in the box and returns what it did.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Runs the shell `script` in the box; its trimmed stdout. Panics unless it exits 0.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        self.checked(script, out)
    }

    /// Copies the host file `host` to exactly `guest` (mode kept, parent directories made),
    /// or the host directory `host` as the directory `guest`.
    pub fn copy_in(&self, host: impl AsRef<Path>, guest: &str) {
        let host = host.as_ref();
        let out = self
            .script()
            .arg("cp-in")
            .arg(host)
            .arg(guest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("[{}] cannot run {SCRIPT}: {e}", self.name));
        self.checked(&format!("cp-in {} {guest}", host.display()), out);
    }

    /// Writes `contents` to the file `guest` in the box (for unit files and configuration).
    pub fn write_file(&self, guest: &str, contents: &str) {
        let argv = ["sh", "-c", "mkdir -p \"$(dirname \"$1\")\" && cat >\"$1\"", "sh", guest];
        let out = self.exec_with_input(&argv, contents.as_bytes());
        self.checked(&format!("write {guest}"), out);
    }

    /// `systemctl ARGS...` in the box; its trimmed stdout. Panics unless it exits 0.
    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut argv = vec!["systemctl", "--no-pager"];
        argv.extend_from_slice(args);
        self.exec_ok(&argv)
    }

    /// One property of a unit (`systemctl show -p PROPERTY --value UNIT`).
    pub fn property(&self, unit: &str, property: &str) -> String {
        self.systemctl(&["show", "-p", property, "--value", unit])
    }

    /// Waits up to 30 s for `unit` to be active (a `Type=notify` service: ready); panics with
    /// its status and journal otherwise, or at once if it failed.
    pub fn wait_active(&self, unit: &str) {
        let timeout = Duration::from_secs(30);
        let state = wait_until(timeout, || match self.property(unit, "ActiveState").as_str() {
            "active" => Some("active".to_owned()),
            "failed" => Some("failed".to_owned()),
            _ => None,
        });
        match state.as_deref() {
            Some("active") => {}
            Some(state) => self.fail_unit(unit, state),
            None => self.fail_unit(unit, &format!("not active after {timeout:?}")),
        }
    }

    /// `systemctl status` and the journal of the units matching `pattern`, for failure reports.
    pub fn diagnose(&self, pattern: &str) -> String {
        let status = self.exec(&["systemctl", "--no-pager", "--full", "status", pattern]);
        let journal = self.exec(&["journalctl", "--no-pager", "-o", "short-monotonic", "-n", "80", "-u", pattern]);
        format!(
            "--- systemctl status {pattern}\n{}{}--- journalctl -u {pattern}\n{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr),
            String::from_utf8_lossy(&journal.stdout),
            String::from_utf8_lossy(&journal.stderr),
        )
    }

    /// Copies the host's `sdcluster-worker` (built if missing or stale: [`worker_binary`]) to
    /// [`GUEST_WORKER`], once per box, and checks that it runs there; returns the guest path.
    pub fn install_worker(&self) -> &'static str {
        self.worker.get_or_init(|| {
            self.copy_in(worker_binary(), GUEST_WORKER);
            let out = self.exec(&[GUEST_WORKER, "--version"]);
            assert!(
                out.status.success(),
                "[{}] the worker built on this host doesn't run in the box (built against a newer \
                 glibc than the box's Debian has? set SDBOX_SUITE): {}\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        });
        GUEST_WORKER
    }

    fn fail_unit(&self, unit: &str, what: &str) -> ! {
        panic!("[{}] {unit} {what}\n{}", self.name, self.diagnose(unit))
    }

    fn checked(&self, what: &str, out: Output) -> String {
        if !out.status.success() {
            panic!(
                "[{}] `{what}` failed ({})\n--- stdout\n{}--- stderr\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    fn script(&self) -> Command {
        let mut cmd = Command::new(SCRIPT);
        cmd.env("SDBOX_NAME", &self.name);
        cmd
    }
}

impl Drop for SdBox {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        match self.script().arg("down").stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!("[{}] sdbox down: {}: {}", self.name, out.status, String::from_utf8_lossy(&out.stderr))
            }
            Err(e) => eprintln!("[{}] cannot run {SCRIPT} down: {e}", self.name),
        }
    }
}

/// Why there is no box.
#[derive(Debug)]
enum Unavailable {
    /// Not our environment: skip the test.
    Skip(String),
    /// Should have worked: fail the test.
    Fail(String),
}

impl Unavailable {
    /// The box, `None` (with a note) when the test is to be skipped; panics when it must fail.
    fn skip_or_fail<T, U: std::borrow::Borrow<Unavailable>>(booted: Result<T, U>) -> Option<T> {
        let why = match booted {
            Ok(sdbox) => return Some(sdbox),
            Err(why) => why,
        };
        match why.borrow() {
            Unavailable::Skip(why) => {
                eprintln!("SKIPPED: no systemd box: {why}");
                None
            }
            Unavailable::Fail(why) => panic!("{why}"),
        }
    }
}

/// Runs `tests/sdbox up` (or `reboot`) for box `name`, with `env` for the script.
fn boot(name: &str, command: &str, env: &[(&str, String)]) -> Result<(), Unavailable> {
    let on_ci = crate::deb::on_ci();
    if !is_root() {
        let why = "booting a box needs root (run the tests with sudo, or as root)".to_owned();
        return Err(if on_ci { Unavailable::Fail(why) } else { Unavailable::Skip(why) });
    }
    let started = Instant::now();
    let out = Command::new(SCRIPT)
        .arg(command)
        .env("SDBOX_NAME", name)
        .env("SDBOX_OWNER_PID", std::process::id().to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Unavailable::Fail(format!("cannot run {SCRIPT}: {e}")))?;
    if !out.status.success() {
        let env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        return Err(Unavailable::Fail(format!(
            "`SDBOX_NAME={name} {env}{SCRIPT} {command}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    eprintln!("[{name}] box {command} in {:.1?}", started.elapsed());
    Ok(())
}

fn is_root() -> bool {
    // The effective uid: the second field of "Uid:" in /proc/self/status.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|l| l.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)) == Some("0"))
    })
}

/// The test binary's name without cargo's hash (`systemd-0123abcd` → `systemd`), as a valid
/// box name.
fn binary_stem() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_deref().and_then(Path::file_stem).and_then(|s| s.to_str()).unwrap_or("test");
    let stem = stem.rsplit_once('-').map_or(stem, |(name, _hash)| name);
    let stem: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(24).collect();
    if stem.is_empty() { "test".to_owned() } else { stem }
}
