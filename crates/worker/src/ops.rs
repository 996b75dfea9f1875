//! The layer every app gets: `/healthz`, `/metrics`, the worker header and status counting.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode};

use crate::body::{Leftover, RequestBody, discard};
use crate::connection::ConnState;
use crate::stats::Stats;

/// The response header naming the worker that answered, so anyone can see the spread.
pub const WORKER_HEADER: HeaderName = HeaderName::from_static("x-sdcluster-worker");

/// A service a worker can serve, in hyper's shape: any `hyper::service::Service` of
/// requests with a [`RequestBody`] whose futures can move between threads. One value serves
/// every connection (`call` takes `&self`).
///
/// Entry points take [`IntoApp`] instead, which also admits tower services (axum's `Router`).
pub trait App:
    Service<Request<RequestBody>, Response = Response<Self::Body>, Error: Into<BoxError>, Future: Send + 'static>
    + Send
    + Sync
    + 'static
{
    /// The app's response body.
    type Body: AppBody;
}

impl<S, B: AppBody> App for S
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
        + Send
        + Sync
        + 'static,
{
    type Body = B;
}

/// What the entry points ([`crate::run`], [`crate::serve`], [`crate::Worker::serve`]) take:
/// a hyper service (`hyper::service::service_fn`, any [`App`]) or a tower service (axum's
/// `Router`, `tower::service_fn`, a `ServiceBuilder` stack), told apart by `Kind`, which the
/// compiler infers: callers never name it.
///
/// A tower service must be `Clone + Send + Sync`; it is cloned for each request and driven
/// through `poll_ready` then `call`, as `hyper_util::service::TowerToHyperService` does (for
/// axum's `Router` a clone is one reference count). Its request body is [`RequestBody`],
/// which axum accepts (`Router` serves any `Body<Data = Bytes>` whose error is a `BoxError`).
pub trait IntoApp<Kind> {
    /// The service in hyper's shape.
    type App: App;
    /// Converts.
    fn into_app(self) -> Self::App;
}

/// [`IntoApp`]'s `Kind` for hyper services.
#[derive(Debug)]
pub enum HyperKind {}

/// [`IntoApp`]'s `Kind` for tower services.
#[derive(Debug)]
pub enum TowerKind {}

impl<S: App> IntoApp<HyperKind> for S {
    type App = S;
    fn into_app(self) -> S {
        self
    }
}

impl<S, B> IntoApp<TowerKind> for S
where
    S: tower_service::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: AppBody,
{
    type App = hyper_util::service::TowerToHyperService<S>;
    fn into_app(self) -> Self::App {
        hyper_util::service::TowerToHyperService::new(self)
    }
}

/// A response body a worker can send.
pub trait AppBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<B> AppBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// What the layer answers with: its own small bodies, or the app's.
pub type OpsBody<B> = Either<Full<Bytes>, B>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps an app's service: answers the operational endpoints itself, passes everything else
/// on, and stamps and counts every response; keeps its connection's state current; answers
/// 500 for a handler that panics.
pub struct Instrumented<S> {
    common: Arc<Common<S>>,
    /// The connection served; `None` in the template every connection's copy is made from.
    connection: Option<Arc<ConnState>>,
}

/// What every connection's [`Instrumented`] shares.
struct Common<S> {
    app: S,
    stats: Arc<Stats>,
    worker: HeaderValue,
    unread: UnreadLimits,
    healthz: Option<Box<str>>,
    metrics: Option<Box<str>>,
}

/// Where the operational endpoints answer (`None`: off).
#[derive(Debug, Clone, Default)]
pub(crate) struct OpsPaths {
    pub(crate) healthz: Option<String>,
    pub(crate) metrics: Option<String>,
}

/// How much of a request body the app left unread is read and thrown away, and how fast.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnreadLimits {
    pub(crate) bytes: u64,
    pub(crate) timeout: Duration,
}

pin_project_lite::pin_project! {
    /// A response on its way: ends the request in the connection's state when it is sent
    /// (or dropped).
    pub struct ResponseBody<B> {
        #[pin]
        inner: OpsBody<B>,
        sent: Sent,
    }
}

struct Sent(Arc<ConnState>);

impl Drop for Sent {
    fn drop(&mut self) {
        self.0.response_finished();
    }
}

impl<B: AppBody> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S> Instrumented<S> {
    pub(crate) fn new(app: S, stats: Arc<Stats>, unread: UnreadLimits, paths: OpsPaths) -> Self {
        let worker =
            HeaderValue::from_str(stats.instance()).unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let common = Common {
            app,
            stats,
            worker,
            unread,
            healthz: paths.healthz.map(String::into_boxed_str),
            metrics: paths.metrics.map(String::into_boxed_str),
        };
        Self { common: Arc::new(common), connection: None }
    }

    /// This service for one connection.
    pub(crate) fn for_connection(&self, connection: Arc<ConnState>) -> Self {
        Self { common: Arc::clone(&self.common), connection: Some(connection) }
    }
}

impl<S> Common<S> {
    fn own(&self, status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }

    fn answer_ops<B>(&self, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
        let text = "text/plain; charset=utf-8";
        let path = Some(req.uri().path());
        let healthz = path == self.healthz.as_deref();
        if !healthz && path != self.metrics.as_deref() {
            return None;
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Some(self.own(StatusCode::METHOD_NOT_ALLOWED, text, Bytes::from_static(b"use GET\n")));
        }
        Some(if healthz {
            self.own(StatusCode::OK, text, Bytes::from_static(b"ok\n"))
        } else {
            self.own(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.stats.render_prometheus().into())
        })
    }

