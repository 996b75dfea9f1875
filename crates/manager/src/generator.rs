//! A systemd generator (systemd.generator(7)): at every boot and daemon-reload, turns each
//! `/etc/sdcluster/APP.toml` into units and wants `instances` workers, counted on the machine
//! that boots, not the one that built or installed the package.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::spec::{CONFIG_DIR, SpecFile};
use crate::units;

/// What one app's generation did.
#[derive(Debug)]
pub enum Generated {
    /// Units written, with this many instances wanted.
    App {
        /// The app.
        name: String,
        /// Instances wanted by `APP.target`.
        instances: u32,
    },
    /// The file is not a valid spec; nothing written for it (the rest goes on).
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

/// Renders every spec in `config_dir` into `out` (the generator's "normal" directory) for
/// systemd `version`.
pub fn generate(config_dir: &Path, out: &Path, version: u32) -> io::Result<Vec<Generated>> {
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
        let spec = match SpecFile::read(&path).and_then(SpecFile::validate) {
            Ok(spec) => spec,
            Err(e) => {
                done.push(Generated::Invalid { path, error: e.to_string() });
                continue;
            }
        };
        for unit in units::render(&spec, version, &path) {
            fs::write(out.join(&unit.name), &unit.content)?;
        }
        let wants = out.join(format!("{}.target.wants", spec.name));
        fs::create_dir_all(&wants)?;
        let instances = spec.instances.resolve();
        for k in 1..=instances {
            let link = wants.join(format!("{}@{k}.service", spec.name));
            match symlink(format!("../{}@.service", spec.name), &link) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        done.push(Generated::App { name: spec.name, instances });
    }
    Ok(done)
}

/// The directory the generator reads.
pub fn config_dir() -> PathBuf {
    std::env::var_os("SDCLUSTER_CONFIG_DIR").map_or_else(|| PathBuf::from(CONFIG_DIR), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_valid_spec_becomes_units_and_wants() {
        let dir = std::env::temp_dir().join(format!("sdcluster-generator-{}", std::process::id()));
        let (config, out) = (dir.join("etc"), dir.join("out"));
        fs::create_dir_all(&config).unwrap();
        fs::create_dir_all(&out).unwrap();
        fs::write(config.join("web.toml"), "command = \"/bin/sh\"\ninstances = 3\n").unwrap();
        fs::write(config.join("broken.toml"), "command = \"/bin/sh\"\ninstances = 0\n").unwrap();
        fs::write(config.join("notes.txt"), "not a spec").unwrap();
        let done = generate(&config, &out, 252).unwrap();
        assert!(matches!(&done[0], Generated::Invalid { error, .. } if error.contains("would serve nothing")));
        assert!(matches!(&done[1], Generated::App { name, instances: 3 } if name == "web"));
        assert_eq!(done.len(), 2);
        let socket = fs::read_to_string(out.join("web.socket")).unwrap();
        assert!(socket.contains("ListenStream=127.0.0.1:8080") && socket.contains("web.toml"));
        let mut wants: Vec<String> = fs::read_dir(out.join("web.target.wants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        wants.sort();
        assert_eq!(wants, ["web@1.service", "web@2.service", "web@3.service"]);
        assert_eq!(fs::read_link(out.join("web.target.wants/web@2.service")).unwrap(), Path::new("../web@.service"));
        assert!(fs::read_to_string(out.join("web.target.wants/web@2.service")).unwrap().contains("ExecStart=/bin/sh"));
        fs::remove_dir_all(dir).unwrap();
    }
}
