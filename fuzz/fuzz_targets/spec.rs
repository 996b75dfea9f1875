//! Spec files as anyone may write them: TOML, then validation, then rendering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdcluster::spec::SpecFile;

fuzz_target!(|text: &str| {
    let Ok(file) = toml::from_str::<SpecFile>(text) else { return };
    let mut file = file;
    file.name.get_or_insert_with(|| "fuzz".into());
    if let Ok(spec) = file.validate_elsewhere() {
        if let Err(e) = sdcluster_fuzz::properties::check_spec(&spec, 252) {
            panic!("{e}\nspec: {spec:#?}");
        }
    }
});
