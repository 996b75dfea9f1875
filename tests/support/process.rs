//! Starting a worker the ways a supervisor does, and keeping it (or any child a test starts)
//! from outliving its test.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{wait_until, worker_binary};

/// The first fd of the `sd_listen_fds(3)` protocol.
const LISTEN_FDS_START: RawFd = 3;

/// How to start one worker: arguments, environment, and what its supervisor hands it.
///
/// Variables a supervisor sets to the worker's own pid (`LISTEN_PID`, `WATCHDOG_PID`) are
/// only known after the fork, so the worker is then started by `sh -c 'export VAR=$$; exec
/// "$0" "$@"' worker ARGS...`: `exec` keeps the shell's pid, which becomes the worker's.
pub struct WorkerCommand {
    program: Vec<OsString>,
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    own_pid_vars: Vec<String>,
    fds: Vec<OwnedFd>,
    socket_activate: Option<String>,
}

impl Default for WorkerCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerCommand {
    /// The reference worker with no arguments, logging at `info`.
    pub fn new() -> Self {
        Self {
            program: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            own_pid_vars: Vec::new(),
            fds: Vec::new(),
            socket_activate: None,
        }
        .env("RUST_LOG", "info")
    }

    /// Runs `argv` (a program and its first arguments) instead of the reference worker: a
    /// worker written in another language, started with the same supervisor protocols.
    pub fn program<I, A>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: AsRef<OsStr>,
    {
        self.program = argv.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Appends arguments.
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable (replacing an earlier setting of it).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.forget_var(key);
        self.env.push((key.to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets `key` to the worker's own pid (replacing an earlier setting of it).
    pub fn env_own_pid(mut self, key: &str) -> Self {
        self.forget_var(key);
        self.own_pid_vars.push(key.to_owned());
        self
    }

    /// Points `NOTIFY_SOCKET` at `path`.
    pub fn notify_socket(self, path: &std::path::Path) -> Self {
        self.env("NOTIFY_SOCKET", path)
    }

    /// Enables the watchdog as systemd does: `WATCHDOG_USEC`, and `WATCHDOG_PID` = the worker.
    pub fn watchdog(self, usec: u64) -> Self {
        self.env("WATCHDOG_USEC", usec.to_string()).env_own_pid("WATCHDOG_PID")
    }

    /// Passes `fds` as fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` = the worker, and
    /// `LISTEN_FDNAMES` when `names` is given (colon-separated, passed as is).
    pub fn pass_fds(mut self, fds: Vec<OwnedFd>, names: Option<&str>) -> Self {
        self = self.env("LISTEN_FDS", fds.len().to_string()).env_own_pid("LISTEN_PID");
        if let Some(names) = names {
            self = self.env("LISTEN_FDNAMES", names);
        }
        self.fds = fds;
        self
    }

    /// Runs the worker under `systemd-socket-activate -l addr`, which execs it (same pid) on
    /// the first connection with the socket as fd 3; every variable set here goes through
    /// its `-E`, since it passes on only a few of its own.
    pub fn socket_activated(mut self, addr: &str) -> Self {
        self.socket_activate = Some(addr.to_owned());
        self
    }

    /// Drops any earlier setting of `key`, so that the last call wins.
    fn forget_var(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
        self.own_pid_vars.retain(|k| k != key);
    }

    /// Starts the worker; it is killed when the returned guard is dropped.
    pub fn spawn(self) -> Worker {
        let mut inner: Vec<OsString> = Vec::new();
        if let Some(addr) = &self.socket_activate {
            assert!(self.fds.is_empty(), "systemd-socket-activate passes its own sockets");
            inner.extend(["systemd-socket-activate", "-l", addr].map(OsString::from));
            for key in self.env.iter().map(|(k, _)| k).chain(&self.own_pid_vars) {
                inner.extend([OsString::from("-E"), OsString::from(key)]);
            }
        }
        if self.program.is_empty() {
            inner.push(worker_binary().into());
        } else {
            inner.extend(self.program.iter().cloned());
        }
        inner.extend(self.args.iter().cloned());

        let mut command = if self.own_pid_vars.is_empty() {
            let mut command = Command::new(&inner[0]);
            command.args(&inner[1..]);
            command
        } else {
            let exports = self.own_pid_vars.iter().map(|k| format!("{k}=$$")).collect::<Vec<_>>().join(" ");
            let mut command = Command::new("sh");
            command.arg("-c").arg(format!("export {exports}; exec \"$0\" \"$@\"")).args(&inner);
            command
        };
        clear_supervisor_env(&mut command);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let staged = pass_fds_at_3(&mut command, &self.fds);
        let description = format!("{command:?}");
        let worker = ChildGuard::spawn(&mut command, description);
        drop((staged, self.fds)); // the child has its copies
        worker
    }
}

/// Makes `fds` the child's fds 3, 4, ... (inheritable; nothing else is, std opens fds
/// close-on-exec). Each is first duplicated above the target range, so that putting one in
/// place never overwrites another still to be moved; keep the returned copies until the
/// command has spawned.
#[must_use]
fn pass_fds_at_3(command: &mut Command, fds: &[OwnedFd]) -> Vec<OwnedFd> {
    if fds.is_empty() {
        return Vec::new();
    }
    let above = LISTEN_FDS_START + fds.len() as RawFd;
    let staged: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC on an fd we own; a non-negative result is a new fd.
            let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
            assert!(new >= 0, "F_DUPFD_CLOEXEC: {}", std::io::Error::last_os_error());
            // SAFETY: just created, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(new) }
        })
        .collect();
    let sources: Vec<RawFd> = staged.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure only calls dup2, which is async-signal-safe, and reads a Vec
    // allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            for (target, &source) in (LISTEN_FDS_START..).zip(&sources) {
                if libc::dup2(source, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    staged
}

/// What a child writes to its piped stderr, collected on a thread and readable at any time.
pub struct StderrLog {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl StderrLog {
    /// Takes `child`'s stderr (which must be `Stdio::piped()`) and starts collecting it.
    pub fn collect(child: &mut Child) -> Self {
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&buf[..n]);
            }
        });
        Self { bytes, reader: Some(reader) }
    }

    /// Everything collected so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Waits for the end of the stream, so that [`Self::text`] is complete; call it once the
    /// child (and anything that inherited its stderr) has exited.
    pub fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A spawned child with its stderr collected, its exit status cached once reaped, and a kill on
