//! Talking to systemd through its own command-line tools, so that what sdcluster does is
//! exactly what an operator could type.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A systemd tool failed or is missing.
#[derive(Debug, thiserror::Error)]
pub enum SystemctlError {
    /// The tool could not be run at all.
    #[error("cannot run {program}: {source} (is systemd installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tool ran and said no.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Its output was not what we expected.
    #[error("unexpected output from `{command}`: {output:?}")]
    Unexpected {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

/// Runs a systemd tool, returning stdout; a non-zero exit is an error carrying stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, SystemctlError> {
    let command = format!("{program} {}", args.join(" "));
    tracing::debug!("running {command}");
    let out = Command::new(program)
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0")
        .output()
        .map_err(|source| SystemctlError::Spawn { program: program.into(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(SystemctlError::Failed { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `systemctl ARGS`.
pub fn systemctl(args: &[&str]) -> Result<String, SystemctlError> {
    run("systemctl", args)
}

/// Whether systemd is the running init (`sd_booted(3)`): only then can units be started.
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The version of the installed systemd (`systemctl --version`: "systemd 252 (252.39-1)").
pub fn version() -> Result<u32, SystemctlError> {
    let out = systemctl(&["--version"])?;
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SystemctlError::Unexpected { command: "systemctl --version".into(), output: out.clone() })
}

/// `systemctl show UNIT -p ...` as a map.
pub fn show(unit: &str, properties: &[&str]) -> Result<BTreeMap<String, String>, SystemctlError> {
    let props = properties.join(",");
    let out = systemctl(&["show", unit, "-p", &props])?;
    Ok(out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

/// What a socket unit listens on now (`Listen=` comes once per address), as systemd
/// writes the addresses: `127.0.0.1:8080`, `[::]:80`, `/run/app.sock`.
pub fn listening(socket: &str) -> Result<Vec<String>, SystemctlError> {
    let out = systemctl(&["show", socket, "-p", "Listen"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("Listen="))
        .filter_map(|v| v.split(' ').next())
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect())
}
