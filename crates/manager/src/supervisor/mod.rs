//! `sdcluster run`: systemd's part, for machines where systemd is not PID 1.
//!
//! Binds the listeners once, starts the instances with the sd_listen_fds protocol, reads
//! their `sd_notify` messages (with the fds they store, as systemd's file descriptor store),
//! restarts the dead with backoff, kills the silent (watchdog), rolls restarts one instance
//! at a time on SIGHUP or `sdcluster restart`, drains everything on SIGTERM, and answers
//! `sdcluster status|restart|scale` on a control socket ([`control::ControlRequest`]).
//!
//! Each instance's lifecycle is the pure state machine of [`machine`]; this module is the
//! executor that feeds it events and performs its actions.
//!
//! Each start gets what systemd would give a unit's process ([`environment`]): one
//! environment map (inherited, the spec's, the environment file's, then the supervisor's
//! own), its credentials copied into a private folder, its state directory; it is ready at
//! `READY=1`, or (`ready = exec`) once its program was executed, which its exec pipe says
//! ([`spawn`]). When an instance's main process ends, whatever is left of its process group
//! is killed, as systemd's `KillMode=mixed` does with the unit's cgroup; what escaped the
//! group (a daemon in a session of its own) is adopted by the supervisor, a child subreaper,
//! and killed once the process it descends from ended ([`orphans`]); nothing the supervisor
//! started outlives it.
//!
//! Hostile or odd input is refused or passed through, never a panic: a NUL byte in the
//! command or the environment is refused before anything starts, an inherited variable that
//! is not UTF-8 reaches the workers byte for byte. The runtime directory must be private
//! ([`control::prepare_private_dir`]), and the control socket answers only its own user and
//! root (`SO_PEERCRED`). A stalled supervisor (SIGSTOP) reads what its workers sent meanwhile
//! before it judges their watchdogs, and does not count its own stall against them.

mod environment;
mod fdstore;
mod machine;
mod orphans;
mod roll;
mod spawn;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use sdcluster_protocol::metrics::{METRICS_FILE_ENV, MetricsTable};
use sdcluster_protocol::notify::Notification;
use sdcluster_protocol::{BindError, Listener, balance, handover};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use fdstore::FdStore;
use machine::{Action, Event, Machine, Then, Timing};
use roll::{CANARY, Roll, RollStep};
use spawn::{ExecFailure, ExecOutcome, ExecPipe, Launch};

use crate::control::{self, ControlRequest, ControlResponse};
use crate::spec::{Balance, Spec};
use crate::status::{ClusterStatus, Counters, InstanceStatus, LastExit, process_usage};

