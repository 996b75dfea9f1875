//! The reference worker: the seed's "dead simple" app on the sdcluster worker runtime.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
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
    /// runtime: the watchdog's prey), /debug/crash (abort), /debug/panic (a handler that
    /// panics), /debug/echo (reads the request body, answers its length) and
    /// /debug/big?kb=N (a large response). For tests; never in production.
    #[arg(long, env = sdcluster_protocol::env::DEBUG_ENDPOINTS, value_parser = clap::builder::BoolishValueParser::new())]
    debug_endpoints: bool,

    /// Print the man page (man) or a shell's completions (bash, zsh, fish) and exit.
    #[arg(long, hide = true, value_name = "KIND", value_parser = sdcluster_assets::parse_asset)]
    generate: Option<sdcluster_assets::Asset>,
}

const BODY: &str = "this is dead simple";
/// The longest /debug/sleep or /debug/wedge honoured.
const MAX_DEBUG_MS: u64 = 120_000;
/// The largest /debug/big honoured, in KiB.
const MAX_DEBUG_KB: u64 = 16 * 1024;

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
    let app = service_fn(move |req: Request<RequestBody>| async move { Ok::<_, Infallible>(answer(req, debug).await) });
    sdcluster_worker::run(cli.worker, app)
}

async fn answer(req: Request<RequestBody>, debug: bool) -> Response<Full<Bytes>> {
    match (req.uri().path(), debug) {
        ("/", _) => text(StatusCode::OK, BODY),
        ("/debug/sleep", true) => {
            tokio::time::sleep(Duration::from_millis(millis(&req))).await;
            text(StatusCode::OK, "slept\n")
        }
        ("/debug/wedge", true) => {
            // Deliberately blocks the runtime thread, as a buggy handler would.
            std::thread::sleep(Duration::from_millis(millis(&req)));
            text(StatusCode::OK, "unwedged\n")
        }
        ("/debug/crash", true) => std::process::abort(),
        ("/debug/panic", true) => panic!("/debug/panic: a bug in a handler"),
        ("/debug/echo", true) => match req.into_body().collect().await {
            Ok(body) => Response::new(Full::new(Bytes::from(format!("{} bytes\n", body.to_bytes().len())))),
            Err(e) => Response::new(Full::new(Bytes::from(format!("body failed: {e}\n")))),
        },
        ("/debug/big", true) => {
            // One buffer for every response: a flood of these measures the connection
            // handling, not the allocator.
            static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
            let big = BIG.get_or_init(|| Bytes::from(vec![b'x'; (MAX_DEBUG_KB * 1024) as usize]));
            let kb = query(&req, "kb").unwrap_or(1024).min(MAX_DEBUG_KB);
            Response::new(Full::new(big.slice(..(kb * 1024) as usize)))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `?ms=N` of a debug request, capped.
fn millis(req: &Request<RequestBody>) -> u64 {
    query(req, "ms").unwrap_or(1000).min(MAX_DEBUG_MS)
}

/// The number `?KEY=N` of a request.
fn query(req: &Request<RequestBody>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?.parse().ok()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
