//! Starting a worker exactly as systemd does: fds from 3, `LISTEN_FDS`, `LISTEN_PID` equal to
//! the worker's own pid, `LISTEN_FDNAMES`, and (for the watchdog) `WATCHDOG_PID`.
//!
//! `LISTEN_FDS` counts only what systemd would pass: the listeners, then the instance's fd
//! store. The shared tables (balance, metrics) are inherited above that range, uncounted,
//! and named by a variable each (`SDCLUSTER_BALANCE_FILE=/proc/self/fd/N`), the way the
//! reference worker is told where the tables are under systemd: a server that takes every
//! passed fd for a socket (gunicorn) never sees them.
//!
//! The pid is known only after `fork`, and between `fork` and `exec` only async-signal-safe
//! calls are allowed (no allocation), so everything is prepared before the fork and the
//! child only writes its pid's digits into buffers reserved for them.
//!
//! Whether the program was executed is learnt as `std::process::Command` does: through a
//! close-on-exec pipe. The child writes the step that failed and its errno
//! ([`ExecFailure`]) into it if anything between `fork` and `exec` fails (moving the fds,
//! `chdir`, `execve`), then exits 127; a successful `execve` closes the pipe, so the parent
//! reads the end of the file. The parent reads it without blocking ([`ExecPipe::check`]):
//! the supervisor's event loop never waits on a child.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString, c_char};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{ForkResult, Pid, fork};
use sdcluster_protocol::listen_fds::LISTEN_FDS_START;

/// Room for the digits of any pid.
const PID_DIGITS: usize = 20;
/// What the child writes into the exec pipe when a step fails: the step and the errno, as
/// two native-endian `i32`s (well under `PIPE_BUF`: one atomic write).
const REPORT_BYTES: usize = 8;

/// The variables [`Launch::spawn`] sets itself; any other value for them is dropped.
pub const PROTOCOL_VARIABLES: [&str; 5] =
    ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_PID", "WATCHDOG_USEC"];

/// The step between `fork` and `exec` that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Moving the fds into place (`fcntl`, `dup2`).
    Fds,
    /// `chdir` into the working directory.
    Chdir,
    /// `execve` of the program.
    Exec,
}

impl Step {
    fn code(self) -> i32 {
        match self {
            Step::Fds => 1,
            Step::Chdir => 2,
            Step::Exec => 3,
        }
    }

    fn from_code(code: i32) -> Option<Self> {
        Some(match code {
            1 => Step::Fds,
            2 => Step::Chdir,
            3 => Step::Exec,
            _ => return None,
        })
    }
}

/// Why a started process never became the program: the step, its errno, and what it was
/// about, for people ("cannot execute /usr/bin/nodee: No such file or directory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecFailure {
    /// The step that failed.
    pub step: Step,
    /// Its errno.
    pub errno: Errno,
    /// The program.
    pub program: String,
    /// The working directory, for [`Step::Chdir`].
    pub directory: Option<PathBuf>,
}

impl std::fmt::Display for ExecFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = self.errno.desc();
        match self.step {
            Step::Exec => write!(f, "cannot execute {}: {why}", self.program),
            Step::Chdir => {
                let dir = self.directory.as_deref().unwrap_or(Path::new("?"));
                write!(f, "cannot change into the working directory {}: {why}", dir.display())
            }
            Step::Fds => write!(f, "cannot pass the fds to {}: {why}", self.program),
        }
    }
}

/// What the exec pipe says so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The child has not executed its program yet, nor failed.
    Pending,
    /// The program runs (the pipe was closed by `execve`).
    Executed,
    /// A step failed; the child exits 127.
    Failed(ExecFailure),
}

/// The parent's end of a started process's exec pipe (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct ExecPipe {
    fd: OwnedFd,
    program: String,
    directory: Option<PathBuf>,
}

