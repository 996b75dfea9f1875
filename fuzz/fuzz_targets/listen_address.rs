//! Listen addresses as operators write them (`--listen`, `listen = [...]`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdcluster_protocol::ListenAddress;

fuzz_target!(|text: &str| {
    if let Ok(addr) = text.parse::<ListenAddress>() {
        // What is shown parses back to the same address.
        let shown = addr.to_string();
        assert_eq!(shown.parse::<ListenAddress>().as_ref(), Ok(&addr), "{text:?} shown as {shown:?}");
    }
});
