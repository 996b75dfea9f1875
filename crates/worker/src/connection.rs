//! One client connection, from accept (or take-over) to close or hand-over.
//!
//! hyper serves the requests; around it, this module knows where the connection stands:
//! busy with a request, or idle at a request boundary (waiting for the next one). That is
//! what every decision here needs:
//! - timeouts: an idle connection gets `--keepalive-timeout` to start its next request, a
//!   request that started gets `--header-timeout` for its head (slowloris), a new connection
//!   `--header-timeout` for its first request; while a request runs, a response that makes
//!   no write progress for `--write-timeout` (a client that stops reading) and a body the
//!   app waits for that brings no byte for `--body-timeout` (a client that dribbles it, or
//!   stops) end the connection (the latter with a 408 when no answer started);
//! - a drain that hands over: each connection is taken out of hyper at its next request
//!   boundary, with the bytes hyper already read, and passed to the next process;
//! - a drain with no replacement: responses announce `Connection: close`, and connections
//!   still idle after the grace are closed; a kept-alive connection is never closed under a
//!   client that may be sending its next request without having been told.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::gate::{Gate, Open};
use crate::handover::HandOver;
use crate::ops::{App, Instrumented};
use crate::stats::{Rejected, Stats};

/// Where a connection stands, kept by the connection's I/O and by the service layer.
pub(crate) struct ConnState {
    /// Requests whose head was read (the service was called).
    started: AtomicU32,
    /// Responses sent to their end.
    finished: AtomicU32,
    /// When the last response ended (or the connection began), in [`now_ns`]; [`UNSTAMPED`]
    /// until [`Drive`] next looks (reading the clock once per request, not at every event).
    boundary_at: AtomicU64,
    /// When the first byte after that boundary arrived: 0 while none did, else as above.
    first_byte_at: AtomicU64,
    /// Responses must say `Connection: close` (a drain with no replacement).
    close_next: AtomicBool,
    /// A response said `Connection: close`: the client will not send another request.
    announced_close: AtomicBool,
    /// Hand-over: once the request in flight is answered, read nothing more (a client that
    /// always has its next request ready would otherwise never leave hyper at a boundary).
    hold_reads: AtomicBool,
    /// The app answered 101 Switching Protocols (or 2xx to CONNECT): the connection leaves
    /// HTTP (a WebSocket, a tunnel) once that is sent, and is neither handed over nor held.
    upgrading: AtomicBool,
    /// Since when hyper has been waiting to write (the socket's buffer is full: the client
    /// does not read): 0 while writes go through, else as `boundary_at`.
    write_blocked_at: AtomicU64,
    /// Since when the app has been waiting for bytes of the request body: 0 while it is not,
    /// else as `boundary_at`.
    body_wait_at: AtomicU64,
    /// Requests the app produced an answer for (its head is with hyper).
    answered: AtomicU32,
}

impl ConnState {
    fn new() -> Self {
        Self {
            started: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            boundary_at: AtomicU64::new(now_ns()),
            first_byte_at: AtomicU64::new(0),
            close_next: AtomicBool::new(false),
            announced_close: AtomicBool::new(false),
            hold_reads: AtomicBool::new(false),
            upgrading: AtomicBool::new(false),
            write_blocked_at: AtomicU64::new(0),
            body_wait_at: AtomicU64::new(0),
            answered: AtomicU32::new(0),
        }
    }

    /// The app produced the answer of the request running (hyper writes it next).
    pub(crate) fn response_ready(&self) {
        self.answered.store(self.started.load(Relaxed), Relaxed);
    }

    /// The app waits for bytes of the request body (it polled the body and got nothing).
    pub(crate) fn body_waiting(&self) {
        if self.body_wait_at.load(Relaxed) == 0 {
            self.body_wait_at.store(UNSTAMPED, Relaxed);
        }
    }