impl ExecPipe {
    /// The fd, to wait for it to become readable.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Reads what the child wrote, without blocking: [`ExecOutcome::Pending`] while it is
    /// between `fork` and `exec`. Once the child has exited, never pending.
    pub fn check(&self) -> ExecOutcome {
        let mut buf = [0u8; REPORT_BYTES];
        let mut got = 0;
        loop {
            match nix::unistd::read(&self.fd, &mut buf[got..]) {
                Ok(0) if got == 0 => return ExecOutcome::Executed,
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if got == REPORT_BYTES {
                        break;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if got == 0 => return ExecOutcome::Pending,
                // A partial report can't be (one atomic write); an error reading a pipe of
                // our own neither: take what there is.
                Err(_) => break,
            }
        }
        let word = |i: usize| i32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let step = if got == REPORT_BYTES { Step::from_code(word(0)) } else { None };
        ExecOutcome::Failed(ExecFailure {
            step: step.unwrap_or(Step::Exec),
            errno: if got == REPORT_BYTES { Errno::from_raw(word(4)) } else { Errno::UnknownErrno },
            program: self.program.clone(),
            directory: self.directory.clone(),
        })
    }
}

/// Why [`Launch::new`] or [`Launch::spawn`] could not start a process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    /// An argument, a variable or a path holds a NUL byte, which no C string can carry: the
    /// program would see it cut short. (The supervisor refuses such a spec at its start;
    /// this is the last line.)
    #[error("{0} holds a NUL byte, which cannot be passed to a program")]
    Nul(String),
    /// `pipe2` or `fork` failed.
    #[error("{0}")]
    Os(#[from] Errno),
}

/// `bytes` as a C string, or [`SpawnError::Nul`] naming `what`.
fn cstr(bytes: impl Into<Vec<u8>>, what: impl FnOnce() -> String) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul(what()))
}

/// A started process: its pid and the pipe that tells whether it runs its program.
#[derive(Debug)]
pub struct Spawned {
    /// The main process.
    pub pid: Pid,
    /// Its exec pipe.
    pub exec: ExecPipe,
}

/// A prepared command line and set of fds to pass; the environment comes with each start.
pub struct Launch {
    program: String,
    argv: Vec<CString>,
    /// Counted in `LISTEN_FDS`: the listeners, with their names.
    fds: Vec<(RawFd, String)>,
    /// Inherited after the `LISTEN_FDS` range, uncounted, each announced by its variable as
    /// `/proc/self/fd/N` (the shared tables).
    tables: Vec<(RawFd, String)>,
    watchdog_usec: Option<u64>,
    directory: Option<PathBuf>,
    directory_c: Option<CString>,
}

impl Launch {
    /// `fds` become 3, 4, ... in the child, named in `LISTEN_FDNAMES`; `tables` (fd and
    /// variable name) follow them, uncounted; the child starts in `directory` (default: this
    /// process's). An argument or a directory with a NUL byte is an error, never a panic.
    pub fn new(
        argv: &[String],
        fds: Vec<(RawFd, String)>,
        tables: Vec<(RawFd, String)>,
        watchdog_usec: Option<u64>,
        directory: Option<&Path>,
    ) -> Result<Self, SpawnError> {
        let argv = argv
            .iter()
            .enumerate()
            .map(|(i, a)| cstr(a.as_bytes(), || format!("argument {i} of the command ({a:?})")))
            .collect::<Result<Vec<_>, _>>()?;
        let directory_c = directory
            .map(|d| cstr(d.as_os_str().as_bytes(), || format!("the working directory {:?}", d.as_os_str())))
            .transpose()?;
        Ok(Self {
            program: argv.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default(),
            argv,
            fds,
            tables,
            watchdog_usec,
            directory: directory.map(Path::to_path_buf),
            directory_c,
        })
    }

