//! Command-line and environment settings of a worker, meant to be flattened into an app's CLI.

use std::time::Duration;

use sdcluster_protocol::env;

/// Every knob of the worker runtime. Each flag has an `SDCLUSTER_*` environment twin so that
/// unit files and `sdcluster run` can set them without touching the command line.
///
/// Three ways to get one:
/// - flattened into an app's CLI (`#[command(flatten)] worker: sdcluster_worker::Options`),
///   which reads the flags and their environment twins;
/// - [`Options::from_env`]: what that CLI would give with no flags (defaults, then the
///   `SDCLUSTER_*` variables a supervisor sets): the choice of an app without a CLI of its own
///   that runs under `sdcluster run` or systemd;
/// - [`Options::default`]: the defaults alone, environment ignored.
///
/// Every field is public, so `Options { max_connections: 100, ..Options::default() }` works,
/// and the `with_*` methods chain. The defaults are written once, in the `#[arg]` attributes
/// below: [`Default`] and [`Options::from_env`] parse an empty command line with them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Options {
    /// Address to bind when no socket was passed (LISTEN_FDS unset): HOST:PORT, [V6]:PORT or
    /// unix:/PATH. Repeat for several.
    #[arg(long = "listen", env = env::LISTEN, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    pub listen: Vec<String>,

    /// Refuse to start unless the supervisor passed a socket (units and `sdcluster run` set
    /// this): a worker of a cluster must never bind a port of its own by mistake.
    #[arg(long, env = env::REQUIRE_SOCKET, value_parser = clap::builder::BoolishValueParser::new())]
    pub require_socket: bool,

    /// Bind --listen with SO_REUSEPORT, so that several workers each own a socket on one port
    /// (the kernel then spreads connections by hash instead of one shared queue).
    #[arg(long, env = env::REUSEPORT, value_parser = clap::builder::BoolishValueParser::new())]
    pub reuseport: bool,

    /// Serve only the passed sockets with these LISTEN_FDNAMES names (default: every passed
    /// socket).
    #[arg(long = "listener-name", env = env::LISTENER_NAMES, value_delimiter = ',')]
    pub listener_names: Vec<String>,

    /// Name of this worker in responses, metrics and logs; units pass the instance (%i).
    /// Default: the process id.
    #[arg(long, env = env::INSTANCE)]
    pub instance: Option<String>,

    /// Runtime threads: 1 (one worker per CPU, the cluster default) or more for a standalone
    /// multi-threaded server. Only [`crate::run`] builds a runtime; [`crate::serve`] runs on
    /// the caller's and ignores this.
    #[arg(long, env = env::THREADS, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// On SIGTERM, how long in-flight requests may take to finish before the worker gives up
    /// and exits 1; keep it below the unit's TimeoutStopSec= (systemd's default is 90s).
    #[arg(long, env = env::DRAIN_TIMEOUT, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// A client has this long to send a request's headers (slowloris defence).
    #[arg(long, env = env::HEADER_TIMEOUT, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a kept-alive connection may sit idle between requests before it is closed;
    /// above the idle timeouts of common load balancers (60 s), so that they close first.
    #[arg(long, env = env::KEEPALIVE_TIMEOUT, default_value = "75s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// A response that makes no write progress for this long (the client stopped reading it)
    /// ends its connection, so that a client that never reads cannot hold a connection slot.
    #[arg(long, env = env::WRITE_TIMEOUT, default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// A request body the app waits for that brings no byte for this long (the client
    /// dribbles it, or stopped) is answered 408 and its connection closed.
    #[arg(long, env = env::BODY_TIMEOUT, default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// When the worker stops and no replacement takes its connections over: how long idle
    /// kept-alive connections stay open (their next request is answered with
    /// `Connection: close`) before they are closed; never past --drain-timeout.
    #[arg(long, env = env::CLOSE_GRACE, default_value = "5s", value_parser = parse_duration)]
    pub close_grace: Duration,

    /// A request body the app leaves unread is read and thrown away up to this many bytes
    /// (within --header-timeout), so the connection stays usable; a longer one gets
    /// `Connection: close`.
    #[arg(long, env = env::MAX_UNREAD_BODY, default_value_t = 1024 * 1024)]
    pub max_unread_body: u64,

    /// Largest request head (request line and headers) accepted; larger gets 431.
    #[arg(long, env = env::MAX_HEADER_BYTES, default_value_t = 32 * 1024, value_parser = clap::value_parser!(u32).range(8192..=16 * 1024 * 1024))]
    pub max_header_bytes: u32,

    /// Open connections this worker holds at most; further ones wait in the kernel's queue
    /// for a worker with room, instead of being refused.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// A file shared by all workers of the app through which they balance load (units set
    /// it; `sdcluster run` names a shared memory fd it passes: `/proc/self/fd/N`). Created if
    /// missing.
    #[arg(long, env = env::BALANCE_FILE)]
    pub balance_file: Option<std::path::PathBuf>,

    /// A file shared by all workers of the app where each keeps its counters, so that
    /// `/metrics` from any of them covers the whole app (units set it; `sdcluster run` names a
    /// shared memory fd it passes: `/proc/self/fd/N`). Created if missing.
    #[arg(long, env = sdcluster_protocol::metrics::METRICS_FILE_ENV)]
    pub metrics_file: Option<std::path::PathBuf>,

    /// How long a worker above its fair share leaves a waiting connection to its peers before
    /// taking it anyway (a peer may be busy); only with a shared balance table.
    #[arg(long, env = env::BALANCE_PATIENCE, default_value = "20ms", value_parser = parse_duration)]
    pub balance_patience: Duration,

    /// Path answering the health check (`ok`), or `off` to leave every path to the app.
    #[arg(long, env = env::HEALTHZ_PATH, default_value = "/healthz", value_parser = Endpoint::parse)]
    pub healthz_path: Endpoint,

    /// Path answering Prometheus metrics (of every instance of the app), or `off`.
    #[arg(long, env = env::METRICS_PATH, default_value = "/metrics", value_parser = Endpoint::parse)]
    pub metrics_path: Endpoint,
}