    /// The app got body bytes (or the end), or stopped waiting.
    pub(crate) fn body_progressed(&self) {
        if self.body_wait_at.load(Relaxed) != 0 {
            self.body_wait_at.store(0, Relaxed);
        }
    }

    fn write_blocked(&self) {
        if self.write_blocked_at.load(Relaxed) == 0 {
            self.write_blocked_at.store(UNSTAMPED, Relaxed);
        }
    }

    fn write_progressed(&self) {
        if self.write_blocked_at.load(Relaxed) != 0 {
            self.write_blocked_at.store(0, Relaxed);
        }
    }

    /// A write or the app's wait for the body is making no progress.
    fn stalled(&self) -> bool {
        self.write_blocked_at.load(Relaxed) != 0 || self.body_wait_at.load(Relaxed) != 0
    }

    /// Counts a request whose head was read; whether it is time to let the connection's
    /// peers run (see [`YIELD_EVERY`]).
    pub(crate) fn request_started(&self) -> bool {
        (self.started.fetch_add(1, Relaxed) + 1) % YIELD_EVERY == 0
    }

    pub(crate) fn response_finished(&self) {
        self.first_byte_at.store(0, Relaxed);
        self.boundary_at.store(UNSTAMPED, Relaxed);
        self.finished.fetch_add(1, Relaxed);
    }

    /// Whether the next response must announce `Connection: close`.
    pub(crate) fn must_close(&self) -> bool {
        self.close_next.load(Relaxed)
    }

    /// The response being sent upgrades the connection: see [`Hyper`] for what follows.
    pub(crate) fn upgrading(&self) {
        self.upgrading.store(true, Relaxed);
        self.hold_reads.store(false, Relaxed); // the app reads the upgraded connection
    }

    fn is_upgrading(&self) -> bool {
        self.upgrading.load(Relaxed)
    }

    pub(crate) fn announce_close(&self) {
        self.announced_close.store(true, Relaxed);
    }

    fn bytes_arrived(&self) {
        if self.first_byte_at.load(Relaxed) == 0 {
            self.first_byte_at.store(UNSTAMPED, Relaxed);
        }
    }

    fn at_boundary(&self) -> bool {
        self.started.load(Relaxed) == self.finished.load(Relaxed)
    }

    /// Nothing was ever read from this connection or answered on it.
    fn untouched(&self) -> bool {
        self.started.load(Relaxed) == 0 && self.first_byte_at.load(Relaxed) == 0
    }

    fn unstamped(&self) -> bool {
        [&self.boundary_at, &self.first_byte_at, &self.write_blocked_at, &self.body_wait_at]
            .iter()
            .any(|at| at.load(Relaxed) == UNSTAMPED)
    }

    /// Puts the time on what happened since [`Drive`] last looked: it looks in the same
    /// poll in which hyper read the byte, finished the response or found the socket full,
    /// so the time is right.
    fn stamp(&self, now: u64) {
        for at in [&self.boundary_at, &self.first_byte_at, &self.write_blocked_at, &self.body_wait_at] {
            if at.load(Relaxed) == UNSTAMPED {
                at.store(now, Relaxed);
            }
        }
    }

