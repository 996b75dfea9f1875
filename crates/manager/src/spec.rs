//! One description of an app, from `/etc/sdcluster/APP.toml` or flags, that both supervisors
//! (systemd units and `sdcluster run`) obey, so the two run the same cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sdcluster_protocol::{ListenAddress, duration};
use serde::Deserialize;

/// Where `sdcluster` looks for `APP.toml` by default.
pub const CONFIG_DIR: &str = "/etc/sdcluster";
/// Longest app name: it also names the workers' shared user, `sdc-NAME`, and user names
/// should stay within 31 characters.
pub const MAX_NAME: usize = 27;
/// Listen addresses per app (each instance gets them all as fds).
pub const MAX_LISTEN: usize = 32;
/// More instances than this on one machine is a typo, not a plan.
pub const MAX_INSTANCES: u32 = 1024;
/// The longest argument or environment assignment the kernel passes to a program
/// (`MAX_ARG_STRLEN`, with its terminating NUL).
pub const MAX_ARG_STRLEN: usize = 128 * 1024;
/// The longest command line, all arguments together: quoted, it stays far below systemd's
/// longest unit line (1 MiB).
pub const MAX_COMMAND: usize = 128 * 1024;
/// The longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// The longest span a spec may give: more is a typo, and systemd's microseconds would
/// overflow well before `Duration` does.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A validated app description.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Unit-name-safe app name: units are `NAME.socket`, `NAME@.service`, `NAME.target`.
    pub name: String,
    /// The worker program (absolute path) and its arguments; any sd_listen_fds program.
    pub command: Vec<String>,
    /// Sockets the supervisor binds once and passes to every instance.
    pub listen: Vec<ListenAddress>,
    /// How many instances run.
    pub instances: Instances,
    /// Extra environment for the workers.
    pub environment: BTreeMap<String, String>,
    /// Delay before a dead worker is started again.
    pub restart_delay: Duration,
    /// Ceiling of the delay while a worker keeps crashing (the delay doubles per crash).
    pub restart_max_delay: Duration,
    /// A worker silent for this long is killed (SIGABRT) and restarted; `None` disables.
    pub watchdog: Option<Duration>,
    /// How long a stopping worker may drain before it is killed.
    pub stop_timeout: Duration,
    /// Memory cap per worker (systemd `MemoryMax=` syntax), if any.
    pub memory_max: Option<String>,
    /// How connections reach the workers.
    pub balance: Balance,
    /// Run as this user instead of a dynamic one.
    pub user: Option<String>,
    /// Let workers open network connections of their own (off: `PrivateNetwork=yes`).
    pub outbound_network: bool,
    /// Kept-alive connections one instance may hand to its next process on a restart
    /// (the size of its fd store, `FileDescriptorStoreMax=`); 0 turns hand-over off.
    pub handover_max: u32,
    /// When a started worker counts as ready.
    pub ready: Readiness,
    /// Let workers map memory writable and executable (a JIT: V8, HotSpot, LuaJIT);
    /// off: `MemoryDenyWriteExecute=yes`.
    pub jit: bool,
    /// A directory of the app's own that outlives restarts (`StateDirectory=`: a name under
    /// `/var/lib`), passed as `$STATE_DIRECTORY`.
    pub state_directory: Option<String>,
    /// Paths the workers may write despite `ProtectSystem=strict` (`ReadWritePaths=`).
    pub read_write_paths: Vec<PathBuf>,
    /// The workers' working directory (`WorkingDirectory=`); default `/`.
    pub working_directory: Option<PathBuf>,
    /// A file of `KEY=VALUE` lines read into the workers' environment at each start
    /// (`EnvironmentFile=`).
    pub environment_file: Option<PathBuf>,
    /// Secrets by name: the file each is read from at each start (`LoadCredential=NAME:PATH`),
    /// given to the workers in `$CREDENTIALS_DIRECTORY/NAME`.
    pub credentials: BTreeMap<String, PathBuf>,
    /// System calls (or `@groups`) the workers may make beyond the sandbox's filter
    /// (`SystemCallFilter=`): gunicorn's workers call `setuid()` with their own uid.
    pub system_calls: Vec<String>,
}

impl Spec {
    /// How long the reference worker may drain: inside the stop timeout, so that it exits
    /// by itself before it is killed.
    pub fn drain_timeout(&self) -> Duration {
        self.stop_timeout - (self.stop_timeout / 5).min(Duration::from_secs(5))
    }

    /// The environment every instance gets: the spec's, plus the instance name and the drain
    /// timeout in the variables the reference worker reads (other programs ignore them).
    pub fn worker_environment(&self, instance: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push((sdcluster_protocol::env::INSTANCE.into(), instance.into()));
        env.push((sdcluster_protocol::env::REQUIRE_SOCKET.into(), "1".into()));
        env.push((sdcluster_protocol::env::DRAIN_TIMEOUT.into(), duration::to_systemd(self.drain_timeout())));
        env.push((sdcluster_protocol::env::FDSTORE_MAX.into(), self.handover_max.to_string()));
        env
    }
}

/// `instances = "auto"` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// One per CPU this process may run on (affinity and cgroup quota honoured).
    Auto,
    /// Exactly this many.
    Count(u32),
}

impl Instances {
    /// The number this means on this machine now.
    pub fn resolve(self) -> u32 {
        match self {
            Self::Count(n) => n,
            Self::Auto => std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(MAX_INSTANCES),
        }
    }

