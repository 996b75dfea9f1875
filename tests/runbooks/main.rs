//! The runbooks in `docs/runbooks/`, run as written: every ```` ```sh ```` block of a runbook,
//! in order, as root in a throw-away machine with systemd as PID 1 (`tests/sdbox`), each one's
//! promised outcome checked. The marking convention is in `docs/runbooks/README.md`; in short:
//!
//! - every ```` ```sh ```` block is a step, run with `bash -e -o pipefail` in `/root`;
//! - HTML comments directly above a block state what it must do: `<!-- expect: TEXT -->`,
//!   `<!-- expect-not: TEXT -->`, `<!-- exit: N -->`, `<!-- retry: 30s -->`,
//!   `<!-- load: ADDR -->` (clients request `/` while it runs; nothing may fail),
//!   `<!-- measure: ADDR -->` (the same load, its outcome printed as `MEASURED ...`) and
//!   `<!-- report: LABEL -->` (the block's output printed as `MEASURED ...`);
//! - a block whose first line is `# not run by the tests: WHY` is shown, not run;
//! - `<!-- setup` … `-->` holds a hidden step: preparation the reader has already done.
//!
//! Each runbook gets a box of its own with a network of its own (only its own loopback), so a
//! runbook uses the ports it names, and runbooks run side by side without colliding. Before
//! its first block, the box has the binaries under test where `cargo build --release` would
//! leave them in a checkout at `/root/sdcluster`, and, for the runbooks that install the
//! Debian package, the `.deb` in `/root` (see [`RUNBOOKS`]).
//!
//! Needs root (skipped otherwise, unless `CI` is set: then it fails), as every box test does.
//! The parts: [`markdown`] reads a runbook into steps (the convention), [`executor`] runs them
//! in a box and checks their outcomes, [`kubernetes`] checks the Kubernetes example.

mod executor;
mod kubernetes;
mod markdown;

use std::path::{Path, PathBuf};

use executor::run_runbook;
use markdown::{Kind, anchors, parse};

/// Where the runbooks are.
pub(crate) const RUNBOOK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/runbooks");

/// The longest a block may run before it counts as hung.
pub(crate) const STEP_TIMEOUT_SECS: u32 = 180;

/// What a runbook's box needs besides the binaries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Needs {
    /// The Debian package (`target/debian/sdcluster_*.deb`), copied to `/root`.
    pub(crate) deb: bool,
}

/// Every runbook, and what its box needs. A runbook missing here fails
/// [`every_runbook_is_run_and_follows_the_convention`].
pub(crate) const RUNBOOKS: &[(&str, Needs)] = &[
    ("install.md", Needs { deb: true }),
    ("install-from-source.md", Needs { deb: false }),
    ("deploy.md", Needs { deb: false }),
    ("scale.md", Needs { deb: false }),
    ("listen.md", Needs { deb: false }),
    ("diagnose.md", Needs { deb: false }),
    ("capacity.md", Needs { deb: false }),
    ("fleet.md", Needs { deb: true }),
    ("kubernetes.md", Needs { deb: false }),
    ("uninstall.md", Needs { deb: true }),
];

#[test]
fn install() {
    run_runbook("install.md");
}

#[test]
fn install_from_source() {
    run_runbook("install-from-source.md");
}

#[test]
fn deploy() {
    run_runbook("deploy.md");
}

#[test]
fn scale() {
    run_runbook("scale.md");
}

#[test]
fn listen() {
    run_runbook("listen.md");
}

#[test]
fn diagnose() {
    run_runbook("diagnose.md");
}

#[test]
fn capacity() {
    run_runbook("capacity.md");
}

#[test]
fn fleet() {
    run_runbook("fleet.md");
}

#[test]
fn kubernetes() {
    run_runbook("kubernetes.md");
}

#[test]
fn uninstall() {
    run_runbook("uninstall.md");
}

/// `docs/runbooks/NAME`.
pub(crate) fn runbook_path(name: &str) -> PathBuf {
    Path::new(RUNBOOK_DIR).join(name)
}

#[test]
fn every_runbook_is_run_and_follows_the_convention() {
    let mut files: Vec<String> = std::fs::read_dir(RUNBOOK_DIR)
        .expect("docs/runbooks")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".md") && n != "README.md")
        .collect();
    files.sort();
    let mut listed: Vec<String> = RUNBOOKS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "every runbook in docs/runbooks has an entry in RUNBOOKS and a #[test]");
    let index = std::fs::read_to_string(runbook_path("README.md")).expect("docs/runbooks/README.md");
    for name in &files {
        assert!(index.contains(&format!("]({name})")), "docs/runbooks/README.md links to {name}");
        let text = std::fs::read_to_string(runbook_path(name)).unwrap();
        let steps = parse(&text).unwrap_or_else(|e| panic!("docs/runbooks/{name}: {e}"));
        assert!(steps.iter().any(|s| s.kind == Kind::Run), "{name} has no block that is run");
    }
    for name in files.iter().map(String::as_str).chain(["README.md"]) {
        check_links(name);
    }
    // The index shows the convention in ```markdown blocks, which are not steps.
    let steps = parse(&index).unwrap_or_else(|e| panic!("docs/runbooks/README.md: {e}"));
    assert!(steps.iter().all(|s| matches!(s.kind, Kind::Shown(_))), "README.md runs nothing");
}

/// Every relative link of docs/runbooks/`name` reaches a file, and its `#anchor` a heading.
fn check_links(name: &str) {
    let text = std::fs::read_to_string(runbook_path(name)).unwrap();
    for target in text.split("](").skip(1).filter_map(|rest| rest.split_once(')').map(|(t, _)| t)) {
        if target.contains("://") {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        let path = if file.is_empty() { runbook_path(name) } else { runbook_path(name).with_file_name(file) };
        assert!(path.exists(), "docs/runbooks/{name} links to {target}, which does not exist");
        if !anchor.is_empty() {
            let linked = std::fs::read_to_string(&path).unwrap();
            assert!(anchors(&linked).iter().any(|a| a == anchor), "docs/runbooks/{name}: no heading for {target}");
        }
    }
}
