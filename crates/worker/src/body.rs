//! Request bodies that an app may leave unread without breaking the connection.
//!
//! A client sends a body right after its headers; an app that answers without reading it
//! leaves those bytes in the socket, and hyper then gives up on the connection: it closes it
//! after the response, without `Connection: close` (measured: 15% of a keep-alive client's
//! requests failed when every third was a POST). So the app gets a [`RequestBody`] that gives
//! the body back when dropped unread; the worker reads and discards what is left (up to
//! `--max-unread-body`, within `--header-timeout`) before it answers, or, when that is too
//! much or too slow, answers with `Connection: close`, so the client knows to reconnect.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

use crate::connection::ConnState;

/// The body of a request as the app sees it: hyper's body, read the same way.
pub struct RequestBody {
    inner: Option<Incoming>,
    /// Where the body goes back when it is dropped before its end; `None` once it ended.
    unread: Option<oneshot::Sender<Incoming>>,
    /// The connection, told when the app waits for bytes of the body (`--body-timeout`);
    /// `None` for an empty body.
    connection: Option<Arc<ConnState>>,
}

/// The worker's end of a request body: what is left of it after the app answered.
pub(crate) enum Leftover {
    /// Nothing: the body was empty or read to its end.
    None,
    /// The app dropped the body before its end: this is the rest.
    Dropped(Incoming),
    /// The app still holds an unfinished body (it streams it, or forgot it somewhere).
    Held,
}

/// The worker's side of a [`RequestBody`].
pub(crate) struct Unread(Option<oneshot::Receiver<Incoming>>);

impl RequestBody {
    /// Wraps hyper's body; the returned handle tells, after the response, what is left.
    pub(crate) fn new(body: Incoming, connection: &Arc<ConnState>) -> (Self, Unread) {
        if body.is_end_stream() {
            return (Self { inner: Some(body), unread: None, connection: None }, Unread(None));
        }
        let (back, rx) = oneshot::channel();
        let connection = Some(Arc::clone(connection));
        (Self { inner: Some(body), unread: Some(back), connection }, Unread(Some(rx)))
    }
}

impl Unread {
    pub(crate) fn leftover(self) -> Leftover {
        let Some(mut rx) = self.0 else { return Leftover::None };
        match rx.try_recv() {
            Ok(rest) => Leftover::Dropped(rest),
            Err(oneshot::error::TryRecvError::Closed) => Leftover::None,
            Err(oneshot::error::TryRecvError::Empty) => Leftover::Held,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let frame = Pin::new(&mut *inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) || inner.is_end_stream() {
            self.unread = None; // ended (or failed): nothing to give back
        }
        if let Some(connection) = &self.connection {
            if frame.is_pending() { connection.body_waiting() } else { connection.body_progressed() }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Incoming::size_hint).unwrap_or_default()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(connection) = &self.connection {
            connection.body_progressed(); // nobody waits for it any more
        }
        if let (Some(inner), Some(back)) = (self.inner.take(), self.unread.take()) {
            let _ = back.send(inner);
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("end_stream", &self.is_end_stream()).finish()
    }
}

/// Reads and drops what is left of a body, at most `limit` bytes within `timeout`; true when
/// it reached the end, so the connection can carry the next request.
pub(crate) async fn discard(mut rest: Incoming, limit: u64, timeout: Duration) -> bool {
    if rest.size_hint().lower() > limit {
        return false; // announced as too large: don't wait for it
    }
    let read_all = async {
        let mut seen = 0u64;
        while let Some(frame) = rest.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > limit {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(timeout, read_all).await.unwrap_or(false)
}
