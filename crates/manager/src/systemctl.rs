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

/// One line of `systemctl list-units`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// The unit name.
    pub name: String,
    /// `loaded`, `not-found`, ...
    pub load: String,
    /// `active`, `activating`, `deactivating`, `reloading`, `inactive`, `failed`.
    pub active: String,
    /// The type's own state: `running`, `auto-restart`, `dead`, ...
    pub sub: String,
}

/// Every unit systemd has loaded that matches `pattern`, in any state
/// (`systemctl list-units --all PATTERN`): also instances nothing wants any more, and ones
/// started by hand.
pub fn list_units(pattern: &str) -> Result<Vec<UnitState>, SystemctlError> {
    let out = systemctl(&["list-units", "--all", "--plain", "--no-legend", "--full", pattern])?;
    Ok(parse_list_units(&out))
}

fn parse_list_units(out: &str) -> Vec<UnitState> {
    out.lines()
        .filter_map(|line| {
            // A failed or missing unit may come with a "●" before its name.
            let mut words = line.split_whitespace().skip_while(|w| !w.contains('.'));
            let mut next = || words.next().map(str::to_owned);
            Some(UnitState { name: next()?, load: next()?, active: next()?, sub: next()? })
        })
        .collect()
}

/// One job in systemd's queue (`systemctl list-jobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its number.
    pub id: u32,
    /// The unit it is for.
    pub unit: String,
    /// `start`, `stop`, `restart`, `try-restart`, `reload`, ...
    pub kind: String,
    /// `running` or `waiting`.
    pub state: String,
}

/// The jobs queued or running for units matching `pattern`.
pub fn jobs(pattern: &str) -> Result<Vec<Job>, SystemctlError> {
    let out = systemctl(&["list-jobs", "--plain", "--no-legend", "--full", pattern])?;
    Ok(parse_jobs(&out))
}

fn parse_jobs(out: &str) -> Vec<Job> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let id = words.next()?.parse().ok()?;
            let mut next = || words.next().map(str::to_owned);
            Some(Job { id, unit: next()?, kind: next()?, state: next()? })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_units_lines() {
        let out = "app@1.service loaded active running app worker 1\n\
                   ● app@3.service loaded failed failed app worker 3\n\
                   app@4.service loaded inactive dead app worker 4\n";
        let units = parse_list_units(out);
        assert_eq!(units.len(), 3);
        assert_eq!(
            units[1],
            UnitState {
                name: "app@3.service".into(),
                load: "loaded".into(),
                active: "failed".into(),
                sub: "failed".into()
            }
        );
        assert_eq!((units[2].name.as_str(), units[2].active.as_str()), ("app@4.service", "inactive"));
        assert!(parse_list_units("").is_empty());
    }

    #[test]
    fn list_jobs_lines() {
        let out = "1234 app@1.service restart running\n1235 app.target    start   waiting\nNo jobs running.\n";
        let jobs = parse_jobs(out);
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            jobs[0],
            Job { id: 1234, unit: "app@1.service".into(), kind: "restart".into(), state: "running".into() }
        );
        assert_eq!(jobs[1].kind, "start");
    }
}
