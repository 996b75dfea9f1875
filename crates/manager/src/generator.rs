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
        /// Why the file's count could not be read (then "auto" was used, so the app keeps
        /// serving rather than leaving its socket to queue connections nobody takes).
        problem: Option<String>,
    },
    /// `APP.target` wants the file's count of workers, though another key of the file is
    /// wrong: the count stands, and the problem is reported (the next `sdcluster install`
    /// refuses the file until it is fixed).
    WantedDespite {
        /// The app.
        name: String,
        /// Instances wanted: the file's.
        instances: u32,
        /// What is wrong elsewhere in the file.
        problem: String,
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
        let (instances, problem, counted) = match instances_of(&path) {
            Ok((n, problem)) => (n.resolve(), problem, true),
            Err(e) => (Instances::Auto.resolve(), Some(e), false),
        };
        let wants = out.join(format!("{name}.target.wants"));
        fs::create_dir_all(&wants)?;
        for k in 1..=instances {
            match symlink(&template, wants.join(format!("{name}@{k}.service"))) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        done.push(match problem {
            Some(problem) if counted => Generated::WantedDespite { name, instances, problem },
            problem => Generated::Wanted { name, instances, problem },
        });
    }
    Ok(done)
}

/// The spec's instance count (an error when the file or its count can't be read), and what
/// else is wrong with the file, so that a broken file is noticed at boot, not at the next
/// `sdcluster install`. Only what needs no mounted file system is checked
/// ([`SpecFile::validate_elsewhere`]): a generator runs before `/opt`, `/srv` or
/// `/usr/local` may be mounted, so a program there is not missing.
fn instances_of(path: &Path) -> Result<(Instances, Option<String>), String> {
    let file = SpecFile::read(path).map_err(|e| e.to_string())?;
    let instances = match file.instances.clone() {
        None => Instances::Auto,
        Some(InstancesValue::Count(n)) => Instances::parse(&n.to_string()).map_err(|e| e.to_string())?,
        Some(InstancesValue::Text(t)) => Instances::parse(&t).map_err(|e| e.to_string())?,
    };
    Ok((instances, file.validate_elsewhere().err().map(|e| e.to_string())))
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

    /// At early boot /opt, /srv or /usr/local may not be mounted yet: a program there is
    /// not missing, and the file's count stands.
    #[test]
    fn the_count_does_not_depend_on_mounts_or_on_other_keys() {
        let dir = std::env::temp_dir().join(format!("sdcluster-generator-mounts-{}", std::process::id()));
        let (config, units, out) = (dir.join("etc"), dir.join("units"), dir.join("out"));
        for d in [&config, &units, &out] {
            fs::create_dir_all(d).unwrap();
        }
        let count = Instances::Auto.resolve() + 2;
        fs::write(
            config.join("late.toml"),
            format!(
                "command = \"/srv/late/not-mounted-yet\"\nworking-directory = \"/srv/late\"\ninstances = {count}\n"
            ),
        )
        .unwrap();
        // A broken key elsewhere is reported, and the count is still the file's.
        fs::write(
            config.join("odd.toml"),
            format!("command = \"/bin/sh\"\nmemory-max = \"lots\"\ninstances = {count}\n"),
        )
        .unwrap();
        for app in ["late", "odd"] {
            fs::write(units.join(format!("{app}@.service")), "[Service]\nExecStart=/bin/sh\n").unwrap();
        }
        let done = generate(&config, &[units.as_path()], &out).unwrap();
        assert_eq!(done[0], Generated::Wanted { name: "late".into(), instances: count, problem: None });
        let Generated::WantedDespite { name, instances, problem } = &done[1] else { panic!("{:?}", done[1]) };
        assert_eq!((name.as_str(), *instances), ("odd", count));
        assert!(problem.contains("memory-max"), "{problem}");
        assert_eq!(fs::read_dir(out.join("odd.target.wants")).unwrap().count(), count as usize);
        fs::remove_dir_all(dir).unwrap();
    }
}