    /// Forks and execs with `env` (the whole environment but the protocol's variables), the
    /// launch's fds followed by `extra` (the instance's fd store), then the tables. The child
    /// is in its own process group (terminal signals reach only the supervisor, which
    /// decides; the supervisor kills what is left of the group when the main process ends)
    /// and gets SIGTERM if the supervisor dies. Variables are bytes: one that is not UTF-8
    /// (inherited) is passed as it is; one with a NUL byte is an error.
    pub fn spawn(&self, env: &BTreeMap<OsString, OsString>, extra: &[(RawFd, &str)]) -> Result<Spawned, SpawnError> {
        let supervisor = nix::unistd::getpid();
        // Everything the child needs is allocated here, before the fork.
        let fds: Vec<RawFd> = self
            .fds
            .iter()
            .map(|(fd, _)| *fd)
            .chain(extra.iter().map(|(fd, _)| *fd))
            .chain(self.tables.iter().map(|(fd, _)| *fd))
            .collect();
        let counted = self.fds.len() + extra.len();
        let names: Vec<&str> = self.fds.iter().map(|(_, n)| n.as_str()).chain(extra.iter().map(|(_, n)| *n)).collect();
        let mut env = env.clone();
        env.retain(|k, _| !PROTOCOL_VARIABLES.iter().any(|p| OsStr::new(p) == k));
        for (i, (_, var)) in self.tables.iter().enumerate() {
            let fd = LISTEN_FDS_START as usize + counted + i;
            env.insert(var.into(), format!("/proc/self/fd/{fd}").into());
        }
        env.insert("LISTEN_FDS".into(), counted.to_string().into());
        env.insert("LISTEN_FDNAMES".into(), names.join(":").into());
        if let Some(usec) = self.watchdog_usec {
            env.insert("WATCHDOG_USEC".into(), usec.to_string().into());
        }
        let vars: Vec<CString> = env
            .iter()
            .map(|(k, v)| {
                let var = [k.as_bytes(), b"=", v.as_bytes()].concat();
                cstr(var, || format!("the variable {}", k.to_string_lossy()))
            })
            .collect::<Result<_, _>>()?;
        let mut pid_vars = vec![pid_var("LISTEN_PID=")];
        if self.watchdog_usec.is_some() {
            pid_vars.push(pid_var("WATCHDOG_PID="));
        }
        let mut moved: Vec<RawFd> = vec![0; fds.len()];
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // Pointers are taken before the fork; the child writes only into pid_vars' buffers
        // and `moved`.
        let argv: Vec<*const c_char> = self.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let mut envp: Vec<*const c_char> = vars.iter().map(|e| e.as_ptr()).collect();
        envp.extend(pid_vars.iter().map(|v| v.as_ptr().cast::<c_char>()));
        envp.push(std::ptr::null());
        let pid_bufs: Vec<*mut u8> = pid_vars.iter_mut().map(|v| v.as_mut_ptr()).collect();
        let prefixes: Vec<usize> = pid_vars.iter().map(|v| v.len() - PID_DIGITS - 1).collect();
        let child = Child {
            supervisor,
            argv: &argv,
            envp: &envp,
            pid_bufs: &pid_bufs,
            prefixes: &prefixes,
            fds: &fds,
            directory: self.directory_c.as_ref().map(|d| d.as_ptr()),
            report: write.as_raw_fd(),
        };
        // SAFETY: the child calls only async-signal-safe functions and exits or execs.
        match unsafe { fork() }? {
            ForkResult::Parent { child } => {
                drop(write);
                nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
                let exec = ExecPipe { fd: read, program: self.program.clone(), directory: self.directory.clone() };
                Ok(Spawned { pid: child, exec })
            }
            // SAFETY: in the child of a fork, `exec` only calls async-signal-safe functions
            // on buffers made before the fork, then execs; `_exit` ends the child if it fails.
            ForkResult::Child => unsafe {
                child.exec(&mut moved);
                libc::_exit(127)
            },
        }
    }
}

fn pid_var(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(name.len() + PID_DIGITS + 1, 0);
    v
}

/// What the child of a fork needs, all of it made before the fork.
struct Child<'a> {
    supervisor: Pid,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    pid_bufs: &'a [*mut u8],
    prefixes: &'a [usize],
    fds: &'a [RawFd],
    directory: Option<*const c_char>,
    /// The write end of the exec pipe.
    report: RawFd,
}

