//! `sdcluster run`: systemd's part, for machines where systemd is not PID 1.
//!
//! Binds the listeners once, starts the instances with the sd_listen_fds protocol, reads
//! their `sd_notify` messages, restarts the dead with backoff, kills the silent (watchdog),
//! rolls restarts one instance at a time on SIGHUP, drains everything on SIGTERM, and
//! answers `sdcluster status` on a control socket.

mod spawn;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use sdcluster_protocol::listen_fds::BALANCE_FD_NAME;
use sdcluster_protocol::notify::Notification;
use sdcluster_protocol::{BindError, Listener, balance};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use spawn::Launch;

use crate::control;
use crate::spec::{Balance, Spec};
use crate::status::{ClusterStatus, InstanceStatus, process_usage};

/// A worker that has not sent `READY=1` after this long is stopped and tried again.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// A worker up this long after `READY=1` is no longer part of a crash loop.
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The smallest step of the crash-loop backoff when the restart delay is 0.
const MIN_BACKOFF_STEP: Duration = Duration::from_millis(50);

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A listen address.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Another `sdcluster run` serves this app.
    #[error(
        "`sdcluster run` for {0:?} is already running (its control socket {1} answers); stop it first, or give this one another --name"
    )]
    AlreadyRunning(String, PathBuf),
    /// Setting up a socket, the balance table or the signal handlers failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SuperviseError {
    let what = what.into();
    move |source| SuperviseError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    Stopping,
    Waiting,
    Stopped,
}

impl State {
    /// The word `sdcluster status` shows.
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Waiting => "restarting",
            State::Stopped => "stopped",
        }
    }
}

/// What to do when an instance's process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// An unexpected death: restart after the (backed-off) delay.
    Restart,
    /// A rolling restart: start again at once.
    RestartNow,
    /// Shutdown or scale-down: stay stopped.
    Stay,
}

struct Instance {
    name: String,
    launch: Launch,
    /// Sockets of this instance alone (SO_REUSEPORT mode), kept open across restarts.
    _own_sockets: Vec<Listener>,
    pid: Option<Pid>,
    state: State,
    then: Then,
    started: Instant,
    ready_at: Option<Instant>,
    last_ping: Instant,
    restarts: u32,
    crashes: u32,
    deadline: Option<Instant>,
    status_text: String,
}

/// A request from the control socket, answered by the main loop.
struct Request {
    command: String,
    reply: oneshot::Sender<String>,
}

/// The running cluster.
pub struct Supervisor {
    spec: Spec,
    dir: PathBuf,
    shared: Vec<Listener>,
    balance_table: Option<OwnedFd>,
    instances: Vec<Instance>,
    roll: VecDeque<String>,
    rolling: Option<String>,
    roll_waiters: Vec<oneshot::Sender<String>>,
    shutting_down: bool,
}

