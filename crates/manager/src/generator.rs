//! A systemd generator (systemd.generator(7)), shipped by the package: at every boot and
//! daemon-reload, makes `APP.target` want `instances` workers for each
//! `/etc/sdcluster/APP.toml` whose units are installed, counted on the machine that boots,
//! not the one that built or installed them.
//!
//! Only the wants are generated; the units themselves stay ordinary files (shipped in
//! `/usr/lib/systemd/system`, or written by `sdcluster install` into `/etc/systemd/system`),
//! so `systemctl enable`, `deb-systemd-helper` and drop-ins work on them as usual.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::spec::{CONFIG_DIR, Instances, InstancesValue, SpecFile};

/// Where the package installs the generator; its presence means apps with a TOML in
/// [`CONFIG_DIR`] get their worker count from it at every boot.
pub const GENERATOR: &str = "/usr/lib/systemd/system-generators/sdcluster-generator";

/// Where systemd looks for system units, most important first (systemd.unit(5)).
pub const UNIT_PATH: [&str; 4] =
    ["/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];

/// What generation did for one TOML.
#[derive(Debug, PartialEq, Eq)]
pub enum Generated {
    /// `APP.target` wants this many workers.
    Wanted {
        /// The app.
        name: String,
        /// Instances wanted.
        instances: u32,
        /// Why the file could not be used as it is (then "auto" was used, so the app keeps
        /// serving rather than leaving its socket to queue connections nobody takes).
        problem: Option<String>,
    },
    /// No `APP@.service` is installed: nothing to want.
    NotInstalled(String),
}

/// Writes `APP.target.wants/APP@k.service` links into `out` (the generator's "normal"
/// directory) for every spec in `config_dir` whose template is found in `unit_path`.
pub fn generate(config_dir: &Path, unit_path: &[&Path], out: &Path) -> io::Result<Vec<Generated>> {
    let mut specs: Vec<PathBuf> = match fs::read_dir(config_dir) {
        Ok(entries) => {
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    specs.sort();
    let mut done = Vec::new();
    for path in specs {
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else { continue };
        let Some(template) = unit_path.iter().map(|dir| dir.join(format!("{name}@.service"))).find(|p| p.exists())
        else {
            done.push(Generated::NotInstalled(name));
            continue;
        };
        let (instances, problem) = match instances_of(&path) {
            Ok(n) => (n.resolve(), None),
            Err(e) => (Instances::Auto.resolve(), Some(e)),
        };
        let wants = out.join(format!("{name}.target.wants"));
        fs::create_dir_all(&wants)?;
        for k in 1..=instances {
            match symlink(&template, wants.join(format!("{name}@{k}.service"))) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        done.push(Generated::Wanted { name, instances, problem });
    }
    Ok(done)
}

/// The spec's instance count; the whole spec must be valid, so that a broken file is noticed
/// at boot, not at the next `sdcluster install`.
fn instances_of(path: &Path) -> Result<Instances, String> {
    let file = SpecFile::read(path).map_err(|e| e.to_string())?;
    let instances = file.instances.clone();
    file.validate().map_err(|e| e.to_string())?;
    match instances {
        None => Ok(Instances::Auto),
        Some(InstancesValue::Count(n)) => Instances::parse(&n.to_string()).map_err(|e| e.to_string()),
        Some(InstancesValue::Text(t)) => Instances::parse(&t).map_err(|e| e.to_string()),
    }
}

/// The directory the generator reads (`SDCLUSTER_CONFIG_DIR` overrides, for tests).
pub fn config_dir() -> PathBuf {
    std::env::var_os("SDCLUSTER_CONFIG_DIR").map_or_else(|| PathBuf::from(CONFIG_DIR), PathBuf::from)
}

/// Whether the generator decides the worker count of app `name` on this machine.
pub fn manages(name: &str) -> bool {
    Path::new(GENERATOR).exists() && config_dir().join(format!("{name}.toml")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_apps_with_a_spec_get_wants() {
        let dir = std::env::temp_dir().join(format!("sdcluster-generator-{}", std::process::id()));
        let (config, units, out) = (dir.join("etc"), dir.join("units"), dir.join("out"));
        for d in [&config, &units, &out] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(config.join("web.toml"), "command = \"/bin/sh\"\ninstances = 3\n").unwrap();
        fs::write(config.join("broken.toml"), "command = \"/bin/sh\"\ninstances = 0\n").unwrap();
        fs::write(config.join("absent.toml"), "command = \"/bin/sh\"\n").unwrap();
        fs::write(config.join("notes.txt"), "not a spec").unwrap();
        for app in ["web", "broken"] {
            fs::write(units.join(format!("{app}@.service")), "[Service]\nExecStart=/bin/sh\n").unwrap();
        }
        let done = generate(&config, &[units.as_path()], &out).unwrap();
        assert_eq!(done.len(), 3);
        assert_eq!(done[0], Generated::NotInstalled("absent".into()));
        let Generated::Wanted { name, instances, problem: Some(problem) } = &done[1] else { panic!("{:?}", done[1]) };
        assert_eq!((name.as_str(), *instances), ("broken", Instances::Auto.resolve()));
        assert!(problem.contains("would serve nothing"), "{problem}");
        assert_eq!(done[2], Generated::Wanted { name: "web".into(), instances: 3, problem: None });
        let mut wants: Vec<String> = fs::read_dir(out.join("web.target.wants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        wants.sort();
        assert_eq!(wants, ["web@1.service", "web@2.service", "web@3.service"]);
        assert_eq!(fs::read_link(out.join("web.target.wants/web@2.service")).unwrap(), units.join("web@.service"));
        assert!(!out.join("absent.target.wants").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
