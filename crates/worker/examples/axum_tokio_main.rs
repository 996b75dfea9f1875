//! An axum app as an sdcluster worker inside the app's own runtime (`#[tokio::main]`):
//! [`sdcluster_worker::Worker`] (what [`sdcluster_worker::serve`] does, plus a drain signal),
//! options from the environment and the builder (no CLI), a WebSocket echo route that says
//! goodbye (close 1001) when the worker drains, and the health check moved to `/livez` so
//! that the app's own `/healthz` is its own.
//!
//! ```sh
//! cargo build -p sdcluster-worker --examples
//! sdcluster run --instances 2 -- target/debug/examples/axum_tokio_main
//! curl http://127.0.0.1:8080/livez     # ok (the worker's)
//! curl http://127.0.0.1:8080/healthz   # the app's
//! websocat ws://127.0.0.1:8080/ws      # echoes every message
//! ```

use std::process::ExitCode;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::routing::get;
use sdcluster_worker::{Draining, Options, Worker};

#[tokio::main]
async fn main() -> ExitCode {
    // The defaults, with what a supervisor sets (SDCLUSTER_INSTANCE, SDCLUSTER_REQUIRE_SOCKET,
    // ...); `Options::default()` would ignore the environment.
    let opts = match Options::from_env() {
        Ok(opts) => opts,
        Err(e) => e.exit(),
    };
    // Builders win over the environment (SDCLUSTER_HEALTHZ_PATH here).
    let opts = opts.with_healthz("/livez");
    let worker = Worker::new(opts);
    let draining = worker.draining();
    let app = Router::new()
        .route("/", get(|| async { "hello from axum in tokio::main\n" }))
        .route("/healthz", get(|| async { "the app's own /healthz\n" }))
        .route(
            "/ws",
            get(move |ws: WebSocketUpgrade| {
                let draining = draining.clone();
                async move { ws.on_upgrade(move |socket| echo(socket, draining)) }
            }),
        );
    match worker.serve(app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum_tokio_main: {e}");
            e.exit_code()
        }
    }
}

/// Sends every text and binary message back until the client closes; when the worker
/// drains, closes with 1001 ("going away": the client reconnects, to the next process).
async fn echo(mut socket: WebSocket, draining: Draining) {
    let mut closing = false;
    loop {
        let message = tokio::select! {
            message = socket.recv() => message,
            () = draining.started(), if !closing => {
                closing = true;
                let bye = CloseFrame { code: close_code::AWAY, reason: "restarting".into() };
                if socket.send(Message::Close(Some(bye))).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match message {
            None | Some(Err(_)) => return,
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) if !closing => {
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            // The library answers pings and the client's close (then `recv` ends).
            Some(Ok(_)) => {}
        }
    }
}
