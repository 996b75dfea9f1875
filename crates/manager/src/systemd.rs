//! Operating an installed app through systemd: the verbs of `sdcluster` when systemd is the
//! supervisor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::time::{ClockId, clock_gettime};
use sdcluster_protocol::ListenAddress;
use sdcluster_protocol::metrics::MetricsTable;

use crate::generator;
use crate::install::{self, Change, InstallError};
use crate::spec::{CONFIG_DIR, Instances, Spec};
use crate::status::{ClusterStatus, Counters, InstanceStatus, LastExit, process_usage};
use crate::systemctl::{SystemctlError, UnitState, booted, jobs, list_units, listening, show, systemctl};
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
    /// A rolling restart stopped at an instance that did not come back ready.
    #[error(
        "{unit} did not come back ready after its restart (now {state}{why}); the rolling restart stopped there{left}: see `sdcluster status {app}` and `sdcluster logs {app}`"
    )]
    NotReady {
        /// The app.
        app: String,
        /// The instance that failed.
        unit: String,
        /// Its `ActiveState/SubState` afterwards.
        state: String,
        /// What `systemctl restart` said, if it failed (with a leading ": ").
        why: String,
        /// The instances left as they were, on the old version (with a leading phrase).
        left: String,
    },
    /// The release did not come up in the canary: no worker was restarted.
    #[error(transparent)]
    CanaryFailed(Box<CanaryFailed>),
}

/// A rolling restart's canary did not become ready: no worker was restarted.
#[derive(Debug, thiserror::Error)]
#[error(
    "the release does not start: {unit}, started beside the workers before any of them was restarted, did not become ready (now {state}{why}); no worker was restarted, {kept} keep serving: see `sdcluster logs {app}`"
)]
pub struct CanaryFailed {
    /// The app.
    pub app: String,
    /// The canary unit.
    pub unit: String,
    /// Its `ActiveState/SubState` before it was stopped.
    pub state: String,
    /// What `systemctl start` said, if it failed (with a leading ": ").
    pub why: String,
    /// The instances that keep their old processes.
    pub kept: String,
}

fn unit(app: &str, instance: u32) -> String {
    format!("{app}@{instance}.service")
}

/// The instance a rolling restart starts first, beside the others, to see that the new
/// release comes up at all before any worker is restarted: a worker that is restarted hands
/// its kept-alive connections to its next process, and a next process that never comes up
/// would leave them waiting.
pub const CANARY: u32 = 0;

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
        // Every instance systemd has, also those started by hand.
        let known = known_instances(app).unwrap_or_default();
        let instances = known.wanted.iter().chain(known.loaded.keys()).copied().collect::<BTreeSet<u32>>();
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

/// What systemd knows of an app's instances: the ones `APP.target` wants, and every one it
/// has loaded (also those started by hand, or wanted no more), by number.
#[derive(Debug, Default, Clone)]
pub struct Known {
    /// The instances `APP.target` wants.
    pub wanted: BTreeSet<u32>,
    /// Every loaded instance and its state.
    pub loaded: BTreeMap<u32, UnitState>,
}

impl Known {
    fn state(&self, k: u32) -> &str {
        self.loaded.get(&k).map_or("inactive", |u| u.active.as_str())
    }

    /// Instances with a process, or about to have one (crash loops included).
    pub fn running(&self) -> BTreeSet<u32> {
        self.loaded
            .keys()
            .copied()
            .filter(|&k| matches!(self.state(k), "active" | "activating" | "reloading"))
            .collect()
    }

    /// What `status` shows: the wanted ones whatever their state, and every other one that is
    /// not simply inactive (running, stopping, failed).
    pub fn shown(&self) -> BTreeSet<u32> {
        let mut all = self.wanted.clone();
        all.extend(self.loaded.keys().copied().filter(|&k| self.state(k) != "inactive"));
        all
    }

    /// What a rolling restart restarts: the wanted ones and every one that runs.
    pub fn restarted(&self) -> BTreeSet<u32> {
        let mut all = self.wanted.clone();
        all.extend(self.running());
        all
    }
}