    /// When a write or the app's wait for the body that makes no progress times out.
    fn stall_deadline(&self, limits: &Limits) -> Option<Instant> {
        let since = |at: &AtomicU64, limit: Duration| {
            let at = at.load(Relaxed);
            (at > UNSTAMPED).then(|| instant(at) + limit)
        };
        match (since(&self.write_blocked_at, limits.write_timeout), since(&self.body_wait_at, limits.body_timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the connection times out: the stalls' deadlines, and at a boundary (`idle`) the
    /// idle deadline.
    fn deadline(&self, limits: &Limits, idle: bool) -> Option<Instant> {
        let stall = self.stall_deadline(limits);
        if !idle {
            return stall;
        }
        let idle = self.idle_deadline(limits);
        Some(stall.map_or(idle, |stall| stall.min(idle)))
    }

    /// What timed out at `now`, if anything.
    fn expired(&self, limits: &Limits, idle: bool, now: Instant) -> Option<Outcome> {
        let past = |at: &AtomicU64, limit: Duration| {
            let at = at.load(Relaxed);
            at > UNSTAMPED && now >= instant(at) + limit
        };
        if past(&self.write_blocked_at, limits.write_timeout) {
            return Some(Outcome::Stalled(Stall::Write));
        }
        if past(&self.body_wait_at, limits.body_timeout) {
            let answered = self.answered.load(Relaxed) == self.started.load(Relaxed);
            return Some(Outcome::Stalled(Stall::Body { answered }));
        }
        if idle && now >= self.idle_deadline(limits) {
            let head = self.first_byte_at.load(Relaxed) != 0 || self.started.load(Relaxed) == 0;
            return Some(Outcome::TimedOut { head });
        }
        None
    }

    /// When an idle connection leaves hyper ([`PARK_AFTER`]); `None` once a byte of its next
    /// request arrived (or while none was stamped yet).
    fn park_at(&self) -> Option<Instant> {
        let boundary = self.boundary_at.load(Relaxed);
        (self.first_byte_at.load(Relaxed) == 0 && boundary > UNSTAMPED).then(|| instant(boundary) + PARK_AFTER)
    }

    /// When an idle connection times out: its head's deadline once a byte of it arrived,
    /// else the keep-alive (or, before the first request, the header) timeout.
    fn idle_deadline(&self, limits: &Limits) -> Instant {
        let first_byte = self.first_byte_at.load(Relaxed);
        if first_byte != 0 {
            instant(first_byte) + limits.header_timeout
        } else if self.started.load(Relaxed) == 0 {
            instant(self.boundary_at.load(Relaxed)) + limits.header_timeout
        } else {
            instant(self.boundary_at.load(Relaxed)) + limits.keepalive_timeout
        }
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Every this many requests a connection lets the others run (`yield_now`: woken after the
/// runtime polled for I/O). hyper serves up to 16 pipelined requests per poll and then wakes
/// itself at once, so a client that pipelines thousands would keep the runtime from polling
/// for I/O (tokio does that every 61 tasks run, or when none is ready) and delay every other
/// connection by ~1000 requests; with this, by at most this many.
const YIELD_EVERY: u32 = 16;

/// A kept-alive connection idle this long leaves hyper: its buffers and hyper's state are
/// freed, and the bare socket waits (in a small task) until it is readable again. An idle
/// connection then costs what its socket, its timer and [`ConnState`] cost (under 1 KiB),
/// not hyper's ~8 KiB read buffer and connection. A busy connection is never parked: its
/// timer goes off at most once per this long (see [`IdleClock`]), and a connection that
/// waits a little longer pays one rebuild of hyper's connection when its next request comes.
const PARK_AFTER: Duration = Duration::from_millis(10);

/// A time in [`ConnState`] that happened but was not read off the clock yet.
const UNSTAMPED: u64 = 1;

/// Nanoseconds since the first call, above [`UNSTAMPED`] (0 means "not yet").
fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64 + 2
}

/// [`now_ns`] for an instant already read.
fn ns_of(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_nanos() as u64 + 2
}

fn instant(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

/// The timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) keepalive_timeout: Duration,
    /// No write progress for this long: the client does not read; closed.
    pub(crate) write_timeout: Duration,
    /// No body byte for this long while the app waits for one: 408 (or closed).
    pub(crate) body_timeout: Duration,
}

/// What the worker is doing, as every connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// Serving as usual.
    Serving,
    /// Stopping: hand idle connections to the next process if `handover`, else (and for
    /// those the store has no room for) announce the close and close the idle ones once
    /// `grace_until` has passed.
    Stopping { handover: bool, grace_until: Instant },
    /// The drain is over (done, timed out or cut short): connections still open are
    /// dropped. Upgraded connections are the app's, and not affected.
    Cut,
}

/// A connection's own part of the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serving,
    HandOver,
    Close { grace_until: Instant },
}

/// What every connection of a worker shares.
pub(crate) struct Shared<S> {
    pub(crate) http: http1::Builder,
    pub(crate) service: Instrumented<S>,
    pub(crate) limits: Limits,
    pub(crate) drain: watch::Receiver<Drain>,
    pub(crate) handover: Arc<HandOver>,
    pub(crate) gate: Arc<Gate>,
}

impl<S> Shared<S> {
    /// The connection's mode once the worker drains.
    fn enter(&self, drain: Drain, state: &ConnState) -> Mode {
        match drain {
            // Leaving HTTP: nothing to hand over or close at a boundary.
            _ if state.is_upgrading() => Mode::Serving,
            Drain::Serving | Drain::Cut => Mode::Serving,
            Drain::Stopping { handover: true, .. } if self.handover.reserve() => {
                state.hold_reads.store(true, Relaxed);
                Mode::HandOver
            }
            Drain::Stopping { grace_until, .. } => {
                state.close_next.store(true, Relaxed);
                Mode::Close { grace_until }
            }
        }
    }
}

/// An accepted (or taken-over) connection: TCP or Unix.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Wraps a connected socket passed from elsewhere (the fd store).
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
        let family =
            getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::from)?.family();
        match family {
            Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpStream::from_std(std)?))
            }
            Some(AddressFamily::Unix) => {
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::Unix(UnixStream::from_std(std)?))
            }
            other => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a TCP or Unix socket: {other:?}"))),
        }
    }

    /// Makes the close that follows a reset (`SO_LINGER` 0), dropping unsent data.
    fn reset_on_close(&self) {
        if let Self::Tcp(s) = self {
            let _ = s.set_zero_linger();
        }
    }

    /// Sends `bytes` if the socket takes them now, without waiting.
    fn try_send(&self, bytes: &[u8]) {
        let _ = match self {
            Self::Tcp(s) => s.try_write(bytes),
            Self::Unix(s) => s.try_write(bytes),
        };
    }

    /// Shuts both directions down at once (as `shutdown().await` would for a socket whose
    /// buffers are empty), with no future to keep in a parked connection's task.
    fn shutdown_now(&self) {
        let _ = match self {
            Self::Tcp(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both),
        };
    }

    /// Waits until the socket has bytes (or the peer's end) to read.
    async fn readable(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.readable().await,
            Self::Unix(s) => s.readable().await,
        }
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(match self {
            Self::Tcp(s) => s.into_std()?.into(),
            Self::Unix(s) => s.into_std()?.into(),
        })
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        both!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        both!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The stream as hyper sees it: first the bytes a previous process had already read, then
/// the socket; every read tells the connection's state that bytes arrived.
///
/// It carries the connection's place in the gate ([`Open`]): wherever the stream goes, the
/// count follows, and it is given back however the stream ends: closed, handed over, the
/// task dropped or panicking, or (upgraded) dropped by the app when its WebSocket is done.
struct Tracked {
    io: Stream,
    prefix: Bytes,
    state: Arc<ConnState>,
    stats: Arc<Stats>,
    open: Open,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.state.hold_reads.load(Relaxed) && this.state.at_boundary() && this.state.started.load(Relaxed) > 0 {
            // The connection's next request is for the next process; [`Drive`] takes the
            // connection out of hyper in this same poll, so nobody waits for a wake-up.
            return Poll::Pending;
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.state.bytes_arrived();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.bytes_arrived();
            this.stats.bytes_in(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Tracked {
    /// Counts what a write sent, and tells the connection's state whether it went through.
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.stats.bytes_out(*n);
                self.state.write_progressed();
            }
            Poll::Pending => self.state.write_blocked(),
            Poll::Ready(Err(_)) => {}
        }
    }
}