impl Child<'_> {
    /// In the child, between fork and exec: nothing here may allocate or lock. Returns only
    /// if a step failed (and was reported).
    unsafe fn exec(&self, moved: &mut [RawFd]) {
        // SAFETY: the caller is the child of a fork (see `Launch::spawn`): only
        // async-signal-safe calls follow, on pointers into buffers the parent made, which stay
        // valid in the child.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::getppid() != self.supervisor.as_raw() {
                return; // the supervisor is already gone: don't start an orphan
            }
            libc::setpgid(0, 0);
            // Undo what the supervisor's runtime changed: Rust ignores SIGPIPE, handlers may block.
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);

            // Move the fds, and the exec pipe, out of the way first (dup2(3, 3) would keep
            // FD_CLOEXEC, and a dup2 onto the pipe would close it), then into place. The
            // moved copies are close-on-exec: execve closes them, the pipe included.
            let first_free = LISTEN_FDS_START + self.fds.len() as RawFd;
            let report = libc::fcntl(self.report, libc::F_DUPFD_CLOEXEC, first_free);
            if report < 0 {
                return; // nowhere to report to: the parent sees "executed", then exit 127
            }
            for (i, &fd) in self.fds.iter().enumerate() {
                moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
                if moved[i] < 0 {
                    return fail(report, Step::Fds);
                }
            }
            for (i, &fd) in moved.iter().enumerate() {
                if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                    return fail(report, Step::Fds);
                }
            }
            if let Some(dir) = self.directory {
                if libc::chdir(dir) != 0 {
                    return fail(report, Step::Chdir);
                }
            }
            let pid = libc::getpid() as u64;
            for (&buf, &prefix) in self.pid_bufs.iter().zip(self.prefixes) {
                write_decimal(buf.add(prefix), pid);
            }
            libc::execve(self.argv[0], self.argv.as_ptr(), self.envp.as_ptr());
            fail(report, Step::Exec)
        }
    }
}

