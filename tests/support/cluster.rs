//! `sdcluster run` as its users start it: the `sdcluster` binary, a [`Cluster`] guard around
//! one supervisor with its own runtime folder, port and app name, and the `sdcluster status`,
//! `restart` and `scale` commands pointed at it.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use sdcluster::status::{ClusterStatus, InstanceStatus};

pub use crate::binary::sdcluster_binary;
use crate::process::clear_supervisor_env;
use crate::{ChildGuard, TestDir, net};

/// Generous bound for anything a cluster does (start, restart, answer a command): only
/// reached when something is wrong.
pub const PATIENCE: Duration = Duration::from_secs(15);
/// How often [`Cluster::wait_until`] asks for the status (each time a `sdcluster status`
/// process): often enough to see changes promptly, rarely enough not to load the machine.
pub const STATUS_POLL: Duration = Duration::from_millis(30);

/// `sdcluster ARGS` with `SDCLUSTER_RUNTIME_DIR=runtime_dir`, none of the test's own
/// supervisor variables (`LISTEN_*`, `NOTIFY_SOCKET`, ...), and logs at `info`.
pub fn sdcluster_command(runtime_dir: &Path) -> Command {
    let mut command = Command::new(sdcluster_binary());
    clear_supervisor_env(&mut command);
    command.env("SDCLUSTER_RUNTIME_DIR", runtime_dir).env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Runs `sdcluster ARGS` to completion (it must end within [`PATIENCE`]) and returns its
/// output. For commands that should fail fast, such as `sdcluster run` with a bad config.
pub fn sdcluster_output(runtime_dir: &Path, args: &[&str]) -> Output {
    let child = sdcluster_command(runtime_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start sdcluster {args:?}: {e}"));
    let pid = child.id();
    // Read both pipes while waiting (a full pipe would stall the child), on a thread, so that
    // a hung command can be killed.
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match output.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("collect output"),
        Err(_) => {
            // SAFETY: kill(2) on our child, not reaped until it exits.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("sdcluster {args:?} still ran after {PATIENCE:?}");
        }
    }
}

/// One `sdcluster run` on `127.0.0.1:<free port>` with its own runtime folder and app name,
/// its stderr (and its workers', which inherit it) collected.
///
/// Dropping it freezes the supervisor, SIGKILLs the workers it started, then the supervisor:
/// nothing outlives the test, even a wedged worker. A failing test prints the stderr.
pub struct Cluster {
    /// Dropped before `dir`: the supervisor is gone before its runtime folder is removed.
    process: ChildGuard,
    name: String,
    addr: SocketAddr,
    dir: TestDir,
}

impl Cluster {
    /// Starts `sdcluster run --name NAME --listen 127.0.0.1:PORT ARGS -- COMMAND` and returns
    /// at once; see [`Cluster::wait_running`].
    pub fn start(name: &str, args: &[&str], command: &[&str]) -> Self {
        Self::start_with_env(name, &[], args, command)
    }

    /// [`Cluster::start`], with `env` added to the supervisor's environment (which its
    /// workers inherit).
    pub fn start_with_env(name: &str, env: &[(&str, &str)], args: &[&str], command: &[&str]) -> Self {
        let env: Vec<(&str, &OsStr)> = env.iter().map(|&(k, v)| (k, OsStr::new(v))).collect();
        Self::start_with_os_env(name, &env, args, command)
    }

    /// [`Cluster::start_with_env`] with values of any bytes (an environment need not be
    /// UTF-8).
    pub fn start_with_os_env(name: &str, env: &[(&str, &OsStr)], args: &[&str], command: &[&str]) -> Self {
        let dir = private_dir(&format!("run-{name}"));
        let addr: SocketAddr = ([127, 0, 0, 1], net::free_port()).into();
        let listen = addr.to_string();
        let mut run = sdcluster_command(dir.path());
        run.envs(env.iter().copied());
        run.args(["run", "--name", name, "--listen", &listen]).args(args).arg("--").args(command);
        let process = ChildGuard::spawn(&mut run, format!("sdcluster run --name {name}"));
        Self { process, name: name.to_owned(), addr, dir }
    }

    /// Starts `instances` reference workers (with `--debug-endpoints`) and waits until every
    /// one of them is running.
    pub fn of_workers(name: &str, instances: u32, args: &[&str]) -> Self {
        let count = instances.to_string();
        let worker = crate::worker_binary().to_str().expect("a UTF-8 path");
        let cluster = Self::start(name, &[&["--instances", &count][..], args].concat(), &[worker, "--debug-endpoints"]);
        cluster.wait_running(instances as usize);
        cluster
    }

    /// The app name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The listening address every worker serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `SDCLUSTER_RUNTIME_DIR` of this cluster (control and notify sockets).
    pub fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Runs `sdcluster ARGS` against this cluster's runtime folder; returns its output.
    pub fn ctl(&self, args: &[&str]) -> Output {
        sdcluster_output(self.runtime_dir(), args)
    }

    /// Runs `sdcluster ARGS`, asserts success, and returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "sdcluster {args:?} failed ({}): {}\nsupervisor stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.stderr()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `sdcluster status APP --json`, parsed; `None` while the supervisor does not answer.
    pub fn try_status(&self) -> Option<ClusterStatus> {
        let output = self.ctl(&["status", &self.name, "--json"]);
        if !output.status.success() {
            return None;
        }
        let json = String::from_utf8_lossy(&output.stdout);
        Some(
            serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("status --json is not a ClusterStatus ({e}):\n{json}")),
        )
    }

    /// `sdcluster status APP --json`, parsed; panics if it fails.
    pub fn status(&self) -> ClusterStatus {
        self.try_status().unwrap_or_else(|| panic!("sdcluster status failed; supervisor stderr:\n{}", self.stderr()))
    }

    /// The pids of the instances that have one, in instance order.
    pub fn pids(&self) -> Vec<u32> {
        self.status().instances.iter().filter_map(|i| i.pid).collect()
    }

    /// Polls the status every [`STATUS_POLL`] until `probe` returns `Some` (the supervisor
    /// may not answer yet), for at most [`PATIENCE`]; panics with `what`, the last status and
    /// the stderr otherwise.
    pub fn wait_until<T>(&self, what: &str, mut probe: impl FnMut(&ClusterStatus) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            if let Some(status) = self.try_status() {
                if let Some(found) = probe(&status) {
                    return found;
                }
                last = Some(status);
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not within {PATIENCE:?}; last status: {last:#?}\nsupervisor stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(STATUS_POLL);
        }
    }

    /// Waits until exactly `n` instances are listed, each `running` with a pid; returns that
    /// status.
    pub fn wait_running(&self, n: usize) -> ClusterStatus {
        self.wait_until(&format!("{n} instances running"), |s| {
            let all = s.instances.len() == n && s.instances.iter().all(|i| i.state == "running" && i.pid.is_some());
            all.then(|| s.clone())
        })
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the supervisor.
    pub fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// What the supervisor and its workers wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Waits up to [`PATIENCE`] until `probe` finds something in the stderr; panics otherwise.
    pub fn wait_for_stderr<T>(&self, what: &str, probe: impl FnMut(&str) -> Option<T>) -> T {
        self.process.wait_for_stderr_match(what, PATIENCE, probe)
    }

    /// Waits up to `timeout` for the supervisor to exit and returns how; panics if it runs on.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = self.process.wait_exit(timeout);
        if status.signal().is_none() {
            // Its workers are gone too (it waits for them), so the pipe is closed: read it all.
            // Killed by a signal, it may have left workers that still hold the pipe.
            self.process.finish_stderr();
        }
        status
    }
}

impl Drop for Cluster {
    /// Freezes the supervisor and kills its workers; `process` then kills and reaps the
    /// supervisor itself (and prints the stderr of a failed test) as it drops.
    fn drop(&mut self) {
        if self.process.is_running() {
            let pid = self.pid() as libc::pid_t;
            // Frozen, it starts no new worker while its children are killed; SIGKILL last
            // (by the guard), so that it cannot restart them.
            // SAFETY: kill(2) on our own unreaped child and on its own children.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
                for worker in children_of(self.pid()) {
                    libc::kill(worker as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// A [`TestDir`] of mode 0700, as `sdcluster run` wants its runtime directory (it refuses
/// one that group or others may use).
pub fn private_dir(label: &str) -> TestDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new(label);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
    dir
}

/// Every pid in /proc.
fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// The running processes whose command line (`/proc/PID/cmdline`, any argument) contains
/// `marker`: a unique string a test gave them, never the test's own command line.
pub fn processes_with_marker(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && is_alive(pid))
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0).any(|arg| arg.windows(marker.len()).any(|w| w == marker.as_bytes()))
            })
        })
        .collect()
}

/// Every running process below `root` (children, their children, ...), from /proc.
pub fn descendants_of(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> =
        all_pids().into_iter().filter_map(|pid| Some((pid, proc_ids(pid)?.0))).filter(|&(p, _)| is_alive(p)).collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found.sort_unstable();
    found
}

/// The parent, process group and session of `pid`, from `/proc/PID/stat`.
pub fn proc_ids(pid: u32) -> Option<(u32, u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(") ")?.1.split(' ').skip(1);
    let mut next = || fields.next()?.parse::<u32>().ok();
    Some((next()?, next()?, next()?))
}

/// How many fds process `pid` has open (`/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pids whose parent is `parent`, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// Whether process `pid` still runs: it exists and is not a zombie (an orphan's zombie is
/// reaped by PID 1 at its own pace, and holds no sockets).
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The state letter and parent pid of `pid`, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name (which may contain anything): state, ppid, ...
    let mut fields = stat.rsplit_once(") ")?.1.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Waits up to `timeout` until no process of `pids` runs; panics naming the survivors.
pub fn wait_all_gone(pids: &[u32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes {alive:?} still run after {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