/// The instances of `app` that systemd wants or has loaded
/// (`systemctl list-units --all 'APP@*.service'`), not only the count in its spec.
pub fn known_instances(app: &str) -> Result<Known, OpsError> {
    let wanted = enabled_instances(app)?.into_iter().collect();
    let prefix = format!("{app}@");
    let loaded = list_units(&format!("{app}@*.service"))?
        .into_iter()
        .filter_map(|u| Some((u.name.strip_prefix(&prefix)?.strip_suffix(".service")?.parse().ok()?, u)))
        .filter(|(k, _)| *k != CANARY)
        .collect();
    Ok(Known { wanted, loaded })
}

/// Starts the socket and every enabled worker.
pub fn start(app: &str) -> Result<(), OpsError> {
    require_booted()?;
    enabled_instances(app)?;
    let socket = format!("{app}.socket");
    // balance = reuseport has no APP.socket: each instance brings its APP@k.socket.
    let shared = show(&socket, &["LoadState"])?.get("LoadState").is_some_and(|s| s == "loaded");
    let target = format!("{app}.target");
    let units: Vec<&str> = if shared { vec![&socket, &target] } else { vec![&target] };
    let mut args = vec!["start"];
    args.extend(units);
    systemctl(&args)?;
    Ok(())
}

/// Stops the workers (each drains) and the socket.
pub fn stop(app: &str) -> Result<(), OpsError> {
    require_booted()?;
    systemctl(&["stop", &format!("{app}.target"), &format!("{app}.service"), &format!("{app}.socket")])?;
    Ok(())
}

/// Runs `n` instances from now on, and after reboots: records `n` in the app's TOML, starts
/// the missing instances (if the app runs) and stops every instance above `n` that systemd
/// has (wanted, or started by hand), and makes that last: through the generator where it
/// counts this app's workers, else by enabling and disabling instances. Returns how many
/// instances there were (wanted or running) and how many there are now.
pub fn scale(app: &str, n: Instances) -> Result<(u32, u32), OpsError> {
    require_booted()?;
    let known = known_instances(app)?;
    let running = known.running();
    let current: BTreeSet<u32> = known.wanted.union(&running).copied().collect();
    let count = n.resolve();
    let names = |ks: &mut dyn Iterator<Item = u32>| ks.map(|k| unit(app, k)).collect::<Vec<_>>();
    // New instances are started (start jobs); those above `count` are stopped (stop jobs, so
    // they close their connections instead of handing them over); the others are left alone.
    let start: Vec<String> = names(&mut (1..=count).filter(|k| !running.contains(k)));
    let enable: Vec<String> = names(&mut (1..=count).filter(|k| !known.wanted.contains(k)));
    let stop: Vec<String> = names(&mut current.iter().copied().filter(|&k| k > count));
    let disable: Vec<String> = names(&mut known.wanted.iter().copied().filter(|&k| k > count));
    let app_runs = !running.is_empty() || systemctl(&["is-active", "--quiet", &format!("{app}.target")]).is_ok();
    persist_instances(app, n)?;
    let by_generator = generator::manages(app);
    let with = |verb: &'static str, units: &[String]| -> Result<(), OpsError> {
        if units.is_empty() {
            return Ok(());
        }
        let mut args = vec![verb];
        args.extend(units.iter().map(String::as_str));
        systemctl(&args)?;
        Ok(())
    };
    if by_generator {
        systemctl(&["daemon-reload"])?; // the generator now wants `count` instances
    } else {
        with("enable", &enable)?;
        with("disable", &disable)?;
    }
    if app_runs {
        with("start", &start)?;
    }
    with("stop", &stop)?;
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

