//! `sd_notify` datagrams as any worker may send them to `sdcluster run`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdcluster_protocol::notify::{Notification, valid_fd_name};

fuzz_target!(|datagram: &[u8]| {
    let n = Notification::parse(datagram);
    let text = String::from_utf8_lossy(datagram);
    let has = |line: &str| text.lines().any(|l| l == line);
    assert_eq!(n.ready, has("READY=1"));
    assert_eq!(n.stopping, has("STOPPING=1"));
    assert_eq!(n.watchdog, has("WATCHDOG=1"));
    assert_eq!(n.watchdog_trigger, has("WATCHDOG=trigger"));
    assert_eq!(n.fdstore, has("FDSTORE=1"));
    assert_eq!(n.fdstore_remove, has("FDSTOREREMOVE=1"));
    assert_eq!(n.barrier, has("BARRIER=1"));
    if let Some(name) = &n.fdname {
        assert!(valid_fd_name(name), "{name:?}");
    }
    if let Some(status) = &n.status {
        assert!(!status.contains('\n'), "{status:?}");
    }
});
