//! Rendered units: compared with golden files, and checked by systemd's own tools.
//!
//! `UPDATE_GOLDEN=1 cargo test -p sdcluster --test units` rewrites the golden files after an
//! intended change; review the diff like code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sdcluster::spec::{Balance, Instances, Readiness, Spec};
use sdcluster::units::{UnitFile, render};

/// A spec as a user would write it, without touching the file system (the worker path
/// need not exist to render).
fn spec(name: &str) -> Spec {
    Spec {
        name: name.into(),
        command: vec!["/usr/bin/sdcluster-worker".into()],
        listen: vec!["127.0.0.1:8080".parse().unwrap()],
        instances: Instances::Auto,
        environment: BTreeMap::new(),
        restart_delay: Duration::from_millis(100),
        restart_max_delay: Duration::from_secs(10),
        watchdog: Some(Duration::from_secs(10)),
        stop_timeout: Duration::from_secs(30),
        memory_max: None,
        balance: Balance::Shared,
        user: None,
        outbound_network: false,
        handover_max: 4096,
        ready: Readiness::Notify,
        jit: false,
        state_directory: None,
        read_write_paths: Vec::new(),
        working_directory: None,
        environment_file: None,
        credentials: BTreeMap::new(),
    }
}

/// Every rendering the project cares about: (case, spec, systemd version).
fn cases() -> Vec<(&'static str, Spec, u32)> {
    let mut full = spec("api");
    full.command = vec!["/opt/api/bin/server".into(), "--greeting".into(), "hello world".into(), "--rate=100%".into()];
    full.listen = vec!["*:80".parse().unwrap(), "[::]:80".parse().unwrap(), "unix:/run/api.sock".parse().unwrap()];
    full.environment = [("RUST_LOG".to_owned(), "debug".to_owned()), ("GREETING".to_owned(), "a b".to_owned())].into();
    full.memory_max = Some("512M".into());
    full.user = Some("www-data".into());
    full.outbound_network = true;
    full.watchdog = None;
    full.handover_max = 64;
    let mut reuseport = spec("edge");
    reuseport.balance = Balance::Reuseport;
    vec![("default-252", spec("app"), 252), ("full-255", full, 255), ("reuseport-252", reuseport, 252)]
}

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(case)
}

fn units_of(spec: &Spec, systemd: u32) -> Vec<UnitFile> {
    render(spec, systemd, Path::new(&format!("/etc/sdcluster/{}.toml", spec.name)), Path::new("/usr/bin/sdcluster"))
}

#[test]
fn renderings_match_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (case, spec, systemd) in cases() {
        let dir = golden_dir(case);
        let units = units_of(&spec, systemd);
        if update {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for unit in &units {
                std::fs::write(dir.join(&unit.name), &unit.content).unwrap();
            }
        }
        let mut expected: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        expected.sort();
        let mut got: Vec<String> = units.iter().map(|u| u.name.clone()).collect();
        got.sort();
        assert_eq!(got, expected, "{case}: the set of units changed (UPDATE_GOLDEN=1 to accept)");
        for unit in &units {
            let golden = std::fs::read_to_string(dir.join(&unit.name)).unwrap();
            assert_eq!(
                unit.content, golden,
                "{case}/{} differs from its golden file (UPDATE_GOLDEN=1 to accept)",
                unit.name
            );
        }
    }
}

#[test]
fn keys_newer_than_the_systemd_are_left_out() {
    let old = units_of(&spec("app"), 252);
    let new = units_of(&spec("app"), 254);
    let keys = |units: &[UnitFile]| -> Vec<String> {
        let worker = &units.iter().find(|u| u.name == "app@.service").unwrap().content;
        worker
            .lines()
            .filter(|l| l.starts_with("RestartSteps=") || l.starts_with("RestartMaxDelaySec="))
            .map(str::to_owned)
            .collect()
    };
    assert!(keys(&old).is_empty(), "{:?}", keys(&old));
    assert_eq!(keys(&new), ["RestartSteps=5", "RestartMaxDelaySec=10s"]);
}

/// The installed systemd's version, which `systemd-analyze` below judges against.
fn installed_systemd() -> u32 {
    sdcluster::systemctl::version().expect("systemd must be installed for these tests (apt-get install systemd)")
}

/// Writes `units` (with an existing program as the worker and as the stop hook, since verify
/// checks them) into a fresh directory.
fn write_for_analysis(test: &str, case: &str, spec: &Spec, systemd: u32) -> (PathBuf, Vec<UnitFile>) {
    let mut spec = spec.clone();
    spec.command[0] = "/bin/true".into();
    let dir = std::env::temp_dir().join(format!("sdcluster-{test}-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The stop hook's program too.
    let units = render(&spec, systemd, Path::new("/etc/sdcluster/t.toml"), Path::new("/bin/true"));
    for unit in &units {
        std::fs::write(dir.join(&unit.name), &unit.content).unwrap();
    }
    (dir, units)
}

#[test]
fn systemd_analyze_verify_is_clean_for_every_rendering() {
    let systemd = installed_systemd();
    for (case, spec, _) in cases() {
        let (dir, units) = write_for_analysis("verify", case, &spec, systemd);
        // man pages are checked by the package's tests; here only the units.
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .args(units.iter().map(|u| dir.join(&u.name)))
            .output()
            .expect("systemd-analyze runs");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{case}: systemd-analyze verify says:\n{said}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn workers_are_sandboxed_safe() {
    let systemd = installed_systemd();
    for (case, spec, _) in cases() {
        let (dir, _) = write_for_analysis("security", case, &spec, systemd);
        // Analyse instance 1, with its own socket where there is one (reuseport mode).
        for kind in ["service", "socket"] {
            let template = dir.join(format!("{}@.{kind}", spec.name));
            if template.exists() {
                std::fs::copy(&template, dir.join(format!("{}@1.{kind}", spec.name))).unwrap();
            }
        }
        let instance = dir.join(format!("{}@1.service", spec.name));
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&instance)
            .output()
            .expect("systemd-analyze runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let exposure: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{case}: no exposure level in:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
        // Outbound network is a documented opt-out that costs some exposure.
        let limit = if spec.outbound_network { 2.0 } else { 1.0 };
        assert!(exposure <= limit, "{case}: exposure {exposure} > {limit}:\n{text}");
        eprintln!("{case}: exposure {exposure}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
