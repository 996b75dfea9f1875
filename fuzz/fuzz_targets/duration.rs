//! Time spans as people and systemd write them.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sdcluster_protocol::duration::{parse, to_systemd};

fuzz_target!(|text: &str| {
    if let Ok(d) = parse(text) {
        // The systemd form reads back as the span, to the microsecond (systemd's resolution).
        let us = Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        if us.as_micros() == d.as_micros() {
            let shown = to_systemd(d);
            assert_eq!(parse(&shown), Ok(us), "{text:?} shown as {shown:?}");
        }
    }
});
