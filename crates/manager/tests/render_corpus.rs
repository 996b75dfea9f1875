//! The fuzz seeds (`fuzz/seeds/spec/*.toml`, hostile values among them), judged by systemd
//! itself: every spec that validation accepts renders into units that `systemd-analyze
//! verify` accepts, that have the properties the `render` fuzz target checks
//! (`fuzz/src/properties.rs`), and whose `Environment=` and `ExecStart=` systemd reads as
//! the spec says (`systemd --test` dumps the parsed units; it runs as `nobody`). A spec
//! that validation refuses renders nothing.
//!
//! Needs systemd installed on the host (not running): `apt-get install systemd`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sdcluster::spec::{Spec, SpecFile};
use sdcluster::units::{UnitFile, try_render};

#[path = "../../../fuzz/src/properties.rs"]
#[allow(dead_code)]
mod properties;

fn seeds() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/spec");
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "{seeds:?}");
    seeds
}

fn installed_systemd() -> u32 {
    sdcluster::systemctl::version().expect("systemd must be installed for these tests (apt-get install systemd)")
}

/// Writes `spec`'s units into a fresh directory, its program replaced by a link to
/// `/bin/true` under the same file name (its quoting is still what is checked).
fn write_units(case: &str, spec: &Spec, systemd: u32) -> (PathBuf, Spec, Vec<UnitFile>) {
    let dir = std::env::temp_dir().join(format!("sdcluster-corpus-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut spec = spec.clone();
    let program = Path::new(&spec.command[0]).file_name().map_or("w".into(), |n| n.to_string_lossy().into_owned());
    let program = bin.join(if program.is_empty() { "w".to_owned() } else { program });
    std::os::unix::fs::symlink("/bin/true", &program).unwrap();
    spec.command[0] = program.display().to_string();
    let units = try_render(&spec, systemd, Path::new("/etc/sdcluster/t.toml"), Path::new("/bin/true"))
        .unwrap_or_else(|e| panic!("{case}: an accepted spec was not rendered: {e}"));
    for unit in &units {
        std::fs::write(dir.join(&unit.name), &unit.content).unwrap();
    }
    (dir, spec, units)
}

/// What `systemd --test` reads from `unit` in `dir`: its `Environment:` and `Command Line:`
/// lines, as the dump shows them.
fn systemd_reads(dir: &Path, unit: &str) -> (Vec<String>, Vec<String>) {
    let systemd = ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"].into_iter().find(|p| Path::new(p).exists());
    let systemd = systemd.expect("systemd's binary");
    // "Don't run test mode as root."
    let root = is_root();
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", systemd]);
        c
    } else {
        Command::new(systemd)
    };
    let out = cmd
        .args(["--test", "--system", "--no-pager", &format!("--unit={unit}")])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .expect("systemd --test runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let block = text.split(&format!("-> Unit {unit}:\n")).nth(1).unwrap_or_else(|| {
        panic!(
            "systemd --test shows no {unit}:\n{}{}",
            &text[..text.len().min(3000)],
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let block = block.split("\n\t-> Unit ").next().unwrap_or_default();
    let pick = |prefix: &str| -> Vec<String> {
        block.lines().filter_map(|l| l.trim_start().strip_prefix(prefix)).map(str::to_owned).collect()
    };
    (pick("Environment: "), pick("Command Line: "))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().any(|l| l.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)) == Some("0"))
    })
}

#[test]
fn every_accepted_seed_renders_units_systemd_reads_as_the_spec_says() {
    let systemd = installed_systemd();
    let mut accepted = 0;
    for seed in seeds() {
        let case = seed.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&seed).unwrap();
        let mut file: SpecFile = match toml::from_str(&text) {
            Ok(file) => file,
            Err(_) => continue,
        };
        file.name.get_or_insert_with(|| "fuzz".into());
        let Ok(spec) = file.validate_elsewhere() else {
            eprintln!("{case}: refused");
            continue;
        };
        accepted += 1;
        if let Err(e) = properties::check_spec(&spec, systemd) {
            panic!("{case}: {e}");
        }
        let (dir, spec, units) = write_units(&case, &spec, systemd);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(units.iter().map(|u| dir.join(&u.name)))
            .output()
            .expect("systemd-analyze runs");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "{case}: systemd-analyze verify says:\n{said}");

        let (environment, commands) = systemd_reads(&dir, &format!("{}@1.service", spec.name));
        for (key, value) in &spec.environment {
            let assignment = format!("{key}={value}");
            assert!(environment.contains(&assignment), "{case}: systemd reads no {assignment:?}, but {environment:?}");
        }
        // systemd shows the command line quoted for a shell, each argument with `$` not yet
        // expanded (`$$` is one `$` at the start).
        let shown = &commands[0];
        for arg in &spec.command[1..] {
            let dollars = arg.replace('$', "$$");
            let plain =
                !dollars.is_empty() && dollars.chars().all(|c| c.is_ascii_alphanumeric() || "-_=./,%:@+".contains(c));
            if plain {
                assert!(shown.split(' ').any(|w| w == dollars), "{case}: {arg:?} not in {shown}");
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
    assert!(accepted >= 4, "only {accepted} seeds were accepted");
}

/// Hostile seeds are refused by validation, and nothing of them would render.
#[test]
fn the_injection_seed_is_refused() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/spec/injection.toml"))
            .unwrap();
    let file: SpecFile = toml::from_str(&text).unwrap();
    let err = file.validate_elsewhere().unwrap_err().to_string();
    assert!(err.contains("control character"), "{err}");
}