type Plain<S> = http1::Connection<TokioIo<Tracked>, Instrumented<S>>;

/// hyper serving the connection.
///
/// Normally a plain `Connection`, driven with `poll_without_shutdown`, so that at a request
/// boundary it can be taken apart (`into_parts`: the socket and the bytes read ahead) for a
/// hand-over or a graceful close. hyper's upgrade support (`with_upgrades`) has no such
/// exit, and a plain `Connection` fails any upgrade (it answers the app's `OnUpgrade` with
/// an error once the 101 is out). So the switch is made for the one response that needs it:
/// when the app answers 101, the service layer marks the connection upgrading and yields
/// once before handing the response to hyper; in that pause [`Drive`] wraps the connection
/// `with_upgrades`, and hyper then gives the socket (in an `Upgraded`) to the app. An
/// upgrading connection is never handed over or held at a boundary, and it stays counted
/// open until the app drops it (a drain waits for it up to `--drain-timeout`).
enum Hyper<S: App> {
    Plain(Plain<S>),
    Upgrading(http1::UpgradeableConnection<TokioIo<Tracked>, Instrumented<S>>),
    /// Only while switching from one to the other.
    Switching,
}

impl<S: App> Hyper<S> {
    fn poll(&mut self, cx: &mut Context<'_>, state: &ConnState) -> Poll<hyper::Result<()>> {
        if let Hyper::Plain(_) = self {
            if state.is_upgrading() {
                if let Hyper::Plain(conn) = std::mem::replace(self, Hyper::Switching) {
                    *self = Hyper::Upgrading(conn.with_upgrades());
                }
            }
        }
        match self {
            Hyper::Plain(conn) => conn.poll_without_shutdown(cx),
            Hyper::Upgrading(conn) => Pin::new(conn).poll(cx),
            Hyper::Switching => Poll::Ready(Ok(())),
        }
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Hyper::Plain(conn) => Pin::new(conn).graceful_shutdown(),
            Hyper::Upgrading(conn) => Pin::new(conn).graceful_shutdown(),
            Hyper::Switching => {}
        }
    }

    /// The socket back from hyper; `None` once the app has it (upgraded).
    fn into_parts(self) -> Option<http1::Parts<TokioIo<Tracked>, Instrumented<S>>> {
        match self {
            Hyper::Plain(conn) => Some(conn.into_parts()),
            Hyper::Upgrading(conn) => conn.into_parts(),
            Hyper::Switching => None,
        }
    }
}