    /// Parses `auto` or a count in 1..=MAX_INSTANCES.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        match text.parse::<i64>() {
            Ok(n) => Self::count(n),
            Err(_) => Err(SpecError::Invalid {
                key: "instances",
                reason: format!("{text:?} is neither \"auto\" nor a number"),
            }),
        }
    }

    fn count(n: i64) -> Result<Self, SpecError> {
        match u32::try_from(n) {
            Ok(n) if (1..=MAX_INSTANCES).contains(&n) => Ok(Self::Count(n)),
            _ if n < 1 => Err(SpecError::Invalid {
                key: "instances",
                reason: format!("{n} instances would serve nothing; use 1 or more, or \"auto\" for one per CPU"),
            }),
            _ => Err(SpecError::Invalid {
                key: "instances",
                reason: format!("{n} is more than {MAX_INSTANCES}; use \"auto\" for one per CPU"),
            }),
        }
    }
}

impl std::fmt::Display for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

/// When a started worker counts as ready (and a rolling restart moves on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// When it sends `READY=1` (`Type=notify`): the reference worker, gunicorn, any
    /// `sd_notify` program.
    #[default]
    Notify,
    /// As soon as its program was executed (`Type=exec`): for servers that don't speak
    /// `sd_notify` (Node, most Go and Java servers).
    Exec,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Readiness::Notify => "notify",
            Readiness::Exec => "exec",
        })
    }
}

/// How connections are spread across instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// One shared accept queue plus a balance table: even, and a restarting worker's
    /// connections go to the others.
    #[default]
    Shared,
    /// One `SO_REUSEPORT` socket per instance: the kernel spreads by hash; each instance
    /// has its own queue.
    Reuseport,
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::Shared => "shared",
            Balance::Reuseport => "reuseport",
        })
    }
}

/// What is wrong with an app description; nothing is written when there is one.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, or an unknown key (with line and column).
    #[error("{path}: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's message, which points at the line.
        message: String,
    },
    /// A value is out of its domain.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The key (or flag) at fault.
        key: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
}

/// Default fd store size per instance: every kept-alive connection of a busy worker.
pub const DEFAULT_HANDOVER_MAX: u32 = 4096;
/// Far more would only make systemd hold fds nobody takes over.
const MAX_HANDOVER: i64 = 65536;

fn invalid(key: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid { key, reason: reason.into() }
}

/// The file form; every key optional but `command`, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SpecFile {
    /// See [`Spec::name`]; defaults to the file's stem.
    pub name: Option<String>,
    /// A program and arguments: an array, or a string split at whitespace.
    pub command: Option<CommandLine>,
    /// Addresses (`127.0.0.1:8080`, `[::]:80`, `unix:/run/app.sock`); an IPv6 address
    /// serves IPv6 only, so list `*:80` and `[::]:80` for both.
    pub listen: Option<Vec<String>>,
    /// `"auto"` or a number.
    pub instances: Option<InstancesValue>,
    /// Extra environment.
    pub environment: Option<BTreeMap<String, String>>,
    /// A duration such as `100ms`.
    pub restart_delay: Option<String>,
    /// A duration such as `10s`.
    pub restart_max_delay: Option<String>,
    /// A duration, or `off`.
    pub watchdog: Option<String>,
    /// A duration.
    pub stop_timeout: Option<String>,
    /// `MemoryMax=` syntax: `512M`, `2G`, `50%`.
    pub memory_max: Option<String>,
    /// `shared` or `reuseport`.
    pub balance: Option<Balance>,
    /// A user name; default: a dynamic user.
    pub user: Option<String>,
    /// Whether workers may open connections of their own.
    pub outbound_network: Option<bool>,
    /// Connections an instance may hand to its next process on a restart; 0: off.
    pub handover_max: Option<i64>,
    /// `notify` or `exec`.
    pub ready: Option<Readiness>,
    /// Whether workers may JIT-compile (writable and executable memory).
    pub jit: Option<bool>,
    /// A directory name under `/var/lib`.
    pub state_directory: Option<String>,
    /// Absolute paths.
    pub read_write_paths: Option<Vec<String>>,
    /// An absolute path.
    pub working_directory: Option<String>,
    /// An absolute path.
    pub environment_file: Option<String>,
    /// `NAME = "/path/to/secret"`.
    pub credentials: Option<BTreeMap<String, String>>,
    /// System call names or `@groups`.
    pub system_calls: Option<Vec<String>>,
}

/// `command = "/usr/bin/app --flag"` or `command = ["/usr/bin/app", "--flag"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// Split at whitespace.
    Line(String),
    /// Taken as is.
    Argv(Vec<String>),
}

/// `instances = "auto"` or `instances = 4`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InstancesValue {
    /// A number.
    Count(i64),
    /// `"auto"` (or a number in quotes).
    Text(String),
}