    /// The answer to a request whose handler panicked.
    fn panicked(&self, panic: &(dyn Any + Send)) -> Response<Full<Bytes>> {
        let what = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(not a string)");
        tracing::error!("a request handler panicked ({what}): answered 500");
        self.own(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"internal server error\n"),
        )
    }
}

/// Whether a response's `Connection` header says close.
fn says_close(response: &Response<impl Sized>) -> bool {
    response
        .headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))))
}

/// Stamps a response: the worker header, `Connection: close` when the connection ends here,
/// and the counters; then it goes out as a [`ResponseBody`] that ends the request in the
/// connection's state when sent. `upgrade`: the connection leaves HTTP with this response.
fn stamp<B>(
    common: &Common<impl Sized>,
    connection: Arc<ConnState>,
    began: Instant,
    response: Response<OpsBody<B>>,
    close: bool,
    upgrade: bool,
) -> Response<ResponseBody<B>> {
    let status = response.status();
    connection.response_ready();
    let mut response = response.map(|inner| ResponseBody { inner, sent: Sent(Arc::clone(&connection)) });
    response.headers_mut().insert(WORKER_HEADER, common.worker.clone());
    // A 101's `Connection: upgrade` stays: the connection leaves HTTP, it is not kept alive.
    if !upgrade {
        if close || connection.must_close() {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if says_close(&response) {
            connection.announce_close();
        }
    }
    common.stats.answered(status.as_u16(), began.elapsed());
    response
}

pin_project_lite::pin_project! {
    /// A future that turns a panic while it is polled into an `Err`.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // The future is not polled again after a panic (it is dropped with this one), so
        // no broken state of it is ever observed.
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

impl<S: App> Service<Request<Incoming>> for Instrumented<S> {
    type Response = Response<ResponseBody<S::Body>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let connection = Arc::clone(self.connection.as_ref().expect("a service made for a connection"));
        let let_others_run = connection.request_started();
        let began = Instant::now();
        let (head, body) = req.into_parts();
        let (body, unread) = RequestBody::new(body, &connection);
        let req = Request::from_parts(head, body);
        let common = &*self.common;
        if let Some(own) = common.answer_ops(&req) {
            drop(req);
            let close = matches!(unread.leftover(), Leftover::Dropped(_) | Leftover::Held);
            let response = stamp(common, connection, began, own.map(Either::Left), close, false);
            return Box::pin(async move {
                if let_others_run {
                    tokio::task::yield_now().await;
                }
                Ok::<_, BoxError>(response)
            });
        }
        // A panic in `call` itself (before any future exists) is caught here, one while the
        // future runs by `CatchUnwind`: either way the client gets a 500, and the connection
        // and its slot live on.
        let connect = req.method() == Method::CONNECT;
        let app = std::panic::catch_unwind(AssertUnwindSafe(|| common.app.call(req)));
        let common = Arc::clone(&self.common);
        Box::pin(async move {
            if let_others_run {
                tokio::task::yield_now().await;
            }
            // (`S::Error` need not be `Send`: it is converted before the next await.)
            let response = match app {
                Ok(app) => match (CatchUnwind { inner: app }).await {
                    Ok(Ok(response)) => response.map(Either::Right),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(panic) => common.panicked(&*panic).map(Either::Left),
                },
                Err(panic) => common.panicked(&*panic).map(Either::Left),
            };
            // hyper upgrades on a 101, and on a 2xx to CONNECT (a tunnel).
            let upgrade =
                response.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && response.status().is_success());
            if upgrade {
                // The connection leaves HTTP once this is sent: let it switch to hyper's
                // upgrading mode before hyper writes the response (see connection.rs).
                connection.upgrading();
                tokio::task::yield_now().await;
            }
            // An unread body would be taken for the next request: read it away, or say
            // that this connection ends here.
            let close = match unread.leftover() {
                Leftover::None => false,
                Leftover::Held => true,
                Leftover::Dropped(rest) => {
                    let discarded = discard(rest, common.unread.bytes, common.unread.timeout).await;
                    common.stats.unread_body(discarded);
                    !discarded
                }
            };
            Ok(stamp(&common, connection, began, response, close, upgrade))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn accepts<K>(app: impl IntoApp<K>) -> impl App {
        app.into_app()
    }

    #[test]
    fn hyper_and_tower_services_are_apps_as_they_are() {
        let hyper = hyper::service::service_fn(|_: Request<RequestBody>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hyper"))))
        });
        let _ = accepts(hyper);
        let tower = tower::service_fn(|_: Request<RequestBody>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"tower"))))
        });
        let _ = accepts(tower);
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "axum" }));
        let _ = accepts(router);
        let stack = tower::ServiceBuilder::new().map_response(|r: Response<Full<Bytes>>| r).service(tower);
        let _ = accepts(stack);
    }

    #[test]
    fn ops_paths_are_matched_exactly_and_can_be_off() {
        let stats = Arc::new(Stats::new("t".into()));
        let unread = UnreadLimits { bytes: 0, timeout: Duration::from_secs(1) };
        let paths = OpsPaths { healthz: Some("/livez".into()), metrics: None };
        let ops = Instrumented::new((), stats, unread, paths);
        let get = |path: &str| Request::get(path).body(()).unwrap();
        let answer = |path: &str| ops.common.answer_ops(&get(path)).map(|r| r.status());
        assert_eq!(answer("/livez"), Some(StatusCode::OK));
        assert_eq!(answer("/healthz"), None);
        assert_eq!(answer("/metrics"), None);
        assert_eq!(answer("/livez/x"), None);
        let post = Request::post("/livez").body(()).unwrap();
        assert_eq!(ops.common.answer_ops(&post).map(|r| r.status()), Some(StatusCode::METHOD_NOT_ALLOWED));
    }
}