/// drop, so that no process outlives its test. A failing test prints the child's stderr.
///
/// The one guard behind [`Worker`] and [`crate::cluster::Cluster`] (and any other program a
/// test starts and watches), so that they poll, wait and clean up the same way.
pub struct ChildGuard {
    child: Child,
    description: String,
    stderr: StderrLog,
    exited: Option<ExitStatus>,
}

/// A running worker (or its supervisor wrapper, which becomes the worker by `exec`): see
/// [`WorkerCommand::spawn`].
pub type Worker = ChildGuard;

impl ChildGuard {
    /// Spawns `command` with stdin and stdout on `/dev/null` and stderr collected; `description`
    /// names it in messages.
    pub fn spawn(command: &mut Command, description: String) -> Self {
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let stderr = StderrLog::collect(&mut child);
        Self { child, description, stderr, exited: None }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        // Our own child cannot be reaped (and its pid reused) while we hold it.
        signal_pid(self.pid(), signal);
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits up to `timeout` for stderr to contain `needle`; panics otherwise.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) {
        self.wait_for_stderr_match(&format!("{needle:?}"), timeout, |log| log.contains(needle).then_some(()));
    }

    /// Waits up to `timeout` until `probe` finds something in the stderr; panics naming `what`
    /// otherwise.
    pub fn wait_for_stderr_match<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&str) -> Option<T>,
    ) -> T {
        wait_until(timeout, || probe(&self.stderr())).unwrap_or_else(|| {
            panic!("{} did not log {what} within {timeout:?}; stderr:\n{}", self.description, self.stderr())
        })
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Waits up to `timeout` for it to exit and returns how; panics if it runs on. Its stderr
    /// may still be incomplete: see [`Self::finish_stderr`].
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_until(timeout, || self.poll_exit())
            .unwrap_or_else(|| panic!("{} still runs after {timeout:?}; stderr:\n{}", self.description, self.stderr()))
    }

    /// Reads its stderr to the end; call it once it (and anything that inherited its stderr)
    /// has exited, or it blocks until they have.
    pub fn finish_stderr(&mut self) {
        self.stderr.finish();
    }

    /// Waits up to `timeout` for it to exit, then returns its exit code (stderr is complete
    /// by then); panics if it is still running or was killed by a signal.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait_exit(timeout);
        self.finish_stderr();
        status.code().unwrap_or_else(|| {
            panic!("{} was killed by signal {:?}; stderr:\n{}", self.description, status.signal(), self.stderr())
        })
    }

    /// Its exit status once it exited, reaping it then; remembered, since a reaped child
    /// cannot be asked again.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- stderr of {} ---\n{}", self.description, self.stderr());
        }
    }
}

/// Sends `signal` to process `pid`; panics if it cannot (no such process).
pub fn signal_pid(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill -{signal} {pid}: {}", std::io::Error::last_os_error());
}

/// Removes the test's own supervisor variables (`LISTEN_*`, `NOTIFY_SOCKET`, `SDCLUSTER_*`,
/// ...) from what `command` inherits: a test run under systemd or `sdcluster run` must not
/// hand them to the program it tests.
pub(crate) fn clear_supervisor_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if ["SDCLUSTER_", "LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET", "RUST_LOG"].iter().any(|p| key.starts_with(p)) {
            command.env_remove(&*key);
        }
    }
}
