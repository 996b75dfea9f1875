//! Operating an installed app through systemd: the verbs of `sdcluster` when systemd is the
//! supervisor.

use std::path::Path;
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use sdcluster_protocol::ListenAddress;

use crate::generator;
use crate::install::{self, Change, InstallError};
use crate::spec::{CONFIG_DIR, Instances, Spec};
use crate::status::{ClusterStatus, InstanceStatus, process_usage};
use crate::systemctl::{SystemctlError, booted, listening, show, systemctl};
use crate::units::{UnitFile, listen_stream, unit_names};

/// Something between sdcluster and systemd went wrong.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// systemd refused or is missing.
    #[error(transparent)]
    Systemctl(#[from] SystemctlError),
    /// Writing unit files.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// systemd is not the init system here.
    #[error(
        "systemd is not running as PID 1 here, so units can't be started; use `sdcluster run` to supervise the workers yourself (or `install --root DIR` to only write units)"
    )]
    NotBooted,
    /// The app's units are not installed.
    #[error("{0}.target is not installed: install the app with `sdcluster install`, or start it with `sdcluster run`")]
    NotInstalled(String),
    /// A listen address is held by somebody else.
    #[error(
        "{0} is already in use by another process (not {1}.socket): stop it or choose another listen address; `ss -ltnp` shows who holds it"
    )]
    PortInUse(ListenAddress, String),
    /// The app's TOML could not be updated.
    #[error("cannot record the new instance count in {0}: {1}")]
    Persist(String, String),
}

fn unit(app: &str, instance: u32) -> String {
    format!("{app}@{instance}.service")
}

/// Writes the units, reloads systemd and enables the socket, the target and the instances,
/// as a package would. With a `root` other than `/`, only files are written and enabled
/// offline (`systemctl --root`), nothing is started.
pub fn install(spec: &Spec, units: &[UnitFile], root: &Path, force: bool) -> Result<Installed, OpsError> {
    let live = root == Path::new("/");
    let socket = format!("{}.socket", spec.name);
    let active = live && booted() && systemctl(&["is-active", "--quiet", &socket]).is_ok();
    let held = if active { listening(&socket)? } else { Vec::new() };
    if live {
        check_ports(spec, &held)?;
    }
    let changes = install::install(units, root, force)?;
    let mut enable: Vec<String> = units
        .iter()
        .map(|u| u.name.clone())
        .filter(|n| n.ends_with(".target") || (n.ends_with(".socket") && !n.contains('@')))
        .collect();
    // Where the package's generator counts the workers at every boot, it alone wants them.
    if !(live && generator::manages(&spec.name)) {
        enable.extend((1..=spec.instances.resolve()).map(|k| unit(&spec.name, k)));
    }
    let root_arg = format!("--root={}", root.display());
    let mut args: Vec<&str> = if live { vec![] } else { vec![root_arg.as_str()] };
    if live && booted() {
        systemctl(&["daemon-reload"])?;
    }
    args.push("enable");
    args.extend(enable.iter().map(String::as_str));
    systemctl(&args)?;
    let wanted: Vec<String> = spec.listen.iter().map(listen_stream).collect();
    let mut sorted = (held.clone(), wanted.clone());
    sorted.0.sort();
    sorted.1.sort();
    let listen_pending = (active && sorted.0 != sorted.1).then_some((held, wanted));
    Ok(Installed { changes, listen_pending })
}

/// What `install` did, and what it left for the operator to decide.
#[derive(Debug)]
pub struct Installed {
    /// Each unit file's fate.
    pub changes: Vec<Change>,
    /// The running socket still listens on the old addresses (first) instead of the new ones
    /// (second): they take effect when the socket restarts, which restarts the workers too.
    pub listen_pending: Option<(Vec<String>, Vec<String>)>,
}

