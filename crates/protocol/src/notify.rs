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
                _ => {}
            }
        }
        n
    }
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
        let n = Notification::parse(b"READY=0\nWATCHDOG=trigger\nSTOPPING=yes");
        assert_eq!(n, Notification { watchdog_trigger: true, ..Default::default() });
    }

    #[test]
    fn garbage_is_ignored() {
        assert_eq!(Notification::parse(b"\xff\xfe\nno equals sign\n=\n"), Notification::default());
    }
}