/// Writes `step` and the current errno into the exec pipe (async-signal-safe).
unsafe fn fail(report: RawFd, step: Step) {
    let errno = Errno::last_raw();
    let mut buf = [0u8; REPORT_BYTES];
    buf[..4].copy_from_slice(&step.code().to_ne_bytes());
    buf[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write(2) of a buffer on this stack into a pipe of ours; async-signal-safe.
    unsafe { libc::write(report, buf.as_ptr().cast(), REPORT_BYTES) };
}

/// Writes `n` as NUL-terminated decimal at `out` (room for PID_DIGITS + 1 bytes).
unsafe fn write_decimal(out: *mut u8, mut n: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller gives `out` room for PID_DIGITS + 1 bytes; len <= 20 <= PID_DIGITS.
        unsafe { *out.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above, the terminating NUL is within the PID_DIGITS + 1 bytes.
    unsafe { *out.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn env(vars: &[(&str, &str)]) -> BTreeMap<OsString, OsString> {
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn path_env() -> BTreeMap<OsString, OsString> {
        env(&[("PATH", "/usr/bin:/bin")])
    }

    /// Waits for the child to end and returns what its exec pipe said by then.
    fn finish(spawned: Spawned) -> (ExecOutcome, nix::sys::wait::WaitStatus) {
        let status = nix::sys::wait::waitpid(spawned.pid, None).unwrap();
        (spawned.exec.check(), status)
    }

    /// An argument, a directory or a variable with a NUL byte is an error naming it, never a
    /// panic; a variable that is not UTF-8 reaches the child byte for byte.
    #[test]
    fn odd_bytes_are_errors_or_passed_through_never_panics() {
        let err = Launch::new(&["/bin/true".into(), "a\0b".into()], vec![], vec![], None, None).err();
        assert_eq!(err, Some(SpawnError::Nul("argument 1 of the command (\"a\\0b\")".into())));
        let err = Launch::new(&["/bin/true".into()], vec![], vec![], None, Some(Path::new("/a\0b"))).err();
        assert!(matches!(&err, Some(SpawnError::Nul(what)) if what.starts_with("the working directory")), "{err:?}");
        let launch = Launch::new(&["/bin/true".into()], vec![], vec![], None, None).unwrap();
        let mut vars = path_env();
        vars.insert("BAD".into(), "x\0y".into());
        let err = launch.spawn(&vars, &[]).err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("the variable BAD holds a NUL byte, which cannot be passed to a program".into())
        );

        use std::os::unix::ffi::OsStringExt;
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-bytes-{}", std::process::id()));
        let script = format!("cat /proc/$$/environ > {}", out.display());
        let launch = Launch::new(&["/bin/sh".into(), "-c".into(), script], vec![], vec![], None, None).unwrap();
        let mut vars = path_env();
        vars.insert(OsString::from_vec(b"K\xff".to_vec()), OsString::from_vec(b"v\xfe\x80".to_vec()));
        assert_eq!(finish(launch.spawn(&vars, &[]).unwrap()).0, ExecOutcome::Executed);
        let environ = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert!(environ.split(|&b| b == 0).any(|v| v == b"K\xff=v\xfe\x80"), "{:?}", String::from_utf8_lossy(&environ));
    }

    #[test]
    fn the_child_sees_the_protocol_with_its_own_pid() {
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let script = format!(
            "echo \"$$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES $WATCHDOG_PID $WATCHDOG_USEC $FOO\" > {0}; ls -l /proc/$$/fd/3 >> {0}",
            out.display()
        );
        let launch = Launch::new(
            &["/bin/sh".into(), "-c".into(), script],
            vec![(listener.as_raw_fd(), "http".into())],
            vec![],
            Some(5_000_000),
            None,
        )
        .unwrap();
        // A LISTEN_FDS of the caller's is no match for the launch's own.
        let vars = env(&[("FOO", "bar"), ("PATH", "/usr/bin:/bin"), ("LISTEN_FDS", "9")]);
        let (outcome, _) = finish(launch.spawn(&vars, &[]).unwrap());
        assert_eq!(outcome, ExecOutcome::Executed);
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        let first: Vec<&str> = text.lines().next().unwrap().split(' ').collect();
        let pid = first[0];
        assert_eq!(first, [pid, pid, "1", "http", pid, "5000000", "bar"]);
        assert!(text.contains("socket:["), "fd 3 is the socket: {text}");
    }

    #[test]
    fn stored_fds_follow_the_listeners() {
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-extra-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // More fds than any fixed array would hold.
        let stored: Vec<std::fs::File> = (0..100).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let extra: Vec<(RawFd, &str)> = stored.iter().map(|f| (f.as_raw_fd(), "kept")).collect();
        let script = format!("echo \"$LISTEN_FDS $LISTEN_FDNAMES\" > {0}; ls -l /proc/$$/fd/102 >> {0}", out.display());
        let launch = Launch::new(
            &["/bin/sh".into(), "-c".into(), script],
            vec![(listener.as_raw_fd(), "http".into())],
            vec![],
            None,
            None,
        )
        .unwrap();
        finish(launch.spawn(&path_env(), &extra).unwrap());
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(text.lines().next(), Some(format!("101 http{}", ":kept".repeat(100)).as_str()));
        assert!(text.contains("/dev/null"), "fd 102 is the last stored one: {text}");
        // The next start without them passes the listener alone.
        finish(launch.spawn(&path_env(), &[]).unwrap());
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().next(), Some("1 http"));
        std::fs::remove_file(&out).unwrap();
    }

    /// The tables come after the counted fds, named by their variables, readable through
    /// `/proc/self/fd/N`; LISTEN_FDS does not count them.
    #[test]
    fn tables_are_inherited_above_the_listen_fds_range() {
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-tables-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let table =
            std::fs::File::from(nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap());
        std::io::Write::write_all(&mut &table, b"the table").unwrap();
        let stored = std::fs::File::open("/dev/null").unwrap();
        let script =
            format!("echo \"$LISTEN_FDS $LISTEN_FDNAMES $TABLE_FILE\" > {0}; cat $TABLE_FILE >> {0}", out.display());
        let launch = Launch::new(
            &["/bin/sh".into(), "-c".into(), script],
            vec![(listener.as_raw_fd(), "http".into())],
            vec![(table.as_raw_fd(), "TABLE_FILE".into())],
            None,
            None,
        )
        .unwrap();
        finish(launch.spawn(&env(&[("TABLE_FILE", "/elsewhere")]), &[(stored.as_raw_fd(), "kept")]).unwrap());
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(text, "2 http:kept /proc/self/fd/5\nthe table");
    }

    #[test]
    fn a_failed_exec_reports_its_errno() {
        let launch = Launch::new(&["/nonexistent/nodee".into()], vec![], vec![], None, None).unwrap();
        let (outcome, status) = finish(launch.spawn(&path_env(), &[]).unwrap());
        let ExecOutcome::Failed(failure) = outcome else { panic!("{outcome:?}") };
        assert_eq!((failure.step, failure.errno), (Step::Exec, Errno::ENOENT));
        assert_eq!(failure.to_string(), "cannot execute /nonexistent/nodee: No such file or directory");
        assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 127)), "{status:?}");
        // Not a program at all: EACCES.
        let launch = Launch::new(&["/".into()], vec![], vec![], None, None).unwrap();
        let ExecOutcome::Failed(failure) = finish(launch.spawn(&path_env(), &[]).unwrap()).0 else { panic!() };
        assert_eq!(failure.errno, Errno::EACCES);
    }

    #[test]
    fn the_child_starts_in_its_working_directory() {
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-cwd-{}", std::process::id()));
        let script = format!("pwd > {}", out.display());
        let argv = ["/bin/sh".to_owned(), "-c".to_owned(), script];
        let launch = Launch::new(&argv, vec![], vec![], None, Some(Path::new("/usr"))).unwrap();
        assert_eq!(finish(launch.spawn(&path_env(), &[]).unwrap()).0, ExecOutcome::Executed);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "/usr\n");
        std::fs::remove_file(&out).unwrap();
        let launch = Launch::new(&argv, vec![], vec![], None, Some(Path::new("/nonexistent/dir"))).unwrap();
        let ExecOutcome::Failed(failure) = finish(launch.spawn(&path_env(), &[]).unwrap()).0 else { panic!() };
        assert_eq!((failure.step, failure.errno), (Step::Chdir, Errno::ENOENT));
        assert_eq!(
            failure.to_string(),
            "cannot change into the working directory /nonexistent/dir: No such file or directory"
        );
    }

    /// The pipe says nothing while the child has not reached execve, and never blocks.
    #[test]
    fn the_exec_pipe_never_blocks() {
        let launch = Launch::new(&["/bin/sleep".into(), "1".into()], vec![], vec![], None, None).unwrap();
        let spawned = launch.spawn(&path_env(), &[]).unwrap();
        let started = Instant::now();
        let outcome = loop {
            match spawned.exec.check() {
                ExecOutcome::Pending => std::thread::sleep(Duration::from_millis(1)),
                other => break other,
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never executed");
        };
        assert_eq!(outcome, ExecOutcome::Executed, "while sleep runs");
        assert!(is_alive(spawned.pid));
        nix::sys::signal::kill(spawned.pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        nix::sys::wait::waitpid(spawned.pid, None).unwrap();
    }

    fn is_alive(pid: Pid) -> bool {
        nix::sys::signal::kill(pid, None).is_ok()
    }

    #[test]
    fn decimal() {
        let mut buf = [0xffu8; PID_DIGITS + 1];
        for (n, s) in [(0u64, "0"), (7, "7"), (4194304, "4194304"), (u64::MAX, "18446744073709551615")] {
            // SAFETY: `buf` has the PID_DIGITS + 1 bytes write_decimal may write.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            assert_eq!(&buf[..s.len()], s.as_bytes());
            assert_eq!(buf[s.len()], 0);
        }
    }
}