/// A worker that has not sent `READY=1` after this long is stopped and tried again; a
/// rolling restart waits this long for each new process.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How often stored fds are checked for hang-ups when nothing else happens.
const TICK: Duration = Duration::from_secs(1);
/// Most fds one notification may carry (systemd's limit: SCM_MAX_FD minus what it keeps).
const MAX_NOTIFY_FDS: usize = 253;
/// Longest notification datagram read (systemd's is the same, PIPE_BUF).
const NOTIFY_BUFFER: usize = 4096;
/// The main loop woke this much later than it meant to: the supervisor was stalled
/// (SIGSTOP, a starved machine), and its instances' deadlines move on by as much.
const STALL_MIN: Duration = Duration::from_millis(100);
/// Most notifications read in one go before deadlines are checked (a worker that floods the
/// socket cannot hold the loop).
const DRAIN_MAX: usize = 4096;
/// Longest control request read (a request is a few dozen bytes of JSON).
const CONTROL_LINE_MAX: u64 = 64 * 1024;
/// How long the supervisor, stopping, waits for what its workers left behind to die.
const LEFTOVERS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A listen address.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The runtime directory is not private (another user could take over the sockets).
    #[error(transparent)]
    RuntimeDir(#[from] control::UnsafeDir),
    /// The spec holds what no process can be given (a NUL byte in an argument).
    #[error("{0}")]
    Spec(String),
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

struct Instance {
    machine: Machine,
    launch: Launch,
    /// Sockets of this instance alone (SO_REUSEPORT mode), kept open across restarts.
    _own_sockets: Vec<Listener>,
    /// Its file descriptor store, passed to each next process.
    store: FdStore,
    /// Its hand-over flag ([`handover::HANDOVER_FLAG_ENV`]).
    flag: PathBuf,
    status_text: String,
    /// How its previous process ended, for `sdcluster status`.
    last_exit: Option<LastExit>,
    /// The current process's exec pipe, until it says whether the program runs.
    exec: Option<(Pid, ExecPipe)>,
    /// The current process could not execute its program: why (it exits 127 next).
    exec_failure: Option<(Pid, ExecFailure)>,
    /// Its private credentials folder (`$CREDENTIALS_DIRECTORY`), while a process runs.
    credentials: PathBuf,
    /// The `INVOCATION_ID` of its current (or last) process, which its descendants inherit.
    invocation: String,
}

impl Instance {
    fn name(&self) -> &str {
        &self.machine.name
    }
}

/// A request from the control socket, answered by the main loop.
struct Request {
    request: ControlRequest,
    reply: oneshot::Sender<ControlResponse>,
}

/// The running cluster.
pub struct Supervisor {
    spec: Spec,
    dir: PathBuf,
    timing: Timing,
    shared: Vec<Listener>,
    balance_table: Option<OwnedFd>,
    /// The table every instance keeps its counters in (a sealed memfd), and this
    /// process's mapping of it, for `status`.
    metrics_table: OwnedFd,
    metrics: MetricsTable,
    /// The environment this process was given (bytes: UTF-8 or not), less what describes
    /// its own supervisor.
    inherited: BTreeMap<OsString, OsString>,
    /// Pids whose exec pipe became readable (from a small task per start).
    exec_ready: mpsc::UnboundedSender<Pid>,
    exec_reports: Option<mpsc::UnboundedReceiver<Pid>>,
    instances: Vec<Instance>,
    roll: Option<Roll>,
    roll_waiters: Vec<oneshot::Sender<ControlResponse>>,
    shutting_down: bool,
    /// Adopted orphans this process killed and has not reaped yet.
    swept: BTreeSet<Pid>,
    /// Adopted orphans without an `INVOCATION_ID`, kept until the cluster stops (logged once).
    untracked: BTreeSet<Pid>,
    /// When the adopted orphans were last looked at.
    last_sweep: Option<Instant>,
}

impl Supervisor {
    /// Binds the spec's listeners (once, for all instances) and prepares the instances.
    pub fn bind(spec: Spec, dir: PathBuf) -> Result<Self, SuperviseError> {
        check_passable(&spec).map_err(SuperviseError::Spec)?;
        control::prepare_private_dir(&dir)?;
        let control = control::control_path(&dir, &spec.name);
        if std::os::unix::net::UnixStream::connect(&control).is_ok() {
            return Err(SuperviseError::AlreadyRunning(spec.name.clone(), control));
        }
        let (shared, balance_table) = match spec.balance {
            Balance::Shared => {
                let listeners = spec.listen.iter().map(|a| a.bind(false)).collect::<Result<Vec<_>, _>>()?;
                let table = balance::BalanceTable::create_memfd().map_err(io_err("cannot create the balance table"))?;
                (listeners, Some(table))
            }
            Balance::Reuseport => (Vec::new(), None),
        };
        // In both modes: counters are per instance, whichever socket it serves. Both tables are
        // sized and sealed: no worker can cut one under the others' mappings (SIGBUS).
        let metrics_table = MetricsTable::create_memfd().map_err(io_err("cannot create the metrics table"))?;
        let metrics = metrics_table
            .try_clone()
            .map(std::fs::File::from)
            .and_then(|file| MetricsTable::open(&file))
            .map_err(io_err("cannot map the metrics table"))?;
        let timing = Timing {
            start_timeout: START_TIMEOUT,
            stop_timeout: spec.stop_timeout,
            watchdog: spec.watchdog,
            restart_delay: spec.restart_delay,
            restart_max_delay: spec.restart_max_delay,
            ready: spec.ready,
        };
        let (exec_ready, exec_reports) = mpsc::unbounded_channel();
        let mut supervisor = Self {
            spec,
            dir,
            timing,
            shared,
            balance_table,
            metrics_table,
            metrics,
            inherited: inherited_environment(),
            exec_ready,
            exec_reports: Some(exec_reports),
            instances: Vec::new(),
            roll: None,
            roll_waiters: Vec::new(),
            shutting_down: false,
            swept: BTreeSet::new(),
            untracked: BTreeSet::new(),
            last_sweep: None,
        };
        supervisor.scale_to(supervisor.spec.instances.resolve())?;
        Ok(supervisor)
    }

    /// The table where every instance keeps its counters (`/metrics` of any worker renders
    /// it): requests, connections, bytes, starts, by instance name, carried across restarts.
    pub fn metrics(&self) -> &MetricsTable {
        &self.metrics
    }

    /// Adds instances up to `n`, or stops the ones above it; returns how many ran before.
    fn scale_to(&mut self, n: u32) -> Result<usize, SuperviseError> {
        let live: Vec<usize> = (0..self.instances.len())
            .filter(|&i| !self.instances[i].machine.stays_stopped() && self.instances[i].name() != CANARY)
            .collect();
        for &i in live.iter().skip(n as usize) {
            self.deliver(i, Event::Stop(Then::Stay));
        }
        if !self.shutting_down {
            // Those without a process (waiting, failed) are stopped at once: gone.
            self.instances.retain(|i| i.machine.life != machine::Life::Stopped);
        }
        let mut next = self.instances.iter().filter_map(|i| i.name().parse::<u32>().ok()).max().unwrap_or(0);
        for _ in live.len()..n as usize {
            next += 1;
            let instance = self.prepare(next.to_string())?;
            self.instances.push(instance);
        }
        self.check_roll();
        Ok(live.len())
    }

    fn prepare(&self, name: String) -> Result<Instance, SuperviseError> {
        let own_sockets = match self.spec.balance {
            Balance::Reuseport => self.spec.listen.iter().map(|a| a.bind(true)).collect::<Result<Vec<_>, _>>()?,
            Balance::Shared => Vec::new(),
        };
        // LISTEN_FDS carries only what systemd would pass: the listeners (then the store).
        // The tables follow, uncounted, named by the variables the reference worker reads
        // under systemd too.
        let fds: Vec<(i32, String)> =
            self.shared.iter().chain(&own_sockets).map(|l| (l.as_raw_fd(), "http".to_owned())).collect();
        let mut tables = Vec::new();
        if let Some(table) = &self.balance_table {
            tables.push((table.as_raw_fd(), sdcluster_protocol::env::BALANCE_FILE.to_owned()));
        }
        tables.push((self.metrics_table.as_raw_fd(), METRICS_FILE_ENV.to_owned()));
        let flag = control::handover_dir(&self.dir, &self.spec.name).join(&name);
        let launch = Launch::new(
            &self.spec.command,
            fds,
            tables,
            self.spec.watchdog.map(|d| d.as_micros() as u64),
            self.spec.working_directory.as_deref(),
        )
        .map_err(|e| SuperviseError::Spec(e.to_string()))?;
        let credentials = control::credentials_dir(&self.dir, &self.spec.name).join(&name);
        Ok(Instance {
            machine: Machine::new(name, Instant::now()),
            launch,
            _own_sockets: own_sockets,
            store: FdStore::new(self.spec.handover_max as usize),
            flag,
            status_text: String::new(),
            last_exit: None,
            exec: None,
            exec_failure: None,
            credentials,
            invocation: String::new(),
        })
    }

    /// The whole environment of instance `idx`'s next process (without the sd_listen_fds
    /// variables, which [`Launch::spawn`] adds), its credentials written and its state
    /// directory made: what can fail here fails the start, with a message. `invocation` is
    /// the process's `INVOCATION_ID`.
    fn start_environment(&self, idx: usize, invocation: &str) -> Result<BTreeMap<OsString, OsString>, String> {
        let i = &self.instances[idx];
        let worker = self.spec.worker_environment(i.name());
        let file = match &self.spec.environment_file {
            Some(path) => environment::read_environment_file(path)?,
            None => Vec::new(),
        };
        let mut own = vec![
            ("NOTIFY_SOCKET".to_owned(), control::notify_path(&self.dir, &self.spec.name).display().to_string()),
            (handover::HANDOVER_FLAG_ENV.to_owned(), i.flag.display().to_string()),
            (orphans::INVOCATION_ID.to_owned(), invocation.to_owned()),
        ];
        if let Some(name) = &self.spec.state_directory {
            let root = nix::unistd::geteuid().is_root();
            let base = environment::state_base(root, |k| std::env::var(k).ok())?;
            let dir = environment::prepare_state_directory(&base, name)?;
            own.push(("STATE_DIRECTORY".to_owned(), dir.display().to_string()));
        }
        if !self.spec.credentials.is_empty() {
            environment::write_credentials(&i.credentials, &self.spec.credentials)?;
            own.push(("CREDENTIALS_DIRECTORY".to_owned(), i.credentials.display().to_string()));
        }
        Ok(environment::layered(&self.inherited, [&worker[..], &file, &own]))
    }

    /// Learns from instance `idx`'s exec pipe whether its process runs its program, if the
    /// pipe says so yet (it never blocks).
    fn resolve_exec(&mut self, idx: usize) {
        let i = &mut self.instances[idx];
        let Some((pid, pipe)) = &i.exec else { return };
        let pid = *pid;
        match pipe.check() {
            ExecOutcome::Pending => {}
            ExecOutcome::Executed => {
                i.exec = None;
                if i.machine.pid() == Some(pid) {
                    self.deliver(idx, Event::Executed);
                }
            }
            ExecOutcome::Failed(failure) => {
                i.exec = None;
                tracing::error!("instance {} (pid {pid}): {failure}", i.machine.name);
                i.exec_failure = Some((pid, failure));
            }
        }
    }

    /// Wakes the main loop with `pid` once `pipe` is readable (the program runs, or a report
    /// of why not is there), on a task of its own: the loop never waits for it.
    fn watch_exec(&self, pid: Pid, pipe: &ExecPipe) {
        let Ok(fd) = pipe.fd().try_clone() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return; // no runtime (a unit test): the tick and the exit read the pipe
        }
        let wake = self.exec_ready.clone();
        tokio::spawn(async move {
            // SAFETY: the task owns the fd (a dup of the pipe), open and unchanged while the
            // AsyncFd lives.
            if let Ok(fd) = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                let _ = fd.readable().await;
            }
            let _ = wake.send(pid);
        });
    }

    /// Supervises until SIGTERM/SIGINT, then drains every worker and returns.
    pub async fn run(mut self) -> Result<(), SuperviseError> {
        // Before the first fork: every orphan below this process comes back to it.
        orphans::become_subreaper().map_err(io_err("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER)"))?;
        let notify_path = control::notify_path(&self.dir, &self.spec.name);
        let _ = std::fs::remove_file(&notify_path);
        let notify =
            UnixDatagram::bind(&notify_path).map_err(io_err(format!("cannot bind {}", notify_path.display())))?;
        setsockopt(&notify, sockopt::PassCred, &true).map_err(|e| io_err("SO_PASSCRED")(e.into()))?;
        notify.set_nonblocking(true).map_err(io_err("notify socket"))?;
        // SAFETY: the datagram socket owns its fd, open and unchanged while the AsyncFd lives.
        let notify = unsafe { AsyncFd::register_with_interest(notify, Interest::READABLE) }
            .map_err(|e| io_err("notify socket")(e.into()))?;
        let handover_dir = control::handover_dir(&self.dir, &self.spec.name);
        let _ = std::fs::remove_dir_all(&handover_dir);
        control::prepare_private_dir(&handover_dir)?;
        // Credentials a killed supervisor left behind go; the folder is made private anew.
        let credentials_dir = control::credentials_dir(&self.dir, &self.spec.name);
        let _ = std::fs::remove_dir_all(&credentials_dir);
        control::prepare_private_dir(&credentials_dir)?;
        let control_path = control::control_path(&self.dir, &self.spec.name);
        let _ = std::fs::remove_file(&control_path);
        let control =
            UnixListener::bind(&control_path).map_err(io_err(format!("cannot bind {}", control_path.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The folder is private already; the socket is too (and every peer is checked).
            std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err(format!("cannot make {} private", control_path.display())))?;
        }
        let me = nix::unistd::geteuid().as_raw();
        let (requests, mut incoming) = mpsc::channel::<Request>(16);
        let mut exec_reports = self.exec_reports.take().expect("run is called once");
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
        // When the loop meant to wake up next: waking up much later means it was stalled.
        let mut planned = Instant::now();
        loop {
            // What the workers sent first (also what queued while this process was stopped),
            // then the deadlines, in supervisor time.
            self.drain_notifications(notify.get_ref());
            let late = Instant::now().saturating_duration_since(planned);
            if late >= STALL_MIN {
                self.stalled(late);
            }
            self.drop_hung_up();
            self.tick();
            if self.shutting_down && self.instances.iter().all(|i| i.machine.life == machine::Life::Stopped) {
                break;
            }
            let next = self.next_deadline();
            planned = next;
            tokio::select! {
                biased;
                // Notifications first: a worker's last datagram (its stored fds) is handled
                // before its exit, as systemd does.
                ready = notify.readable() => {
                    if let Ok(mut guard) = ready {
                        while let Ok(Ok((pid, n, fds))) = guard.try_io(|s| receive(s.get_ref())) {
                            self.on_notification(pid, n, fds);
                        }
                    }
                }
                _ = chld.recv() => {
                    while let Ok((pid, n, fds)) = receive(notify.get_ref()) {
                        self.on_notification(pid, n, fds);
                    }
                    self.reap();
                }
                _ = term.recv() => self.shut_down("SIGTERM"),
                _ = int.recv() => self.shut_down("SIGINT"),
                _ = hup.recv() => { tracing::info!("SIGHUP: rolling restart"); self.start_roll(None); }
                Ok((stream, _)) = control.accept() => { tokio::spawn(serve_control(stream, requests.clone(), me)); }
                Some(request) = incoming.recv() => self.on_request(request),
                Some(pid) = exec_reports.recv() => {
                    if let Some(idx) = self.instances.iter().position(|i| i.exec.as_ref().is_some_and(|(p, _)| *p == pid)) {
                        self.resolve_exec(idx);
                    }
                }
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
        self.kill_leftovers();
        let _ = std::fs::remove_file(&control_path);
        let _ = std::fs::remove_file(&notify_path);
        let _ = std::fs::remove_dir_all(&handover_dir);
        let _ = std::fs::remove_dir_all(&credentials_dir);
        tracing::info!("{}: all workers stopped", self.spec.name);
        Ok(())
    }

    /// Handles what waits in the notify socket, at most [`DRAIN_MAX`] datagrams.
    fn drain_notifications(&mut self, socket: &UnixDatagram) {
        for _ in 0..DRAIN_MAX {
            match receive(socket) {
                Ok((pid, n, fds)) => self.on_notification(pid, n, fds),
                Err(_) => return,
            }
        }
    }

    /// The loop ran `late` after it meant to: the supervisor did not run meanwhile, and that
    /// time is not held against its instances ([`Event::Stalled`]).
    fn stalled(&mut self, late: Duration) {
        if late >= Duration::from_secs(1) {
            tracing::warn!(
                "the supervisor did not run for {late:.1?} (stopped, or starved of CPU): watchdog and stop deadlines move on by as much"
            );
        } else {
            tracing::debug!("the main loop woke {late:?} late: deadlines move on by as much");
        }
        for idx in 0..self.instances.len() {
            self.deliver(idx, Event::Stalled(late));
        }
    }

    /// Kills the adopted orphans that are left from a process that ended: those whose
    /// `INVOCATION_ID` is no running process's ([`orphans`]). Those without one stay until
    /// the cluster stops ([`Self::kill_leftovers`]).
    fn sweep_orphans(&mut self) {
        self.last_sweep = Some(Instant::now());
        let live: BTreeSet<&str> =
            self.instances.iter().filter(|i| i.machine.pid().is_some()).map(|i| i.invocation.as_str()).collect();
        let mut killed = Vec::new();
        for pid in orphans::children() {
            if self.instances.iter().any(|i| i.machine.pid() == Some(pid))
                || self.swept.contains(&pid)
                || orphans::is_zombie(pid)
            {
                continue;
            }
            match orphans::invocation_of(pid) {
                Some(id) if live.contains(id.as_str()) => {}
                Some(id) => {
                    let of = self.instances.iter().find(|i| i.invocation == id).map(|i| i.name().to_owned());
                    let from =
                        of.map_or_else(|| "an ended process".to_owned(), |n| format!("instance {n}'s ended process"));
                    tracing::info!("killing pid {pid} ({}), left behind by {from}", orphans::name_of(pid));
                    orphans::kill_child(pid);
                    killed.push(pid);
                }
                None => {
                    if self.untracked.insert(pid) {
                        tracing::debug!(
                            "pid {pid} ({}), adopted, carries no INVOCATION_ID: it is killed when the cluster stops",
                            orphans::name_of(pid)
                        );
                    }
                }
            }
        }
        self.swept.extend(killed);
    }

    /// Once every instance stopped: SIGKILL to whatever is still below this process (adopted
    /// orphans and their children, which come to it in turn), until nothing is left or
    /// [`LEFTOVERS_TIMEOUT`] passed.
    fn kill_leftovers(&mut self) {
        let deadline = Instant::now() + LEFTOVERS_TIMEOUT;
        let mut killed = BTreeSet::new();
        loop {
            self.reap();
            let left: Vec<Pid> = orphans::children().into_iter().filter(|&p| !orphans::is_zombie(p)).collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!("processes {left:?} were still there {LEFTOVERS_TIMEOUT:?} after SIGKILL");
                break;
            }
            for pid in left {
                if killed.insert(pid) {
                    tracing::info!("killing pid {pid} ({}), left behind by the workers", orphans::name_of(pid));
                }
                orphans::kill_child(pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap();
    }

    /// The earliest deadline of any instance, at most a [`TICK`] away.
    fn next_deadline(&self) -> Instant {
        let tick = Instant::now() + TICK;
        self.instances.iter().filter_map(|i| i.machine.next_deadline(&self.timing)).min().map_or(tick, |d| d.min(tick))
    }

    fn tick(&mut self) {
        for idx in 0..self.instances.len() {
            // Should a wake-up have been missed, the pipe is read here too.
            self.resolve_exec(idx);
            self.deliver(idx, Event::Tick);
        }
        if self.last_sweep.is_none_or(|at| at.elapsed() >= TICK) {
            self.sweep_orphans();
        }
    }

    /// Drops the stored fds that hung up, in every instance's store.
    fn drop_hung_up(&mut self) {
        for i in &mut self.instances {
            if i.store.is_empty() {
                continue;
            }
            for name in i.store.drop_hung_up() {
                tracing::info!("instance {}: stored fd {name:?} hung up: removed from the store", i.machine.name);
            }
        }
    }

    /// Feeds `event` to instance `idx`'s state machine and performs the actions it returns.
    fn deliver(&mut self, idx: usize, event: Event) {
        let actions = self.instances[idx].machine.handle(event, Instant::now(), &self.timing);
        for action in actions {
            self.perform(idx, action);
        }
    }

    fn perform(&mut self, idx: usize, action: Action) {
        let i = &mut self.instances[idx];
        match action {
            Action::Spawn => {
                for name in i.store.drop_hung_up() {
                    tracing::info!("instance {}: stored fd {name:?} hung up: removed from the store", i.machine.name);
                }
                let invocation = orphans::new_invocation_id();
                let env = match self.start_environment(idx, &invocation) {
                    Ok(env) => env,
                    Err(e) => {
                        self.instances[idx].last_exit = Some(LastExit::start_failed(e.clone()));
                        return self.deliver(idx, Event::SpawnFailed(e));
                    }
                };
                let i = &mut self.instances[idx];
                let stored = i.store.entries();
                let spawned = i.launch.spawn(&env, &stored);
                let event = match spawned {
                    Ok(spawned) => {
                        i.status_text.clear();
                        i.invocation = invocation;
                        if !stored.is_empty() {
                            tracing::info!("instance {}: passing {} stored fds", i.machine.name, stored.len());
                        }
                        let pid = spawned.pid;
                        self.watch_exec(pid, &spawned.exec);
                        let i = &mut self.instances[idx];
                        i.exec = Some((pid, spawned.exec));
                        i.exec_failure = None;
                        Event::Spawned(pid)
                    }
                    Err(e) => {
                        environment::remove_credentials(&i.credentials);
                        let e = format!("cannot start a process: {e}");
                        i.last_exit = Some(LastExit::start_failed(e.clone()));
                        Event::SpawnFailed(e)
                    }
                };
                self.deliver(idx, event);
                // The program may run already (or have failed): the pipe tells without waiting.
                self.resolve_exec(idx);
            }
            Action::Signal(pid, Signal::SIGKILL) => {
                // The final kill goes to the whole process group, as systemd's to the cgroup.
                let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
                let _ = kill(pid, Signal::SIGKILL);
            }
            Action::Signal(pid, signal) => {
                let _ = kill(pid, signal);
            }
            Action::CreateHandoverFlag => {
                let created = i.flag.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| {
                    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&i.flag).map(drop)
                });
                if let Err(e) = created {
                    tracing::warn!(
                        "instance {}: cannot create the hand-over flag {}: {e}; its connections are closed, not handed over",
                        i.machine.name,
                        i.flag.display()
                    );
                }
            }
            Action::RemoveHandoverFlag => {
                let _ = std::fs::remove_file(&i.flag);
            }
            Action::DropStore => {
                let n = i.store.clear();
                if n > 0 {
                    tracing::info!("instance {} stays stopped: closed the {n} fds of its store", i.machine.name);
                }
            }
            Action::Ready => {
                let name = i.machine.name.clone();
                let step = self.roll.as_mut().and_then(|r| r.ready(&name, |n| may_roll(&self.instances, n)));
                self.roll_step(step);
            }
            Action::NotReady(why) => {
                let name = i.machine.name.clone();
                let step = self.roll.as_mut().and_then(|r| r.not_ready(&name, &why));
                self.roll_step(step);
            }
        }
    }

    fn reap(&mut self) {
        loop {
            // Seen, not reaped yet: while the zombie holds its pid, that is also still its
            // process group's id, which no other process can have taken.
            let pid = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT) {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return,
                },
                Err(_) => return,
            };
            let instance = self.instances.iter().any(|i| i.machine.pid() == Some(pid));
            if instance {
                kill_group_of(pid);
            } else {
                // An adopted orphan (this process is a subreaper), never an instance.
                self.swept.remove(&pid);
                self.untracked.remove(&pid);
            }
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if !instance => {
                    tracing::debug!(
                        "reaped pid {pid}, adopted (no instance's main process): exited with status {code}"
                    );
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if !instance => {
                    tracing::debug!("reaped pid {pid}, adopted (no instance's main process): killed by {sig}");
                }
                Ok(WaitStatus::Exited(pid, code)) => {
                    let last = LastExit::from_wait(Some(code), None, false);
                    self.on_exit(pid, format!("exited with status {code}"), Some(code), last);
                }
                Ok(WaitStatus::Signaled(pid, sig, core)) => {
                    let last = LastExit::from_wait(None, Some(sig.as_str()), core);
                    self.on_exit(pid, format!("was killed by {sig}"), None, last);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: String, status: Option<i32>, last: LastExit) {
        let Some(idx) = self.instances.iter().position(|i| i.machine.pid() == Some(pid)) else { return };
        // Whether it ever ran its program: the pipe is closed now, so this does not wait.
        self.resolve_exec(idx);
        let instance = &mut self.instances[idx];
        environment::remove_credentials(&instance.credentials);
        let (how, last) = match instance.exec_failure.take() {
            Some((p, failure)) if p == pid => (failure.to_string(), LastExit::exec_failed(failure.to_string(), status)),
            _ => (how, last.because(instance.machine.stop_cause)),
        };
        instance.last_exit = Some(last);
        self.deliver(idx, Event::Exited { how, status });
        // Its children are this process's now: what descends from it goes with it.
        self.sweep_orphans();
        if !self.shutting_down {
            // Dropping an instance closes what is left of its store and its own sockets.
            self.instances.retain(|i| i.machine.life != machine::Life::Stopped);
        }
        self.check_roll();
    }

    /// A roll whose current instance stays stopped or is gone moves on.
    fn check_roll(&mut self) {
        let Some(current) = self.roll.as_ref().and_then(|r| r.current()).map(str::to_owned) else { return };
        let gone = self.instances.iter().find(|i| i.name() == current).is_none_or(|i| i.machine.stays_stopped());
        if gone {
            let step = self.roll.as_mut().and_then(|r| r.gone(&current, |n| may_roll(&self.instances, n)));
            self.roll_step(step);
        }
    }

    fn on_notification(&mut self, pid: Pid, n: Notification, fds: Vec<OwnedFd>) {
        let Some(idx) = self.instances.iter().position(|i| i.machine.pid() == Some(pid)) else {
            if !fds.is_empty() {
                tracing::warn!(
                    "closing {} fds sent by pid {pid}, which is not the main process of an instance",
                    fds.len()
                );
            }
            return;
        };
        let max = self.spec.handover_max;
        let i = &mut self.instances[idx];
        let name = i.machine.name.clone();
        if let Some(text) = n.status {
            i.status_text = text;
        }
        if n.fdstore_remove {
            match &n.fdname {
                Some(fdname) => {
                    let removed = i.store.remove(fdname);
                    tracing::debug!("instance {name}: FDSTOREREMOVE=1 closed {removed} fds named {fdname:?}");
                }
                None => tracing::warn!("instance {name}: FDSTOREREMOVE=1 without FDNAME=: ignored"),
            }
        }
        if n.fdstore && !fds.is_empty() {
            let fdname = n.fdname.as_deref().unwrap_or(fdstore::DEFAULT_NAME);
            let added = i.store.add(fds, fdname, !n.fdpoll_off);
            if added.over_cap > 0 {
                tracing::warn!(
                    "instance {name}: the fd store is full (handover-max {max}): closed {} more fds named {fdname:?}",
                    added.over_cap
                );
            }
            tracing::debug!(
                "instance {name}: stored {} fds named {fdname:?} ({} already stored); {} in the store",
                added.kept,
                added.duplicates,
                i.store.len()
            );
        } else if !fds.is_empty() && !n.barrier {
            tracing::warn!("instance {name}: closing {} fds sent without FDSTORE=1", fds.len());
        }
        // BARRIER=1: its fd is closed (dropped) here, once the datagram is handled.
        if n.watchdog {
            self.deliver(idx, Event::Ping);
        }
        if n.stopping {
            self.deliver(idx, Event::Stopping);
        }
        if n.ready {
            self.deliver(idx, Event::Ready);
        }
        if n.watchdog_trigger {
            self.deliver(idx, Event::WatchdogTrigger);
        }
    }

    fn shut_down(&mut self, why: &str) {
        if self.shutting_down {
            tracing::warn!("{why} again: killing every worker now");
            for pid in self.instances.iter().filter_map(|i| i.machine.pid()) {
                let _ = kill(pid, Signal::SIGKILL);
                kill_group_of(pid);
            }
            return;
        }
        tracing::info!(
            "{why}: stopping {} workers (each drains, at most {:?})",
            self.instances.len(),
            self.spec.stop_timeout
        );
        self.shutting_down = true;
        if self.roll.take().is_some() {
            tracing::warn!("rolling restart abandoned: the cluster is shutting down");
        }
        for waiter in self.roll_waiters.drain(..) {
            let _ = waiter.send(ControlResponse::error("the cluster is shutting down"));
        }
        for idx in 0..self.instances.len() {
            self.deliver(idx, Event::Stop(Then::Stay));
        }
    }

    /// Restarts every running instance, one at a time, each waiting for its new process's
    /// `READY=1`; `waiter` is told when the roll is over (or stopped).
    fn start_roll(&mut self, waiter: Option<oneshot::Sender<ControlResponse>>) {
        if self.shutting_down {
            if let Some(w) = waiter {
                let _ = w.send(ControlResponse::error("the cluster is shutting down"));
            }
            return;
        }
        self.roll_waiters.extend(waiter);
        if self.roll.is_some() {
            return; // already rolling: the new waiter is told when this roll ends
        }
        let rolled: Vec<&Instance> = self
            .instances
            .iter()
            .filter(|i| (i.machine.is_running() || i.machine.is_failed()) && i.name() != CANARY)
            .collect();
        let names = rolled.iter().map(|i| i.name().to_owned()).collect();
        let failed: BTreeSet<String> =
            rolled.iter().filter(|i| i.machine.is_failed()).map(|i| i.name().to_owned()).collect();
        if !failed.is_empty() {
            tracing::info!(
                "rolling restart: failed instances ({}) are started again in their turn",
                failed.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        // No canary in reuseport mode: its own socket would reset what queued on it.
        let mut roll = Roll::new(names, failed, self.spec.balance == Balance::Shared);
        let step = roll.advance(|n| may_roll(&self.instances, n));
        self.roll = Some(roll);
        self.roll_step(Some(step));
    }

    fn roll_step(&mut self, step: Option<RollStep>) {
        match step {
            None => {}
            Some(RollStep::StartCanary) => {
                tracing::info!("rolling restart: a canary (instance {CANARY}) on the current release first");
                match self.prepare(CANARY.to_owned()) {
                    Ok(canary) => self.instances.push(canary),
                    Err(e) => {
                        let step = self.roll.as_mut().and_then(|r| r.not_ready(CANARY, &e.to_string()));
                        self.roll_step(step);
                    }
                }
            }
            Some(RollStep::StopCanary) => {
                self.stop_canary();
                let step = self.roll.as_mut().map(|r| r.advance(|n| may_roll(&self.instances, n)));
                self.roll_step(step);
            }
            Some(RollStep::Restart(name)) => {
                tracing::info!("rolling restart: instance {name}");
                if let Some(idx) = self.instances.iter().position(|i| i.name() == name) {
                    self.deliver(idx, Event::Stop(Then::RestartNow));
                }
            }
            Some(RollStep::Done { restarted, started }) => {
                self.roll = None;
                tracing::info!("rolling restart done");
                for waiter in self.roll_waiters.drain(..) {
                    let _ = waiter.send(ControlResponse::Restarted { instances: restarted, started: started.clone() });
                }
            }
            Some(RollStep::Failed { message }) => {
                self.roll = None;
                self.stop_canary();
                tracing::error!("rolling restart stopped: {message}");
                for waiter in self.roll_waiters.drain(..) {
                    let _ = waiter.send(ControlResponse::error(message.clone()));
                }
            }
        }
    }

    /// Stops the canary, if one runs: a stop, so it closes what it accepted gracefully.
    fn stop_canary(&mut self) {
        if let Some(idx) = self.instances.iter().position(|i| i.name() == CANARY && !i.machine.stays_stopped()) {
            self.deliver(idx, Event::Stop(Then::Stay));
        }
    }

    fn on_request(&mut self, Request { request, reply }: Request) {
        let answer = match request {
            ControlRequest::Status => ControlResponse::Status(self.status()),
            ControlRequest::Restart => return self.start_roll(Some(reply)),
            ControlRequest::Scale { .. } if self.shutting_down => {
                ControlResponse::error("the cluster is shutting down: scale refused")
            }
            ControlRequest::Scale { instances } => {
                let to = instances.resolve();
                match self.scale_to(to) {
                    Ok(from) => {
                        tracing::info!("scale: {from} -> {to} instances");
                        ControlResponse::Scaled { from, to: to as usize }
                    }
                    Err(e) => ControlResponse::error(e.to_string()),
                }
            }
        };
        let _ = reply.send(answer);
    }

    /// The cluster as `sdcluster status` shows it.
    pub fn status(&self) -> ClusterStatus {
        let mut status = ClusterStatus {
            app: self.spec.name.clone(),
            supervisor: "sdcluster run".into(),
            listen: self.spec.listen.iter().map(ToString::to_string).collect(),
            instances: self
                .instances
                .iter()
                .map(|i| {
                    let pid = i.machine.pid();
                    let (memory_bytes, cpu_secs) = pid.map_or((None, None), |p| process_usage(p.as_raw() as u32));
                    InstanceStatus {
                        instance: i.name().to_owned(),
                        pid: pid.map(|p| p.as_raw() as u32),
                        state: i.machine.state_name().to_owned(),
                        uptime_secs: i.machine.since().map(|s| s.elapsed().as_secs_f64()),
                        restarts: i.machine.restarts,
                        memory_bytes,
                        cpu_secs,
                        status_text: i.status_text.clone(),
                        requests: None,
                        request_rate: None,
                        open_connections: None,
                        last_exit: i.last_exit.clone(),
                        failed: i.machine.is_failed().then(|| {
                            i.last_exit.as_ref().map_or_else(|| "not restarted".into(), LastExit::not_restarted)
                        }),
                    }
                })
                .collect(),
        };
        status.fill_counters(&self.counters());
        status
    }

    /// The workers' slots of the cluster's metrics table.
    fn counters(&self) -> Vec<Counters> {
        Counters::of_table(Some(self.metrics()))
    }
}

/// This process's environment as the kernel gave it (`vars_os`: a variable that is not UTF-8
/// is passed on byte for byte, where `std::env::vars` would panic), less its supervisor's.
fn inherited_environment() -> BTreeMap<OsString, OsString> {
    let env = environment::inherited(std::env::vars_os());
    let odd = env.iter().filter(|(k, v)| k.to_str().is_none() || v.to_str().is_none()).count();
    if odd > 0 {
        tracing::debug!("{odd} inherited variables are not UTF-8: the workers get them as they are");
    }
    env
}

/// Refuses, before anything starts, what cannot be handed to a process: a NUL byte in the
/// command, the environment or a path (a C string ends at the first NUL: the program would
/// get another argument than the spec says), or a variable name that is empty or holds `=`.
/// The message names the key and says what to do.
fn check_passable(spec: &Spec) -> Result<(), String> {
    let nul = |key: &str, what: String| {
        format!("invalid {key}: {what} holds a NUL byte, which cannot be passed to a program; remove it")
    };
    for (i, arg) in spec.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err(nul("command", format!("argument {i} ({arg:?})")));
        }
    }
    for (key, value) in &spec.environment {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(format!("invalid environment: {key:?} is not a variable name (no '=', no NUL, not empty)"));
        }
        if value.contains('\0') {
            return Err(nul("environment", format!("the value of {key}")));
        }
    }
    let paths = [
        ("working-directory", spec.working_directory.as_deref()),
        ("environment-file", spec.environment_file.as_deref()),
    ];
    for (key, path) in paths.into_iter().chain(spec.credentials.values().map(|p| ("credentials", Some(p.as_path())))) {
        if let Some(path) = path.filter(|p| p.as_os_str().as_encoded_bytes().contains(&0)) {
            return Err(nul(key, format!("the path {:?}", path.as_os_str())));
        }
    }
    for name in spec.credentials.keys().chain(spec.state_directory.as_ref()) {
        if name.contains('\0') {
            return Err(nul("credentials or state-directory", format!("the name {name:?}")));
        }
    }
    Ok(())
}

/// Whether a rolling restart restarts instance `name` (it runs), or starts it again (it
/// failed).
fn may_roll(instances: &[Instance], name: &str) -> bool {
    instances.iter().any(|i| i.name() == name && (i.machine.is_running() || i.machine.is_failed()))
}

/// SIGKILL to what is left of the process group of `pid`, an instance's main process (each
/// is the leader of its own group): its children, once it ended or is being killed.
fn kill_group_of(pid: Pid) {
    // ESRCH: nothing left.
    if kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL).is_ok() {
        tracing::debug!("killed what was left of the process group of pid {pid}");
    }
}

/// One datagram from the notify socket: the sender's pid from its credentials, what it
/// says, and the fds it sent along (SCM_RIGHTS, close-on-exec; closed when dropped).
fn receive(socket: &UnixDatagram) -> io::Result<(Pid, Notification, Vec<OwnedFd>)> {
    let mut buf = [0u8; NOTIFY_BUFFER];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [std::os::fd::RawFd; MAX_NOTIFY_FDS]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut pid = Pid::from_raw(0);
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(creds) => pid = Pid::from_raw(creds.pid()),
            ControlMessageOwned::ScmRights(raw) => {
                // SAFETY: the kernel just installed these fds in this process; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
            }
            _ => {}
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        tracing::warn!("a notification from pid {pid} carried more than {MAX_NOTIFY_FDS} fds: the rest were closed");
    }
    let len = msg.bytes;
    Ok((pid, Notification::parse(&buf[..len]), fds))
}