impl SpecFile {
    /// Reads `path`; errors carry the file name and, for TOML, line and column.
    pub fn read(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.into(), source })?;
        let mut file: Self =
            toml::from_str(&text).map_err(|e| SpecError::Toml { path: path.into(), message: e.to_string() })?;
        if file.name.is_none() {
            file.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(file)
    }

    /// Checks every value and fills in the defaults.
    pub fn validate(self) -> Result<Spec, SpecError> {
        self.checked(true)
    }

    /// As [`SpecFile::validate`], but the worker program need not exist here: for rendering
    /// units on a machine other than the one that will run them (a package build).
    pub fn validate_elsewhere(self) -> Result<Spec, SpecError> {
        self.checked(false)
    }

    fn checked(self, program_here: bool) -> Result<Spec, SpecError> {
        let name =
            self.name.ok_or_else(|| invalid("name", "missing: give the app a name (--name or name = \"...\")"))?;
        check_name(&name)?;
        let command = match self.command {
            None => {
                return Err(invalid(
                    "command",
                    "missing: the worker program to run, e.g. command = \"/usr/bin/sdcluster-worker\"",
                ));
            }
            Some(CommandLine::Line(line)) => line.split_whitespace().map(str::to_owned).collect(),
            Some(CommandLine::Argv(argv)) => argv,
        };
        check_command(&command, program_here)?;
        let listen = self.listen.unwrap_or_else(|| vec!["127.0.0.1:8080".into()]);
        let listen = check_listen(&listen)?;
        let instances = match self.instances {
            None => Instances::Auto,
            Some(InstancesValue::Count(n)) => Instances::count(n)?,
            Some(InstancesValue::Text(t)) => Instances::parse(&t)?,
        };
        let environment = self.environment.unwrap_or_default();
        for (key, value) in &environment {
            let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(invalid("environment", format!("{key:?} is not a variable name (letters, digits, _)")));
            }
            if let Some(c) = value.chars().find(|c| c.is_control()) {
                return Err(invalid(
                    "environment",
                    format!(
                        "the value of {key} has a control character ({c:?}), which would end or split its \
                         Environment= line; put such values in an environment-file"
                    ),
                ));
            }
            if key.len() + 1 + value.len() >= MAX_ARG_STRLEN {
                return Err(invalid(
                    "environment",
                    format!("{key}={value:.20}... is longer than the {MAX_ARG_STRLEN} bytes the kernel passes"),
                ));
            }
        }
        // In whole microseconds, as systemd counts: both supervisors wait the same span.
        let span = |key: &'static str, value: Option<String>, default: &str| {
            let d = duration::parse(value.as_deref().unwrap_or(default)).map_err(|e| invalid(key, e))?;
            if d > MAX_DURATION {
                return Err(invalid(key, format!("{} is too long: at most 365 days", duration::to_systemd(d))));
            }
            Ok(Duration::from_micros(d.as_micros() as u64))
        };
        let restart_delay = span("restart-delay", self.restart_delay, "100ms")?;
        let restart_max_delay = span("restart-max-delay", self.restart_max_delay, "10s")?;
        if restart_max_delay < restart_delay {
            return Err(invalid("restart-max-delay", "it must not be shorter than restart-delay"));
        }
        let ready = self.ready.unwrap_or_default();
        // A watchdog is fed by WATCHDOG=1 messages, which only an sd_notify program sends.
        // Every zero span (0, 0s, 0ms, ...) is off, as WatchdogSec=0 is for systemd.
        let watchdog = match self.watchdog.as_deref().map(str::trim) {
            Some("off") => None,
            Some(w) => Some(span("watchdog", Some(w.to_owned()), "")?).filter(|d| !d.is_zero()),
            None if ready == Readiness::Exec => None,
            None => Some(span("watchdog", None, "10s")?),
        };
        let watchdog = match (watchdog, ready) {
            (Some(_), Readiness::Exec) => {
                let w = self.watchdog.as_deref().unwrap_or_default();
                return Err(invalid(
                    "watchdog",
                    format!(
                        "{w:?} with ready = \"exec\": a program that doesn't speak sd_notify sends no WATCHDOG=1, \
                         so every worker would be killed {w} after its start; set watchdog = \"off\" \
                         (--watchdog off), or ready = \"notify\" if the program sends READY=1 and WATCHDOG=1"
                    ),
                ));
            }
            (watchdog, _) => watchdog,
        };
        let stop_timeout = span("stop-timeout", self.stop_timeout, "30s")?;
        if stop_timeout < Duration::from_secs(1) {
            return Err(invalid("stop-timeout", "leave workers at least 1s to drain"));
        }
        if let Some(m) = &self.memory_max {
            check_memory(m)?;
        }
        if let Some(user) = &self.user {
            let valid = !user.is_empty()
                && user.len() <= 32
                && user.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                && !user.starts_with('-');
            if !valid {
                return Err(invalid("user", format!("{user:?} is not a user name")));
            }
        }
        let jit = self.jit.unwrap_or(false);
        if let Some(dir) = &self.state_directory {
            check_state_directory(dir)?;
        }
        let read_write_paths = self
            .read_write_paths
            .unwrap_or_default()
            .iter()
            .map(|p| check_unit_path("read-write-paths", p))
            .collect::<Result<Vec<_>, _>>()?;
        let working_directory =
            self.working_directory.as_deref().map(|p| check_unit_path("working-directory", p)).transpose()?;
        if let (Some(dir), true) = (&working_directory, program_here) {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(invalid("working-directory", format!("{} is not a directory", dir.display()))),
                Err(e) => {
                    return Err(invalid(
                        "working-directory",
                        format!("{}: {e} (create it first: the workers start in it)", dir.display()),
                    ));
                }
            }
        }
        let environment_file =
            self.environment_file.as_deref().map(|p| check_unit_path("environment-file", p)).transpose()?;
        let mut credentials = BTreeMap::new();
        for (name, path) in self.credentials.unwrap_or_default() {
            check_credential_name(&name)?;
            credentials.insert(name, check_unit_path("credentials", &path)?);
        }
        let mut system_calls = self.system_calls.unwrap_or_default();
        for call in &system_calls {
            check_system_call(call)?;
        }
        system_calls.sort();
        system_calls.dedup();
        Ok(Spec {
            system_calls,
            ready,
            jit,
            state_directory: self.state_directory,
            read_write_paths,
            working_directory,
            environment_file,
            credentials,
            name,
            command,
            listen,
            instances,
            environment,
            restart_delay,
            restart_max_delay,
            watchdog,
            stop_timeout,
            memory_max: self.memory_max,
            balance: self.balance.unwrap_or_default(),
            user: self.user,
            outbound_network: self.outbound_network.unwrap_or(false),
            handover_max: match self.handover_max {
                None => DEFAULT_HANDOVER_MAX,
                Some(n) if (0..=MAX_HANDOVER).contains(&n) => n as u32,
                Some(n) => {
                    return Err(invalid(
                        "handover-max",
                        format!("{n} is not a number of connections from 0 (hand-over off) to {MAX_HANDOVER}"),
                    ));
                }
            },
        })
    }
}

