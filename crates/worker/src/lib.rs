//! A worker of an sdcluster: serves HTTP on the sockets its supervisor passes.
//!
//! One process per CPU shares one listening socket owned by systemd (or by `sdcluster run`).
//! This crate does everything such a worker owes its supervisor and its peers, for any hyper
//! or tower service (axum's `Router` among them): takes the passed sockets (`LISTEN_FDS`), or
//! binds `--listen` when run standalone; reports `READY=1`, `STATUS=`, `WATCHDOG=1` and
//! `STOPPING=1`; takes only its share of new connections so that load spreads evenly; drains
//! in-flight requests on SIGTERM and hands kept-alive connections to the next process; lets
//! upgraded connections (WebSockets) run; answers 500 for a handler that panics; and answers
//! `/healthz` and `/metrics` for every app (movable, or off: [`Options::healthz_path`],
//! [`Options::metrics_path`]).
//!
//! Two entry points, one implementation:
//! - [`run`] for a synchronous `main`: it builds the runtime (`--threads`) and returns the
//!   exit code;
//! - [`serve`] (or [`Worker`], with more say) inside the app's own runtime
//!   (`#[tokio::main]`): it returns a `Result` whose [`Error::exit_code`] is the exit code.
//!
//! Both take an [`IntoApp`]: a hyper service (`hyper::service::service_fn`) or a tower
//! service (an axum `Router`), as is. [`Options`] flattens into an app's clap CLI, or comes
//! from [`Options::from_env`] / [`Options::default`] with `with_*` builders.
//!
//! A synchronous `main` with its own CLI:
//!
//! ```no_run
//! use std::convert::Infallible;
//! use clap::Parser;
//! use http_body_util::Full;
//! use hyper::{Request, Response, body::Bytes, service::service_fn};
//! use sdcluster_worker::RequestBody;
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     worker: sdcluster_worker::Options,
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let app = service_fn(|_req: Request<RequestBody>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//!     });
//!     sdcluster_worker::run(Cli::parse().worker, app)
//! }
//! ```
//!
//! Inside `#[tokio::main]`, with an axum `Router` (see `examples/axum_tokio_main.rs`):
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
//!     let opts = match sdcluster_worker::Options::from_env() {
//!         Ok(opts) => opts.with_healthz("/livez"),
//!         Err(e) => e.exit(),
//!     };
//!     match sdcluster_worker::serve(opts, app).await {
//!         Ok(()) => std::process::ExitCode::SUCCESS,
//!         Err(e) => {
//!             eprintln!("{e}");
//!             e.exit_code()
//!         }
//!     }
//! }
//! ```

mod body;
mod connection;
mod gate;
mod handover;
mod listeners;
mod logging;
mod notify;
mod ops;
mod options;
mod serve;
mod stats;
mod worker;

pub use body::RequestBody;
pub use handover::TakenOver;
pub use listeners::{Acquired, ListenError, acquire};
pub use ops::{App, AppBody, HyperKind, Instrumented, IntoApp, OpsBody, ResponseBody, TowerKind, WORKER_HEADER};
pub use options::{Endpoint, Options};
pub use sdcluster_protocol::listen_fds;
pub use sdcluster_protocol::metrics;
pub use serve::{DrainTimedOut, Server};
pub use stats::Stats;
pub use worker::{Draining, Error, Worker, run, serve};

pub use sdcluster_protocol::EXIT_BAD_INPUT;