impl Supervisor {
    /// Binds the spec's listeners (once, for all instances) and prepares the instances.
    pub fn bind(spec: Spec, dir: PathBuf) -> Result<Self, SuperviseError> {
        std::fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        let control = control::control_path(&dir, &spec.name);
        if std::os::unix::net::UnixStream::connect(&control).is_ok() {
            return Err(SuperviseError::AlreadyRunning(spec.name.clone(), control));
        }
        let (shared, balance_table) = match spec.balance {
            Balance::Shared => {
                let listeners = spec.listen.iter().map(|a| a.bind(false)).collect::<Result<Vec<_>, _>>()?;
                let table = nix::sys::memfd::memfd_create(BALANCE_FD_NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                    .map_err(|e| io_err("cannot create the balance table")(e.into()))?;
                nix::unistd::ftruncate(&table, balance::TABLE_BYTES as i64)
                    .map_err(|e| io_err("cannot size the balance table")(e.into()))?;
                (listeners, Some(table))
            }
            Balance::Reuseport => (Vec::new(), None),
        };
        let mut supervisor = Self {
            spec,
            dir,
            shared,
            balance_table,
            instances: Vec::new(),
            roll: VecDeque::new(),
            rolling: None,
            roll_waiters: Vec::new(),
            shutting_down: false,
        };
        supervisor.scale_to(supervisor.spec.instances.resolve())?;
        Ok(supervisor)
    }

    /// Adds instances up to `n`, or stops the ones above it.
    fn scale_to(&mut self, n: u32) -> Result<(), SuperviseError> {
        let live: Vec<usize> = (0..self.instances.len()).filter(|&i| self.instances[i].then != Then::Stay).collect();
        for &i in live.iter().skip(n as usize) {
            self.stop(i, Then::Stay);
        }
        let mut next = self.instances.iter().filter_map(|i| i.name.parse::<u32>().ok()).max().unwrap_or(0);
        for _ in live.len()..n as usize {
            next += 1;
            let instance = self.prepare(next.to_string())?;
            self.instances.push(instance);
        }
        Ok(())
    }

    fn prepare(&self, name: String) -> Result<Instance, SuperviseError> {
        let own_sockets = match self.spec.balance {
            Balance::Reuseport => self.spec.listen.iter().map(|a| a.bind(true)).collect::<Result<Vec<_>, _>>()?,
            Balance::Shared => Vec::new(),
        };
        let mut fds: Vec<(i32, String)> =
            self.shared.iter().chain(&own_sockets).map(|l| (l.as_raw_fd(), "http".to_owned())).collect();
        if let Some(table) = &self.balance_table {
            fds.push((table.as_raw_fd(), BALANCE_FD_NAME.to_owned()));
        }
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| !k.starts_with("LISTEN_") && !k.starts_with("WATCHDOG_") && k != "NOTIFY_SOCKET")
            .collect();
        env.extend(self.spec.worker_environment(&name));
        env.push(("NOTIFY_SOCKET".into(), control::notify_path(&self.dir, &self.spec.name).display().to_string()));
        let launch = Launch::new(&self.spec.command, &env, fds, self.spec.watchdog.map(|d| d.as_micros() as u64));
        let now = Instant::now();
        Ok(Instance {
            name,
            launch,
            _own_sockets: own_sockets,
            pid: None,
            state: State::Waiting,
            then: Then::Restart,
            started: now,
            ready_at: None,
            last_ping: now,
            restarts: 0,
            crashes: 0,
            deadline: Some(now),
            status_text: String::new(),
        })
    }