/// Where an operational endpoint (`/healthz`, `/metrics`) answers: at a path, or nowhere
/// (the app gets those requests like any other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Not answered by the worker.
    Off,
    /// Answered at this path (it starts with `/`).
    Path(String),
}

impl Endpoint {
    /// `off`, or an absolute path (`/livez`), as the command line takes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(Self::Off),
            path if path.starts_with('/') && !path.contains(['?', '#']) => Ok(Self::Path(path.to_owned())),
            other => Err(format!("{other:?} is neither `off` nor a path starting with `/` (without `?` or `#`)")),
        }
    }

    /// The path, unless off.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::Off => None,
            Self::Path(path) => Some(path),
        }
    }
}

/// `"off"` is [`Endpoint::Off`]; any other text is a path (a missing leading `/` is added).
impl From<&str> for Endpoint {
    fn from(text: &str) -> Self {
        match text {
            "off" => Self::Off,
            path if path.starts_with('/') => Self::Path(path.to_owned()),
            path => Self::Path(format!("/{path}")),
        }
    }
}

/// `None` is [`Endpoint::Off`].
impl From<Option<&str>> for Endpoint {
    fn from(path: Option<&str>) -> Self {
        path.map_or(Self::Off, Self::from)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path().unwrap_or("off"))
    }
}

/// An empty command line, parsed with or without the environment twins.
fn parse_empty(with_env: bool) -> Result<Options, clap::Error> {
    use clap::{Args, FromArgMatches};
    let mut command = Options::augment_args(clap::Command::new("sdcluster-worker").no_binary_name(true));
    if !with_env {
        command = command.mut_args(|arg| arg.env(None));
    }
    let matches = command.try_get_matches_from(std::iter::empty::<&str>())?;
    Options::from_arg_matches(&matches)
}

/// The command line's defaults, with no environment variable read.
impl Default for Options {
    fn default() -> Self {
        parse_empty(false).expect("the defaults of the `#[arg]` attributes parse")
    }
}

impl Options {
    /// What the command line gives with no flags: each default, unless its `SDCLUSTER_*`
    /// twin is set (as units and `sdcluster run` set `SDCLUSTER_INSTANCE`,
    /// `SDCLUSTER_REQUIRE_SOCKET`, ...). Fails on a variable that does not parse; the error
    /// names it (`clap::Error::exit` prints it and exits 2).
    pub fn from_env() -> Result<Self, clap::Error> {
        parse_empty(true)
    }

