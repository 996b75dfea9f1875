//! What each start of an instance gets besides its fds, the way systemd prepares a unit's
//! process: the environment (inherited, then the spec's `environment`, then
//! `EnvironmentFile=`, then the supervisor's own variables: one map, the later one wins),
//! credentials (`LoadCredential=`: copied from their sources at each start into a private
//! directory, `$CREDENTIALS_DIRECTORY`) and the state directory (`StateDirectory=`,
//! `$STATE_DIRECTORY`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// systemd's limit for one credential (`CREDENTIAL_SIZE_MAX`).
const CREDENTIAL_MAX: u64 = 1024 * 1024;

/// An I/O error as people read it: "No such file or directory", without "(os error 2)".
fn why(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// The variables systemd's `EnvironmentFile=` syntax assigns in `text`, in order (a later
/// one of the same name wins when they are collected). Blank lines, lines starting with `#`
/// or `;` and lines without `=` are ignored; whitespace around the name and the value is
/// dropped; a value may be in single quotes (verbatim), in double quotes (`\"`, `\\`, `` \` ``,
/// `\$` and a backslash-newline are escapes), or bare (a backslash keeps the next character, a
/// trailing one continues the line); quoted values may span lines. An invalid name is an
/// error naming its line.
pub fn parse_environment_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut vars = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < chars.len() {
        let start_line = line;
        // The name: up to '=' or the end of the line.
        let mut name = String::new();
        while i < chars.len() && chars[i] != '=' && chars[i] != '\n' {
            name.push(chars[i]);
            i += 1;
        }
        let trimmed = name.trim_matches([' ', '\t', '\r']);
        if i >= chars.len() || chars[i] == '\n' {
            // A blank line, a comment, or a line without '=': ignored.
            i += 1;
            line += 1;
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with(';') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            i += 1;
            line += 1;
            continue;
        }
        let valid = trimmed.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && trimmed.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("line {start_line}: {trimmed:?} is not a variable name (letters, digits, _)"));
        }
        i += 1; // '='
        while i < chars.len() && matches!(chars[i], ' ' | '\t') {
            i += 1;
        }
        let value = match chars.get(i) {
            Some(&quote @ ('\'' | '"')) => {
                i += 1;
                quoted(&chars, &mut i, &mut line, quote)
                    .ok_or_else(|| format!("line {start_line}: the value of {trimmed} has no closing {quote}"))?
            }
            _ => {
                let mut value = String::new();
                while let Some(&c) = chars.get(i) {
                    match c {
                        '\n' => break,
                        '\\' => match chars.get(i + 1) {
                            Some('\n') => {
                                line += 1;
                                i += 1;
                            }
                            Some(&next) => {
                                value.push(next);
                                i += 1;
                            }
                            None => {}
                        },
                        c => value.push(c),
                    }
                    i += 1;
                }
                i += 1;
                line += 1;
                let kept = value.trim_end_matches([' ', '\t', '\r']).len();
                value.truncate(kept);
                value
            }
        };
        if value.contains('\0') {
            return Err(format!("line {start_line}: the value of {trimmed} has a NUL"));
        }
        vars.push((trimmed.to_owned(), value));
    }
    Ok(vars)
}

/// A value in `quote`s, from just past the opening one: verbatim in single quotes; in double
/// quotes `\"`, `\\`, `` \` `` and `\$` are escapes and a backslash-newline continues the
/// line. Past the closing quote, the rest of its line is skipped; `None` without one.
fn quoted(chars: &[char], i: &mut usize, line: &mut usize, quote: char) -> Option<String> {
    let escapes = quote == '"';
    let mut value = String::new();
    loop {
        match chars.get(*i) {
            None => return None,
            Some(&c) if c == quote => break,
            Some('\\') if escapes => match chars.get(*i + 1) {
                Some('\n') => {
                    *line += 1;
                    *i += 1;
                }
                Some(&c @ ('"' | '\\' | '`' | '$')) => {
                    value.push(c);
                    *i += 1;
                }
                _ => value.push('\\'),
            },
            Some(&c) => {
                *line += usize::from(c == '\n');
                value.push(c);
            }
        }
        *i += 1;
    }
    *i += 1;
    skip_rest_of_line(chars, i, line);
    Some(value)
}

/// After a closing quote: the rest of the line is whitespace (anything else is ignored, as
/// systemd does with a warning).
fn skip_rest_of_line(chars: &[char], i: &mut usize, line: &mut usize) {
    while *i < chars.len() && chars[*i] != '\n' {
        *i += 1;
    }
    *i += 1;
    *line += 1;
}