/// The answer to a control connection from uid `peer` (pid `pid`), when it is refused: only
/// this process's user (`me`) and root may control the cluster.
fn refusal(peer: u32, pid: Option<i32>, me: u32) -> Option<ControlResponse> {
    if control::peer_allowed(peer, me) {
        return None;
    }
    let pid = pid.map_or_else(String::new, |p| format!(" (pid {p})"));
    tracing::warn!(
        "refused a control connection from uid {peer}{pid}: only uid {me} and root may control this cluster"
    );
    Some(ControlResponse::error(format!(
        "refused: uid {peer} may not control this cluster (only uid {me}, which runs it, and root may)"
    )))
}

async fn serve_control(stream: tokio::net::UnixStream, requests: mpsc::Sender<Request>, me: u32) {
    let refused = match stream.peer_cred() {
        Ok(peer) => refusal(peer.uid(), peer.pid(), me),
        Err(e) => {
            tracing::warn!("refused a control connection whose peer is unknown (SO_PEERCRED: {e})");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One line, of a bounded length: a request is a few dozen bytes.
    let mut reader = BufReader::new(read.take(CONTROL_LINE_MAX));
    let read_line = reader.read_line(&mut line);
    if tokio::time::timeout(Duration::from_secs(5), read_line).await.is_err() {
        return;
    }
    if let Some(answer) = refused {
        // Read first, then answered: the client sees the refusal, not a broken pipe.
        let mut out = Vec::new();
        if control::write_message(&mut out, &answer).is_ok() {
            let _ = write.write_all(&out).await;
        }
        return;
    }
    let answer = match control::parse_message::<ControlRequest>(&line) {
        Err(e) => ControlResponse::error(format!("not a request: {e}")),
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if requests.send(Request { request, reply }).await.is_err() {
                return;
            }
            match answer.await {
                Ok(answer) => answer,
                Err(_) => return,
            }
        }
    };
    let mut out = Vec::new();
    if control::write_message(&mut out, &answer).is_ok() {
        let _ = write.write_all(&out).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control protocol end to end over a socket pair: the supervisor's async side
    /// against the CLI's blocking side.
    #[test]
    fn serve_control_answers_typed_requests() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for (request, expected) in [
            (ControlRequest::Restart, ControlResponse::Restarted { instances: 2, started: vec![] }),
            (
                ControlRequest::Scale { instances: crate::spec::Instances::Count(3) },
                ControlResponse::error("the cluster is shutting down: scale refused"),
            ),
        ] {
            let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
            let sent = request.clone();
            let answer = expected.clone();
            let client = std::thread::spawn(move || control::exchange(client, &sent).unwrap());
            runtime.block_on(async {
                server.set_nonblocking(true).unwrap();
                let server = tokio::net::UnixStream::from_std(server).unwrap();
                let (requests, mut incoming) = mpsc::channel(1);
                let serving = tokio::spawn(serve_control(server, requests, nix::unistd::geteuid().as_raw()));
                let got: Request = incoming.recv().await.unwrap();
                assert_eq!(got.request, request);
                got.reply.send(answer).unwrap();
                serving.await.unwrap();
            });
            assert_eq!(client.join().unwrap(), expected);
        }
    }

    /// Only the cluster's own user and root get answers; anyone else is told why, and logged.
    #[test]
    fn control_peers_other_than_the_user_and_root_are_refused() {
        assert_eq!(refusal(1000, Some(7), 1000), None);
        assert_eq!(refusal(0, None, 1000), None, "root may");
        let answer = refusal(65534, Some(7), 1000).expect("refused");
        assert_eq!(
            answer,
            ControlResponse::error(
                "refused: uid 65534 may not control this cluster (only uid 1000, which runs it, and root may)"
            )
        );
        assert!(refusal(65534, None, 0).is_some(), "a root cluster refuses other users too");
    }

    /// NUL bytes in what goes to a process are refused by name before anything starts.
    #[test]
    fn nul_bytes_are_refused_before_anything_starts() {
        let spec = || {
            crate::spec::SpecFile {
                name: Some("nul".into()),
                command: Some(crate::spec::CommandLine::Argv(vec!["/bin/sh".into()])),
                ..Default::default()
            }
            .validate()
            .unwrap()
        };
        assert_eq!(check_passable(&spec()), Ok(()));
        let mut bad = spec();
        bad.command.push("a\0b".into());
        let err = check_passable(&bad).unwrap_err();
        assert_eq!(
            err,
            "invalid command: argument 1 (\"a\\0b\") holds a NUL byte, which cannot be passed to a program; remove it"
        );
        let dir = std::env::temp_dir().join(format!("sdcluster-nul-{}", std::process::id()));
        let bound = Supervisor::bind(bad, dir.clone());
        assert!(matches!(&bound, Err(SuperviseError::Spec(e)) if *e == err), "no panic, the same message");
        let mut bad = spec();
        bad.environment.insert("A".into(), "x\0y".into());
        assert!(check_passable(&bad).unwrap_err().starts_with("invalid environment: the value of A holds a NUL"));
        let mut bad = spec();
        bad.environment.insert("A=B".into(), "x".into());
        assert!(check_passable(&bad).unwrap_err().contains("not a variable name"));
        let mut bad = spec();
        bad.working_directory = Some("/a\0b".into());
        assert!(check_passable(&bad).unwrap_err().starts_with("invalid working-directory: the path"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn notifications_carry_credentials_and_fds() {
        use nix::sys::socket::{ControlMessage, sendmsg};
        let (a, b) = UnixDatagram::pair().unwrap();
        setsockopt(&b, sockopt::PassCred, &true).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let fds = [r.as_raw_fd(), r.as_raw_fd()];
        let iov = [io::IoSlice::new(b"FDSTORE=1\nFDNAME=x")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
        let (pid, n, got) = receive(&b).unwrap();
        assert_eq!(pid, nix::unistd::getpid());
        assert!(n.fdstore && n.fdname.as_deref() == Some("x"));
        assert_eq!(got.len(), 2);
        let flags = nix::fcntl::fcntl(&got[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0, "received fds are close-on-exec");
        assert!(receive(&b).is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock));
    }
}
