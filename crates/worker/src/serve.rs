//! Accepting and serving connections, and draining them on shutdown.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use nix::sys::socket::{SockFlag, accept4};
use sdcluster_protocol::{BalanceTable, Listener, MetricsTable};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connection::{self, Drain, Limits, Shared, Stream};
use crate::gate::Gate;
use crate::handover::{HandOver, TakenOver};
use crate::listeners::Acquired;
use crate::notify::{Notifier, status_line};
use crate::ops::{App, Instrumented, IntoApp, OpsPaths, UnreadLimits};
use crate::options::Options;
use crate::stats::Stats;

/// The drain deadline passed with requests still in flight; they were cut off.
#[derive(Debug, thiserror::Error)]
#[error(
    "{open} connections were still open when the drain timeout ({timeout:?}) ran out; raise --drain-timeout (and the unit's TimeoutStopSec=) if requests legitimately take that long"
)]
pub struct DrainTimedOut {
    /// Connections cut off.
    pub open: u64,
    /// The deadline that ran out.
    pub timeout: Duration,
}

/// A worker ready to serve: its sockets, settings and counters.
pub struct Server {
    listeners: Vec<Listener>,
    balance: Option<Arc<BalanceTable>>,
    taken_over: Vec<TakenOver>,
    stale: Vec<String>,
    opts: Options,
    stats: Arc<Stats>,
}

impl Server {
    /// Prepares serving `acquired` with `opts`; fails only if a passed balance table can't
    /// be mapped (a metrics table that can't is left out, with a warning: it costs only the
    /// app-wide view, and a table of an older layout must not stop an upgraded worker).
    pub fn new(acquired: Acquired, opts: Options) -> io::Result<Self> {
        let instance = opts.instance.clone().unwrap_or_else(|| std::process::id().to_string());
        let balance = acquired.balance.as_ref().map(|f: &File| BalanceTable::open(f).map(Arc::new)).transpose()?;
        let metrics = acquired.metrics.as_ref().and_then(|f: &File| match MetricsTable::open(f) {
            Ok(table) => Some(Arc::new(table)),
            Err(e) => {
                tracing::warn!("cannot map the metrics table ({e}): /metrics shows this worker only");
                None
            }
        });
        Ok(Self {
            listeners: acquired.listeners,
            balance,
            taken_over: acquired.taken_over,
            stale: acquired.stale,
            opts,
            stats: Arc::new(Stats::in_table(instance, metrics)),
        })
    }

    /// The counters, for an app that wants to show them its own way.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Serves `app` on every listener until `shutdown` completes, then drains: stops
    /// accepting, lets requests in flight finish, and then hands each kept-alive connection
    /// to the next process of this instance (when the supervisor says one comes), or
    /// closes it gracefully (`Connection: close` on its next response; closed when still
    /// idle after `--close-grace`).
    ///
    /// Connections the previous process handed over are served first. `READY=1` is sent
    /// once every listener is being served, `STOPPING=1` when the drain starts;
    /// `abort_drain` completing cuts the drain short (a second SIGTERM in [`crate::run`]).
    ///
    /// This is the building block under [`crate::serve`], for an app that takes its sockets
    /// ([`crate::acquire`]) and handles signals its own way.
    pub async fn serve<K>(
        self,
        app: impl IntoApp<K>,
        shutdown: impl Future<Output = ()>,
        abort_drain: impl Future<Output = ()>,
    ) -> Result<(), DrainTimedOut> {
        self.serve_app(app.into_app(), shutdown, abort_drain).await
    }