/// Restarts the instances one at a time, every one systemd wants or runs; `systemctl restart`
/// of a `Type=notify` unit returns once the new process sent `READY=1`, so the next one only
/// goes when this one serves. Restart jobs, not a stop and a start: the instance keeps its
/// fd store, through which its worker hands its kept-alive connections to the next process.
/// Stops at the first instance that is not active and running afterwards, and leaves the rest
/// as they were ([`OpsError::NotReady`]).
pub fn rolling_restart(app: &str, mut progress: impl FnMut(&str)) -> Result<usize, OpsError> {
    require_booted()?;
    let known = known_instances(app)?;
    let instances: Vec<u32> = known.restarted().into_iter().collect();
    try_canary(app, &instances, &mut progress)?;
    for (done, &k) in instances.iter().enumerate() {
        let name = unit(app, k);
        // A failed unit (bad input: not restarted by systemd) is started by its restart job.
        if known.state(k) == "failed" {
            progress(&format!("{name} (it had failed: starting it again)"));
        } else {
            progress(&name);
        }
        let restarted = systemctl(&["restart", &name]);
        let p = show(&name, &["ActiveState", "SubState"])?;
        let get = |key: &str| p.get(key).map(String::as_str).unwrap_or("");
        if restarted.is_err() || (get("ActiveState"), get("SubState")) != ("active", "running") {
            let rest: Vec<String> = instances[done + 1..].iter().map(|&k| unit(app, k)).collect();
            return Err(OpsError::NotReady {
                app: app.into(),
                unit: name,
                state: format!("{}/{}", get("ActiveState"), get("SubState")),
                why: match restarted {
                    Err(SystemctlError::Failed { stderr, .. }) => format!(": {}", stderr.lines().next().unwrap_or("")),
                    Err(e) => format!(": {e}"),
                    Ok(_) => String::new(),
                },
                left: match rest.len() {
                    0 => String::new(),
                    1 => format!(" and left {} on its old process", rest[0]),
                    _ => format!(" and left {} on their old processes", rest.join(", ")),
                },
            });
        }
    }
    Ok(instances.len())
}

/// Starts [`CANARY`] on the current release and stops it again; an error, with every
/// instance untouched, when it does not come up. In `balance = reuseport` mode there is no
/// canary: its own socket would reset the connections queued on it when it stops.
fn try_canary(app: &str, instances: &[u32], progress: &mut impl FnMut(&str)) -> Result<(), OpsError> {
    let shared = show(&format!("{app}.socket"), &["LoadState"])?.get("LoadState").is_some_and(|s| s == "loaded");
    if !shared || instances.is_empty() {
        return Ok(());
    }
    let canary = unit(app, CANARY);
    progress(&format!("{canary} (the new release, beside the running workers)"));
    let started = systemctl(&["start", &canary]);
    let p = show(&canary, &["ActiveState", "SubState"])?;
    let get = |key: &str| p.get(key).map(String::as_str).unwrap_or("").to_owned();
    let state = format!("{}/{}", get("ActiveState"), get("SubState"));
    // A stop, not a restart: the canary closes what it accepted gracefully, hands nothing over.
    let _ = systemctl(&["stop", &canary]);
    let _ = systemctl(&["reset-failed", &canary]);
    if started.is_ok() && state == "active/running" {
        return Ok(());
    }
    Err(OpsError::CanaryFailed(Box::new(CanaryFailed {
        app: app.into(),
        unit: canary,
        state,
        why: match started {
            Err(SystemctlError::Failed { stderr, .. }) => format!(": {}", stderr.lines().next().unwrap_or("")),
            Err(e) => format!(": {e}"),
            Ok(_) => String::new(),
        },
        kept: instances.iter().map(|&k| unit(app, k)).collect::<Vec<_>>().join(", "),
    })))
}