/// Unit-name rules (systemd.unit(5)), narrowed to what is safe in paths and shells.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !name.ends_with(".service")
        && !name.ends_with(".socket");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name",
            format!(
                "{name:?} can't name units: use 1-{MAX_NAME} letters, digits, '_', '.' or '-', starting with a letter or digit, without a unit suffix (no '@', spaces or '/')"
            ),
        ))
    }
}

fn check_command(command: &[String], program_here: bool) -> Result<(), SpecError> {
    let Some(program) = command.first() else { return Err(invalid("command", "it is empty")) };
    // ExecStart= quotes each argument, but a control character would end the line (\n, \r)
    // or mean something else to systemd; sdcluster run would pass it as it is.
    for arg in command {
        if arg.chars().any(char::is_control) {
            return Err(invalid(
                "command",
                format!(
                    "the argument {arg:?} has a control character (a newline, a tab?), which can't be written into \
                     ExecStart=; pass such values through the environment-file or a file the program reads"
                ),
            ));
        }
        if arg.len() >= MAX_ARG_STRLEN {
            return Err(invalid(
                "command",
                format!("the argument {arg:.20}... is longer than the {MAX_ARG_STRLEN} bytes the kernel passes"),
            ));
        }
    }
    let total: usize = command.iter().map(|a| a.len() + 1).sum();
    if total > MAX_COMMAND {
        return Err(invalid("command", format!("{total} bytes long; at most {MAX_COMMAND}")));
    }
    if program.contains('$') {
        return Err(invalid(
            "command",
            format!(
                "the program's path {program:?} has a '$': systemd expands variables in a command's arguments but \
                 not in its path, so no quoting makes both mean the same; use a path (a symlink) without it"
            ),
        ));
    }
    let path = Path::new(program);
    if !path.is_absolute() {
        return Err(invalid(
            "command",
            format!(
                "{program:?} is not an absolute path (systemd runs no $PATH search for you; try `command -v {program}`)"
            ),
        ));
    }
    if !program_here {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(invalid("command", format!("{program} is not an executable file"))),
        Err(e) => Err(invalid("command", format!("{program}: {e}"))),
    }
}

fn check_listen(listen: &[String]) -> Result<Vec<ListenAddress>, SpecError> {
    if listen.is_empty() {
        return Err(invalid("listen", "no address: give at least one, e.g. listen = [\"127.0.0.1:8080\"]"));
    }
    if listen.len() > MAX_LISTEN {
        return Err(invalid("listen", format!("{} addresses; at most {MAX_LISTEN} per app", listen.len())));
    }
    let mut out: Vec<ListenAddress> = Vec::new();
    for text in listen {
        let addr: ListenAddress =
            text.parse().map_err(|e: sdcluster_protocol::AddressError| invalid("listen", e.to_string()))?;
        if let ListenAddress::Unix(path) = &addr {
            // It goes into ListenStream= as it is (a % doubled): the rules of every unit path.
            let path = path.to_str().unwrap_or_default();
            check_unit_path("listen", path)?;
            if path == "/" {
                return Err(invalid("listen", "unix:/ is a directory, not a socket path"));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(invalid(
                    "listen",
                    format!(
                        "{text:?} is {} bytes long; a Unix socket path holds at most {MAX_UNIX_PATH} (108 with its \
                         terminating NUL)",
                        path.len()
                    ),
                ));
            }
        }
        if let ListenAddress::Tcp(std::net::SocketAddr::V6(a)) = &addr {
            // Found by fuzzing: systemd's ListenStream= refuses a scope ("Failed to parse
            // address value"), where sdcluster run would bind it.
            if a.scope_id() != 0 {
                return Err(invalid(
                    "listen",
                    format!("{text:?} has a scope (%{}), which systemd's ListenStream= refuses", a.scope_id()),
                ));
            }
        }
        if let ListenAddress::Tcp(a) = &addr {
            if a.port() == 0 {
                return Err(invalid(
                    "listen",
                    format!(
                        "{text}: port 0 would be a different random port for every bind; choose a port from 1 to 65535"
                    ),
                ));
            }
        }
        if out.contains(&addr) {
            return Err(invalid("listen", format!("{text} is listed twice")));
        }
        out.push(addr);
    }
    Ok(out)
}

/// `state-directory`: a name under `/var/lib` (`StateDirectory=`), possibly nested.
fn check_state_directory(dir: &str) -> Result<(), SpecError> {
    if dir.starts_with('/') {
        return Err(invalid(
            "state-directory",
            format!(
                "{dir:?} is absolute; give a name under /var/lib, e.g. state-directory = \"{}\" for /var/lib/{0} \
                 (for a directory elsewhere, use read-write-paths)",
                dir.rsplit('/').find(|p| !p.is_empty()).unwrap_or("app")
            ),
        ));
    }
    for part in dir.split('/') {
        let ok = !part.is_empty()
            && part != "."
            && part != ".."
            && part.len() <= 255
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            return Err(invalid(
                "state-directory",
                format!(
                    "{dir:?} is not a directory name under /var/lib: use parts of letters, digits, '.', '_' \
                     or '-' joined by '/', none of them empty, \".\" or \"..\" (e.g. \"web\" or \"web/cache\")"
                ),
            ));
        }
    }
    Ok(())
}