/// Reads and parses the environment file at `path` (at each start: edits take effect on the
/// next one); a missing or unreadable file is an error, as for systemd without a `-`.
pub fn read_environment_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the environment file {}: {}", path.display(), why(&e)))?;
    parse_environment_file(&text).map_err(|e| format!("environment file {}: {e}", path.display()))
}

/// The inherited environment (`std::env::vars_os()`: bytes, UTF-8 or not, as the kernel
/// passed them), without what describes the supervisor's own supervisor (`LISTEN_*`,
/// `WATCHDOG_*`, `NOTIFY_SOCKET`, `INVOCATION_ID`, another app's tables and store) rather
/// than the workers'.
pub fn inherited(vars: impl Iterator<Item = (OsString, OsString)>) -> BTreeMap<OsString, OsString> {
    use sdcluster_protocol::{env, handover};
    vars.filter(|(k, _)| {
        let k = k.as_bytes();
        !k.starts_with(b"LISTEN_")
            && !k.starts_with(b"WATCHDOG_")
            && ![
                "NOTIFY_SOCKET",
                "INVOCATION_ID",
                handover::HANDOVER_FLAG_ENV,
                handover::SYSTEMD_FDSTORE_ENV,
                env::BALANCE_FILE,
                env::METRICS_FILE,
                "CREDENTIALS_DIRECTORY",
            ]
            .iter()
            .any(|own| own.as_bytes() == k)
    })
    .collect()
}

/// One map from the inherited `base` and the layers over it, in order: a later layer's value
/// wins.
pub fn layered<'a>(
    base: &BTreeMap<OsString, OsString>,
    layers: impl IntoIterator<Item = &'a [(String, String)]>,
) -> BTreeMap<OsString, OsString> {
    let mut env = base.clone();
    for layer in layers {
        for (k, v) in layer {
            env.insert(k.into(), v.into());
        }
    }
    env
}

/// Copies each credential's source into `dir` (made anew, mode 0700), as file `NAME` of
/// mode 0400; the error names the credential and its source. `dir` is removed on error.
pub fn write_credentials(dir: &Path, credentials: &BTreeMap<String, PathBuf>) -> Result<(), String> {
    let written = (|| {
        remove_credentials(dir);
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("cannot create {}: {}", parent.display(), why(&e)))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {}", dir.display(), why(&e)))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {}", dir.display(), why(&e)))?;
        for (name, source) in credentials {
            let fail = |e: io::Error| format!("cannot load credential {name} from {}: {}", source.display(), why(&e));
            let mut file = std::fs::File::open(source).map_err(fail)?;
            if file.metadata().map_err(fail)?.is_dir() {
                return Err(fail(io::Error::other("it is a directory; name a file")));
            }
            let mut content = Vec::new();
            (&mut file).take(CREDENTIAL_MAX + 1).read_to_end(&mut content).map_err(fail)?;
            if content.len() as u64 > CREDENTIAL_MAX {
                return Err(fail(io::Error::other(format!("larger than {CREDENTIAL_MAX} bytes"))));
            }
            let target = dir.join(name);
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&target)
                .map_err(|e| format!("cannot write credential {name} into {}: {}", dir.display(), why(&e)))?;
            out.write_all(&content).map_err(|e| format!("cannot write credential {name}: {}", why(&e)))?;
        }
        Ok(())
    })();
    if written.is_err() {
        remove_credentials(dir);
    }
    written
}