    /// Binds `addr` (`HOST:PORT`, `[V6]:PORT` or `unix:/PATH`) when no socket is passed,
    /// instead of the default `127.0.0.1:8080`.
    #[must_use]
    pub fn with_listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = vec![addr.into()];
        self
    }

    /// Names this worker (`x-sdcluster-worker`, metrics, logs).
    #[must_use]
    pub fn with_instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// Moves the health check (`"/livez"`), or turns it off (`"off"`, [`Endpoint::Off`]).
    #[must_use]
    pub fn with_healthz(mut self, at: impl Into<Endpoint>) -> Self {
        self.healthz_path = at.into();
        self
    }

    /// Moves the metrics (`"/internal/metrics"`), or turns them off (`"off"`, [`Endpoint::Off`]).
    #[must_use]
    pub fn with_metrics(mut self, at: impl Into<Endpoint>) -> Self {
        self.metrics_path = at.into();
        self
    }

    /// Holds at most `n` connections open (at least 1).
    #[must_use]
    pub fn with_max_connections(mut self, n: u64) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Gives requests in flight this long to finish after SIGTERM.
    #[must_use]
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Runtime threads for [`crate::run`] (at least 1).
    #[must_use]
    pub fn with_threads(mut self, threads: u16) -> Self {
        self.threads = threads.clamp(1, 1024);
        self
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    sdcluster_protocol::duration::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: Options,
    }

    #[test]
    fn default_is_the_command_line_defaults() {
        let defaults = Options::default();
        assert_eq!(defaults.listen, ["127.0.0.1:8080"]);
        assert_eq!(defaults.threads, 1);
        assert_eq!(defaults.drain_timeout, Duration::from_secs(30));
        assert_eq!(defaults.header_timeout, Duration::from_secs(10));
        assert_eq!(defaults.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(defaults.write_timeout, Duration::from_secs(30));
        assert_eq!(defaults.body_timeout, Duration::from_secs(30));
        assert_eq!(defaults.close_grace, Duration::from_secs(5));
        assert_eq!(defaults.max_connections, 10_000);
        assert_eq!(defaults.max_header_bytes, 32 * 1024);
        assert_eq!(defaults.max_unread_body, 1024 * 1024);
        assert_eq!(defaults.balance_patience, Duration::from_millis(20));
        assert_eq!(defaults.healthz_path, Endpoint::Path("/healthz".into()));
        assert_eq!(defaults.metrics_path, Endpoint::Path("/metrics".into()));
        assert!(!defaults.require_socket && !defaults.reuseport);
        assert_eq!(defaults.instance, None);
        // The same as a flattened CLI given nothing (when the test's environment sets none
        // of the twins, as a test run does).
        if !std::env::vars().any(|(k, _)| k.starts_with("SDCLUSTER_")) {
            assert_eq!(Cli::parse_from(["app"]).worker, defaults);
            assert_eq!(Options::from_env().unwrap(), defaults);
        }
    }

    #[test]
    fn flags_override_defaults_when_flattened() {
        let cli = Cli::parse_from(["app", "--healthz-path", "off", "--metrics-path", "/internal/metrics"]);
        assert_eq!(cli.worker.healthz_path, Endpoint::Off);
        assert_eq!(cli.worker.metrics_path.path(), Some("/internal/metrics"));
        assert_eq!(cli.worker, Options::default().with_healthz("off").with_metrics("/internal/metrics"));
    }

    #[test]
    fn builders_and_struct_update_agree() {
        let built = Options::default().with_max_connections(2).with_instance("a").with_listen("127.0.0.1:0");
        let literal = Options {
            max_connections: 2,
            instance: Some("a".into()),
            listen: vec!["127.0.0.1:0".into()],
            ..Options::default()
        };
        assert_eq!(built, literal);
        assert_eq!(Options::default().with_max_connections(0).max_connections, 1);
        assert_eq!(Options::default().with_threads(0).threads, 1);
    }

    #[test]
    fn endpoint_paths_parse() {
        assert_eq!(Endpoint::parse("off"), Ok(Endpoint::Off));
        assert_eq!(Endpoint::parse("/livez"), Ok(Endpoint::Path("/livez".into())));
        for bad in ["", "livez", "/a?b", "/a#b", "OFF"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["app", "--healthz-path", "nope"]).is_err());
        assert_eq!(Endpoint::from("livez"), Endpoint::Path("/livez".into()));
        assert_eq!(Endpoint::from("off"), Endpoint::Off);
        assert_eq!(Endpoint::from(None), Endpoint::Off);
        assert_eq!(Endpoint::Off.to_string(), "off");
        assert_eq!(Endpoint::from("/m").to_string(), "/m");
    }
}
