//! The `sdcluster` command: a thin layer over the library, errors with context at the edge.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sdcluster::control;
use sdcluster::spec::{Balance, CONFIG_DIR, CommandLine, InstancesValue, SpecFile};
use sdcluster::status::ClusterStatus;
use sdcluster::supervisor::Supervisor;

/// Run a network service on every CPU: one worker process per CPU sharing one port.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Supervise the workers here, without systemd (laptops, containers, CI).
    Run(SpecArgs),
    /// Show every instance: pid, state, uptime, restarts, memory, CPU, status line.
    Status {
        /// The app.
        app: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restart the instances one at a time, each after the previous one is ready again.
    Restart {
        /// The app.
        app: String,
        /// One at a time (the only way sdcluster restarts).
        #[arg(long)]
        rolling: bool,
    },
    /// Change the number of instances of a running cluster.
    Scale {
        /// The app.
        app: String,
        /// A count, or "auto" for one per CPU.
        instances: String,
    },
}

/// An app description: APP.toml and/or flags (flags win).
#[derive(Args)]
struct SpecArgs {
    /// APP.toml, or the name of an app in /etc/sdcluster.
    config: Option<String>,
    /// App name (default: the config file's name, or "app").
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
    /// The worker command (default: sdcluster-worker next to this program), after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

impl SpecArgs {
    fn spec_file(self) -> Result<SpecFile> {
        let mut file = match &self.config {
            None => SpecFile::default(),
            Some(c) => {
                let path = if c.contains('/') || c.ends_with(".toml") {
                    PathBuf::from(c)
                } else {
                    PathBuf::from(CONFIG_DIR).join(format!("{c}.toml"))
                };
                SpecFile::read(&path)?
            }
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
        Command::Run(args) => {
            let spec = args.spec_file()?.validate()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let supervisor = Supervisor::bind(spec, dir)?;
                supervisor.run().await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { app, json } => {
            let answer = control::request(&dir, &app, "status")?;
            let status: ClusterStatus =
                serde_json::from_str(&answer).with_context(|| format!("unexpected answer: {answer}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart { app, rolling: _ } => answer(control::request(&dir, &app, "restart")?),
        Command::Scale { app, instances } => answer(control::request(&dir, &app, &format!("scale {instances}"))?),
    }
}

fn answer(text: String) -> Result<ExitCode> {
    match text.strip_prefix("error: ") {
        Some(e) => bail!("{e}"),
        None => {
            println!("{}", text.strip_prefix("ok: ").unwrap_or(&text));
            Ok(ExitCode::SUCCESS)
        }
    }
}