/// A path that goes into a unit line as it is (`ReadWritePaths=`, `WorkingDirectory=`,
/// `EnvironmentFile=`, `LoadCredential=`): absolute, normalized, and with nothing systemd
/// would split at or unquote, since sdcluster refuses such a path rather than quote it. A `%`
/// is fine: it is written as `%%`, so that systemd does not take it for a specifier.
pub fn check_unit_path(key: &'static str, path: &str) -> Result<PathBuf, SpecError> {
    let wrong = |what: &str| invalid(key, format!("{path:?} {what}"));
    if !path.starts_with('/') {
        return Err(wrong("is not an absolute path: give the whole path, from / (e.g. /srv/web/data)"));
    }
    if path.chars().any(char::is_control) {
        return Err(wrong("has a control character (a newline, a tab?)"));
    }
    if path.chars().any(char::is_whitespace) {
        return Err(wrong(
            "has whitespace, where systemd would split the unit line; use a path without spaces (a symlink to it)",
        ));
    }
    if path.contains(['"', '\'', '\\']) {
        return Err(wrong("has a quote or a backslash, which systemd would unquote; use a path without them"));
    }
    if path.len() > 4095 {
        return Err(wrong("is longer than PATH_MAX"));
    }
    if path != "/" {
        for part in path[1..].split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(wrong(
                    "is not normalized: write it without \".\", \"..\", \"//\" or a trailing '/' (e.g. /srv/app)",
                ));
            }
            if part.len() > 255 {
                return Err(wrong("has a component longer than 255 bytes"));
            }
        }
    }
    Ok(PathBuf::from(path))
}

/// Credential names (`LoadCredential=NAME:PATH`, file names in `$CREDENTIALS_DIRECTORY`).
fn check_credential_name(name: &str) -> Result<(), SpecError> {
    let ok = (1..=255).contains(&name.len())
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "credentials",
            format!(
                "{name:?} can't name a credential (a file in $CREDENTIALS_DIRECTORY): use 1-255 letters, digits, \
                 '_', '.' or '-', not \".\" or \"..\", e.g. credentials = {{ db-password = \"/etc/web/db-password\" }}"
            ),
        ))
    }
}

/// A system call name (`setuid`) or a group (`@chown`), as `SystemCallFilter=` takes them.
fn check_system_call(call: &str) -> Result<(), SpecError> {
    let name = call.strip_prefix('@').unwrap_or(call);
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "system-calls",
            format!(
                "{call:?} is not a system call or @group (lowercase letters, digits, '_'; `systemd-analyze syscall-filter` lists them), e.g. system-calls = [\"setuid\"]"
            ),
        ))
    }
}