/// Removes an instance's credentials directory (its files are read-only: a plain
/// `remove_dir_all` removes them, the directory being writable by its owner).
pub fn remove_credentials(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Where `StateDirectory=NAME` lives: under `/var/lib` for root (systemd's system manager),
/// else under `$XDG_STATE_HOME` or `~/.local/state` (a user manager); `SDCLUSTER_STATE_DIR`
/// overrides both, as `SDCLUSTER_RUNTIME_DIR` does for the runtime directory.
pub fn state_base(root: bool, var: impl Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    if let Some(dir) = var("SDCLUSTER_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(dir.into());
    }
    if root {
        return Ok("/var/lib".into());
    }
    if let Some(dir) = var("XDG_STATE_HOME").filter(|d| d.starts_with('/')) {
        return Ok(dir.into());
    }
    match var("HOME").filter(|h| h.starts_with('/')) {
        Some(home) => Ok(Path::new(&home).join(".local/state")),
        None => Err("cannot place the state directory: neither XDG_STATE_HOME nor HOME is set".into()),
    }
}

/// Creates the state directory `name` under `base` if missing and gives it mode 0700 (each
/// start, as systemd applies `StateDirectoryMode=`); returns its path.
pub fn prepare_state_directory(base: &Path, name: &str) -> Result<PathBuf, String> {
    if name.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(format!("state directory {name:?} is not a name under {}", base.display()));
    }
    let dir = base.join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create the state directory {}: {}", dir.display(), why(&e)))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot set the mode of the state directory {}: {}", dir.display(), why(&e)))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse_environment_file(text).unwrap()
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn environment_files_read_as_systemd_reads_them() {
        let text = "# a comment\n; another\n\nA=1\n  B = two words  \nC='single $quoted \\n'\nD=\"double \\\"quoted\\\" \\$x \\n\"\nno equals sign\nE=\nF=a\\\nb\nG='multi\nline'\nH=x=y\r\nexport_ok=1";
        assert_eq!(
            pairs(text),
            [
                kv("A", "1"),
                kv("B", "two words"),
                kv("C", "single $quoted \\n"),
                kv("D", "double \"quoted\" $x \\n"),
                kv("E", ""),
                kv("F", "ab"),
                kv("G", "multi\nline"),
                kv("H", "x=y"),
                kv("export_ok", "1"),
            ]
        );
        assert!(pairs("").is_empty());
        let err = parse_environment_file("A=1\n\nB C=2\n").unwrap_err();
        assert!(err.starts_with("line 3:") && err.contains("\"B C\" is not a variable name"), "{err}");
        let err = parse_environment_file("A=1\nB='open\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("no closing '"), "{err}");
    }

    #[test]
    fn later_layers_win() {
        use std::os::unix::ffi::OsStringExt;
        let os = |(k, v): (String, String)| (OsString::from(k), OsString::from(v));
        let bytes = (OsString::from("BYTES"), OsString::from_vec(b"\xff\xfe".to_vec()));
        let inherited = inherited(
            [kv("PATH", "/bin"), kv("A", "inherited"), kv("LISTEN_FDS", "3"), kv("NOTIFY_SOCKET", "/x")]
                .into_iter()
                .map(os)
                .chain([bytes.clone()]),
        );
        assert_eq!(inherited.keys().collect::<Vec<_>>(), ["A", "BYTES", "PATH"]);
        let spec = [kv("A", "spec"), kv("B", "spec")];
        let file = [kv("B", "file")];
        let env = layered(&inherited, [&spec[..], &file]);
        assert_eq!(env[&OsString::from("A")], "spec");
        assert_eq!(env[&OsString::from("B")], "file");
        assert_eq!(env[&OsString::from("PATH")], "/bin");
        assert_eq!(env[&bytes.0], bytes.1, "not UTF-8: passed through as bytes");
    }

    #[test]
    fn credentials_are_private_copies() {
        let base = std::env::temp_dir().join(format!("sdcluster-creds-{}", std::process::id()));
        let source = base.join("source");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(&source, "s3cret").unwrap();
        let dir = base.join("run/app.credentials/1");
        let creds = BTreeMap::from([("db".to_owned(), source.clone())]);
        write_credentials(&dir, &creds).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode(&dir), mode(&dir.join("db"))), (0o700, 0o400));
        assert_eq!(std::fs::read_to_string(dir.join("db")).unwrap(), "s3cret");
        // Each start copies anew: an edited source is seen.
        std::fs::write(&source, "rotated").unwrap();
        write_credentials(&dir, &creds).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("db")).unwrap(), "rotated");
        // A missing source fails the start, naming it, and leaves no directory.
        let missing = BTreeMap::from([("db".to_owned(), base.join("missing"))]);
        let err = write_credentials(&dir, &missing).unwrap_err();
        assert!(err.starts_with("cannot load credential db from ") && err.contains("No such file"), "{err}");
        assert!(!dir.exists());
        write_credentials(&dir, &creds).unwrap();
        remove_credentials(&dir);
        assert!(!dir.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn state_directories_follow_the_manager_kind() {
        let vars = |list: &'static [(&str, &str)]| {
            move |k: &str| list.iter().find(|(name, _)| *name == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(state_base(true, vars(&[("XDG_STATE_HOME", "/x")])).unwrap(), Path::new("/var/lib"));
        assert_eq!(state_base(false, vars(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")])).unwrap(), Path::new("/x"));
        assert_eq!(state_base(false, vars(&[("HOME", "/h")])).unwrap(), Path::new("/h/.local/state"));
        assert!(state_base(false, vars(&[])).is_err());
        assert_eq!(state_base(true, vars(&[("SDCLUSTER_STATE_DIR", "/t")])).unwrap(), Path::new("/t"));
        let base = std::env::temp_dir().join(format!("sdcluster-state-{}", std::process::id()));
        let dir = prepare_state_directory(&base, "web/cache").unwrap();
        assert_eq!(dir, base.join("web/cache"));
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o700);
        std::fs::write(dir.join("kept"), "x").unwrap();
        prepare_state_directory(&base, "web/cache").unwrap();
        assert!(dir.join("kept").exists(), "it outlives starts");
        assert!(prepare_state_directory(&base, "../x").is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