/// The status view from `systemctl show` of every instance systemd wants or has running.
pub fn status(app: &str) -> Result<ClusterStatus, OpsError> {
    let instances = known_instances(app)?.shown();
    let mut listen = listening(&format!("{app}.socket"))?;
    if listen.is_empty() {
        // balance = reuseport: a socket per instance, all on the same addresses.
        if let Some(k) = instances.first() {
            listen = listening(&format!("{app}@{k}.socket"))?;
        }
    }
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
                "ExecMainCode",
                "ExecMainStatus",
                "Result",
            ],
        )?;
        let get = |key: &str| p.get(key).map(String::as_str).unwrap_or("");
        let number = |key: &str| get(key).parse::<u64>().ok().filter(|&v| v != u64::MAX);
        let pid = number("MainPID").filter(|&p| p > 0).map(|p| p as u32);
        let (rss, cpu) = pid.map_or((None, None), process_usage);
        let started = number("ExecMainStartTimestampMonotonic").filter(|&t| t > 0);
        let last = last_exit(get("ExecMainCode"), get("ExecMainStatus"), get("Result"))
            .or_else(|| journal_last_exit(&unit(app, k)));
        out.push(InstanceStatus {
            instance: k.to_string(),
            pid,
            state: format!("{}/{}", get("ActiveState"), get("SubState")),
            uptime_secs: pid.and(started).map(|t| Duration::from_micros(now_us.saturating_sub(t)).as_secs_f64()),
            restarts: number("NRestarts").unwrap_or(0) as u32,
            memory_bytes: number("MemoryCurrent").or(rss),
            cpu_secs: number("CPUUsageNSec").map(|ns| ns as f64 / 1e9).or(cpu),
            status_text: get("StatusText").to_owned(),
            requests: None,
            request_rate: None,
            open_connections: None,
            failed: failed_for_good(get("ActiveState"), last.as_ref()),
            last_exit: last,
        });
    }
    let mut status = ClusterStatus { app: app.into(), supervisor: "systemd".into(), listen, instances: out };
    // Readable by anyone (the workers' RuntimeDirectoryMode); absent for other programs.
    let table = MetricsTable::open_existing(Path::new(&metrics_file(app))).ok();
    status.fill_counters(&Counters::of_table(table.as_ref()));
    Ok(status)
}

/// Why a unit stays down: it failed with exit status 2 (bad input), which the workers'
/// `RestartPreventExitStatus=` keeps from being restarted; the same words as under
/// `sdcluster run`.
fn failed_for_good(active: &str, last: Option<&LastExit>) -> Option<String> {
    let last = last.filter(|l| active == "failed" && l.is_bad_input())?;
    Some(last.not_restarted())
}

/// The metrics table the app's workers share under systemd.
pub fn metrics_file(app: &str) -> String {
    format!("/run/sdcluster/{app}/metrics")
}

/// The last exit from `ExecMainCode` (`CLD_EXITED` 1, `CLD_KILLED` 2, `CLD_DUMPED` 3),
/// `ExecMainStatus` (the status or the signal) and `Result` (`watchdog`, `timeout`, ...).
/// systemd resets them when it starts the next process: a restarted instance has none here
/// (see [`journal_last_exit`]).
fn last_exit(code: &str, status: &str, result: &str) -> Option<LastExit> {
    let kind = match code {
        "1" => "exited",
        "2" => "killed",
        "3" => "dumped",
        _ => return None,
    };
    Some(exit_of(kind, status.parse().ok()?)?.because(cause(result)))
}

/// An end as systemd words it: `exited`, `killed` or `dumped`, with the status or signal.
fn exit_of(kind: &str, status: i32) -> Option<LastExit> {
    let signal = || Signal::try_from(status).map_or_else(|_| format!("signal {status}"), |s| s.as_str().to_owned());
    Some(match kind {
        "exited" => LastExit::from_wait(Some(status), None, false),
        "killed" => LastExit::from_wait(None, Some(&signal()), false),
        "dumped" => LastExit::from_wait(None, Some(&signal()), true),
        _ => return None,
    })
}

/// A unit's `Result=` as a reason of its own, when it says more than the exit does.
fn cause(result: &str) -> Option<&str> {
    match result {
        "" | "success" | "exit-code" | "signal" | "core-dump" => None,
        other => Some(other),
    }
}

/// systemd's journal message about a unit's process exit (`EXIT_CODE=`, `EXIT_STATUS=`).
const PROCESS_EXIT_MESSAGE: &str = "98e322203f7a4ed290d09fe03c09fe15";
/// systemd's journal message about a unit's failure (`UNIT_RESULT=`).
const FAILURE_RESULT_MESSAGE: &str = "d9b373ed55a64feb8242e02dbe79a49c";
/// systemd's journal message about a unit's clean stop.
const SUCCESS_MESSAGE: &str = "7ad2d189f7e94e70a38c781354912448";

