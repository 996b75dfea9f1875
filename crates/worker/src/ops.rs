//! The layer every app gets: `/healthz`, `/metrics`, the worker header and status counting.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Notify;

use crate::stats::Stats;

/// The response header naming the worker that answered, so anyone can see the spread.
pub const WORKER_HEADER: HeaderName = HeaderName::from_static("x-sdcluster-worker");

/// A hyper service a worker can serve: any `hyper::service::Service` of requests whose
/// futures can move between threads (tower services fit through
/// `hyper_util::service::TowerToHyperService`).
pub trait App:
    Service<Request<Incoming>, Response = Response<Self::Body>, Error: Into<BoxError>, Future: Send + 'static>
    + Send
    + Sync
    + 'static
{
    /// The app's response body.
    type Body: AppBody;
}

impl<S, B: AppBody> App for S
where
    S: Service<Request<Incoming>, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
        + Send
        + Sync
        + 'static,
{
    type Body = B;
}

/// A response body a worker can send.
pub trait AppBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<B> AppBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// What the layer answers with: its own small bodies, or the app's.
pub type OpsBody<B> = Either<Full<Bytes>, B>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps an app's service: answers the operational endpoints itself, passes everything else
/// on, and stamps and counts every response.
pub struct Instrumented<S> {
    app: Arc<S>,
    stats: Arc<Stats>,
    worker: HeaderValue,
    first_request: Arc<FirstRequest>,
}

/// Whether a connection has started its first request yet: a drain must not close a
/// connection whose client is sending its first request right now.
#[derive(Default)]
pub(crate) struct FirstRequest {
    seen: AtomicBool,
    arrived: Notify,
}

impl FirstRequest {
    pub(crate) fn seen(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }

    /// Returns once the first request has started.
    pub(crate) async fn arrived(&self) {
        if !self.seen() {
            self.arrived.notified().await;
        }
    }

    fn mark(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.arrived.notify_one();
        }
    }
}

impl<S> Instrumented<S> {
    pub(crate) fn new(app: Arc<S>, stats: Arc<Stats>) -> Self {
        let worker =
            HeaderValue::from_str(stats.instance()).unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        Self { app, stats, worker, first_request: Arc::default() }
    }

    /// This service for one new connection, and that connection's first-request flag.
    pub(crate) fn for_connection(&self) -> (Self, Arc<FirstRequest>) {
        let first_request = Arc::new(FirstRequest::default());
        let service = Self {
            app: Arc::clone(&self.app),
            stats: Arc::clone(&self.stats),
            worker: self.worker.clone(),
            first_request: Arc::clone(&first_request),
        };
        (service, first_request)
    }

    fn own(&self, status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }

    fn answer_ops(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let text = "text/plain; charset=utf-8";
        let head = matches!(*req.method(), Method::GET | Method::HEAD);
        match req.uri().path() {
            "/healthz" if head => Some(self.own(StatusCode::OK, text, "ok\n".into())),
            "/metrics" if head => Some(self.own(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.stats.render_prometheus(),
            )),
            "/healthz" | "/metrics" => Some(self.own(StatusCode::METHOD_NOT_ALLOWED, text, "use GET\n".into())),
            _ => None,
        }
    }
}

impl<S: App> Service<Request<Incoming>> for Instrumented<S> {
    type Response = Response<OpsBody<S::Body>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.first_request.mark();
        let worker = self.worker.clone();
        let stats = Arc::clone(&self.stats);
        let stamp = move |mut response: Self::Response| {
            response.headers_mut().insert(WORKER_HEADER, worker);
            stats.answered(response.status().as_u16());
            response
        };
        if let Some(own) = self.answer_ops(&req) {
            let response = stamp(own.map(Either::Left));
            return Box::pin(async move { Ok::<_, BoxError>(response) });
        }
        let app = self.app.call(req);
        Box::pin(async move {
            let response = app.await.map_err(Into::into)?;
            Ok(stamp(response.map(Either::Right)))
        })
    }
}