/// How a run of hyper on the connection ended.
enum Outcome {
    /// hyper finished: the client closed, a response announced the close, an error, or the
    /// shutdown asked for at a boundary took effect.
    Ended(hyper::Result<()>),
    /// Nothing was ever read from or written to the connection, and the drain wants it.
    Untouched,
    /// An idle connection's deadline passed (`head`: in the middle of a request head).
    TimedOut { head: bool },
    /// A write or the app's wait for the body made no progress for its timeout.
    Stalled(Stall),
    /// Idle for [`PARK_AFTER`]: hyper stopped at the boundary, the socket is to be parked.
    Parked,
}

/// What made no progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// The response: the client does not read it.
    Write,
    /// The request body the app waits for (`answered`: the app had produced its answer).
    Body { answered: bool },
}

/// Drives hyper, and watches the connection's state each time hyper waits.
struct Drive<'a, S: App> {
    conn: &'a mut Hyper<S>,
    state: &'a ConnState,
    timer: Pin<&'a mut Sleep>,
    mode: Mode,
    limits: Limits,
    /// Requests started when the shutdown at a boundary was asked for (`None`: not asked).
    asked: &'a mut Option<u32>,
    /// The shutdown at a boundary was asked for to park the connection ([`PARK_AFTER`]).
    parking: &'a mut bool,
    /// The idle deadline and the timer's state, kept across polls (and across `Drive`s).
    clock: &'a mut IdleClock,
}

