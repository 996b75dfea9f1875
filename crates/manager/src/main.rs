//! The `sdcluster` command: a thin layer over the library, errors with context at the edge.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sdcluster::spec::{Balance, CONFIG_DIR, CommandLine, Instances, InstancesValue, Spec, SpecFile, check_name};
use sdcluster::supervisor::Supervisor;
use sdcluster::{control, generator, install, systemctl, systemd, units};

/// Run a network service on every CPU: one worker process per CPU sharing one port.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the units for an app (or write them into --output DIR).
    Generate {
        #[command(flatten)]
        spec: SpecArgs,
        /// Write the unit files into this directory instead of printing them.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Write the units into /etc/systemd/system, reload systemd and enable them.
    Install {
        #[command(flatten)]
        spec: SpecArgs,
        /// Replace unit files that were edited since sdcluster wrote them.
        #[arg(long)]
        force: bool,
        /// Also start the app.
        #[arg(long)]
        now: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Stop and disable the app and remove its unit files.
    Uninstall {
        /// The app.
        app: String,
        /// Remove unit files even if they were edited.
        #[arg(long)]
        force: bool,
        /// Operate on this root instead of / (no systemctl calls but offline ones).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Start the socket and every enabled worker.
    Start {
        /// The app.
        app: String,
    },
    /// Stop the workers (each drains its requests) and the socket.
    Stop {
        /// The app.
        app: String,
    },
    /// Supervise the workers here, without systemd (laptops, containers, CI).
    Run(SpecArgs),
    /// Show every instance: pid, state, uptime, restarts, memory, CPU, requests, request
    /// rate, open connections, last exit, status line.
    Status {
        /// The app.
        app: String,
        /// Print JSON instead of a table (one sample: no request rate).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh the table in place until Ctrl-C (one table per interval when stdout is
        /// not a terminal).
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes (500ms, 1s, 2s).
        #[arg(long, default_value = "1s", value_parser = sdcluster_protocol::duration::parse, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Restart the instances one at a time, each after the previous one is ready again.
    Restart {
        /// The app.
        app: String,
        /// One at a time, waiting for READY=1 (the only way sdcluster restarts).
        #[arg(long, required = true)]
        rolling: bool,
    },
    /// Change the number of instances, live and for good.
    Scale {
        /// The app.
        app: String,
        /// A count, or "auto" for one per CPU.
        instances: String,
    },
    /// The workers' ExecStop=+ and ExecStopPost=+: creates the hand-over flag FLAG when the
    /// job stopping UNIT is a restart, removes it otherwise (and always with --stopped).
    #[command(hide = true)]
    StopHook {
        /// After the worker stopped: remove the flag.
        #[arg(long)]
        stopped: bool,
        /// The instance (%n).
        unit: String,
        /// Its hand-over flag file.
        flag: PathBuf,
    },
    /// systemd generator entry point (systemd.generator(7)); installed by the package.
    #[command(hide = true)]
    SystemdGenerator {
        /// The "normal" output directory.
        normal: PathBuf,
        /// The "early" and "late" directories (unused).
        rest: Vec<PathBuf>,
    },
    /// Write the man pages into DIR (`assets man DIR`), or print a shell's completions
    /// (`assets bash|zsh|fish`), for packaging.
    #[command(hide = true)]
    Assets {
        /// man, bash, zsh or fish.
        #[arg(value_parser = sdcluster_assets::parse_asset)]
        kind: sdcluster_assets::Asset,
        /// Where sdcluster.1 and sdcluster-VERB.1 go.
        #[arg(required_if_eq("kind", "man"))]
        dir: Option<PathBuf>,
    },
    /// Show the logs of every unit of the app, interleaved, each line starting with its
    /// instance (APP@2) or unit (APP.socket): journalctl -u for APP.socket, APP.service,
    /// APP@*.socket, APP@*.service and APP.target.
    Logs {
        /// The app.
        app: String,
        /// Keep printing new entries.
        #[arg(long, short)]
        follow: bool,
        /// How many recent entries to show.
        #[arg(long, short = 'n')]
        lines: Option<u32>,
    },
}

/// Which systemd and which root the units are for.
#[derive(Args)]
struct TargetArgs {
    /// Render for this systemd version (default: the installed one).
    #[arg(long)]
    systemd_version: Option<u32>,
    /// Install under this root instead of / (offline: nothing is started).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The sdcluster program the workers' stop hook runs (default: this one).
    #[arg(long, value_name = "PATH")]
    sdcluster_path: Option<PathBuf>,
}

impl TargetArgs {
    fn version(&self) -> Result<u32> {
        match self.systemd_version {
            Some(v) => Ok(v),
            None => Ok(systemctl::version().context("cannot tell the systemd version; pass --systemd-version")?),
        }
    }

    fn sdcluster(&self) -> Result<PathBuf> {
        match &self.sdcluster_path {
            Some(path) => Ok(path.clone()),
            None => std::env::current_exe().context("cannot find this program's path; pass --sdcluster-path"),
        }
    }
}

/// An app description: APP.toml and/or flags (flags win).
#[derive(Args)]
struct SpecArgs {
    /// APP.toml, or the name of an app in /etc/sdcluster.
    config: Option<String>,
    /// App name (default: the config file's name, or "app"): 1-27 letters, digits, '_', '.'
    /// or '-', starting with a letter or digit (its units are APP.socket, APP@N.service, ...,
    /// its workers' user sdc-APP).
    #[arg(long)]
    name: Option<String>,
    /// Listen address, repeatable: HOST:PORT, [V6]:PORT, *:PORT, unix:/PATH.
    #[arg(long)]
    listen: Vec<String>,
    /// Instance count, or "auto" for one per CPU.
    #[arg(long)]
    instances: Option<String>,
    /// Extra environment for the workers, KEY=VALUE, repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    environment: Vec<String>,
    /// Delay before a dead worker is restarted (e.g. 100ms).
    #[arg(long)]
    restart_delay: Option<String>,
    /// Longest crash-loop backoff (e.g. 10s).
    #[arg(long)]
    restart_max_delay: Option<String>,
    /// Watchdog timeout (e.g. 10s, or off).
    #[arg(long)]
    watchdog: Option<String>,
    /// How long a stopping worker may drain before it is killed.
    #[arg(long)]
    stop_timeout: Option<String>,
    /// One shared queue with a balance table, or an SO_REUSEPORT socket per instance.
    #[arg(long, value_enum)]
    balance: Option<Balance>,
    /// Kept-alive connections an instance may hand to its next process on a restart (its fd
    /// store, FileDescriptorStoreMax=); 0 turns hand-over off.
    #[arg(long, value_name = "N")]
    handover_max: Option<i64>,
    /// When a started worker is ready (key ready): notify, at its READY=1 (Type=notify); exec,
    /// once its program runs, for servers that don't speak sd_notify (Type=exec; no watchdog).
    #[arg(long, value_enum)]
    ready: Option<sdcluster::spec::Readiness>,
    /// Let the workers JIT-compile, with writable and executable memory: Node, Java, LuaJIT
    /// (key jit = true; MemoryDenyWriteExecute=no). No effect on sdcluster run (no sandbox).
    #[arg(long)]
    jit: bool,
    /// Let the workers open connections of their own and resolve names (key outbound-network
    /// = true; PrivateNetwork=no, RestrictAddressFamilies= adds AF_INET AF_INET6 AF_NETLINK).
    /// No effect on sdcluster run (no sandbox).
    #[arg(long)]
    outbound_network: bool,
    /// A directory of the app's own that outlives restarts, a name under /var/lib, given to the
    /// workers as $STATE_DIRECTORY (key state-directory; StateDirectory=).
    #[arg(long, value_name = "DIR")]
    state_directory: Option<String>,
    /// An absolute path the workers may write, repeatable; replaces the file's list (key
    /// read-write-paths; ReadWritePaths=). No effect on sdcluster run (no sandbox).
    #[arg(long = "read-write-path", value_name = "PATH")]
    read_write_paths: Vec<String>,
    /// The workers' working directory, absolute (key working-directory; WorkingDirectory=).
    #[arg(long, value_name = "DIR")]
    working_directory: Option<String>,
    /// A file of KEY=VALUE lines for the workers' environment, read at each start (key
    /// environment-file; EnvironmentFile=).
    #[arg(long, value_name = "FILE")]
    environment_file: Option<String>,
    /// A secret the workers read from $CREDENTIALS_DIRECTORY/NAME, copied from PATH at each
    /// start, repeatable (key credentials; LoadCredential=NAME:PATH).
    #[arg(long = "credential", value_name = "NAME=PATH")]
    credentials: Vec<String>,
    /// A system call (or @group) the workers may make beyond the sandbox's filter, repeatable;
    /// adds to the file's (key system-calls; SystemCallFilter=). gunicorn needs setuid. No
    /// effect on sdcluster run (no sandbox).
    #[arg(long = "system-call", value_name = "NAME")]
    system_calls: Vec<String>,
    /// The worker command (default: sdcluster-worker next to this program), after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

impl SpecArgs {
    /// The validated spec, and where it came from (for unit headers).
    fn resolve(self) -> Result<(Spec, PathBuf)> {
        self.resolve_checking(true)
    }

    /// As `resolve`; `program_here`: the worker program must exist on this machine (false
    /// when units are only rendered, e.g. for a package).
    fn resolve_checking(self, program_here: bool) -> Result<(Spec, PathBuf)> {
        let path = self.config.as_ref().map(|c| {
            if c.contains('/') || c.ends_with(".toml") {
                PathBuf::from(c)
            } else {
                PathBuf::from(CONFIG_DIR).join(format!("{c}.toml"))
            }
        });
        let source = path.clone().unwrap_or_else(|| "command-line flags".into());
        let file = self.spec_file(path)?;
        let spec = if program_here { file.validate()? } else { file.validate_elsewhere()? };
        Ok((spec, source))
    }

    fn spec_file(self, path: Option<PathBuf>) -> Result<SpecFile> {
        let mut file = match &path {
            None => SpecFile::default(),
            Some(path) => SpecFile::read(path)?,
        };
        if self.name.is_some() {
            file.name = self.name;
        }
        file.name.get_or_insert_with(|| "app".into());
        if !self.listen.is_empty() {
            file.listen = Some(self.listen);
        }
        if let Some(n) = self.instances {
            file.instances = Some(InstancesValue::Text(n));
        }
        for kv in self.environment {
            let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            file.environment.get_or_insert_default().insert(k.into(), v.into());
        }
        file.restart_delay = self.restart_delay.or(file.restart_delay);
        file.restart_max_delay = self.restart_max_delay.or(file.restart_max_delay);
        file.watchdog = self.watchdog.or(file.watchdog);
        file.stop_timeout = self.stop_timeout.or(file.stop_timeout);
        file.balance = self.balance.or(file.balance);
        file.handover_max = self.handover_max.or(file.handover_max);
        file.ready = self.ready.or(file.ready);
        if self.jit {
            file.jit = Some(true);
        }
        if self.outbound_network {
            file.outbound_network = Some(true);
        }
        file.state_directory = self.state_directory.or(file.state_directory);
        if !self.read_write_paths.is_empty() {
            file.read_write_paths = Some(self.read_write_paths);
        }
        file.working_directory = self.working_directory.or(file.working_directory);
        file.environment_file = self.environment_file.or(file.environment_file);
        for kv in self.credentials {
            let (k, v) = kv.split_once('=').with_context(|| format!("--credential {kv:?}: expected NAME=PATH"))?;
            file.credentials.get_or_insert_default().insert(k.into(), v.into());
        }
        if !self.system_calls.is_empty() {
            file.system_calls.get_or_insert_default().extend(self.system_calls);
        }
        if !self.command.is_empty() {
            file.command = Some(CommandLine::Argv(self.command));
        }
        if file.command.is_none() {
            let exe = std::env::current_exe().context("cannot find this program's directory")?;
            let worker = exe.with_file_name("sdcluster-worker");
            file.command = Some(CommandLine::Argv(vec![worker.display().to_string()]));
        }
        Ok(file)
    }
}

/// Between the two samples of a one-shot `sdcluster status` that give the request rate.
const RATE_SAMPLE: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sdcluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let dir = control::runtime_dir();
    match cli.command {
        Command::Generate { spec, output, target } => {
            let (spec, source) = spec.resolve_checking(false)?;
            let units = units::try_render(&spec, target.version()?, &source, &target.sdcluster()?)?;
            match output {
                None => {
                    for unit in &units {
                        println!("# {}\n{}", unit.name, unit.content);
                    }
                }
                Some(dir) => {
                    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                    for unit in &units {
                        let path = dir.join(&unit.name);
                        install::write_atomically(&path, unit.content.as_bytes())
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        println!("{}", path.display());
                    }
                }
            }
        }
        Command::Install { spec, force, now, target } => {
            let (spec, source) = spec.resolve()?;
            let units = units::try_render(&spec, target.version()?, &source, &target.sdcluster()?)?;
            let installed = systemd::install(&spec, &units, &target.root, force)?;
            for change in &installed.changes {
                println!("{change}");
            }
            if let Some((old, new)) = &installed.listen_pending {
                eprintln!(
                    "note: {name}.socket still listens on {}; the new addresses ({}) take effect with \
                     `systemctl restart {name}.socket`, which restarts the workers too (docs/runbooks/listen.md). \
                     Restart the socket before any worker: a worker started now would get the old socket.",
                    old.join(", "),
                    new.join(", "),
                    name = spec.name
                );
            }
            let name = &spec.name;
            if target.root == std::path::Path::new("/") && generator::manages(name) {
                println!(
                    "enabled {name}.socket and {name}.target; the generator wants {} workers at each boot (instances in /etc/sdcluster/{name}.toml)",
                    spec.instances
                );
            } else {
                println!("enabled {name}.socket, {name}.target and {} instances", spec.instances.resolve());
            }
            if now {
                systemd::start(&spec.name)?;
                println!("started {}", spec.name);
            }
        }
        Command::Uninstall { app, force, root } => {
            check_name(&app)?;
            systemd::uninstall(&app, &root, force)?;
            println!("removed {app}");
        }
        Command::Start { app } => systemd::start(&app)?,
        Command::Stop { app } => systemd::stop(&app)?,
        Command::Run(args) => {
            let (spec, _) = args.resolve()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async { Supervisor::bind(spec, dir)?.run().await })?;
        }
        Command::Status { app, json, watch, interval } => {
            let fetch = || -> Result<sdcluster::status::ClusterStatus> {
                Ok(match control::request(&dir, &app, &control::ControlRequest::Status) {
                    Ok(answer) => answer.into_status().map_err(anyhow::Error::msg)?,
                    Err(not_running) => under_systemd(not_running, || systemd::status(&app))?,
                })
            };
            if watch {
                let title = format!("sdcluster status {app}");
                sdcluster::status::watch(&title, interval, || fetch().map_err(|e| format!("{e:#}")))?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut status = fetch()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                if status.has_counters() {
                    // A second sample a moment later gives the request rate.
                    let before = status;
                    let taken = std::time::Instant::now();
                    std::thread::sleep(RATE_SAMPLE);
                    status = fetch()?;
                    status.add_rates(&before, taken.elapsed());
                }
                for line in status.table_lines(sdcluster::status::terminal_width()) {
                    println!("{line}");
                }
            }
        }
        Command::Restart { app, rolling: _ } => match control::request(&dir, &app, &control::ControlRequest::Restart) {
            Ok(answer) => return print_answer(answer),
            Err(not_running) => {
                let n = under_systemd(not_running, || {
                    systemd::rolling_restart(&app, |unit| eprintln!("restarting {unit}"))
                })?;
                println!("restarted {n} instances one at a time");
            }
        },
        Command::Scale { app, instances } => {
            let n = Instances::parse(&instances)?;
            match control::request(&dir, &app, &control::ControlRequest::Scale { instances: n }) {
                Ok(answer) => return print_answer(answer),
                Err(not_running) => {
                    let (from, to) = under_systemd(not_running, || systemd::scale(&app, n))?;
                    println!("{app}: {from} -> {to} instances");
                }
            }
        }
        Command::StopHook { stopped, unit, flag } => {
            // Never fails the stop: without the flag the worker closes its connections
            // gracefully instead of handing them over. Its output goes to the unit's journal.
            match systemd::stop_hook(&unit, &flag, stopped) {
                Ok(systemd::Hook::Restarting(job)) => println!("restart job {job}: hand-over flag {}", flag.display()),
                Ok(_) => {}
                Err(e) => eprintln!("sdcluster stop-hook {unit}: {e}; connections are closed, not handed over"),
            }
        }
        Command::SystemdGenerator { normal, rest: _ } => {
            // systemd sends a generator's stderr to the kernel log, where boot problems are read.
            let unit_path: Vec<&std::path::Path> = generator::UNIT_PATH.iter().map(std::path::Path::new).collect();
            for done in generator::generate(&generator::config_dir(), &unit_path, &normal)? {
                match done {
                    generator::Generated::Wanted { name, instances, problem: Some(problem) } => eprintln!(
                        "sdcluster-generator: {name}: {problem}; running {instances} workers (one per CPU) until it is fixed"
                    ),
                    generator::Generated::WantedDespite { name, instances, problem } => eprintln!(
                        "sdcluster-generator: {name}: {problem}; running its {instances} workers until it is fixed"
                    ),
                    _ => {}
                }
            }
        }
        Command::Assets { kind, dir } => {
            let cli = <Cli as clap::CommandFactory>::command();
            match (kind, dir) {
                (sdcluster_assets::Asset::Man, Some(dir)) => {
                    for page in sdcluster_assets::write_man_pages(cli, "sdcluster", &dir)? {
                        println!("{}", page.display());
                    }
                }
                (kind, _) => kind.print(cli, "sdcluster")?,
            }
        }
        Command::Logs { app, follow, lines } => {
            if !systemctl::booted() {
                bail!(
                    "systemd is not PID 1 here, so {app} logs nothing to the journal: under `sdcluster run` every worker logs to its standard error (the lines of a serving worker name it: `worker{{id=\"N\"}}`)"
                );
            }
            let ok = sdcluster::logs::run(&app, follow, lines).context("cannot run journalctl")?;
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `op` against systemd, unless systemd isn't PID 1 here either: then the app is
/// nowhere, and the error says where both supervisors were looked for.
fn under_systemd<T>(not_running: control::NotRunning, op: impl FnOnce() -> Result<T, systemd::OpsError>) -> Result<T> {
    if !systemctl::booted() {
        bail!("{not_running}, and systemd is not PID 1 here; start the app with `sdcluster run`");
    }
    Ok(op()?)
}

fn print_answer(answer: control::ControlResponse) -> Result<ExitCode> {
    match answer.human() {
        Err(e) => bail!("{e}"),
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
