//! Rendered units: compared with golden files, and checked by systemd's own tools.
//!
//! `UPDATE_GOLDEN=1 cargo test -p sdcluster --test units` rewrites the golden files after an
//! intended change; review the diff like code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sdcluster::spec::{Balance, Instances, Readiness, Spec, SpecFile};
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
        system_calls: Vec::new(),
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
    full.system_calls = vec!["setuid".into()];
    let mut reuseport = spec("edge");
    reuseport.balance = Balance::Reuseport;
    vec![
        ("default-252", spec("app"), 252),
        ("full-255", full, 255),
        ("reuseport-252", reuseport, 252),
        ("node-252", node(), 252),
    ]
}

/// A Node server as the issue describes it: no sd_notify, a JIT, calls of its own, files.
fn node() -> Spec {
    let mut node = spec("node");
    node.command = vec!["/usr/bin/node".into(), "/srv/node/server.js".into()];
    node.ready = Readiness::Exec;
    node.watchdog = None;
    node.jit = true;
    node.outbound_network = true;
    node.state_directory = Some("node".into());
    node.read_write_paths = vec!["/srv/node/uploads".into()];
    node.working_directory = Some("/srv/node".into());
    node.environment_file = Some("/etc/node/env".into());
    node.credentials = [
        ("db-password".to_owned(), "/etc/node/db-password".into()),
        ("tls.key".to_owned(), "/etc/node/tls.key".into()),
    ]
    .into();
    node
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

/// The flags of the new keys, over a file that says otherwise: flags win, booleans only turn
/// on, repeatable lists replace (paths) or add to (credentials) the file's.
#[test]
fn flags_set_the_keys_and_win_over_the_file() {
    let dir = std::env::temp_dir().join(format!("sdcluster-flags-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("web.toml");
    std::fs::write(
        &file,
        "command = [\"/usr/bin/node\", \"/srv/web/server.js\"]\njit = false\noutbound-network = false\n\
         ready = \"notify\"\nwatchdog = \"off\"\nstate-directory = \"old\"\nread-write-paths = [\"/srv/old\"]\n\
         working-directory = \"/srv/old\"\nenvironment-file = \"/etc/old.env\"\n\
         credentials = { a = \"/etc/web/a\", b = \"/etc/web/old-b\" }\n",
    )
    .unwrap();
    let generate = |flags: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sdcluster"))
            .arg("generate")
            .arg(&file)
            .args(["--systemd-version", "252", "--sdcluster-path", "/usr/bin/sdcluster"])
            .args(flags)
            .output()
            .expect("sdcluster runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let worker = text.split("# web@.service\n").nth(1).unwrap_or_default().to_owned();
        (out.status.success(), worker, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let lines = |unit: &str, key: &str| -> Vec<String> {
        unit.lines().filter_map(|l| l.strip_prefix(key)).map(str::to_owned).collect()
    };
    let (ok, worker, err) = generate(&[]);
    assert!(ok, "{err}");
    assert_eq!(lines(&worker, "Type="), ["notify"]);
    assert_eq!(lines(&worker, "MemoryDenyWriteExecute="), ["yes"]);
    assert_eq!(lines(&worker, "ReadWritePaths="), ["/srv/old"]);
    let (ok, worker, err) = generate(&[
        "--ready",
        "exec",
        "--jit",
        "--outbound-network",
        "--state-directory",
        "web",
        "--read-write-path",
        "/srv/web/uploads",
        "--read-write-path",
        "/srv/web/cache",
        "--working-directory",
        "/srv/web",
        "--environment-file",
        "/etc/web/env",
        "--credential",
        "b=/etc/web/b",
        "--credential",
        "c=/etc/web/c",
    ]);
    assert!(ok, "{err}");
    for (key, values) in [
        ("Type=", &["exec"][..]),
        ("MemoryDenyWriteExecute=", &["no"]),
        ("PrivateNetwork=", &["no"]),
        ("RestrictAddressFamilies=", &["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]),
        ("StateDirectory=", &["web"]),
        ("ReadWritePaths=", &["/srv/web/uploads", "/srv/web/cache"]),
        ("WorkingDirectory=", &["/srv/web"]),
        ("EnvironmentFile=", &["/etc/web/env"]),
        ("LoadCredential=", &["a:/etc/web/a", "b:/etc/web/b", "c:/etc/web/c"]),
        ("WatchdogSec=", &[]),
    ] {
        assert_eq!(lines(&worker, key), values, "{key} in:\n{worker}");
    }
    let (ok, _, err) = generate(&["--credential", "nopath"]);
    assert!(!ok && err.contains("--credential \"nopath\": expected NAME=PATH"), "{err}");
    let (ok, _, err) = generate(&["--ready", "exec", "--watchdog", "10s"]);
    assert!(!ok && err.contains("invalid watchdog") && err.contains("watchdog = \"off\""), "{err}");
    let (ok, _, err) = generate(&["--read-write-path", "srv"]);
    assert!(!ok && err.contains("invalid read-write-paths: \"srv\" is not an absolute path"), "{err}");
    let help = Command::new(env!("CARGO_BIN_EXE_sdcluster")).args(["install", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for (flag, key, directive) in [
        ("--ready", "key ready", "Type=notify"),
        ("--jit", "key jit", "MemoryDenyWriteExecute=no"),
        ("--outbound-network", "key outbound-network", "PrivateNetwork=no"),
        ("--state-directory", "key state-directory", "StateDirectory="),
        ("--read-write-path", "key read-write-paths", "ReadWritePaths="),
        ("--working-directory", "key working-directory", "WorkingDirectory="),
        ("--environment-file", "key environment-file", "EnvironmentFile="),
        ("--credential", "key credentials", "LoadCredential=NAME:PATH"),
    ] {
        let text = help.split(&format!("{flag} <")).nth(1).or_else(|| help.split(&format!("{flag} ")).nth(1));
        let text = text.and_then(|t| t.split(" --").next()).unwrap_or_else(|| panic!("{flag} not in --help"));
        assert!(text.contains(key) && text.contains(directive), "{flag}: {text}");
    }
    std::fs::remove_dir_all(dir).unwrap();
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

/// `systemd-analyze verify` of `spec`'s units: what it said, if anything.
fn verify(test: &str, case: &str, spec: &Spec, systemd: u32) -> Option<String> {
    let (dir, units) = write_for_analysis(test, case, spec, systemd);
    // man pages are checked by the package's tests; here only the units.
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(units.iter().map(|u| dir.join(&u.name)))
        .output()
        .expect("systemd-analyze runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
    (!out.status.success() || !said.trim().is_empty()).then_some(said)
}

#[test]
fn systemd_analyze_verify_is_clean_for_every_rendering() {
    let systemd = installed_systemd();
    for (case, spec, _) in cases() {
        if let Some(said) = verify("verify", case, &spec, systemd) {
            panic!("{case}: systemd-analyze verify says:\n{said}");
        }
    }
}

/// systemd expands specifiers in every path setting (`%z` is none: verify fails on it), so
/// a `%` of a path is rendered as `%%`.
#[test]
fn percent_signs_in_paths_are_not_specifiers() {
    let mut node = node();
    node.state_directory = None;
    node.read_write_paths = vec!["/srv/100%z".into()];
    node.working_directory = Some("/srv/a%z".into());
    node.environment_file = Some("/etc/a%z.env".into());
    node.credentials = [("db".to_owned(), "/etc/a/db%z".into())].into();
    if let Some(said) = verify("percent", "node", &node, installed_systemd()) {
        panic!("systemd-analyze verify says:\n{said}");
    }
    let worker = units_of(&node, 252).into_iter().find(|u| u.name == "node@.service").unwrap().content;
    for line in ["ReadWritePaths=/srv/100%%z", "WorkingDirectory=/srv/a%%z", "EnvironmentFile=/etc/a%%z.env"] {
        assert!(worker.lines().any(|l| l == line), "no {line} in:\n{worker}");
    }
    // Unescaped, systemd refuses the unit: the check above can fail.
    let (dir, units) = write_for_analysis("percent-raw", "node", &node, installed_systemd());
    let worker = dir.join("node@.service");
    std::fs::write(&worker, std::fs::read_to_string(&worker).unwrap().replace("%%z", "%z")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units.iter().map(|u| dir.join(&u.name)))
        .output()
        .expect("systemd-analyze runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to resolve unit specifiers"), "{out:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `systemd-analyze security --offline` of instance 1 of `spec`'s worker (with its own
/// socket where there is one: reuseport mode): the overall exposure, and the whole report.
fn exposure(test: &str, case: &str, spec: &Spec, systemd: u32) -> (f64, String) {
    let (dir, _) = write_for_analysis(test, case, spec, systemd);
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
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{case}: no exposure level in:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
    std::fs::remove_dir_all(dir).unwrap();
    (exposure, text)
}

#[test]
fn workers_are_sandboxed_safe() {
    let systemd = installed_systemd();
    for (case, spec, _) in cases() {
        let (exposure, text) = exposure("security", case, &spec, systemd);
        // Outbound network is a documented opt-out that costs some exposure.
        let limit = if spec.outbound_network { 2.0 } else { 1.0 };
        assert!(exposure <= limit, "{case}: exposure {exposure} > {limit}:\n{text}");
        eprintln!("{case}: exposure {exposure}");
    }
}

/// The highest exposure docs/sandbox.md allows for one relaxation alone, and for all of them
/// together (the Node row).
const RELAXATION_LIMIT: f64 = 1.5;
const ALL_RELAXATIONS_LIMIT: f64 = 2.0;

/// Spec keys every row of the score table must cover, one row each alone.
const RELAXATIONS: [&str; 10] = [
    "ready",
    "jit",
    "outbound-network",
    "state-directory",
    "read-write-paths",
    "working-directory",
    "environment-file",
    "credentials",
    "system-calls",
    "user",
];

/// The rows of docs/sandbox.md's score table: the TOML of the row's first cell (its
/// `code` spans, one key each), and the exposure of its last cell.
fn documented_scores(doc: &str) -> Vec<(String, String)> {
    let section = doc.split("\n## Exposure by setting\n").nth(1).expect("docs/sandbox.md has ## Exposure by setting");
    let table = section.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|'));
    let mut rows = Vec::new();
    for line in table.skip(2) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let toml: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect();
        rows.push((toml.join("\n"), cells.last().unwrap().to_string()));
    }
    rows
}

#[test]
fn the_sandbox_doc_has_the_measured_scores() {
    let systemd = installed_systemd();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/sandbox.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let measured_with: u32 = doc
        .split("measured with systemd ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("docs/sandbox.md says \"measured with systemd N\"");
    let rows = documented_scores(&doc);
    assert!(rows.len() > RELAXATIONS.len(), "{rows:?}");
    let mut wrong = Vec::new();
    for (toml, documented) in &rows {
        let file: SpecFile = toml::from_str(&format!("name = \"web\"\ncommand = \"/usr/bin/node\"\n{toml}"))
            .unwrap_or_else(|e| panic!("docs/sandbox.md row {toml:?}: {e}"));
        let spec = file.validate_elsewhere().unwrap_or_else(|e| panic!("docs/sandbox.md row {toml:?}: {e}"));
        let (exposure, text) = exposure("doc", "web", &spec, systemd);
        let keys = toml.lines().filter(|l| !l.is_empty()).count();
        let limit = if keys <= 1 { RELAXATION_LIMIT } else { ALL_RELAXATIONS_LIMIT };
        assert!(exposure <= limit, "{toml:?}: exposure {exposure} > {limit}:\n{text}");
        eprintln!("{toml:?}: exposure {exposure:.1}");
        if format!("{exposure:.1}") != *documented {
            wrong.push(format!("{toml:?}: documented {documented}, measured {exposure:.1}"));
        }
    }
    for key in RELAXATIONS {
        let alone = rows.iter().any(|(toml, _)| toml.lines().count() == 1 && toml.starts_with(&format!("{key} =")));
        assert!(alone, "docs/sandbox.md has no row for {key} alone");
    }
    let all = rows.iter().any(|(toml, _)| RELAXATIONS.iter().filter(|k| toml.contains(&format!("{k} ="))).count() >= 8);
    assert!(all, "docs/sandbox.md has no row for the Node combination");
    if systemd == measured_with {
        assert!(wrong.is_empty(), "docs/sandbox.md's scores are stale (systemd {systemd}):\n{}", wrong.join("\n"));
    } else if !wrong.is_empty() {
        eprintln!(
            "docs/sandbox.md was measured with systemd {measured_with}, this is {systemd}:\n{}",
            wrong.join("\n")
        );
    }
}
