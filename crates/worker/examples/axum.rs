//! An axum app as an sdcluster worker, with a synchronous `main`: the worker's options
//! flattened into the app's own clap CLI, and [`sdcluster_worker::run`] building the runtime.
//!
//! ```sh
//! cargo build -p sdcluster-worker --examples
//! sdcluster run --instances 2 -- target/debug/examples/axum --greeting hi
//! curl http://127.0.0.1:8080/          # hi
//! curl http://127.0.0.1:8080/metrics   # the worker's, beside the app's routes
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use clap::Parser;
use hyper::body::Frame;

/// An axum app on the sdcluster worker runtime.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// What `GET /` answers.
    #[arg(long, default_value = "hello from axum")]
    greeting: String,

    #[command(flatten)]
    worker: sdcluster_worker::Options,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let greeting = format!("{}\n", cli.greeting);
    let app = Router::new()
        .route("/", get(move || std::future::ready(greeting.clone())))
        // A bug in a handler: the worker answers 500, and the connection's slot stays free.
        .route("/panic", get(|| async { panic_in_handler() }))
        // A bug in a response body, after the head: the connection is dropped, and its
        // slot is given back all the same.
        .route("/panic-in-body", get(|| async { Body::new(PanickingBody) }));
    sdcluster_worker::run(cli.worker, app)
}

fn panic_in_handler() -> &'static str {
    panic!("a bug in a handler")
}

/// A response body that panics when hyper asks for its first frame.
struct PanickingBody;

impl hyper::body::Body for PanickingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        panic!("a bug in a response body")
    }
}