/// The last exit of `unit` from the journal, for an instance systemd started again: the
/// newest of its exit, failure and clean-stop messages. `None` when the journal is not
/// readable (a user outside the `systemd-journal` group) or says nothing.
fn journal_last_exit(unit: &str) -> Option<LastExit> {
    let unit_match = format!("UNIT={unit}");
    let ids = [PROCESS_EXIT_MESSAGE, FAILURE_RESULT_MESSAGE, SUCCESS_MESSAGE].map(|id| format!("MESSAGE_ID={id}"));
    let mut args = vec!["--no-pager", "--quiet", "--output=json", "--lines=3", &unit_match];
    args.extend(ids.iter().map(String::as_str));
    let out = crate::systemctl::run("journalctl", &args).ok()?;
    journal_exit(&out)
}

/// [`journal_last_exit`] of `journalctl -o json` lines, oldest first.
fn journal_exit(json_lines: &str) -> Option<LastExit> {
    let entries: Vec<serde_json::Value> = json_lines.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let field = |e: &serde_json::Value, name: &str| e.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let exit = |e: &serde_json::Value| exit_of(&field(e, "EXIT_CODE")?, field(e, "EXIT_STATUS")?.parse().ok()?);
    let newest = entries.last()?;
    match field(newest, "MESSAGE_ID")?.as_str() {
        SUCCESS_MESSAGE => Some(LastExit::from_wait(Some(0), None, false)),
        PROCESS_EXIT_MESSAGE => exit(newest),
        FAILURE_RESULT_MESSAGE => {
            let result = field(newest, "UNIT_RESULT").unwrap_or_default();
            let before = entries.iter().rev().nth(1);
            let before = before.filter(|e| field(e, "MESSAGE_ID").as_deref() == Some(PROCESS_EXIT_MESSAGE));
            match before.and_then(exit) {
                Some(e) => Some(e.because(cause(&result))),
                None => Some(LastExit { reason: result, code: None, signal: None, message: None }),
            }
        }
        _ => None,
    }
}

/// Job types after which the instance starts again at once, keeping its fd store: a
/// `systemctl restart`, or one propagated from the socket or the target (`PartOf=`).
const RESTART_JOBS: [&str; 2] = ["restart", "try-restart"];

/// What the stop hook found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// A restart job: the flag exists, the worker hands its connections over.
    Restarting(u32),
    /// A stop (or no job: the worker exited by itself): no flag, the worker closes its
    /// connections gracefully.
    Stopping,
    /// `--stopped`: the worker is gone, the flag too.
    Stopped,
}

/// The workers' `ExecStop=+` and `ExecStopPost=+` (`sdcluster stop-hook [--stopped] UNIT
/// FLAG`), run by systemd as root before it sends SIGTERM to the worker, and after the worker
/// exited: creates the hand-over flag when the job that stops `unit` is a restart, removes it
/// otherwise. The flag is readable by the workers (mode 0644 in directories of mode 0755),
/// whatever umask the unit gives its commands.
pub fn stop_hook(unit: &str, flag: &Path, stopped: bool) -> Result<Hook, OpsError> {
    let remove = |hook: Hook| match std::fs::remove_file(flag) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(InstallError::Io(flag.into(), e).into()),
        _ => Ok(hook),
    };
    if stopped {
        return remove(Hook::Stopped);
    }
    let jobs = jobs(unit).inspect_err(|_| {
        let _ = std::fs::remove_file(flag); // unsure: no hand-over
    })?;
    let job = jobs.into_iter().find(|j| j.unit == unit && RESTART_JOBS.contains(&j.kind.as_str()));
    let Some(job) = job else { return remove(Hook::Stopping) };
    create_flag(flag, job.id).map_err(|e| InstallError::Io(flag.into(), e))?;
    Ok(Hook::Restarting(job.id))
}

