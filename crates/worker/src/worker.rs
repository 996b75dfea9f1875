//! The entry points: [`run`] (a whole process: runtime included) and [`serve`] / [`Worker`]
//! (on the caller's runtime), one implementation under both.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use sdcluster_protocol::listen_fds::{self, Inherited};
use sdcluster_protocol::{EXIT_BAD_INPUT, ListenFdsError};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::Instrument;

use crate::listeners::{ListenError, acquire};
use crate::ops::IntoApp;
use crate::options::Options;
use crate::serve::{DrainTimedOut, Server};

/// Why a worker did not serve, or did not end cleanly. [`Error::exit_code`] is the exit
/// status a supervisor expects for each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing to serve: the passed sockets (`LISTEN_FDS`) are wrong, `--listen` cannot be
    /// bound, or nothing was passed under `--require-socket`. Bad input: exit 2.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The balance table the supervisor passed cannot be mapped. Bad input: exit 2.
    #[error("cannot map the balance table: {0}")]
    BalanceTable(#[source] io::Error),
    /// The SIGTERM/SIGINT handlers cannot be installed (a tokio runtime built without
    /// `enable_all()` / `enable_io()`). Exit 1.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// [`run`] could not build its runtime. Exit 1.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The drain deadline passed (or a second signal cut it short) with connections open.
    /// Exit 1.
    #[error(transparent)]
    DrainTimedOut(#[from] DrainTimedOut),
}

impl Error {
    /// Whether the input (environment, options, passed fds) is at fault: a restart will not
    /// help, and supervisors treat it apart (`sdcluster run` stops restarting it).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::Listen(_) | Error::BalanceTable(_))
    }

    /// The exit status for this error: [`EXIT_BAD_INPUT`] (2) for bad input, else 1.
    pub fn exit_code(&self) -> ExitCode {
        if self.is_bad_input() { ExitCode::from(EXIT_BAD_INPUT) } else { ExitCode::FAILURE }
    }
}

/// A worker about to serve on the caller's tokio runtime: [`serve`] with more say.
pub struct Worker {
    opts: Options,
    inherited: Option<Result<Inherited, ListenFdsError>>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    init_logging: bool,
    draining: watch::Sender<bool>,
}

/// Tells an app that its worker began to drain ([`Worker::draining`]).
///
/// A drain lets requests in flight finish and hands kept-alive connections over, but an
/// upgraded connection (a WebSocket) is the app's: the drain waits for it to end, up to
/// `--drain-timeout`, after which the process exits 1 and it is cut. An app with long-lived
/// upgrades ends them itself on this signal (a WebSocket close with 1001, "going away"), so
/// that a restart is quick and clean.
#[derive(Debug, Clone)]
pub struct Draining(watch::Receiver<bool>);

impl Draining {
    /// Whether the drain began.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the drain began (at once if it did already); never if the worker is
    /// gone without draining.
    pub async fn started(&self) {
        let mut seen = self.0.clone();
        if seen.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("opts", &self.opts).field("inherited", &self.inherited).finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker with these options; it takes its sockets from the environment when it serves.
    pub fn new(opts: Options) -> Self {
        Self { opts, inherited: None, shutdown: None, init_logging: true, draining: watch::channel(false).0 }
    }

    /// A handle that tells the app when this worker begins to drain: clone it into the
    /// handlers of long-lived connections (WebSockets). See [`Draining`].
    pub fn draining(&self) -> Draining {
        Draining(self.draining.subscribe())
    }

    /// Serves what the caller already took from the environment (for instance with
    /// `unsafe { sdcluster_worker::listen_fds::take() }` first thing in `main`, which also
    /// removes the variables), instead of reading `LISTEN_FDS` itself.
    #[must_use]
    pub fn with_inherited(mut self, inherited: Inherited) -> Self {
        self.inherited = Some(Ok(inherited));
        self
    }

    /// Also starts the drain when `shutdown` completes, as a first SIGTERM would (a second
    /// signal still cuts the drain short).
    #[must_use]
    pub fn shutdown_on(mut self, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(shutdown));
        self
    }

