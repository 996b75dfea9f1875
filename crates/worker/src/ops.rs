//! The layer every app gets: `/healthz`, `/metrics`, the worker header and status counting.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// A service a worker can serve: any `hyper::service::Service` of requests with a
/// [`RequestBody`] whose futures can move between threads (tower services, axum's
/// `Router` among them, fit through `hyper_util::service::TowerToHyperService`).
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

/// A response body a worker can send.
pub trait AppBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<B> AppBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

/// What the layer answers with: its own small bodies, or the app's.
pub type OpsBody<B> = Either<Full<Bytes>, B>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps an app's service: answers the operational endpoints itself, passes everything else
/// on, and stamps and counts every response; keeps its connection's state current.
pub struct Instrumented<S> {
    app: Arc<S>,
    stats: Arc<Stats>,
    worker: HeaderValue,
    unread: UnreadLimits,
    /// The connection served; `None` in the template every connection's copy is made from.
    connection: Option<Arc<ConnState>>,
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
    pub(crate) fn new(app: Arc<S>, stats: Arc<Stats>, unread: UnreadLimits) -> Self {
        let worker =
            HeaderValue::from_str(stats.instance()).unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        Self { app, stats, worker, unread, connection: None }
    }

    /// This service for one connection.
    pub(crate) fn for_connection(&self, connection: Arc<ConnState>) -> Self {
        Self {
            app: Arc::clone(&self.app),
            stats: Arc::clone(&self.stats),
            worker: self.worker.clone(),
            unread: self.unread,
            connection: Some(connection),
        }
    }

    fn own(&self, status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }

    fn answer_ops<B>(&self, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
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

/// Whether a response's `Connection` header says close.
fn says_close(response: &Response<impl Sized>) -> bool {
    response
        .headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))))
}

impl<S: App> Service<Request<Incoming>> for Instrumented<S> {
    type Response = Response<ResponseBody<S::Body>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let connection = Arc::clone(self.connection.as_ref().expect("a service made for a connection"));
        connection.request_started();
        let began = std::time::Instant::now();
        let worker = self.worker.clone();
        let stats = Arc::clone(&self.stats);
        let stamp = move |response: Response<OpsBody<S::Body>>, close: bool| {
            let mut response = response.map(|inner| ResponseBody { inner, sent: Sent(Arc::clone(&connection)) });
            response.headers_mut().insert(WORKER_HEADER, worker);
            if close || connection.must_close() {
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            if says_close(&response) {
                connection.announce_close();
            }
            stats.answered(response.status().as_u16(), began.elapsed());
            response
        };
        let (head, body) = req.into_parts();
        let (body, unread) = RequestBody::new(body);
        let req = Request::from_parts(head, body);
        if let Some(own) = self.answer_ops(&req) {
            drop(req);
            let close = matches!(unread.leftover(), Leftover::Dropped(_) | Leftover::Held);
            let response = stamp(own.map(Either::Left), close);
            return Box::pin(async move { Ok::<_, BoxError>(response) });
        }
        let app = self.app.call(req);
        let (limits, stats) = (self.unread, Arc::clone(&self.stats));
        Box::pin(async move {
            let response = app.await.map_err(Into::into)?;
            // An unread body would be taken for the next request: read it away, or say
            // that this connection ends here.
            let close = match unread.leftover() {
                Leftover::None => false,
                Leftover::Held => true,
                Leftover::Dropped(rest) => {
                    let discarded = discard(rest, limits.bytes, limits.timeout).await;
                    stats.unread_body(discarded);
                    !discarded
                }
            };
            Ok(stamp(response.map(Either::Right), close))
        })
    }
}
