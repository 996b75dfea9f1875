//! Where the binaries under test live, and building them when they are missing or stale.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `sdcluster-worker` binary of the profile these tests were built with, up to date.
///
/// Integration tests of one package do not build another package's binaries, so a plain
/// `cargo test --workspace` on a clean checkout would find none: the first call runs
/// `cargo build -p sdcluster-worker --bin sdcluster-worker` (a no-op when it is current, so a
/// binary left from an older build is never tested by mistake). Later calls reuse the path.
pub fn worker_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("sdcluster-worker", "sdcluster-worker"))
}

/// The `sdcluster` binary (the manager: `run`, `install`, `status`, ...), built and cached the
/// same way as [`worker_binary`].
pub fn sdcluster_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("sdcluster", "sdcluster"))
}

/// `target/<profile>/`: the test executable runs from its `deps/` folder.
fn profile_dir() -> PathBuf {
    let exe = env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable is in a folder");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") { deps.parent().unwrap_or(deps) } else { deps };
    dir.to_path_buf()
}

/// Builds `bin` of `package` with the profile of the running test (`target/<profile>/`) and
/// returns its path; without cargo, the binary already there is used. Cache the result in a
/// `OnceLock`, as [`worker_binary`] and [`sdcluster_binary`] do, to build once per test process.
pub fn build_binary(package: &str, bin: &str) -> PathBuf {
    let binary = profile_dir().join(bin);
    cargo_build(&["-p", package, "--bin", bin], &binary);
    assert!(binary.exists(), "cargo built {bin} but it is not at {}", binary.display());
    binary
}

/// The example `name` of `sdcluster-worker` (`crates/worker/examples/NAME.rs`: an app built
/// on the library, in `target/<profile>/examples/`), up to date: the first call builds every
/// example as [`build_binary`] builds a binary.
pub fn worker_example(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = profile_dir().join("examples");
        cargo_build(&["-p", "sdcluster-worker", "--examples"], &dir);
        dir
    });
    let binary = dir.join(name);
    assert!(binary.exists(), "cargo built the examples but {} is not there", binary.display());
    binary
}

/// `cargo build --quiet ARGS` with the running test's profile; `output` is what it makes.
/// Without cargo (a copied test executable) an `output` already there is tested instead.
fn cargo_build(args: &[&str], output: &Path) {
    let dir = profile_dir();
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cargo.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet"]).args(args);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(custom) => {
            cargo.args(["--profile", custom]);
        }
    }
    match cargo.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("building {} failed ({status}): {cargo:?}", output.display()),
        Err(e) if output.exists() => eprintln!("cannot run cargo ({e}); testing the existing {}", output.display()),
        Err(e) => panic!("{} is missing and cargo cannot build it: {e}", output.display()),
    }
}
