//! Command-line and environment settings of a worker, meant to be flattened into an app's CLI.

use std::time::Duration;

use sdcluster_protocol::env;

/// Every knob of the worker runtime. Each flag has an `SDCLUSTER_*` environment twin so that
/// unit files and `sdcluster run` can set them without touching the command line.
#[derive(Debug, Clone, clap::Args)]
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
    /// multi-threaded server.
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
    /// it; `sdcluster run` passes a shared memory fd instead). Created if missing.
    #[arg(long, env = env::BALANCE_FILE)]
    pub balance_file: Option<std::path::PathBuf>,

    /// A file shared by all workers of the app where each keeps its counters, so that
    /// `/metrics` from any of them covers the whole app (units set it; `sdcluster run` passes
    /// a shared memory fd instead). Created if missing.
    #[arg(long, env = sdcluster_protocol::metrics::METRICS_FILE_ENV)]
    pub metrics_file: Option<std::path::PathBuf>,

    /// How long a worker above its fair share leaves a waiting connection to its peers before
    /// taking it anyway (a peer may be busy); only with a shared balance table.
    #[arg(long, env = env::BALANCE_PATIENCE, default_value = "20ms", value_parser = parse_duration)]
    pub balance_patience: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    sdcluster_protocol::duration::parse(text)
}