/// `MemoryMax=` as systemd reads it: bytes with an optional K, M, G or T (powers of 1024)
/// that fit in 64 bits, a percentage of the machine's memory up to 100%, or `infinity`.
fn check_memory(m: &str) -> Result<(), SpecError> {
    let digits = m.trim_end_matches(['K', 'M', 'G', 'T', '%']);
    let suffix = &m[digits.len()..];
    let number = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten();
    let ok = m == "infinity"
        || match (number, suffix) {
            (Some(n), "") => n < u64::MAX,
            (Some(n), "%") => n <= 100,
            (Some(n), "K" | "M" | "G" | "T") => {
                let shift = 10 * (1 + "KMGT".find(suffix).unwrap_or(0) as u32);
                n.checked_mul(1 << shift).is_some_and(|b| b < u64::MAX)
            }
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err(invalid("memory-max", format!("{m:?} is not a size (512M, 2G, 50%, infinity) that fits in 64 bits")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Spec, SpecError> {
        let file: SpecFile =
            toml::from_str(text).map_err(|e| SpecError::Toml { path: "t.toml".into(), message: e.to_string() })?;
        file.validate()
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let spec = from_toml("name = \"web\"\ncommand = \"/bin/sh -c true\"").unwrap();
        assert_eq!(spec.command, ["/bin/sh", "-c", "true"]);
        assert_eq!(spec.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(spec.instances, Instances::Auto);
        assert_eq!(spec.restart_delay, Duration::from_millis(100));
        assert_eq!(spec.watchdog, Some(Duration::from_secs(10)));
        assert_eq!(spec.balance, Balance::Shared);
        assert!(!spec.outbound_network);
    }

    #[test]
    fn unknown_keys_are_refused_with_a_line_number() {
        let err = from_toml("name = \"web\"\ncommand = \"/bin/sh\"\ninstance = 3\n").unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("unknown field `instance`"), "{err}");
    }

    #[test]
    fn syntax_errors_have_line_numbers() {
        let err = from_toml("name = \"web\"\ncommand = [\"/bin/sh\"\n").unwrap_err().to_string();
        assert!(err.contains("line 2") || err.contains("line 3"), "{err}");
    }

    #[test]
    fn instance_counts() {
        assert_eq!(Instances::parse("auto").unwrap(), Instances::Auto);
        assert_eq!(Instances::parse("4").unwrap(), Instances::Count(4));
        assert!(Instances::parse("0").unwrap_err().to_string().contains("would serve nothing"));
        assert!(Instances::parse("-3").unwrap_err().to_string().contains("would serve nothing"));
        assert!(Instances::parse("5000").unwrap_err().to_string().contains("more than 1024"));
        assert!(Instances::parse("many").unwrap_err().to_string().contains("neither"));
        assert!(Instances::Auto.resolve() >= 1);
    }

    #[test]
    fn names_follow_unit_rules() {
        for good in ["app", "my-app_2", "api.v2"] {
            check_name(good).unwrap();
        }
        check_name(&"x".repeat(MAX_NAME)).unwrap();
        for bad in ["", "a@b", "a b", "../x", "-x", "app.service", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        // The message says the limit the check applies.
        let message = check_name(&"x".repeat(MAX_NAME + 1)).unwrap_err().to_string();
        assert!(message.contains(&format!("1-{MAX_NAME} letters")), "{message}");
    }

    #[test]
    fn commands_must_be_absolute_and_exist() {
        let err = |c: &str| from_toml(&format!("name = \"a\"\ncommand = \"{c}\"")).unwrap_err().to_string();
        assert!(err("sdcluster-worker").contains("not an absolute path"));
        assert!(err("/no/such/worker").contains("No such file"));
        let elsewhere: SpecFile = toml::from_str("name = \"a\"\ncommand = \"/no/such/worker\"").unwrap();
        assert_eq!(elsewhere.validate_elsewhere().unwrap().command, ["/no/such/worker"]);
        let plain = std::env::temp_dir().join(format!("sdcluster-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        assert!(err(&plain.display().to_string()).contains("not an executable"));
        std::fs::remove_file(plain).unwrap();
    }

    #[test]
    fn listen_addresses_are_checked() {
        let err = |l: &str| {
            from_toml(&format!("name = \"a\"\ncommand = \"/bin/sh\"\nlisten = [{l}]")).unwrap_err().to_string()
        };
        assert!(err("\"127.0.0.1:0\"").contains("port 0"));
        assert!(err("\"127.0.0.1:70000\"").contains("0 to 65535"));
        assert!(err("\"1.2.3.4:80\", \"1.2.3.4:80\"").contains("twice"));
        assert!(err("").contains("no address"));
        let ok =
            from_toml("name = \"a\"\ncommand = \"/bin/sh\"\nlisten = [\"[::]:80\", \"unix:/run/a.sock\"]").unwrap();
        assert_eq!(ok.listen.len(), 2);
    }

    #[test]
    fn system_calls_are_names_or_groups() {
        let with = |calls: &str| from_toml(&format!("name = \"a\"\ncommand = \"/bin/sh\"\nsystem-calls = [{calls}]"));
        assert_eq!(with("\"setuid\", \"@chown\", \"setuid\"").unwrap().system_calls, ["@chown", "setuid"]);
        for bad in ["\"\"", "\"SetUID\"", "\"setuid setgid\"", "\"~setuid\"", "\"setuid\\nExecStartPre=/bin/x\""] {
            let message = with(bad).unwrap_err().to_string();
            assert!(message.starts_with("invalid system-calls: "), "{bad}: {message}");
        }
    }

    #[test]
    fn other_values_are_checked() {
        let err = |kv: &str| from_toml(&format!("name = \"a\"\ncommand = \"/bin/sh\"\n{kv}")).unwrap_err().to_string();
        assert!(err("restart-delay = \"soon\"").contains("invalid restart-delay"));
        assert!(err("restart-delay = \"20s\"").contains("restart-max-delay"));
        assert!(err("stop-timeout = \"10ms\"").contains("at least 1s"));
        assert!(err("memory-max = \"lots\"").contains("not a size"));
        assert!(err("environment = { \"A B\" = \"x\" }").contains("not a variable name"));
        assert!(err("user = \"-root\"").contains("not a user name"));
        assert!(err("balance = \"random\"").contains("unknown variant"));
        assert_eq!(from_toml("name = \"a\"\ncommand = \"/bin/sh\"\nwatchdog = \"off\"").unwrap().watchdog, None);
    }

    fn with(kv: &str) -> Result<Spec, SpecError> {
        from_toml(&format!("name = \"a\"\ncommand = \"/bin/sh\"\n{kv}"))
    }

    #[test]
    fn exec_readiness_has_no_watchdog() {
        assert_eq!(with("").unwrap().ready, Readiness::Notify);
        let exec = with("ready = \"exec\"").unwrap();
        assert_eq!((exec.ready, exec.watchdog), (Readiness::Exec, None));
        assert_eq!(with("ready = \"exec\"\nwatchdog = \"off\"").unwrap().watchdog, None);
        let err = with("ready = \"exec\"\nwatchdog = \"10s\"").unwrap_err().to_string();
        assert!(err.starts_with("invalid watchdog") && err.contains("set watchdog = \"off\""), "{err}");
        assert!(err.contains("ready = \"notify\""), "{err}");
        // A bad duration is reported as such, whatever the readiness.
        assert!(!with("ready = \"exec\"\nwatchdog = \"soon\"").unwrap_err().to_string().contains("sd_notify"));
        let notify = with("ready = \"notify\"\nwatchdog = \"5s\"").unwrap();
        assert_eq!(notify.watchdog, Some(Duration::from_secs(5)));
        assert!(with("ready = \"sometimes\"").unwrap_err().to_string().contains("unknown variant"));
    }

    #[test]
    fn state_directories_are_names_under_var_lib() {
        for good in ["web", "web/cache", "my_app-2.0", ".hidden"] {
            let spec = with(&format!("state-directory = \"{good}\"")).unwrap();
            assert_eq!(spec.state_directory.as_deref(), Some(good));
        }
        assert_eq!(with("").unwrap().state_directory, None);
        let err = |dir: &str| with(&format!("state-directory = \"{dir}\"")).unwrap_err().to_string();
        let absolute = err("/var/lib/web");
        assert!(absolute.starts_with("invalid state-directory") && absolute.contains("state-directory = \"web\""));
        assert!(absolute.contains("read-write-paths"), "{absolute}");
        for bad in ["", ".", "..", "web/..", "../web", "web//cache", "web/", "a b", "web%i", "wéb", "a:b"] {
            let message = err(bad);
            assert!(message.contains("not a directory name under /var/lib"), "{bad:?}: {message}");
        }
    }

    #[test]
    fn paths_for_unit_lines_are_absolute_normalized_and_unquoted() {
        for good in ["/", "/srv/web", "/srv/web-2.0/data_x", "/srv/100%"] {
            assert_eq!(check_unit_path("k", good).unwrap(), Path::new(good));
        }
        let err = |p: &str| check_unit_path("read-write-paths", p).unwrap_err().to_string();
        assert!(err("srv/web").contains("not an absolute path"));
        assert!(err("").contains("not an absolute path"));
        assert!(err("/srv/a b").contains("whitespace"));
        assert!(err("/srv/a\u{a0}b").contains("whitespace"));
        assert!(err("/srv/a\nb").contains("control character"));
        assert!(err("/srv/a\tb").contains("control character"));
        assert!(err("/srv/\"web\"").contains("quote"));
        assert!(err("/srv/it's").contains("quote"));
        assert!(err("/srv/a\\x20b").contains("backslash"));
        for bad in ["/srv/../etc", "/srv/./web", "/srv//web", "/srv/web/", "/.."] {
            assert!(err(bad).contains("not normalized"), "{bad:?}");
        }
        assert!(err(&format!("/{}", "x".repeat(256))).contains("longer than 255"));
        // Every key names itself.
        for key in ["read-write-paths = [\"srv\"]", "working-directory = \"srv\"", "environment-file = \"srv\""] {
            let name = key.split(' ').next().unwrap();
            let message = with(key).unwrap_err().to_string();
            assert!(message.starts_with(&format!("invalid {name}: ")), "{message}");
        }
        let message = with("credentials = { db = \"db.key\" }").unwrap_err().to_string();
        assert!(message.starts_with("invalid credentials: \"db.key\" is not an absolute path"), "{message}");
        let spec = with(
            "read-write-paths = [\"/srv/a\", \"/srv/b\"]\nenvironment-file = \"/etc/a.env\"\n\
             credentials = { db = \"/etc/a/db\", \"tls.key\" = \"/etc/a/key\" }",
        )
        .unwrap();
        assert_eq!(spec.read_write_paths, [Path::new("/srv/a"), Path::new("/srv/b")]);
        assert_eq!(spec.environment_file.as_deref(), Some(Path::new("/etc/a.env")));
        assert_eq!(spec.credentials["tls.key"], Path::new("/etc/a/key"));
    }

    #[test]
    fn the_working_directory_must_exist_where_the_program_runs() {
        let dir = std::env::temp_dir();
        let spec = with(&format!("working-directory = \"{}\"", dir.display())).unwrap();
        assert_eq!(spec.working_directory.as_deref(), Some(dir.as_path()));
        let missing = "working-directory = \"/no/such/dir\"";
        let message = with(missing).unwrap_err().to_string();
        assert!(message.starts_with("invalid working-directory: /no/such/dir: No such file"), "{message}");
        assert!(message.contains("create it"), "{message}");
        let elsewhere: SpecFile = toml::from_str(&format!("name = \"a\"\ncommand = \"/bin/sh\"\n{missing}")).unwrap();
        assert_eq!(
            elsewhere.validate_elsewhere().unwrap().working_directory.as_deref(),
            Some(Path::new("/no/such/dir"))
        );
        let message = with("working-directory = \"/bin/sh\"").unwrap_err().to_string();
        assert!(message.contains("/bin/sh is not a directory"), "{message}");
    }

    #[test]
    fn credential_names_are_file_names() {
        let cred = |name: &str| with(&format!("credentials = {{ \"{name}\" = \"/etc/a/secret\" }}"));
        for good in ["db", "db-password", "tls.key", "A_1", &"x".repeat(255)] {
            assert_eq!(cred(good).unwrap().credentials[good], Path::new("/etc/a/secret"));
        }
        for bad in ["", ".", "..", "a:b", "a/b", "a b", "%n", &"x".repeat(256)] {
            let message = cred(bad).unwrap_err().to_string();
            assert!(message.starts_with("invalid credentials: ") && message.contains("1-255 letters"), "{bad:?}");
        }
    }

    /// Every value reaches a unit line; a control character there ends the line (systemd
    /// reads `\n`, `\r` and NUL as line ends) and the rest becomes a directive of its own,
    /// run by systemd as root. Refused, whatever the key.
    #[test]
    fn values_that_would_start_a_unit_line_are_refused() {
        let message =
            with(r#"listen = ["unix:/run/x.sock\nExecStartPre=/bin/touch /root/PWNED"]"#).unwrap_err().to_string();
        assert!(message.starts_with("invalid listen: ") && message.contains("control character"), "{message}");
        for bad in [r"unix:/run/a\rb.sock", r"unix:/run/a\tb.sock", r"unix:/run/a\u001bb", r"unix:/run/a\u0000b"] {
            let message = with(&format!("listen = [\"{bad}\"]")).unwrap_err().to_string();
            assert!(message.contains("control character"), "{bad}: {message}");
        }
        for (bad, why) in [
            ("unix:/run/a b.sock", "whitespace"),
            (r#"unix:/run/\"a\".sock"#, "quote"),
            ("unix:/run/../x.sock", "not normalized"),
            ("unix:/run/", "not normalized"),
        ] {
            let message = with(&format!("listen = [\"{bad}\"]")).unwrap_err().to_string();
            assert!(message.starts_with("invalid listen: ") && message.contains(why), "{bad}: {message}");
        }
        // sun_path holds 108 bytes with the terminating NUL.
        let long = format!("/run/{}", "x".repeat(102));
        assert_eq!(long.len(), 107);
        with(&format!("listen = [\"unix:{long}\"]")).unwrap();
        let message = with(&format!("listen = [\"unix:{long}x\"]")).unwrap_err().to_string();
        assert!(message.contains("108"), "{message}");
        // A % is fine: it is written as %%.
        with("listen = [\"unix:/run/100%.sock\"]").unwrap();
        // Found by the render corpus test: systemd refuses an IPv6 scope in ListenStream=.
        let message = with("listen = [\"[fe80::1%2]:80\"]").unwrap_err().to_string();
        assert!(message.contains("scope"), "{message}");

        for bad in [r"\r", r"\n", r"\t", r"\u0000", r"\u001b", r"\u007f", r"\u0085"] {
            let command = format!("command = [\"/bin/sh\", \"-c\", \"true{bad}ExecStartPre=/bin/false\"]");
            let message = from_toml(&format!("name = \"a\"\n{command}")).unwrap_err().to_string();
            assert!(
                message.starts_with("invalid command: ") && message.contains("control character"),
                "{bad}: {message}"
            );
            let env = format!("environment = {{ A = \"x{bad}y\" }}");
            let message = with(&env).unwrap_err().to_string();
            assert!(message.starts_with("invalid environment: ") && message.contains("control character"), "{message}");
        }
        // systemd runs the program's path as written, without $ expansion, but expands its
        // arguments: a $ in the path could not be written so that both agree.
        let message = from_toml("name = \"a\"\ncommand = \"/opt/a$b/w\"").unwrap_err().to_string();
        assert!(message.starts_with("invalid command: ") && message.contains('$'), "{message}");
        // Arguments and values longer than the kernel passes to a program (MAX_ARG_STRLEN).
        let long = "x".repeat(128 * 1024);
        let message = with(&format!("environment = {{ A = \"{long}\" }}")).unwrap_err().to_string();
        assert!(message.contains("longer than"), "{message}");
        let message = from_toml(&format!("name = \"a\"\ncommand = [\"/bin/sh\", \"{long}\"]")).unwrap_err().to_string();
        assert!(message.contains("longer than"), "{message}");
        // What stays allowed: spaces, quotes, $, % and backslashes in arguments and values.
        let spec = from_toml(
            r#"name = "a"
               command = ["/bin/sh", "-c", "echo \"$HOME\" 100% a\\b"]
               environment = { A = "a$b", B = "100%", C = 'x"y', D = 'back\slash', E = "two words", F = "" }"#,
        )
        .unwrap();
        assert_eq!(spec.environment["D"], "back\\slash");
    }

    #[test]
    fn every_zero_watchdog_is_off() {
        // systemd reads WatchdogSec=0 (in any unit) as off; so does sdcluster run.
        for zero in ["0", "0s", "0ms", "0us", "0.0s", "0min", "0h", "000", " 0ms ", "0.0000001s"] {
            assert_eq!(with(&format!("watchdog = \"{zero}\"")).unwrap().watchdog, None, "{zero:?}");
            let exec = with(&format!("ready = \"exec\"\nwatchdog = \"{zero}\""));
            assert_eq!(exec.unwrap().watchdog, None, "{zero:?} with ready = \"exec\"");
        }
        assert_eq!(with("watchdog = \"1ms\"").unwrap().watchdog, Some(Duration::from_millis(1)));
    }

    #[test]
    fn durations_are_what_systemd_reads() {
        // systemd counts in microseconds: a spec means the same span to both supervisors.
        assert_eq!(with("watchdog = \"0.29ms\"").unwrap().watchdog, Some(Duration::from_micros(290)));
        assert_eq!(with("watchdog = \"1.0000009s\"").unwrap().watchdog, Some(Duration::from_micros(1_000_000)));
        // Beyond what a unit can say (systemd's microseconds overflow), or any sane delay.
        for key in ["restart-delay", "restart-max-delay", "watchdog", "stop-timeout"] {
            let message = with(&format!("{key} = \"100000000000000000s\"")).unwrap_err().to_string();
            assert!(message.starts_with(&format!("invalid {key}: ")) && message.contains("at most"), "{message}");
        }
    }

    #[test]
    fn memory_sizes_are_what_systemd_reads() {
        for good in ["512M", "2G", "1T", "100%", "0", "infinity", "1024", "16K"] {
            with(&format!("memory-max = \"{good}\"")).unwrap();
        }
        for bad in ["lots", "", "M", "101%", "99999999999999999999", "99999999999T", "1.5G", "-1M"] {
            let message = with(&format!("memory-max = \"{bad}\"")).unwrap_err().to_string();
            assert!(message.starts_with("invalid memory-max: "), "{bad}: {message}");
        }
    }
}