    /// Leaves logging to the app: by default the worker installs its subscriber (journal
    /// or stderr, `RUST_LOG`), unless one is installed already.
    #[must_use]
    pub fn without_logging(mut self) -> Self {
        self.init_logging = false;
        self
    }

    /// Serves `app` until SIGTERM, SIGINT or SIGHUP (or [`Worker::shutdown_on`]), then
    /// drains: a second signal cuts the drain short. `Ok` after a clean drain. See [`serve`].
    pub async fn serve<K>(self, app: impl IntoApp<K>) -> Result<(), Error> {
        let span = tracing::info_span!("worker", id = instance_name(&self.opts));
        self.serve_app(app.into_app()).instrument(span).await
    }

    async fn serve_app<A: crate::App>(self, app: A) -> Result<(), Error> {
        let Worker { opts, inherited, shutdown, init_logging, draining } = self;
        if init_logging {
            crate::logging::init(&instance_name(&opts));
        }
        let inherited = inherited.unwrap_or_else(inherited_from_env);
        serve_inherited(opts, app, inherited, shutdown, draining).await
    }

    /// [`run`] with this worker's settings: for a synchronous `main` that wants
    /// [`Worker::draining`] or [`Worker::shutdown_on`].
    pub fn run<K>(mut self, app: impl IntoApp<K>) -> ExitCode {
        let instance = instance_name(&self.opts);
        if self.init_logging {
            crate::logging::init(&instance);
            self.init_logging = false;
        }
        if self.inherited.is_none() {
            self.inherited = Some(if only_thread() {
                // SAFETY: this is the process's only thread (checked just now, and only this
                // thread could start another), so nothing reads or writes the environment
                // meanwhile.
                unsafe { listen_fds::take() }.inspect(|_| mark_claimed())
            } else {
                inherited_from_env()
            });
        }
        let runtime = if self.opts.threads == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(self.opts.threads.into()).enable_all().build()
        };
        let result = match runtime {
            Ok(runtime) => {
                // Entered here, the span covers every task of a current-thread runtime.
                let _span = tracing::info_span!("worker", id = instance).entered();
                runtime.block_on(self.serve_app(app.into_app()))
            }
            Err(e) => Err(Error::Runtime(e)),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                e.exit_code()
            }
        }
    }
}

/// Serves `app` on the caller's tokio runtime (`#[tokio::main]`) for the whole life of a
/// worker: takes the sockets the supervisor passed (or binds `--listen`), reports
/// `READY=1`, feeds the watchdog, and on SIGTERM, SIGINT or SIGHUP drains (a second signal
/// cuts the drain short); `Ok` after a clean drain.
///
/// The runtime must have its I/O, time and signal drivers on (`#[tokio::main]` does:
/// `enable_all()`). The worker installs its log subscriber unless one is set already
/// ([`Worker::without_logging`]). Once called, SIGTERM, SIGINT and SIGHUP (unless ignored
/// at the start, as under `nohup`) no longer end the process by themselves (tokio's handlers stay installed); a supervisor waits for the
/// process to exit after `serve` returns, so return from `main` then.
///
/// # The environment
///
/// It reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` and leaves them in place:
/// removing a variable while other threads may read the environment is undefined behaviour
/// (`std::env::remove_var` is `unsafe`), and inside a multi-threaded runtime other threads
/// exist. Leaving them is harmless: the passed fds are marked close-on-exec, so a child
/// process does not inherit them, and `LISTEN_PID` names this process, so a child that
/// inherits the variables ignores them (as `sd_listen_fds(3)` does, and this crate's own
/// `Inherited::ForeignPid`). The fds are claimed once per process: a second call serves
/// `--listen` instead (with a warning). An app that wants the variables gone calls
/// `unsafe { sdcluster_worker::listen_fds::take() }` before any thread starts and passes the
/// result to [`Worker::with_inherited`]; [`run`] does that itself when it can prove it is
/// the only thread.
pub async fn serve<K>(opts: Options, app: impl IntoApp<K>) -> Result<(), Error> {
    Worker::new(opts).serve(app).await
}