    async fn serve_app<S: App>(
        self,
        app: S,
        shutdown: impl Future<Output = ()>,
        abort_drain: impl Future<Output = ()>,
    ) -> Result<(), DrainTimedOut> {
        let notifier = Notifier::from_env();
        let handover = Arc::new(HandOver::from_env());
        let gate = Arc::new(Gate::new(
            Arc::clone(&self.stats),
            self.opts.max_connections,
            self.balance.clone(),
            self.opts.balance_patience,
        ));
        let unread = UnreadLimits { bytes: self.opts.max_unread_body, timeout: self.opts.header_timeout };
        let mut http = http1::Builder::new();
        // Header and keep-alive timeouts are the connection's own (connection.rs): hyper's
        // header timer would also run while a kept-alive connection is idle.
        http.timer(TokioTimer::new()).max_buf_size(self.opts.max_header_bytes as usize);
        let (drain, draining) = watch::channel(Drain::Serving);
        let shared = Arc::new(Shared {
            http,
            service: Instrumented::new(
                app,
                Arc::clone(&self.stats),
                unread,
                OpsPaths {
                    healthz: self.opts.healthz_path.path().map(str::to_owned),
                    metrics: self.opts.metrics_path.path().map(str::to_owned),
                },
            ),
            limits: Limits {
                header_timeout: self.opts.header_timeout,
                keepalive_timeout: self.opts.keepalive_timeout,
                write_timeout: self.opts.write_timeout,
                body_timeout: self.opts.body_timeout,
            },
            drain: draining,
            handover: Arc::clone(&handover),
            gate: Arc::clone(&gate),
        });

        let taken = self.taken_over.len();
        for name in self.stale.iter().chain(self.taken_over.iter().flat_map(|t| &t.names)) {
            handover.remove(name).await;
        }
        for taken in self.taken_over {
            match Stream::from_fd(taken.fd) {
                Ok(stream) => {
                    self.stats.taken_over();
                    let open = gate.opened();
                    tokio::spawn(connection::serve(stream, taken.bytes, Arc::clone(&shared), open));
                }
                Err(e) => tracing::warn!("cannot serve a handed-over connection: {e}"),
            }
        }
        if taken > 0 {
            tracing::info!("took over {taken} kept-alive connections from the previous process");
        }

        let serving = self.listeners.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        self.stats.watch_queues(&self.listeners);
        // Not one of `tasks`: the instance stays live in the metrics table while it drains.
        let heartbeat = tokio::spawn(Arc::clone(&self.stats).keep_alive());
        let mut tasks = JoinSet::new();
        for listener in self.listeners {
            guard_against_blocking(&listener);
            // SAFETY: the Listener owns its fd, which stays open and the same until the
            // AsyncFd is dropped.
            let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot watch a listener: {e}");
                    continue;
                }
            };
            tasks.spawn(accept_loop(listener, Arc::clone(&shared)));
        }
        tasks.spawn(Arc::clone(&gate).keep_slot_alive());
        tasks.spawn(notifier.clone().keep_watchdog_fed());
        tasks.spawn(notifier.clone().keep_status_current(Arc::clone(&self.stats), serving.clone()));
        tracing::info!(balanced = self.balance.is_some(), "serving {serving}");
        // Serving goes on while READY=1 waits for room in a supervisor's full queue.
        let status = status_line(&serving, &self.stats);
        let ready = notifier.ready(&status);
        tokio::pin!(shutdown);
        tokio::select! {
            () = ready => shutdown.await,
            () = &mut shutdown => {}
        }
        tasks.abort_all(); // stop accepting; our copies of the sockets close
        gate.leave_balance(); // peers stop counting on us at once
        self.stats.draining();
        let open = self.stats.open();
        let handing_over = handover.wanted();
        let grace = self.opts.close_grace.min(self.opts.drain_timeout);
        match handing_over {
            Ok(()) => tracing::info!(
                "draining {open} open connections (at most {:?}): handing them over to the next process",
                self.opts.drain_timeout
            ),
            Err(why) => tracing::info!(
                "draining {open} open connections (at most {:?}); {why}: closing them gracefully within {grace:?}",
                self.opts.drain_timeout
            ),
        }
        notifier.stopping(&format!("draining {open} connections")).await;
        let grace_until = tokio::time::Instant::now() + grace;
        let _ = drain.send(Drain::Stopping { handover: handing_over.is_ok(), grace_until });
        let drained = tokio::select! {
            done = tokio::time::timeout(self.opts.drain_timeout, gate.all_closed()) => done.is_ok(),
            () = abort_drain => false,
        };
        let left_open = self.stats.open();
        // What is still open now is cut (on the caller's runtime, `crate::serve` returns
        // and the app may go on); upgraded connections are the app's to end.
        let _ = drain.send(Drain::Cut);
        let sent = self.stats.handed_over_count();
        if sent > 0 {
            // Every stored fd must be with the supervisor before this process is gone.
            handover.barrier().await;
            tracing::info!("handed {sent} kept-alive connections over");
        }
        heartbeat.abort();
        if drained {
            tracing::info!("drained; exiting");
            Ok(())
        } else {
            Err(DrainTimedOut { open: left_open, timeout: self.opts.drain_timeout })
        }
    }
}