    /// Supervises until SIGTERM/SIGINT, then drains every worker and returns.
    pub async fn run(mut self) -> Result<(), SuperviseError> {
        let notify_path = control::notify_path(&self.dir, &self.spec.name);
        let _ = std::fs::remove_file(&notify_path);
        let notify =
            UnixDatagram::bind(&notify_path).map_err(io_err(format!("cannot bind {}", notify_path.display())))?;
        setsockopt(&notify, sockopt::PassCred, &true).map_err(|e| io_err("SO_PASSCRED")(e.into()))?;
        notify.set_nonblocking(true).map_err(io_err("notify socket"))?;
        // SAFETY: the datagram socket owns its fd, open and unchanged while the AsyncFd lives.
        let notify = unsafe { AsyncFd::register_with_interest(notify, Interest::READABLE) }
            .map_err(|e| io_err("notify socket")(e.into()))?;
        let control_path = control::control_path(&self.dir, &self.spec.name);
        let _ = std::fs::remove_file(&control_path);
        let control =
            UnixListener::bind(&control_path).map_err(io_err(format!("cannot bind {}", control_path.display())))?;
        let (requests, mut incoming) = mpsc::channel::<Request>(16);
        let sig = |kind| signal(kind).map_err(io_err("cannot install signal handlers"));
        let (mut chld, mut term, mut int, mut hup) = (
            sig(SignalKind::child())?,
            sig(SignalKind::terminate())?,
            sig(SignalKind::interrupt())?,
            sig(SignalKind::hangup())?,
        );
        tracing::info!(
            "{}: {} instances of {} on {} ({} balance)",
            self.spec.name,
            self.instances.len(),
            self.spec.command[0],
            self.spec.listen.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            self.spec.balance,
        );
        loop {
            self.on_deadlines();
            if self.shutting_down && self.instances.iter().all(|i| i.state == State::Stopped) {
                break;
            }
            let next = self.next_deadline();
            tokio::select! {
                _ = chld.recv() => self.reap(),
                ready = notify.readable() => {
                    if let Ok(mut guard) = ready {
                        while let Ok(Ok((pid, n))) = guard.try_io(|s| receive(s.get_ref())) {
                            self.on_notification(pid, n);
                        }
                    }
                }
                _ = term.recv() => self.shut_down("SIGTERM"),
                _ = int.recv() => self.shut_down("SIGINT"),
                _ = hup.recv() => { tracing::info!("SIGHUP: rolling restart"); self.start_roll(None); }
                Ok((stream, _)) = control.accept() => { tokio::spawn(serve_control(stream, requests.clone())); }
                Some(request) = incoming.recv() => self.on_request(request),
                () = sleep_until(next) => {}
            }
        }
        let _ = std::fs::remove_file(&control_path);
        let _ = std::fs::remove_file(&notify_path);
        tracing::info!("{}: all workers stopped", self.spec.name);
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.instances
            .iter()
            .filter_map(|i| match (i.state, self.spec.watchdog) {
                (State::Running, Some(w)) => Some(i.last_ping + w),
                _ => i.deadline,
            })
            .min()
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        for idx in 0..self.instances.len() {
            let i = &mut self.instances[idx];
            match i.state {
                State::Waiting if i.deadline.is_some_and(|d| d <= now) => self.start(idx),
                State::Starting if i.deadline.is_some_and(|d| d <= now) => {
                    tracing::warn!("instance {} sent no READY=1 within {START_TIMEOUT:?}: stopping it", i.name);
                    self.stop(idx, Then::Restart);
                }
                State::Running if self.spec.watchdog.is_some_and(|w| i.last_ping + w <= now) => {
                    tracing::warn!(
                        "instance {} (pid {}) sent no WATCHDOG=1 for {:?}: killing it with SIGABRT",
                        i.name,
                        i.pid.map_or(0, Pid::as_raw),
                        self.spec.watchdog.unwrap_or_default()
                    );
                    self.signal(idx, Signal::SIGABRT, Then::Restart);
                }
                State::Stopping if i.deadline.is_some_and(|d| d <= now) => {
                    tracing::warn!("instance {} did not stop within {:?}: SIGKILL", i.name, self.spec.stop_timeout);
                    if let Some(pid) = i.pid {
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    i.deadline = None;
                }
                _ => {}
            }
        }
    }

    fn start(&mut self, idx: usize) {
        let i = &mut self.instances[idx];
        match i.launch.spawn() {
            Ok(pid) => {
                i.pid = Some(pid);
                i.state = State::Starting;
                i.then = Then::Restart;
                i.started = Instant::now();
                i.ready_at = None;
                i.deadline = Some(i.started + START_TIMEOUT);
                i.status_text.clear();
            }
            Err(e) => {
                i.crashes += 1;
                let delay = backoff(self.spec.restart_delay, self.spec.restart_max_delay, i.crashes);
                tracing::error!("cannot start instance {}: {e}; trying again in {delay:?}", i.name);
                i.deadline = Some(Instant::now() + delay);
            }
        }
    }

    /// SIGTERM, then SIGKILL after the stop timeout.
    fn stop(&mut self, idx: usize, then: Then) {
        self.signal(idx, Signal::SIGTERM, then);
    }

    fn signal(&mut self, idx: usize, signal: Signal, then: Then) {
        let i = &mut self.instances[idx];
        i.then = then;
        match (i.state, i.pid) {
            (State::Starting | State::Running | State::Stopping, Some(pid)) => {
                let _ = kill(pid, signal);
                if i.state != State::Stopping {
                    i.deadline = Some(Instant::now() + self.spec.stop_timeout);
                }
                i.state = State::Stopping;
            }
            (State::Waiting, _) if then == Then::Stay => {
                i.state = State::Stopped;
                i.deadline = None;
            }
            _ => {}
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid, format!("exited with status {code}"), code == 0),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.on_exit(pid, format!("was killed by {sig}"), false),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: String, clean: bool) {
        let Some(idx) = self.instances.iter().position(|i| i.pid == Some(pid)) else { return };
        let (restart_delay, max_delay) = (self.spec.restart_delay, self.spec.restart_max_delay);
        let i = &mut self.instances[idx];
        i.pid = None;
        let now = Instant::now();
        match i.then {
            Then::Stay => {
                tracing::info!("instance {} (pid {pid}) {how}", i.name);
                i.state = State::Stopped;
                i.deadline = None;
            }
            Then::RestartNow => {
                tracing::info!("instance {} (pid {pid}) {how}; starting it again", i.name);
                i.state = State::Waiting;
                i.deadline = Some(now);
            }
            Then::Restart => {
                let stable = i.ready_at.is_some_and(|r| now - r >= STABLE_AFTER);
                i.crashes = if stable { 1 } else { i.crashes + 1 };
                i.restarts += 1;
                let delay = backoff(restart_delay, max_delay, i.crashes);
                let why = if clean { "" } else { " (unexpected)" };
                tracing::warn!("instance {} (pid {pid}) {how}{why}; restarting in {delay:?}", i.name);
                i.state = State::Waiting;
                i.deadline = Some(now + delay);
            }
        }
        if self.rolling.as_deref() == Some(self.instances[idx].name.as_str())
            && self.instances[idx].then == Then::Restart
        {
            // The rolled instance died again instead of coming up: move on, don't stall.
            self.next_roll();
        }
        if self.shutting_down {
            return;
        }
        self.instances.retain(|i| !(i.state == State::Stopped && i.then == Then::Stay));
    }

    fn on_notification(&mut self, pid: Pid, n: Notification) {
        let Some(idx) = self.instances.iter().position(|i| i.pid == Some(pid)) else { return };
        let stop_timeout = self.spec.stop_timeout;
        let i = &mut self.instances[idx];
        let now = Instant::now();
        if let Some(text) = n.status {
            i.status_text = text;
        }
        if n.watchdog {
            i.last_ping = now;
        }
        if n.stopping && i.state != State::Stopping {
            i.state = State::Stopping;
            i.deadline = Some(now + stop_timeout);
        }
        let became_ready = n.ready && i.state == State::Starting;
        if became_ready {
            i.state = State::Running;
            i.ready_at = Some(now);
            i.last_ping = now;
            i.deadline = None;
            tracing::info!("instance {} ready (pid {pid}) {:?} after its start", i.name, now - i.started);
        }
        if n.watchdog_trigger {
            tracing::warn!("instance {} asked for its watchdog to fire: SIGABRT", i.name);
            self.signal(idx, Signal::SIGABRT, Then::Restart);
        }
        if became_ready && self.rolling.as_deref() == Some(self.instances[idx].name.as_str()) {
            self.next_roll();
        }
    }

    fn shut_down(&mut self, why: &str) {
        if self.shutting_down {
            tracing::warn!("{why} again: killing every worker now");
            for i in &self.instances {
                if let Some(pid) = i.pid {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            return;
        }
        tracing::info!(
            "{why}: stopping {} workers (each drains, at most {:?})",
            self.instances.len(),
            self.spec.stop_timeout
        );
        self.shutting_down = true;
        self.roll.clear();
        self.rolling = None;
        for idx in 0..self.instances.len() {
            self.stop(idx, Then::Stay);
        }
        for waiter in self.roll_waiters.drain(..) {
            let _ = waiter.send("error: the cluster is shutting down".into());
        }
    }

    /// Queues every instance for a restart, one at a time, each waiting for the previous
    /// one's `READY=1`; `waiter` is told when the last is up.
    fn start_roll(&mut self, waiter: Option<oneshot::Sender<String>>) {
        waiter.into_iter().for_each(|w| self.roll_waiters.push(w));
        if self.rolling.is_some() || !self.roll.is_empty() {
            return; // already rolling: the new waiter is told when this roll ends
        }
        self.roll = self.instances.iter().filter(|i| i.then != Then::Stay).map(|i| i.name.clone()).collect();
        self.next_roll();
    }

    fn next_roll(&mut self) {
        self.rolling = None;
        while let Some(name) = self.roll.pop_front() {
            if let Some(idx) = self.instances.iter().position(|i| i.name == name && i.state == State::Running) {
                tracing::info!("rolling restart: instance {name}");
                self.rolling = Some(name);
                self.stop(idx, Then::RestartNow);
                return;
            }
        }
        let count = self.instances.len();
        for waiter in self.roll_waiters.drain(..) {
            let _ = waiter.send(format!("ok: restarted {count} instances one at a time"));
        }
        tracing::info!("rolling restart done");
    }

    fn on_request(&mut self, request: Request) {
        let mut words = request.command.split_whitespace();
        let answer = match (words.next(), words.next()) {
            (Some("status"), None) => serde_json::to_string(&self.status()).unwrap_or_else(|e| format!("error: {e}")),
            (Some("restart"), None) => return self.start_roll(Some(request.reply)),
            (Some("scale"), Some(n)) => match crate::spec::Instances::parse(n) {
                Ok(n) => match self.scale_to(n.resolve()) {
                    Ok(()) => format!("ok: {} instances", n.resolve()),
                    Err(e) => format!("error: {e}"),
                },
                Err(e) => format!("error: {e}"),
            },
            _ => format!("error: unknown command {:?} (status, restart, scale N)", request.command),
        };
        let _ = request.reply.send(answer);
    }

    /// The cluster as `sdcluster status` shows it.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            app: self.spec.name.clone(),
            supervisor: "sdcluster run".into(),
            listen: self.spec.listen.iter().map(ToString::to_string).collect(),
            instances: self
                .instances
                .iter()
                .map(|i| {
                    let (memory_bytes, cpu_secs) = i.pid.map_or((None, None), |p| process_usage(p.as_raw() as u32));
                    InstanceStatus {
                        instance: i.name.clone(),
                        pid: i.pid.map(|p| p.as_raw() as u32),
                        state: i.state.name().to_owned(),
                        uptime_secs: i.pid.map(|_| i.started.elapsed().as_secs_f64()),
                        restarts: i.restarts,
                        memory_bytes,
                        cpu_secs,
                        status_text: i.status_text.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// The restart delay after the `crashes`-th death in a row: the spec's delay first, then
/// doubling up to the ceiling.
fn backoff(delay: Duration, max: Duration, crashes: u32) -> Duration {
    if crashes <= 1 {
        return delay;
    }
    let step = delay.max(MIN_BACKOFF_STEP);
    step.saturating_mul(1 << (crashes - 1).min(20)).min(max)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// One datagram from the notify socket, with the sender's pid from its credentials.
fn receive(socket: &UnixDatagram) -> io::Result<(Pid, Notification)> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(socket.as_fd().as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let pid = msg
        .cmsgs()?
        .find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(creds) => Some(Pid::from_raw(creds.pid())),
            _ => None,
        })
        .unwrap_or(Pid::from_raw(0));
    let len = msg.bytes;
    Ok((pid, Notification::parse(&buf[..len])))
}

async fn serve_control(stream: tokio::net::UnixStream, requests: mpsc::Sender<Request>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    let read_line = reader.read_line(&mut line);
    if tokio::time::timeout(Duration::from_secs(5), read_line).await.is_err() {
        return;
    }
    let (reply, answer) = oneshot::channel();
    if requests.send(Request { command: line.trim().to_owned(), reply }).await.is_err() {
        return;
    }
    if let Ok(answer) = answer.await {
        let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let (d, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let steps: Vec<u128> = (1..=7).map(|n| backoff(d, max, n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(Duration::ZERO, max, 1), Duration::ZERO);
        assert_eq!(backoff(Duration::ZERO, max, 2), Duration::from_millis(100));
    }
}
