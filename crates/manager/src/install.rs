//! Putting unit files in place: atomically, and never over a file somebody edited unless
//! told to (`--force`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::units::{UnitFile, is_untouched};

/// Where units go, relative to the root.
pub const UNIT_DIR: &str = "etc/systemd/system";

/// What happened to each file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Did not exist; written.
    Created(PathBuf),
    /// Ours and different; rewritten.
    Updated(PathBuf),
    /// Already exactly this.
    Unchanged(PathBuf),
    /// Edited by someone; replaced because of `--force`.
    Overwritten(PathBuf),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created(p) => write!(f, "created {}", p.display()),
            Change::Updated(p) => write!(f, "updated {}", p.display()),
            Change::Unchanged(p) => write!(f, "unchanged {}", p.display()),
            Change::Overwritten(p) => write!(f, "overwrote edited {}", p.display()),
        }
    }
}

/// Why nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Files were edited after sdcluster wrote them (or were never ours).
    #[error("{} changed since sdcluster wrote {}: {}; move your changes into the app's TOML (or a drop-in: systemctl edit UNIT), or pass --force to replace {}",
        if .0.len() == 1 { "this file was" } else { "these files were" },
        if .0.len() == 1 { "it" } else { "them" },
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if .0.len() == 1 { "it" } else { "them" })]
    Edited(Vec<PathBuf>),
    /// The file system said no.
    #[error("cannot write {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// The unit directory under `root`.
pub fn unit_dir(root: &Path) -> PathBuf {
    root.join(UNIT_DIR)
}

/// Writes `units` into `root`'s unit directory; checks every file before writing any, so
/// an edited file stops the whole install with nothing changed.
pub fn install(units: &[UnitFile], root: &Path, force: bool) -> Result<Vec<Change>, InstallError> {
    let dir = unit_dir(root);
    let mut plan = Vec::new();
    let mut edited = Vec::new();
    for unit in units {
        let path = dir.join(&unit.name);
        let change = match fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Change::Created(path),
            Err(e) => return Err(InstallError::Io(path, e)),
            Ok(existing) if existing == unit.content => Change::Unchanged(path),
            Ok(existing) if is_untouched(&existing) => Change::Updated(path),
            Ok(_) if force => Change::Overwritten(path),
            Ok(_) => {
                edited.push(path);
                continue;
            }
        };
        plan.push((change, unit));
    }
    if !edited.is_empty() {
        return Err(InstallError::Edited(edited));
    }
    fs::create_dir_all(&dir).map_err(|e| InstallError::Io(dir.clone(), e))?;
    for (change, unit) in &plan {
        if let Change::Created(path) | Change::Updated(path) | Change::Overwritten(path) = change {
            write_atomically(path, unit.content.as_bytes()).map_err(|e| InstallError::Io(path.clone(), e))?;
        }
    }
    Ok(plan.into_iter().map(|(c, _)| c).collect())
}

/// Removes the unit files `names` from `root`; edited ones stay unless `force`.
pub fn remove(names: &[String], root: &Path, force: bool) -> Result<Vec<PathBuf>, InstallError> {
    let dir = unit_dir(root);
    let mut edited = Vec::new();
    let mut present = Vec::new();
    for name in names {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::Io(path, e)),
            Ok(existing) if force || is_untouched(&existing) => present.push(path),
            Ok(_) => edited.push(path),
        }
    }
    if !edited.is_empty() {
        return Err(InstallError::Edited(edited));
    }
    for path in &present {
        fs::remove_file(path).map_err(|e| InstallError::Io(path.clone(), e))?;
    }
    Ok(present)
}

/// The mode of a file [`write_atomically`] creates: unit files are read by everyone.
pub const NEW_FILE_MODE: u32 = 0o644;

/// [`write_atomically_new_mode`] with [`NEW_FILE_MODE`] for a file that does not exist yet.
pub fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    write_atomically_new_mode(path, content, NEW_FILE_MODE)
}