async fn accept_loop<S: App>(listener: AsyncFd<Listener>, shared: Arc<Shared<S>>) {
    loop {
        let mut ready = match listener.readable().await {
            Ok(ready) => ready,
            Err(e) => return tracing::error!("listener {} failed: {e}", listener.get_ref()),
        };
        shared.gate.wait_turn(listener.get_ref()).await;
        match ready.try_io(|l| accept(l.get_ref())) {
            Err(_would_block) => continue,
            Ok(Ok(fd)) => {
                let stream = match listener.get_ref() {
                    Listener::Tcp(_) => {
                        let stream = std::net::TcpStream::from(fd);
                        let _ = stream.set_nodelay(true);
                        tokio::net::TcpStream::from_std(stream).map(Stream::Tcp)
                    }
                    Listener::Unix(_) => tokio::net::UnixStream::from_std(fd.into()).map(Stream::Unix),
                };
                match stream {
                    Ok(stream) => {
                        let open = shared.gate.opened();
                        tokio::spawn(connection::serve(stream, bytes::Bytes::new(), Arc::clone(&shared), open));
                    }
                    Err(e) => tracing::warn!("cannot register a connection: {e}"),
                }
            }
            Ok(Err(e)) => back_off(e).await,
        }
    }
}

/// A blocking `accept()` on the shared socket gives up after this long (`SO_RCVTIMEO`).
///
/// Every process sharing a socket shares its O_NONBLOCK flag, and systemd sets that flag on
/// each start of any service the socket is passed to (`NonBlocking=`, off by default). One
/// unit without `NonBlocking=yes` would leave every worker's only thread asleep in `accept()`
/// until the watchdog kills it; with this timeout it wakes up, and [`accept`] restores the flag.
const ACCEPT_TIMEOUT: Duration = Duration::from_millis(5);

/// Prepares a listener for sharing: see [`ACCEPT_TIMEOUT`].
fn guard_against_blocking(listener: &Listener) {
    let timeout = nix::sys::time::TimeVal::new(0, ACCEPT_TIMEOUT.as_micros() as _);
    if let Err(e) = nix::sys::socket::setsockopt(listener, nix::sys::socket::sockopt::ReceiveTimeout, &timeout) {
        tracing::warn!("cannot set an accept timeout on {listener}: {e}");
    }
}

/// One `accept4`; if it blocked, somebody cleared O_NONBLOCK on the shared socket: set it
/// again and say who is likely to blame.
fn accept(listener: &Listener) -> io::Result<OwnedFd> {
    let started = std::time::Instant::now();
    let accepted = accept4(listener.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC);
    if started.elapsed() >= ACCEPT_TIMEOUT / 2 {
        let flags = nix::fcntl::fcntl(listener, nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags);
        if !flags.contains(nix::fcntl::OFlag::O_NONBLOCK) {
            tracing::warn!(
                "the shared socket {listener} was switched to blocking mode (a service started without NonBlocking=yes?); switching it back"
            );
            let _ = nix::fcntl::fcntl(listener, nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK));
        }
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    accepted.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).map_err(io::Error::from)
}

/// Accept errors are about the process or one connection, never fatal to the listener.
async fn back_off(e: io::Error) {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => {}
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!("accept failed: {e}; pausing 100ms (raise LimitNOFILE= or lower --max-connections)");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        _ => {
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
