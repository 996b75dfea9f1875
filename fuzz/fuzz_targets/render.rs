//! Any spec validation accepts renders into units whose every line is what it seems: no
//! value starts a line or a directive of its own, and each reads back as the spec says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdcluster_fuzz::Input;

fuzz_target!(|input: Input| {
    let Ok(spec) = input.spec_file().validate_elsewhere() else { return };
    for systemd in [252, 255] {
        if let Err(e) = sdcluster_fuzz::properties::check_spec(&spec, systemd) {
            panic!("{e}\nspec: {spec:#?}");
        }
    }
});
