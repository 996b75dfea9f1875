//! What the workers leave behind: processes that are no instance's main process.
//!
//! systemd keeps every process a unit starts in the unit's cgroup, so a daemon a worker
//! starts (`setsid` and a double fork, as `daemon(3)` does) is still the unit's and dies with
//! it. `sdcluster run` has no cgroup of its own to count on; it is a **child subreaper**
//! instead (`PR_SET_CHILD_SUBREAPER`): an orphan anywhere below it is re-parented to it, not
//! to PID 1, so nothing a worker starts leaves the supervisor's process tree. Its children
//! are then the instances' main processes and those adopted orphans. Each process started
//! for an instance gets its own `INVOCATION_ID` (as systemd gives each start of a unit), and
//! its descendants inherit it: an adopted orphan whose `INVOCATION_ID` is no longer that of
//! a running process is what is left of a process that ended, and is killed
//! ([`Supervisor`](super::Supervisor) sweeps after each exit and at each tick); one that
//! carries none (it cleared its environment) is killed when the supervisor stops, with
//! every other process still below it.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The variable that ties a process to the start of an instance it descends from.
pub const INVOCATION_ID: &str = "INVOCATION_ID";

/// Makes this process the reaper of every orphan below it.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl(2) with integer arguments only; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new invocation id: 128 random bits in hex, as systemd's `INVOCATION_ID`.
pub fn new_invocation_id() -> String {
    let mut bytes = [0u8; 16];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: getrandom(2) writes at most the given length into the buffer's rest.
        let n = unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got < bytes.len() {
        // No getrandom (very old kernel): unique is all that is needed.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let seed = nanos ^ (u128::from(std::process::id()) << 64) ^ u128::from(counter());
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The children of this process (of every thread of it), from
/// `/proc/self/task/*/children`, or by scanning `/proc` where the kernel lacks that file.
pub fn children() -> Vec<Pid> {
    let mut found = BTreeSet::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                listed = true;
                found.extend(text.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw));
            }
        }
    }
    if !listed {
        let me = std::process::id() as i32;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                if parent_of(pid) == Some(me) {
                    found.insert(Pid::from_raw(pid));
                }
            }
        }
    }
    found.into_iter().collect()
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// Whether `pid` is a zombie (or gone): nothing to kill, only to reap.
pub fn is_zombie(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).is_none_or(|state| matches!(state, 'Z' | 'X'))
}

/// The `INVOCATION_ID` process `pid` was started with, if it still has it (its
/// `/proc/PID/environ`: what it was executed with).
pub fn invocation_of(pid: Pid) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = [INVOCATION_ID.as_bytes(), b"="].concat();
    let value = environ.split(|&b| b == 0).find_map(|var| var.strip_prefix(&prefix[..]))?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// The command name of `pid` (`/proc/PID/comm`), for logs.
pub fn name_of(pid: Pid) -> String {
    std::fs::read(format!("/proc/{pid}/comm"))
        .map(|c| std::ffi::OsStr::from_bytes(c.trim_ascii_end()).to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

/// SIGKILL to `pid`, a child of this process not reaped yet (so its pid is not anyone
/// else's), and to its process group if it leads one (as long as it is not reaped, no other
/// group can have that id).
pub fn kill_child(pid: Pid) {
    if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
    }
    let _ = kill(pid, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_ids_are_unique_hex() {
        let (a, b) = (new_invocation_id(), new_invocation_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn children_and_their_invocation_are_found() {
        let child = std::process::Command::new("/bin/sleep")
            .arg("10")
            .env(INVOCATION_ID, "0123456789abcdef0123456789abcdef")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        assert!(children().contains(&pid), "{:?}", children());
        // Right after the exec (even once its name changed) the new environment may not be
        // in place yet: unknown (None) for a moment, never a wrong one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while invocation_of(pid).is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(name_of(pid), "sleep");
        assert!(!is_zombie(pid));
        assert_eq!(invocation_of(pid).as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(parent_of(pid.as_raw()), Some(std::process::id() as i32));
        kill_child(pid);
        let mut child = child;
        assert!(!child.wait().unwrap().success());
        assert_eq!(invocation_of(Pid::from_raw(i32::MAX)), None);
    }
}