/// When an idle connection times out and when to look at it next; recomputed only when the
/// connection's state moved, so that an idle poll costs no clock read and no timer call.
#[derive(Default)]
struct IdleClock {
    /// (timeout, wake-up): the wake-up comes earlier during a grace.
    deadline: Option<(Instant, Instant)>,
    /// The timer was polled since it was last reset, so it will wake the task.
    armed: bool,
}

impl<S: App> Drive<'_, S> {
    /// Whether an idle connection may be parked now: not twice, not when leaving HTTP, and
    /// not while a write waits (hyper would drop what it has not sent yet). The same test
    /// decides whether the timer wakes it to park, so it never wakes for nothing.
    fn may_park(&self) -> bool {
        !*self.parking && !self.state.stalled() && !self.state.is_upgrading()
    }
}

impl<S: App> Future for Drive<'_, S> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(ended) = this.conn.poll(cx, this.state) {
                let parked = *this.parking && ended.is_ok() && this.state.at_boundary();
                return Poll::Ready(if parked { Outcome::Parked } else { Outcome::Ended(ended) });
            }
            let idle = this.state.at_boundary();
            if !idle && !this.state.stalled() {
                return Poll::Pending; // a request runs and moves; the app decides how long
            }
            // The clock is read once per request (to stamp its end), once per stall, and
            // during a grace.
            let close = matches!(this.mode, Mode::Close { .. });
            let now = if this.state.unstamped() || close || this.clock.deadline.is_none() {
                let now = Instant::now();
                this.state.stamp(ns_of(now));
                this.clock.deadline = None;
                Some(now)
            } else {
                None
            };
            let stop =
                idle && match this.mode {
                    Mode::Serving => false,
                    Mode::HandOver => true,
                    Mode::Close { grace_until } => now.is_some_and(|now| now >= grace_until),
                } && !this.state.is_upgrading();
            if stop {
                if this.state.untouched() {
                    return Poll::Ready(Outcome::Untouched);
                }
                if this.asked.is_none() {
                    // Idle in hyper: it stops at once; finishing a response: right after it.
                    this.conn.graceful_shutdown();
                    *this.asked = Some(this.state.started.load(Relaxed));
                    continue;
                }
            }
            let deadline = match this.clock.deadline {
                Some(deadline) => deadline,
                None => {
                    let Some(timeout) = this.state.deadline(&this.limits, idle) else {
                        return Poll::Pending; // the stall just ended
                    };
                    let wake = match this.mode {
                        Mode::Close { grace_until } if idle && this.asked.is_none() => timeout.min(grace_until),
                        // (Once a stall ends, it parks when the timer next goes off.)
                        Mode::Serving if idle && this.may_park() => {
                            this.state.park_at().map_or(timeout, |park| timeout.min(park))
                        }
                        _ => timeout,
                    };
                    *this.clock.deadline.insert((timeout, wake))
                }
            };
            let wake = deadline.1;
            if this.timer.deadline() > wake {
                this.timer.as_mut().reset(wake);
                this.clock.armed = false;
            }
            if this.clock.armed && !this.timer.is_elapsed() {
                return Poll::Pending;
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                this.clock.armed = true;
                return Poll::Pending;
            }
            // The timer went off: what timed out is decided afresh (a stall may have ended,
            // a deadline moved on since it was set).
            let now = now.unwrap_or_else(Instant::now);
            if let Some(outcome) = this.state.expired(&this.limits, idle, now) {
                return Poll::Ready(outcome);
            }
            let park = idle && this.mode == Mode::Serving && this.may_park();
            if park && this.state.park_at().is_some_and(|at| now >= at) {
                // Idle in hyper: it stops at once, and the connection is parked.
                this.conn.graceful_shutdown();
                *this.parking = true;
                continue;
            }
            // Woken early (a deadline that moved on, or the grace): look again.
            this.clock.deadline = None;
            this.timer.as_mut().reset(wake.max(now + Duration::from_millis(1)));
            this.clock.armed = false;
        }
    }
}

