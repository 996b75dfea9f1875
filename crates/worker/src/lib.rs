//! A worker of an sdcluster: serves HTTP on the sockets its supervisor passes.
//!
//! One process per CPU shares one listening socket owned by systemd (or by `sdcluster run`).
//! This crate does everything such a worker owes its supervisor and its peers, for any hyper
//! service: takes the passed sockets (`LISTEN_FDS`), or binds `--listen` when run standalone;
//! reports `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1`; takes only its share of new
//! connections so that load spreads evenly; drains in-flight requests on SIGTERM; and answers
//! `/healthz` and `/metrics` for every app.
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
//! Tower services (axum) fit through `hyper_util::service::TowerToHyperService`.

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

use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};

pub use body::RequestBody;
pub use handover::TakenOver;
pub use listeners::{Acquired, ListenError, acquire};
pub use ops::{App, AppBody, Instrumented, OpsBody, ResponseBody, WORKER_HEADER};
pub use options::Options;
pub use sdcluster_protocol::listen_fds;
pub use sdcluster_protocol::metrics;
pub use serve::{DrainTimedOut, Server};
pub use stats::Stats;

pub use sdcluster_protocol::EXIT_BAD_INPUT;

/// The whole life of a worker process: logging, sockets, runtime, serving, drain.
///
/// Call it first thing in `main`, before any thread is started: it removes the `LISTEN_*`
/// variables from the environment so that children don't inherit them. Exits 0 after a clean
/// drain, 1 when the drain timed out or serving failed, 2 on bad input.
pub fn run<S: App>(opts: Options, app: S) -> ExitCode {
    logging::init(&opts.instance.clone().unwrap_or_else(|| std::process::id().to_string()));
    raise_open_files_limit();
    // SAFETY: `run` is documented to be called before any other thread exists.
    let acquired = unsafe { listen_fds::take() }.map_err(ListenError::from).and_then(|passed| acquire(passed, &opts));
    let server = match acquired
        .map_err(|e| e.to_string())
        .and_then(|a| Server::new(a, opts.clone()).map_err(|e| format!("cannot map the balance table: {e}")))
    {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(opts.threads.into()).enable_all().build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _span = tracing::info_span!("worker", id = server.stats().instance()).entered();
    runtime.block_on(async {
        let signals = match count_signals() {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let nth = |n: u32| {
            let mut signals = signals.clone();
            async move {
                let _ = signals.wait_for(|seen| *seen >= n).await;
            }
        };
        match server.serve(app, nth(1), nth(2)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Counts SIGTERM and SIGINT: the first starts the drain, a second cuts it short.
fn count_signals() -> std::io::Result<tokio::sync::watch::Receiver<u32>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (count, seen) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            count.send_modify(|n| *n += 1);
            if *count.borrow() == 1 {
                tracing::info!("{name}: draining (send it again to stop at once)");
            } else {
                tracing::warn!("{name} again: stopping without waiting for the drain");
            }
        }
    });
    Ok(seen)
}

/// Lets `--max-connections` be reached: the soft limit of open files is often 1024 while the
/// hard limit is far higher (systemd's default is 1024:524288), as Go's runtime does too.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
