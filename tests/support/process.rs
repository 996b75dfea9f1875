//! Starting a worker the ways a supervisor does, and keeping it from outliving its test.

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
        Self { args: Vec::new(), env: Vec::new(), own_pid_vars: Vec::new(), fds: Vec::new(), socket_activate: None }
            .env("RUST_LOG", "info")
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
        inner.push(worker_binary().into());
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
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if ["SDCLUSTER_", "LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET", "RUST_LOG"].iter().any(|p| key.starts_with(p)) {
                command.env_remove(&*key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let staged = pass_fds_at_3(&mut command, &self.fds);
        let description = format!("{command:?}");
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
        drop((staged, self.fds)); // the child has its copies
        Worker::watch(child, description)
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

/// A running worker (or its supervisor wrapper, which becomes the worker by `exec`), with
/// its stderr collected. Dropping it kills the process; a failing test prints its stderr.
pub struct Worker {
    child: Child,
    description: String,
    stderr: StderrLog,
    exited: Option<ExitStatus>,
}

impl Worker {
    fn watch(mut child: Child, description: String) -> Self {
        let stderr = StderrLog::collect(&mut child);
        Self { child, description, stderr, exited: None }
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been reaped while we hold it.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill {signal}: {}", std::io::Error::last_os_error());
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits up to `timeout` for stderr to contain `needle`; panics otherwise.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) {
        if wait_until(timeout, || self.stderr().contains(needle).then_some(())).is_none() {
            panic!("{} did not log {needle:?} within {timeout:?}; stderr:\n{}", self.description, self.stderr());
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Waits up to `timeout` for it to exit, then returns its exit code (stderr is complete
    /// by then); panics if it is still running or was killed by a signal.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = wait_until(timeout, || self.poll_exit())
            .unwrap_or_else(|| panic!("{} still runs after {timeout:?}; stderr:\n{}", self.description, self.stderr()));
        self.stderr.finish();
        status.code().unwrap_or_else(|| {
            panic!("{} was killed by signal {:?}; stderr:\n{}", self.description, status.signal(), self.stderr())
        })
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }
}

impl Drop for Worker {
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