/// Writes through a temporary file in the same directory and renames it into place, so a
/// crash leaves the old file or the new one, never half of one.
///
/// The new file keeps the mode and owner of the one it replaces (a 0600 file of secrets
/// stays 0600, whatever the umask); a file that did not exist gets `mode`. A symbolic link
/// at `path` is replaced, not followed, and its target's mode and owner are kept when it is
/// a regular file (a unit masked by a link to /dev/null is never made world-writable). The
/// temporary file is created exclusively, mode 0600 until it is complete, so that nothing
/// planted at its name is followed and nobody reads it half-written.
pub fn write_atomically_new_mode(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.sdcluster-{}", std::process::id()));
    let existing = match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Some(meta),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    // Permission bits and the sticky bit; never setuid or setgid on a file we rewrote.
    let mode = existing.as_ref().map_or(mode, |meta| meta.mode()) & 0o1777;
    let create = || fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp);
    let mut file = match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left by a crashed run of the same pid, or planted: removed (a link, not its
            // target), then created anew.
            fs::remove_file(&tmp)?;
            create()?
        }
        other => other?,
    };
    let result = (|| {
        file.write_all(content)?;
        if let Some(meta) = &existing {
            let own = file.metadata()?;
            if (own.uid(), own.gid()) != (meta.uid(), meta.gid()) {
                std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))?;
            }
        }
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::header;

    fn unit(name: &str, body: &str) -> UnitFile {
        UnitFile { name: name.into(), content: format!("{}\n{body}", header("test", body)) }
    }

    fn root() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sdcluster-install-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_updates_and_leaves_alone() {
        let root = root();
        let a = unit("a.socket", "[Socket]\nListenStream=1\n");
        assert!(matches!(install(std::slice::from_ref(&a), &root, false).unwrap()[0], Change::Created(_)));
        assert!(matches!(install(std::slice::from_ref(&a), &root, false).unwrap()[0], Change::Unchanged(_)));
        let a2 = unit("a.socket", "[Socket]\nListenStream=2\n");
        assert!(matches!(install(std::slice::from_ref(&a2), &root, false).unwrap()[0], Change::Updated(_)));
        assert_eq!(fs::read_to_string(unit_dir(&root).join("a.socket")).unwrap(), a2.content);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_edited_file_stops_everything_without_force() {
        let root = root();
        let a = unit("a.socket", "[Socket]\nListenStream=1\n");
        let b = unit("b.service", "[Service]\nExecStart=/bin/true\n");
        install(&[a.clone(), b.clone()], &root, false).unwrap();
        let edited = a.content.replace("ListenStream=1", "ListenStream=9");
        fs::write(unit_dir(&root).join("a.socket"), &edited).unwrap();
        let b2 = unit("b.service", "[Service]\nExecStart=/bin/false\n");
        let err = install(&[a.clone(), b2.clone()], &root, false).unwrap_err();
        assert!(err.to_string().contains("a.socket") && err.to_string().contains("--force"), "{err}");
        // Nothing was written: b.service is still the old one, the edit is still there.
        assert_eq!(fs::read_to_string(unit_dir(&root).join("b.service")).unwrap(), b.content);
        assert_eq!(fs::read_to_string(unit_dir(&root).join("a.socket")).unwrap(), edited);
        assert!(remove(std::slice::from_ref(&a.name), &root, false).is_err());
        let changes = install(&[a.clone(), b2], &root, true).unwrap();
        assert!(matches!(changes[0], Change::Overwritten(_)));
        assert_eq!(remove(&[a.name, b.name, "never-installed.target".into()], &root, false).unwrap().len(), 2);
        assert_eq!(fs::read_dir(unit_dir(&root)).unwrap().count(), 0, "no temporary files left");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn rewriting_a_file_keeps_its_mode_and_owner() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let dir = root();
        fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("app.toml");
        fs::write(&secret, "environment = { TOKEN = \"s3cret\" }\n").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(&secret).unwrap();
        write_atomically(&secret, b"instances = 4\n").unwrap();
        let after = fs::metadata(&secret).unwrap();
        assert_eq!(after.permissions().mode() & 0o7777, 0o600, "a secret's file must not become world-readable");
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(fs::read_to_string(&secret).unwrap(), "instances = 4\n");
        // A symlink is replaced, not followed, by a file with its target's mode.
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        write_atomically(&link, b"instances = 5\n").unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(fs::metadata(&link).unwrap().permissions().mode() & 0o7777, 0o600);
        assert_eq!(fs::read_to_string(&secret).unwrap(), "instances = 4\n");
        // ... but a link to something else lends nothing: a unit masked by a link to
        // /dev/null (mode 0666) must not become a world-writable unit file.
        let masked = dir.join("masked.service");
        std::os::unix::fs::symlink("/dev/null", &masked).unwrap();
        write_atomically(&masked, b"[Unit]\n").unwrap();
        assert_eq!(fs::metadata(&masked).unwrap().permissions().mode() & 0o7777, 0o644);
        assert!(fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        // A new file gets the mode asked for, whatever the umask.
        let fresh = dir.join("fresh");
        write_atomically_new_mode(&fresh, b"x", 0o640).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777, 0o640);
        let unit = dir.join("a.service");
        write_atomically(&unit, b"[Unit]\n").unwrap();
        assert_eq!(fs::metadata(&unit).unwrap().permissions().mode() & 0o7777, 0o644);
        // A temporary file left by a crash (or planted as a symlink) is not followed.
        let planted = dir.join(format!(".fresh.sdcluster-{}", std::process::id()));
        let elsewhere = dir.join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        write_atomically(&fresh, b"y").unwrap();
        assert!(!elsewhere.exists(), "the write followed a symlink");
        assert_eq!(fs::read_to_string(&fresh).unwrap(), "y");
        let names: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.contains(".sdcluster-")), "temporary files left: {names:?}");
        fs::remove_dir_all(dir).unwrap();
    }
}
