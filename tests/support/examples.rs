//! The worker crate's examples (`crates/worker/examples/*.rs`: apps built on the library),
//! built once per test process and found where cargo puts them.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The example `name` of `sdcluster-worker` (`target/<profile>/examples/NAME`), up to date.
///
/// The first call runs `cargo build -p sdcluster-worker --examples` with the profile of the
/// running test (a no-op when they are current); without cargo, the binaries already there
/// are used.
pub fn worker_example(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build_examples);
    let binary = dir.join(name);
    assert!(binary.exists(), "cargo built the examples but {} is not there", binary.display());
    binary
}

/// `target/<profile>/`: the test executable runs from its `deps/` folder.
fn profile_dir() -> PathBuf {
    let exe = env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable is in a folder");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") { deps.parent().unwrap_or(deps) } else { deps };
    dir.to_path_buf()
}

fn build_examples() -> PathBuf {
    let dir = profile_dir();
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet", "-p", "sdcluster-worker", "--examples"]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(custom) => {
            cargo.args(["--profile", custom]);
        }
    }
    let examples = dir.join("examples");
    match cargo.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("building the worker's examples failed ({status}): {cargo:?}"),
        Err(e) if Path::new(&examples).exists() => {
            eprintln!("cannot run cargo ({e}); testing the existing examples in {}", examples.display());
        }
        Err(e) => panic!("{} is missing and cargo cannot build it: {e}", examples.display()),
    }
    examples
}