/// The whole life of a worker process: logging, sockets, runtime, serving, drain; for a
/// synchronous `main` (it builds the runtime: `--threads`). Exits 0 after a clean drain,
/// 1 when the drain timed out or serving failed, 2 on bad input ([`Error::exit_code`]).
///
/// Call it from `main`. When the process has a single thread then (nothing started one
/// before), it also removes the `LISTEN_*` variables from the environment, so that children
/// don't even see them; otherwise it leaves them, as [`serve`] does.
pub fn run<K>(opts: Options, app: impl IntoApp<K>) -> ExitCode {
    Worker::new(opts).run(app)
}

fn instance_name(opts: &Options) -> String {
    opts.instance.clone().unwrap_or_else(|| std::process::id().to_string())
}

/// The one implementation under every entry point.
async fn serve_inherited<A: crate::App>(
    opts: Options,
    app: A,
    inherited: Result<Inherited, ListenFdsError>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    draining: watch::Sender<bool>,
) -> Result<(), Error> {
    raise_open_files_limit();
    let acquired = acquire(inherited?, &opts)?;
    let server = Server::new(acquired, opts).map_err(Error::BalanceTable)?;
    let (signals, counting) = count_signals().map_err(Error::Signals)?;
    let nth = |n: u32| {
        let mut signals = signals.clone();
        async move {
            let _ = signals.wait_for(|seen| *seen >= n).await;
        }
    };
    let first = async {
        match shutdown {
            Some(shutdown) => tokio::select! {
                () = shutdown => {}
                () = nth(1) => {}
            },
            None => nth(1).await,
        }
        draining.send_replace(true);
    };
    let served = server.serve(app, first, nth(2)).await;
    counting.abort();
    Ok(served?)
}

impl From<ListenFdsError> for Error {
    fn from(e: ListenFdsError) -> Self {
        Error::Listen(e.into())
    }
}

/// Set once the passed fds have an owner in this process.
static CLAIMED: AtomicBool = AtomicBool::new(false);

fn mark_claimed() {
    CLAIMED.store(true, Ordering::SeqCst);
}

/// What the supervisor passed, read without touching the environment (see [`serve`]); the
/// fds are marked close-on-exec. The first call claims them; any later one gets
/// [`Inherited::Nothing`], so that no fd ever has two owners.
fn inherited_from_env() -> Result<Inherited, ListenFdsError> {
    let var = |k| std::env::var(k).ok();
    let inherited = listen_fds::parse(
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    let Inherited::Fds(fds) = &inherited else { return Ok(inherited) };
    if CLAIMED.swap(true, Ordering::SeqCst) {
        tracing::warn!("the passed sockets (LISTEN_FDS) are served already in this process: binding --listen");
        return Ok(Inherited::Nothing);
    }
    for passed in fds {
        // SAFETY: fcntl(F_GETFD/F_SETFD) takes no pointers; on an fd that is not open it
        // fails with EBADF (reported later, by `into_listener`). The protocol makes these
        // fds this process's, and only their close-on-exec flag changes.
        unsafe {
            let flags = libc::fcntl(passed.fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(passed.fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(inherited)
}

/// Whether this process has a single thread (`Threads:` of `/proc/self/status`); false when
/// that cannot be read.
fn only_thread() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find_map(|l| l.strip_prefix("Threads:")).map(|n| n.trim() == "1"))
        .unwrap_or(false)
}

/// Counts SIGTERM, SIGINT and SIGHUP: the first starts the drain, a second cuts it short.
/// The counting task ends when the returned handle is aborted.
///
/// SIGHUP drains as SIGTERM does: by default it would kill the process at once, cutting
/// every request in flight (a terminal that hangs up on a worker started from it, a `kill
/// -HUP` meant for the supervisor); a worker has nothing to reload, and its supervisor
/// starts a replacement after a clean exit. A SIGHUP ignored when the worker started
/// (`nohup`) stays ignored.
fn count_signals() -> io::Result<(tokio::sync::watch::Receiver<u32>, tokio::task::JoinHandle<()>)> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = if sighup_ignored() { None } else { Some(signal(SignalKind::hangup())?) };
    let (count, seen) = tokio::sync::watch::channel(0);
    let counting = tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                Some(_) = async { hup.as_mut()?.recv().await } => "SIGHUP",
            };
            count.send_modify(|n| *n += 1);
            if *count.borrow() == 1 {
                tracing::info!("{name}: draining (send it again to stop at once)");
            } else {
                tracing::warn!("{name} again: stopping without waiting for the drain");
            }
        }
    });
    Ok((seen, counting))
}

