//! The Debian package under test, for the tests that install it.

use std::path::PathBuf;

/// Whether this runs on CI (`CI` set and not false), where a missing prerequisite is a
/// failure rather than a skip.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The newest `target/debian/sdcluster_VERSION-*.deb` (or `SDCLUSTER_DEB`), built by
/// `./dev package`; `None` (with a note) when there is none and this is not CI.
pub fn package() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SDCLUSTER_DEB") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "SDCLUSTER_DEB={}: no such file", path.display());
        return Some(path);
    }
    // The test runs from TARGET/PROFILE/deps/; the package is in TARGET/debian/.
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.ancestors().nth(3).expect("the target directory").join("debian");
    let prefix = format!("sdcluster_{}-", env!("CARGO_PKG_VERSION"));
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path());
    if newest.is_none() {
        let why = format!("no {}/{prefix}*.deb: build it with ./dev package", dir.display());
        assert!(!on_ci(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    newest
}
