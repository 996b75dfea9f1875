//! The reference worker: the seed's "dead simple" app on the sdcluster worker runtime.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use sdcluster_worker::RequestBody;

/// Serve HTTP on the socket systemd (or `sdcluster run`) passes, or on --listen.
///
/// GET / answers "this is dead simple"; /healthz and /metrics come with every worker.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    worker: sdcluster_worker::Options,

    /// Also answer /debug/sleep?ms=N (a slow request), /debug/wedge?ms=N (block the
    /// runtime: the watchdog's prey) and /debug/crash (abort). For tests; never in production.
    #[arg(long, env = sdcluster_protocol::env::DEBUG_ENDPOINTS, value_parser = clap::builder::BoolishValueParser::new())]
    debug_endpoints: bool,

    /// Print the man page (man) or a shell's completions (bash, zsh, fish) and exit.
    #[arg(long, hide = true, value_name = "KIND", value_parser = sdcluster_assets::parse_asset)]
    generate: Option<sdcluster_assets::Asset>,
}

const BODY: &str = "this is dead simple";
/// The longest /debug/sleep or /debug/wedge honoured.
const MAX_DEBUG_MS: u64 = 120_000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(asset) = cli.generate {
        let command = <Cli as clap::CommandFactory>::command();
        if let Err(e) = asset.print(command, "sdcluster-worker") {
            eprintln!("sdcluster-worker: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let debug = cli.debug_endpoints;
    let app =
        service_fn(move |req: Request<RequestBody>| async move { Ok::<_, Infallible>(answer(&req, debug).await) });
    sdcluster_worker::run(cli.worker, app)
}

async fn answer(req: &Request<RequestBody>, debug: bool) -> Response<Full<Bytes>> {
    match (req.uri().path(), debug) {
        ("/", _) => text(StatusCode::OK, BODY),
        ("/debug/sleep", true) => {
            tokio::time::sleep(Duration::from_millis(millis(req))).await;
            text(StatusCode::OK, "slept\n")
        }
        ("/debug/wedge", true) => {
            // Deliberately blocks the runtime thread, as a buggy handler would.
            std::thread::sleep(Duration::from_millis(millis(req)));
            text(StatusCode::OK, "unwedged\n")
        }
        ("/debug/crash", true) => std::process::abort(),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `?ms=N` of a debug request, capped.
fn millis(req: &Request<RequestBody>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .min(MAX_DEBUG_MS)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
