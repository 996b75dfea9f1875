//! Reading what workers send to `NOTIFY_SOCKET` (`sd_notify(3)`), for `sdcluster run`.

/// The assignments of one notification datagram that a supervisor acts on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notification {
    /// `READY=1`: start-up finished, the worker serves.
    pub ready: bool,
    /// `STOPPING=1`: the worker is draining.
    pub stopping: bool,
    /// `WATCHDOG=1`: the worker's event loop is alive.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    pub watchdog_trigger: bool,
    /// `STATUS=...`: free text for status views.
    pub status: Option<String>,
    /// `FDSTORE=1`: keep the fds sent with this datagram (SCM_RIGHTS) for the instance's
    /// next process, which gets them after its listeners in `LISTEN_FDS`.
    pub fdstore: bool,
    /// `FDSTOREREMOVE=1`: drop the stored fds named [`Notification::fdname`].
    pub fdstore_remove: bool,
    /// `FDNAME=...`: the name of the fds stored or removed (`LISTEN_FDNAMES` entry).
    pub fdname: Option<String>,
    /// `FDPOLL=0`: don't drop the stored fds when they hang up (systemd's default is to).
    pub fdpoll_off: bool,
    /// `BARRIER=1`: close the fd sent along once every earlier datagram was handled
    /// (`sd_notify_barrier(3)`).
    pub barrier: bool,
}

impl Notification {
    /// Parses a datagram: newline-separated `KEY=VALUE`; unknown keys are ignored, as
    /// systemd does, so workers may send more than we understand.
    pub fn parse(datagram: &[u8]) -> Self {
        let mut n = Self::default();
        for line in String::from_utf8_lossy(datagram).lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => n.ready = true,
                Some(("STOPPING", "1")) => n.stopping = true,
                Some(("WATCHDOG", "1")) => n.watchdog = true,
                Some(("WATCHDOG", "trigger")) => n.watchdog_trigger = true,
                Some(("STATUS", text)) => n.status = Some(text.to_owned()),
                Some(("FDSTORE", "1")) => n.fdstore = true,
                Some(("FDSTOREREMOVE", "1")) => n.fdstore_remove = true,
                Some(("FDNAME", name)) if valid_fd_name(name) => n.fdname = Some(name.to_owned()),
                Some(("FDPOLL", "0")) => n.fdpoll_off = true,
                Some(("BARRIER", "1")) => n.barrier = true,
                _ => {}
            }
        }
        n
    }
}

/// What systemd accepts as `FDNAME=`: 1–255 printable ASCII characters, no `:` (the
/// separator of `LISTEN_FDNAMES`).
pub fn valid_fd_name(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_assignments_in_one_datagram() {
        let n = Notification::parse(b"READY=1\nSTATUS=serving 127.0.0.1:80: 0 requests\nMAINPID=7\n");
        assert!(n.ready && !n.stopping && !n.watchdog);
        assert_eq!(n.status.as_deref(), Some("serving 127.0.0.1:80: 0 requests"));
    }

    #[test]
    fn values_other_than_one_do_not_count() {
        let n = Notification::parse(b"READY=0\nWATCHDOG=trigger\nSTOPPING=yes\nFDSTORE=yes\nBARRIER=0");
        assert_eq!(n, Notification { watchdog_trigger: true, ..Default::default() });
    }

    #[test]
    fn garbage_is_ignored() {
        assert_eq!(Notification::parse(b"\xff\xfe\nno equals sign\n=\n"), Notification::default());
    }

    #[test]
    fn fd_store_messages() {
        let n = Notification::parse(b"FDSTORE=1\nFDNAME=sdcluster-conn.7.1\nFDPOLL=0");
        assert!(n.fdstore && n.fdpoll_off && !n.fdstore_remove);
        assert_eq!(n.fdname.as_deref(), Some("sdcluster-conn.7.1"));
        let n = Notification::parse(b"FDSTOREREMOVE=1\nFDNAME=x");
        assert!(n.fdstore_remove && !n.fdstore);
        assert!(Notification::parse(b"BARRIER=1").barrier);
    }

    #[test]
    fn fd_names_follow_systemd() {
        assert!(valid_fd_name("sdcluster-conn.1.2"));
        for bad in ["", "a:b", "a b", "tab\t", &"x".repeat(256)] {
            assert!(!valid_fd_name(bad), "{bad:?}");
            assert_eq!(Notification::parse(format!("FDNAME={bad}").as_bytes()).fdname, None);
        }
    }
}
