//! `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES` as any parent may set them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdcluster_protocol::listen_fds::{Inherited, LISTEN_FDS_START, parse};

fuzz_target!(|input: (Option<String>, Option<String>, Option<String>, u32)| {
    let (fds, pid, names, own) = input;
    match parse(fds.as_deref(), pid.as_deref(), names.as_deref(), own) {
        Err(_) | Ok(Inherited::Nothing) => {}
        Ok(Inherited::ForeignPid { listen_pid, own_pid }) => {
            assert_eq!(own_pid, own);
            assert_ne!(listen_pid, Some(own));
        }
        Ok(Inherited::Fds(passed)) => {
            let count: usize = fds.as_deref().unwrap().trim().parse().unwrap();
            assert_eq!(passed.len(), count);
            assert!(count > 0);
            assert_eq!(pid.as_deref().unwrap().trim().parse::<u32>().unwrap(), own);
            for (i, p) in passed.iter().enumerate() {
                assert_eq!(p.fd, LISTEN_FDS_START + i as i32);
            }
            match &names {
                None => assert!(passed.iter().all(|p| p.name.is_none())),
                Some(all) => {
                    let joined: Vec<&str> = passed.iter().map(|p| p.name.as_deref().unwrap()).collect();
                    assert_eq!(joined.join(":"), *all);
                }
            }
        }
    }
});