/// Whether SIGHUP is ignored (`SIG_IGN`, as `nohup` leaves it).
fn sighup_ignored() -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`, a
    // zeroed sigaction (plain old data).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Lets `--max-connections` be reached: the soft limit of open files is often 1024 while the
/// hard limit is far higher (systemd's default is 1024:524288), as Go's runtime does too.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_kind_of_error() {
        let bad = Error::from(ListenFdsError::BadCount("x".into()));
        assert!(bad.is_bad_input());
        assert_eq!(bad.exit_code(), ExitCode::from(EXIT_BAD_INPUT));
        let drain = Error::DrainTimedOut(DrainTimedOut { open: 1, timeout: std::time::Duration::from_secs(1) });
        assert!(!drain.is_bad_input());
        assert_eq!(drain.exit_code(), ExitCode::FAILURE);
        assert!(!Error::Signals(io::Error::other("x")).is_bad_input());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_runs_on_the_callers_runtime_until_shutdown_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = std::env::temp_dir().join(format!("sdcluster-worker-serve-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let opts = Options::default().with_listen(format!("unix:{}", path.display())).with_instance("unit");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "in process\n" }));
        let worker = Worker::new(opts).without_logging().shutdown_on(async {
            let _ = stopped.await;
        });
        let serving = tokio::spawn(worker.serve(app));
        let mut stream = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("x-sdcluster-worker: unit\r\n"), "{response}");
        assert!(response.ends_with("in process\n"), "{response}");
        stop.send(()).unwrap();
        assert!(serving.await.unwrap().is_ok());
        let _ = std::fs::remove_file(&path);
    }

    /// An upgraded connection is the app's: a drain neither hands it over nor cuts it at a
    /// boundary; it stays counted open until the drain deadline, and is cut then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgraded_connection_is_left_to_run_until_the_drain_deadline() {
        use axum::extract::ws::{WebSocket, WebSocketUpgrade};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = std::env::temp_dir().join(format!("sdcluster-worker-upgrade-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let opts = Options::default()
            .with_listen(format!("unix:{}", path.display()))
            .with_drain_timeout(std::time::Duration::from_millis(500));
        async fn echo(mut socket: WebSocket) {
            while let Some(Ok(message)) = socket.recv().await {
                if socket.send(message).await.is_err() {
                    return;
                }
            }
        }
        let app =
            axum::Router::new().route("/ws", axum::routing::get(|ws: WebSocketUpgrade| async { ws.on_upgrade(echo) }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = Worker::new(opts).without_logging().shutdown_on(async {
            let _ = stopped.await;
        });
        let draining = worker.draining();
        let serving = tokio::spawn(worker.serve(app));
        let mut ws = loop {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        ws.write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(ws.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
        // One masked text frame "hi" (mask 0), echoed unmasked.
        let ping_pong = async |ws: &mut tokio::net::UnixStream| {
            ws.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).await?;
            let mut frame = [0; 4];
            ws.read_exact(&mut frame).await.map(|_| frame)
        };
        assert_eq!(ping_pong(&mut ws).await.unwrap(), [0x81, 2, b'h', b'i']);
        stop.send(()).unwrap();
        draining.started().await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Draining: still echoing.
        assert_eq!(ping_pong(&mut ws).await.unwrap(), [0x81, 2, b'h', b'i']);
        match serving.await.unwrap() {
            Err(Error::DrainTimedOut(timed_out)) => assert_eq!(timed_out.open, 1),
            other => panic!("the drain waited for the WebSocket until its deadline: {other:?}"),
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn another_thread_is_seen() {
        let (stop, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || wait.recv());
        assert!(!only_thread());
        drop(stop);
        let _ = other.join();
    }
}