/// Serves one connection to its end; `prefix` holds bytes a previous process had already
/// read from it. The caller counts the connection open (`Gate::opened`) before spawning
/// this, so that the accept loop sees its own count at once; dropping `open` counts it
/// closed, however this ends (a panic, the task dropped, or the app done with an upgrade).
pub(crate) async fn serve<S: App>(stream: Stream, prefix: Bytes, shared: Arc<Shared<S>>, open: Open) {
    let mut kept = Kept {
        state: Arc::new(ConnState::new()),
        drain: shared.drain.clone(),
        drain_open: true,
        mode: Mode::Serving,
        timer: Box::pin(tokio::time::sleep(shared.limits.header_timeout)),
        clock: IdleClock::default(),
    };
    let (mut io, mut prefix, mut open) = (stream, prefix, open);
    loop {
        // Boxed: a parked connection's task holds none of hyper's state (see [`PARK_AFTER`]).
        let Some((parked, place)) = Box::pin(serve_in_hyper(&mut kept, io, prefix, open, &shared)).await else {
            return;
        };
        kept.timer.as_mut().reset(kept.state.idle_deadline(&shared.limits));
        kept.clock.armed = false;
        tokio::select! {
            biased;
            _ = parked.readable() => {}
            changed = kept.drain.changed(), if kept.drain_open => match changed {
                // hyper takes the connection back, and with it the drain's mode.
                Ok(()) => match *kept.drain.borrow_and_update() {
                    Drain::Cut => return,
                    now => kept.mode = shared.enter(now, &kept.state),
                },
                Err(_) => kept.drain_open = false,
            },
            () = kept.timer.as_mut() => return parked.shutdown_now(),
        }
        (io, prefix, open) = (parked, Bytes::new(), place);
    }
    // `open`, wherever it is now, counts the connection closed as it drops.
}

/// What a connection keeps across runs of hyper, and while it is parked.
struct Kept {
    state: Arc<ConnState>,
    drain: watch::Receiver<Drain>,
    drain_open: bool,
    mode: Mode,
    timer: Pin<Box<Sleep>>,
    clock: IdleClock,
}

