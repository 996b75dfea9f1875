//! Starting a worker exactly as systemd does: fds from 3, `LISTEN_FDS`, `LISTEN_PID` equal to
//! the worker's own pid, `LISTEN_FDNAMES`, and (for the watchdog) `WATCHDOG_PID`.
//!
//! The pid is known only after `fork`, and between `fork` and `exec` only async-signal-safe
//! calls are allowed (no allocation), so everything is prepared before the fork and the
//! child only writes its pid's digits into buffers reserved for them.

use std::ffi::{CString, c_char};
use std::os::fd::RawFd;

use nix::unistd::{ForkResult, Pid, fork};
use sdcluster_protocol::listen_fds::LISTEN_FDS_START;

/// Room for the digits of any pid.
const PID_DIGITS: usize = 20;

/// A prepared command line, environment and set of fds to pass.
pub struct Launch {
    argv: Vec<CString>,
    env: Vec<CString>,
    /// `NAME=` plus PID_DIGITS+1 bytes, for each variable that carries the child's pid.
    pid_vars: Vec<Vec<u8>>,
    /// The fds every start passes (listeners, the balance table), with their names.
    fds: Vec<(RawFd, String)>,
}

impl Launch {
    /// `fds` become 3, 4, ... in the child, named `names` in `LISTEN_FDNAMES`; `env` is the
    /// whole environment besides the protocol's variables.
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        fds: Vec<(RawFd, String)>,
        watchdog_usec: Option<u64>,
    ) -> Self {
        let mut vars: Vec<CString> = env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect();
        let mut pid_vars = vec![pid_var("LISTEN_PID=")];
        if let Some(usec) = watchdog_usec {
            vars.push(cstr(format!("WATCHDOG_USEC={usec}")));
            pid_vars.push(pid_var("WATCHDOG_PID="));
        }
        Self { argv: argv.iter().cloned().map(cstr).collect(), env: vars, pid_vars, fds }
    }

    /// [`Launch::spawn_with`] no extra fds.
    #[cfg(test)]
    pub fn spawn(&mut self) -> nix::Result<Pid> {
        self.spawn_with(&[])
    }

    /// Forks and execs with the launch's fds followed by `extra` (the instance's fd store);
    /// the child is in its own process group (terminal signals reach only the supervisor,
    /// which decides) and gets SIGTERM if the supervisor dies.
    pub fn spawn_with(&mut self, extra: &[(RawFd, &str)]) -> nix::Result<Pid> {
        let supervisor = nix::unistd::getpid();
        // Everything the child needs is allocated here, before the fork.
        let fds: Vec<RawFd> = self.fds.iter().map(|(fd, _)| *fd).chain(extra.iter().map(|(fd, _)| *fd)).collect();
        let names: Vec<&str> = self.fds.iter().map(|(_, n)| n.as_str()).chain(extra.iter().map(|(_, n)| *n)).collect();
        let listen = [cstr(format!("LISTEN_FDS={}", fds.len())), cstr(format!("LISTEN_FDNAMES={}", names.join(":")))];
        let mut moved: Vec<RawFd> = vec![0; fds.len()];
        // Pointers are taken before the fork; the child writes only into pid_vars' buffers
        // and `moved`.
        let argv: Vec<*const c_char> = self.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let mut envp: Vec<*const c_char> = self.env.iter().chain(&listen).map(|e| e.as_ptr()).collect();
        envp.extend(self.pid_vars.iter().map(|v| v.as_ptr().cast::<c_char>()));
        envp.push(std::ptr::null());
        let pid_bufs: Vec<*mut u8> = self.pid_vars.iter_mut().map(|v| v.as_mut_ptr()).collect();
        let prefixes: Vec<usize> = self.pid_vars.iter().map(|v| v.len() - PID_DIGITS - 1).collect();
        // SAFETY: the child calls only async-signal-safe functions and exits or execs.
        match unsafe { fork() }? {
            ForkResult::Parent { child } => Ok(child),
            // SAFETY: in the child of a fork, `child_exec` only calls async-signal-safe functions
            // on buffers made before the fork, then execs; `_exit` ends the child if it fails.
            ForkResult::Child => unsafe {
                child_exec(supervisor, &argv, &envp, &pid_bufs, &prefixes, &fds, &mut moved);
                libc::_exit(127)
            },
        }
    }
}

fn cstr(s: String) -> CString {
    CString::new(s).expect("no NUL in arguments, environment or fd names (validated)")
}

fn pid_var(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(name.len() + PID_DIGITS + 1, 0);
    v
}

/// In the child, between fork and exec: nothing here may allocate or lock.
unsafe fn child_exec(
    supervisor: Pid,
    argv: &[*const c_char],
    envp: &[*const c_char],
    pid_bufs: &[*mut u8],
    prefixes: &[usize],
    fds: &[RawFd],
    moved: &mut [RawFd],
) {
    // SAFETY: the caller is the child of a fork (see `spawn_with`): only async-signal-safe
    // calls follow, on pointers into buffers the parent made, which stay valid in the child.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 || libc::getppid() != supervisor.as_raw() {
            return; // the supervisor is already gone: don't start an orphan
        }
        libc::setpgid(0, 0);
        // Undo what the supervisor's runtime changed: Rust ignores SIGPIPE, handlers may block.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // Move the fds out of the way first (dup2(3, 3) would keep FD_CLOEXEC), then into place.
        let first_free = LISTEN_FDS_START + fds.len() as RawFd;
        for (i, &fd) in fds.iter().enumerate() {
            moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if moved[i] < 0 {
                return;
            }
        }
        for (i, &fd) in moved.iter().enumerate() {
            if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                return;
            }
        }
        let pid = libc::getpid() as u64;
        for (&buf, &prefix) in pid_bufs.iter().zip(prefixes) {
            write_decimal(buf.add(prefix), pid);
        }
        libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
    }
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

    #[test]
    fn the_child_sees_the_protocol_with_its_own_pid() {
        let out = std::env::temp_dir().join(format!("sdcluster-spawn-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let script = format!(
            "echo \"$$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES $WATCHDOG_PID $WATCHDOG_USEC $FOO\" > {0}; ls -l /proc/$$/fd/3 >> {0}",
            out.display()
        );
        let mut launch = Launch::new(
            &["/bin/sh".into(), "-c".into(), script],
            &[("FOO".into(), "bar".into()), ("PATH".into(), "/usr/bin:/bin".into())],
            vec![(listener.as_raw_fd(), "http".into())],
            Some(5_000_000),
        );
        let pid = launch.spawn().unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        let first: Vec<&str> = text.lines().next().unwrap().split(' ').collect();
        let p = pid.as_raw().to_string();
        assert_eq!(first, [p.as_str(), p.as_str(), "1", "http", p.as_str(), "5000000", "bar"]);
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
        let mut launch = Launch::new(
            &["/bin/sh".into(), "-c".into(), script],
            &[("PATH".into(), "/usr/bin:/bin".into())],
            vec![(listener.as_raw_fd(), "http".into())],
            None,
        );
        let pid = launch.spawn_with(&extra).unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        assert_eq!(text.lines().next(), Some(format!("101 http{}", ":kept".repeat(100)).as_str()));
        assert!(text.contains("/dev/null"), "fd 102 is the last stored one: {text}");
        // The next start without them passes the listener alone.
        let pid = launch.spawn_with(&[]).unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().next(), Some("1 http"));
        std::fs::remove_file(&out).unwrap();
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