/// Stops and disables everything of the app, then removes its unit files.
pub fn uninstall(app: &str, root: &Path, force: bool) -> Result<(), OpsError> {
    let live = root == Path::new("/");
    let names = unit_names(app);
    if live && booted() {
        let instances = enabled_instances(app).unwrap_or_default();
        let mut all: Vec<String> = instances.iter().map(|k| unit(app, *k)).collect();
        all.extend(names.iter().filter(|n| !n.contains("@.")).cloned());
        let mut args = vec!["disable", "--now"];
        args.extend(all.iter().map(String::as_str));
        // Units that are not installed are not an error here: uninstall is idempotent.
        let _ = systemctl(&args);
    }
    install::remove(&names, root, force)?;
    let wants = install::unit_dir(root).join(format!("{app}.target.wants"));
    if wants.is_dir() {
        for link in std::fs::read_dir(&wants).map_err(|e| InstallError::Io(wants.clone(), e))?.flatten() {
            let _ = std::fs::remove_file(link.path());
        }
        let _ = std::fs::remove_dir(&wants);
    }
    if live {
        // The balance file's directory, kept across restarts (RuntimeDirectoryPreserve=).
        for dir in [format!("/run/sdcluster/{app}"), format!("/run/private/sdcluster/{app}")] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if live && booted() {
        systemctl(&["daemon-reload"])?;
    }
    Ok(())
}

/// A TCP port held by a process other than the app's own socket (which holds `held`) would
/// make the socket fail when it (re)starts.
fn check_ports(spec: &Spec, held: &[String]) -> Result<(), OpsError> {
    // A port the socket holds on some address can't be probed on another address: our own
    // socket would answer "in use" (127.0.0.1:8080 held, *:8080 wanted).
    let held_ports: Vec<&str> = held.iter().filter_map(|a| a.rsplit_once(':').map(|(_, p)| p)).collect();
    for addr in &spec.listen {
        if let ListenAddress::Tcp(a) = addr {
            if held_ports.contains(&a.port().to_string().as_str()) {
                continue;
            }
            if let Err(sdcluster_protocol::BindError::InUse(a)) = addr.bind(false) {
                return Err(OpsError::PortInUse(a, spec.name.clone()));
            }
        }
    }
    Ok(())
}

fn require_booted() -> Result<(), OpsError> {
    if booted() { Ok(()) } else { Err(OpsError::NotBooted) }
}

/// The instances `APP.target` wants, in order.
pub fn enabled_instances(app: &str) -> Result<Vec<u32>, OpsError> {
    let target = format!("{app}.target");
    let props = show(&target, &["Wants", "LoadState"])?;
    if props.get("LoadState").map(String::as_str) != Some("loaded") {
        return Err(OpsError::NotInstalled(app.into()));
    }
    let prefix = format!("{app}@");
    let mut instances: Vec<u32> = props
        .get("Wants")
        .map(|w| {
            w.split_whitespace()
                .filter_map(|u| u.strip_prefix(&prefix)?.strip_suffix(".service")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    instances.sort_unstable();
    Ok(instances)
}

/// Starts the socket and every enabled worker.
pub fn start(app: &str) -> Result<(), OpsError> {
    require_booted()?;
    enabled_instances(app)?;
    systemctl(&["start", &format!("{app}.socket"), &format!("{app}.target")])?;
    Ok(())
}

/// Stops the workers (each drains) and the socket.
pub fn stop(app: &str) -> Result<(), OpsError> {
    require_booted()?;
    systemctl(&["stop", &format!("{app}.target"), &format!("{app}.service"), &format!("{app}.socket")])?;
    Ok(())
}

/// Runs `n` instances from now on, and after reboots: records `n` in the app's TOML, starts
/// the missing instances (if the app runs) and stops the extra ones, and makes that last:
/// through the generator where it counts this app's workers, else by enabling and disabling
/// instances.
pub fn scale(app: &str, n: Instances) -> Result<(u32, u32), OpsError> {
    require_booted()?;
    let current = enabled_instances(app)?;
    let count = n.resolve();
    let add: Vec<String> = (1..=count).filter(|k| !current.contains(k)).map(|k| unit(app, k)).collect();
    let remove: Vec<String> = current.iter().filter(|&&k| k > count).map(|&k| unit(app, k)).collect();
    let running = systemctl(&["is-active", "--quiet", &format!("{app}.target")]).is_ok();
    persist_instances(app, n)?;
    let by_generator = generator::manages(app);
    if by_generator {
        systemctl(&["daemon-reload"])?; // the generator now wants `count` instances
    }
    let with = |verb: &'static str, now: bool, units: &[String]| -> Result<(), OpsError> {
        if units.is_empty() {
            return Ok(());
        }
        let mut args = vec![verb];
        if now {
            args.push("--now");
        }
        args.extend(units.iter().map(String::as_str));
        systemctl(&args)?;
        Ok(())
    };
    match (by_generator, running) {
        (true, true) => {
            with("start", false, &add)?;
            with("stop", false, &remove)?;
        }
        (true, false) => with("stop", false, &remove)?,
        (false, _) => {
            with("enable", running, &add)?;
            with("disable", true, &remove)?;
        }
    }
    Ok((current.len() as u32, count))
}

/// Writes `instances = N` into `/etc/sdcluster/APP.toml`, keeping its comments, if it exists.
fn persist_instances(app: &str, n: Instances) -> Result<(), OpsError> {
    let path = Path::new(CONFIG_DIR).join(format!("{app}.toml"));
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let fail = |e: String| OpsError::Persist(path.display().to_string(), e);
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| fail(e.to_string()))?;
    doc["instances"] = match n {
        Instances::Auto => toml_edit::value("auto"),
        Instances::Count(c) => toml_edit::value(i64::from(c)),
    };
    install::write_atomically(&path, doc.to_string().as_bytes()).map_err(|e| fail(e.to_string()))
}

/// Restarts the instances one at a time; `systemctl restart` of a `Type=notify` unit returns
/// once the new process sent `READY=1`, so the next one only goes when this one serves.
pub fn rolling_restart(app: &str, mut progress: impl FnMut(&str)) -> Result<usize, OpsError> {
    require_booted()?;
    let instances = enabled_instances(app)?;
    for &k in &instances {
        let name = unit(app, k);
        progress(&name);
        systemctl(&["restart", &name])?;
    }
    Ok(instances.len())
}

/// The status view from `systemctl show` of every enabled instance.
pub fn status(app: &str) -> Result<ClusterStatus, OpsError> {
    let instances = enabled_instances(app)?;
    let listen = show(&format!("{app}.socket"), &["Listen"])?
        .get("Listen")
        .map(|l| l.split(' ').filter(|w| !w.starts_with('(') && !w.is_empty()).map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    let now_us = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000);
    let mut out = Vec::new();
    for k in instances {
        let p = show(
            &unit(app, k),
            &[
                "MainPID",
                "ActiveState",
                "SubState",
                "NRestarts",
                "MemoryCurrent",
                "CPUUsageNSec",
                "StatusText",
                "ExecMainStartTimestampMonotonic",
            ],
        )?;
        let get = |key: &str| p.get(key).map(String::as_str).unwrap_or("");
        let number = |key: &str| get(key).parse::<u64>().ok().filter(|&v| v != u64::MAX);
        let pid = number("MainPID").filter(|&p| p > 0).map(|p| p as u32);
        let (rss, cpu) = pid.map_or((None, None), process_usage);
        let started = number("ExecMainStartTimestampMonotonic").filter(|&t| t > 0);
        out.push(InstanceStatus {
            instance: k.to_string(),
            pid,
            state: format!("{}/{}", get("ActiveState"), get("SubState")),
            uptime_secs: pid.and(started).map(|t| Duration::from_micros(now_us.saturating_sub(t)).as_secs_f64()),
            restarts: number("NRestarts").unwrap_or(0) as u32,
            memory_bytes: number("MemoryCurrent").or(rss),
            cpu_secs: number("CPUUsageNSec").map(|ns| ns as f64 / 1e9).or(cpu),
            status_text: get("StatusText").to_owned(),
        });
    }
    Ok(ClusterStatus { app: app.into(), supervisor: "systemd".into(), listen, instances: out })
}

/// `journalctl` for every unit of the app, replacing this process (so `-f` behaves).
pub fn logs(app: &str, follow: bool, lines: Option<u32>) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("journalctl");
    for u in
        [format!("{app}@*.service"), format!("{app}.socket"), format!("{app}-balance.socket"), format!("{app}.service")]
    {
        cmd.arg("-u").arg(u);
    }
    cmd.args(["-o", "short-precise"]);
    if follow {
        cmd.arg("-f");
    }
    if let Some(n) = lines {
        cmd.arg(format!("--lines={n}"));
    }
    cmd.exec()
}