/// Serves the connection with hyper until it ends (`None`), or until it is idle for
/// [`PARK_AFTER`] with nothing read ahead: then its socket and place come back, to be parked.
async fn serve_in_hyper<S: App>(
    kept: &mut Kept,
    mut io: Stream,
    mut prefix: Bytes,
    mut open: Open,
    shared: &Shared<S>,
) -> Option<(Stream, Open)> {
    loop {
        let service = shared.service.for_connection(Arc::clone(&kept.state));
        let tracked = Tracked { io, prefix, state: Arc::clone(&kept.state), stats: shared.gate.stats(), open };
        // Boxed: sized for hyper only while it serves the connection.
        let mut conn = Box::new(Hyper::Plain(shared.http.serve_connection(TokioIo::new(tracked), service)));
        let mut asked = None;
        let mut parking = false;
        let mut stalled = None;
        let outcome = loop {
            kept.clock.deadline = None; // a new mode, or a new run of hyper
            let drive = Drive {
                conn: &mut conn,
                state: &kept.state,
                timer: kept.timer.as_mut(),
                mode: kept.mode,
                limits: shared.limits,
                asked: &mut asked,
                parking: &mut parking,
                clock: &mut kept.clock,
            };
            tokio::select! {
                biased;
                outcome = drive => break outcome,
                changed = kept.drain.changed(), if kept.drain_open => match changed {
                    Ok(()) => match *kept.drain.borrow_and_update() {
                        Drain::Cut => return None, // dropping `conn` closes the socket and the slot
                        now if kept.mode == Mode::Serving => kept.mode = shared.enter(now, &kept.state),
                        _ => {}
                    },
                    Err(_) => kept.drain_open = false,
                },
            }
        };
        let handing_over = match outcome {
            Outcome::Ended(Err(e)) => {
                if let Some(why) = Rejected::of(&e) {
                    shared.gate.stats().rejected(why);
                }
                tracing::debug!("connection ended with an error: {e}");
                return None;
            }
            Outcome::TimedOut { head } => {
                if head {
                    shared.gate.stats().rejected(Rejected::HeaderTimeout);
                }
                false
            }
            Outcome::Stalled(stall) => {
                stalled = Some(stall);
                false
            }
            Outcome::Untouched => kept.mode == Mode::HandOver,
            Outcome::Parked => false,
            Outcome::Ended(Ok(())) => {
                // Our shutdown at a boundary, with no request served since and no close
                // announced: the client expects this connection to carry its next request.
                kept.mode == Mode::HandOver
                    && asked == Some(kept.state.started.load(Relaxed))
                    && !kept.state.announced_close.load(Relaxed)
                    && !kept.state.is_upgrading()
            }
        };
        let Some(parts) = (*conn).into_parts() else {
            // Upgraded: the socket, and with it `open`, is the app's now.
            return None;
        };
        let tracked = parts.io.into_inner();
        open = tracked.open;
        if let Outcome::Parked = outcome {
            // Bytes hyper read ahead meanwhile are served at once, with no parking.
            prefix = join(parts.read_buf, tracked.prefix);
            if prefix.is_empty() {
                return Some((tracked.io, open));
            }
            io = tracked.io;
            continue;
        }
        if !handing_over {
            let mut io = tracked.io;
            match stalled {
                Some(Stall::Write) => {
                    tracing::debug!("no write progress for {:?}: closed", shared.limits.write_timeout);
                    // What the client does not read is thrown away: a reset, not a close
                    // that would keep the kernel sending it.
                    io.reset_on_close();
                }
                Some(Stall::Body { answered }) => {
                    tracing::debug!("no request body byte for {:?}: closed", shared.limits.body_timeout);
                    if !answered {
                        io.try_send(REQUEST_TIMEOUT);
                        shared.gate.stats().answered(408, shared.limits.body_timeout);
                    }
                }
                None => {}
            }
            // shutdown, not just close: another process (the fd store) may hold the socket too.
            let _ = io.shutdown().await;
            return None;
        }
        let bytes = join(parts.read_buf, tracked.prefix);
        let stream = tracked.io;
        match stream.into_fd() {
            Ok(fd) => match shared.handover.store(fd, &bytes).await {
                Ok(()) => {
                    shared.gate.stats().handed_over();
                    return None;
                }
                Err((e, fd)) => {
                    tracing::warn!("cannot hand a connection over ({e}): closing it gracefully instead");
                    match Stream::from_fd(fd) {
                        Ok(s) => io = s,
                        Err(_) => return None,
                    }
                }
            },
            Err(e) => {
                tracing::warn!("cannot take a connection out of the runtime ({e}); it is closed");
                return None;
            }
        }
        // The store took it not: serve on, announcing the close.
        prefix = bytes;
        kept.mode = match *kept.drain.borrow() {
            Drain::Stopping { grace_until, .. } => Mode::Close { grace_until },
            Drain::Serving | Drain::Cut => Mode::Close { grace_until: Instant::now() },
        };
        kept.state.close_next.store(true, Relaxed);
        kept.state.hold_reads.store(false, Relaxed);
    }
}

/// The answer to a request whose body stopped coming before the app answered.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// `a` then `b`; an empty result holds no buffer (hyper's empty read-ahead is a view of its
/// whole read buffer).
fn join(a: Bytes, b: Bytes) -> Bytes {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Bytes::new(),
        (false, true) => return a,
        (true, false) => return b,
        (false, false) => {}
    }
    let mut all = BytesMut::with_capacity(a.len() + b.len());
    all.extend_from_slice(&a);
    all.extend_from_slice(&b);
    all.freeze()
}