fn create_flag(flag: &Path, job: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let readable = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    if let Some(dir) = flag.parent() {
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        missing.reverse();
        for d in missing {
            match std::fs::create_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => readable(d, 0o755)?,
            }
        }
    }
    // Complete, and readable, before it appears under its name.
    let name = flag.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = flag.with_file_name(format!(".{name}.sdcluster-{}", std::process::id()));
    std::fs::write(&tmp, format!("restart job {job}\n"))?;
    readable(&tmp, 0o644)?;
    std::fs::rename(&tmp, flag).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(wanted: &[u32], loaded: &[(u32, &str)]) -> Known {
        let loaded = loaded
            .iter()
            .map(|&(k, active)| {
                let state = UnitState {
                    name: unit("app", k),
                    load: "loaded".into(),
                    active: active.into(),
                    sub: String::new(),
                };
                (k, state)
            })
            .collect();
        Known { wanted: wanted.iter().copied().collect(), loaded }
    }

    #[test]
    fn last_exits_read_from_systemctl_and_the_journal() {
        let shown = |code, status, result| last_exit(code, status, result).map(|e| e.to_string());
        assert_eq!(shown("0", "0", "success"), None, "no exit since the start");
        assert_eq!(shown("1", "3", "exit-code").as_deref(), Some("exited 3"));
        assert_eq!(shown("2", "9", "signal").as_deref(), Some("killed by SIGKILL"));
        assert_eq!(shown("3", "6", "watchdog").as_deref(), Some("watchdog"));
        // Exit status 2 is bad input: a failed unit is not restarted (RestartPreventExitStatus=2).
        let bad = last_exit("1", "2", "exit-code");
        assert_eq!(bad.as_ref().map(ToString::to_string).as_deref(), Some("exited 2 (bad input)"));
        assert_eq!(failed_for_good("failed", bad.as_ref()).as_deref(), Some("exited 2 (bad input), not restarted"));
        assert_eq!(failed_for_good("activating", bad.as_ref()), None, "restarting after all (older units)");
        assert_eq!(failed_for_good("failed", last_exit("1", "1", "exit-code").as_ref()), None);
        let entry = |id: &str, fields: &str| format!("{{\"MESSAGE_ID\":\"{id}\"{fields}}}");
        let exit = entry(PROCESS_EXIT_MESSAGE, ",\"EXIT_CODE\":\"dumped\",\"EXIT_STATUS\":\"6\"");
        let failed = entry(FAILURE_RESULT_MESSAGE, ",\"UNIT_RESULT\":\"watchdog\"");
        let watchdog = journal_exit(&format!("{exit}\n{failed}\n")).unwrap();
        assert_eq!((watchdog.to_string(), watchdog.signal.as_deref()), ("watchdog".into(), Some("SIGABRT")));
        let killed = entry(PROCESS_EXIT_MESSAGE, ",\"EXIT_CODE\":\"killed\",\"EXIT_STATUS\":\"9\"");
        assert_eq!(journal_exit(&killed).unwrap().to_string(), "killed by SIGKILL");
        let clean = format!("{failed}\n{}", entry(SUCCESS_MESSAGE, ""));
        assert_eq!(journal_exit(&clean).unwrap().to_string(), "exited 0");
        assert_eq!(journal_exit(""), None);
    }

    #[test]
    fn instances_started_by_hand_count_and_leftovers_do_not() {
        // The target wants 1 and 2; 3 and 4 were started by hand, 5 crash-loops, 6 failed,
        // 7 was stopped and is merely still loaded, 2 was stopped by hand.
        let k = known(
            &[1, 2],
            &[
                (1, "active"),
                (2, "inactive"),
                (3, "active"),
                (4, "reloading"),
                (5, "activating"),
                (6, "failed"),
                (7, "inactive"),
            ],
        );
        let list = |s: BTreeSet<u32>| s.into_iter().collect::<Vec<_>>();
        assert_eq!(list(k.running()), [1, 3, 4, 5]);
        assert_eq!(list(k.shown()), [1, 2, 3, 4, 5, 6]);
        assert_eq!(list(k.restarted()), [1, 2, 3, 4, 5]);
    }
}
