//! One instance's lifecycle as an explicit state machine: [`Life`] carries each state's
//! data, [`Machine::handle`] turns an [`Event`] at a given time into the next state and the
//! [`Action`]s the supervisor then performs (spawn, signal, hand-over flag, fd store). No
//! process is touched here, so every transition is unit-tested without one.
//!
//! Exit statuses mean what they say: a worker that exits with
//! [`EXIT_BAD_INPUT`](sdcluster_protocol::EXIT_BAD_INPUT) (its configuration or input is
//! wrong: restarting won't help) is not restarted but [`Life::Failed`], as systemd's
//! `RestartPreventExitStatus=` leaves it, until a rolling restart starts it again.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use sdcluster_protocol::EXIT_BAD_INPUT;

use crate::spec::Readiness;

/// A worker up this long after `READY=1` is no longer part of a crash loop.
pub const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The smallest step of the crash-loop backoff when the restart delay is 0.
const MIN_BACKOFF_STEP: Duration = Duration::from_millis(50);

/// What happens once a stopping process has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// It was stopped for misbehaving (watchdog, start timeout): restart after the
    /// (backed-off) delay, counted as a crash.
    Restart,
    /// A planned restart (rolling restart): start again at once, keeping the fd store.
    RestartNow,
    /// Shutdown or scale-down: stay stopped, drop the fd store.
    Stay,
}

/// Where an instance is in its life, with what that state needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// No process; start one at `until`.
    Waiting {
        /// When.
        until: Instant,
    },
    /// Started, no `READY=1` yet.
    Starting {
        /// The main process.
        pid: Pid,
        /// When it was started.
        since: Instant,
    },
    /// Sent `READY=1`.
    Running {
        /// The main process.
        pid: Pid,
        /// When it was started.
        since: Instant,
        /// When it sent `READY=1`.
        ready_at: Instant,
        /// Its last `WATCHDOG=1` (or `READY=1`).
        last_ping: Instant,
    },
    /// Asked to stop (or stopping by itself): waiting for it to exit.
    Stopping {
        /// The main process.
        pid: Pid,
        /// When it was started.
        since: Instant,
        /// When it had sent `READY=1`, if it had.
        ready_at: Option<Instant>,
        /// What comes after its exit.
        then: Then,
        /// When it is killed if still there.
        deadline: Instant,
        /// SIGKILL was sent.
        killed: bool,
    },
    /// Stays stopped (shutdown, scale-down).
    Stopped,
    /// Its process exited with [`EXIT_BAD_INPUT`] by itself: not restarted (its fd store
    /// dropped) until a rolling restart or `Stop(RestartNow)` starts it again.
    Failed {
        /// When it exited.
        at: Instant,
        /// Its exit status.
        status: i32,
    },
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed: act on the state's deadline if it is due.
    Tick,
    /// The process asked for by [`Action::Spawn`] runs.
    Spawned(Pid),
    /// [`Action::Spawn`] failed.
    SpawnFailed(String),
    /// The spawned process executed its program (its exec pipe closed).
    Executed,
    /// The main process exited (`how`, for people).
    Exited {
        /// "exited with status 1", "was killed by SIGKILL", "cannot execute ...".
        how: String,
        /// Its exit status; `None` when a signal ended it.
        status: Option<i32>,
    },
    /// `READY=1`.
    Ready,
    /// `WATCHDOG=1`.
    Ping,
    /// `WATCHDOG=trigger`.
    WatchdogTrigger,
    /// `STOPPING=1`: the worker drains by itself.
    Stopping,
    /// The supervisor stops the instance (SIGTERM), to do `Then` afterwards.
    Stop(Then),
    /// The supervisor itself did not run for this long (stopped with SIGSTOP, starved by
    /// the machine): that time is not held against the instance. Its watchdog and stop
    /// deadlines move on by as much (a ping it sent meanwhile may still be queued, or was
    /// never sent because its socket was full).
    Stalled(Duration),
}

/// What the supervisor does for a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the instance's next process (with its fd store); report back
    /// [`Event::Spawned`] or [`Event::SpawnFailed`].
    Spawn,
    /// `kill(pid, signal)`.
    Signal(Pid, Signal),
    /// Create the instance's hand-over flag: the stop that follows is a restart.
    CreateHandoverFlag,
    /// Remove it: the stop that follows is for good.
    RemoveHandoverFlag,
    /// Close every fd in the instance's store: it stays stopped.
    DropStore,
    /// The new process sent `READY=1` (a rolling restart moves on).
    Ready,
    /// The new process ended or timed out before `READY=1`, why (a rolling restart stops).
    NotReady(String),
}

/// The timeouts and delays transitions obey.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A process that sent no `READY=1` after this long is stopped and started again.
    pub start_timeout: Duration,
    /// A stopping process still there after this long gets SIGKILL.
    pub stop_timeout: Duration,
    /// A running process silent this long gets SIGABRT.
    pub watchdog: Option<Duration>,
    /// Delay before a dead process is started again.
    pub restart_delay: Duration,
    /// Ceiling of that delay in a crash loop.
    pub restart_max_delay: Duration,
    /// When a started process is ready: at `READY=1`, or once its program was executed.
    pub ready: Readiness,
}

/// One instance's state and counters.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The instance name ("1", "2", ...), for logs.
    pub name: String,
    /// Its state.
    pub life: Life,
    /// Unplanned restarts so far.
    pub restarts: u32,
    /// Deaths in a row (the backoff's exponent).
    pub crashes: u32,
    /// Why the supervisor is ending the current process, if it is (`watchdog`,
    /// `start-timeout`, `stop-timeout`): the reason `sdcluster status` shows for its exit.
    pub stop_cause: Option<&'static str>,
}

impl Machine {
    /// A new instance, to be started at `now`.
    pub fn new(name: impl Into<String>, now: Instant) -> Self {
        Self { name: name.into(), life: Life::Waiting { until: now }, restarts: 0, crashes: 0, stop_cause: None }
    }

    /// The main process, if there is one.
    pub fn pid(&self) -> Option<Pid> {
        match self.life {
            Life::Starting { pid, .. } | Life::Running { pid, .. } | Life::Stopping { pid, .. } => Some(pid),
            Life::Waiting { .. } | Life::Stopped | Life::Failed { .. } => None,
        }
    }

    /// When the main process was started.
    pub fn since(&self) -> Option<Instant> {
        match self.life {
            Life::Starting { since, .. } | Life::Running { since, .. } | Life::Stopping { since, .. } => Some(since),
            Life::Waiting { .. } | Life::Stopped | Life::Failed { .. } => None,
        }
    }

    /// The word `sdcluster status` shows.
    pub fn state_name(&self) -> &'static str {
        match self.life {
            Life::Waiting { .. } => "restarting",
            Life::Starting { .. } => "starting",
            Life::Running { .. } => "running",
            Life::Stopping { .. } => "stopping",
            Life::Stopped => "stopped",
            Life::Failed { .. } => "failed",
        }
    }

    /// Whether it failed and is not restarted ([`Life::Failed`]).
    pub fn is_failed(&self) -> bool {
        matches!(self.life, Life::Failed { .. })
    }

    /// Whether it serves (sent `READY=1`, not stopping).
    pub fn is_running(&self) -> bool {
        matches!(self.life, Life::Running { .. })
    }

    /// Whether it is stopped or on its way to stay stopped (a failed instance is neither:
    /// it still counts as one of the cluster's, and a rolling restart starts it again).
    pub fn stays_stopped(&self) -> bool {
        matches!(self.life, Life::Stopped | Life::Stopping { then: Then::Stay, .. })
    }

    /// When [`Event::Tick`] next has something to do.
    pub fn next_deadline(&self, t: &Timing) -> Option<Instant> {
        match self.life {
            Life::Waiting { until } => Some(until),
            Life::Starting { since, .. } => Some(since + t.start_timeout),
            Life::Running { last_ping, .. } => t.watchdog.map(|w| last_ping + w),
            Life::Stopping { deadline, killed: false, .. } => Some(deadline),
            Life::Stopping { killed: true, .. } | Life::Stopped | Life::Failed { .. } => None,
        }
    }

    /// The transition for `event` at `now`: updates the state, returns what to do.
    pub fn handle(&mut self, event: Event, now: Instant, t: &Timing) -> Vec<Action> {
        let name = &self.name;
        match (self.life.clone(), event) {
            (Life::Waiting { until }, Event::Tick) if until <= now => vec![Action::Spawn],
            (Life::Waiting { .. }, Event::Spawned(pid)) => {
                self.stop_cause = None;
                self.life = Life::Starting { pid, since: now };
                vec![]
            }
            (Life::Waiting { .. }, Event::SpawnFailed(e)) => {
                self.crashes += 1;
                let delay = backoff(t.restart_delay, t.restart_max_delay, self.crashes);
                tracing::error!("cannot start instance {name}: {e}; trying again in {delay:?}");
                self.life = Life::Waiting { until: now + delay };
                vec![Action::NotReady(format!("cannot start it: {e}"))]
            }
            (Life::Waiting { .. }, Event::Stop(Then::Stay)) => {
                self.life = Life::Stopped;
                vec![Action::RemoveHandoverFlag, Action::DropStore]
            }

            (Life::Starting { pid, since }, Event::Ready) => {
                tracing::info!("instance {name} ready (pid {pid}) {:?} after its start", now - since);
                self.life = Life::Running { pid, since, ready_at: now, last_ping: now };
                vec![Action::Ready]
            }
            (Life::Starting { pid, since }, Event::Executed) if t.ready == Readiness::Exec => {
                tracing::info!("instance {name} ready (pid {pid}): its program runs (ready = exec)");
                self.life = Life::Running { pid, since, ready_at: now, last_ping: now };
                vec![Action::Ready]
            }
            (Life::Starting { pid, since }, Event::Tick) if since + t.start_timeout <= now => {
                tracing::warn!("instance {name} sent no READY=1 within {:?}: stopping it", t.start_timeout);
                self.life = stopping(pid, since, None, Then::Restart, now + t.stop_timeout);
                self.stop_cause = Some("start-timeout");
                let why = format!("sent no READY=1 within {:?}", t.start_timeout);
                vec![Action::Signal(pid, Signal::SIGTERM), Action::NotReady(why)]
            }
            (Life::Starting { pid, .. }, Event::Exited { how, status: Some(status) }) if status == bad_input() => {
                let mut actions = vec![Action::NotReady(format!("{how} (bad input: not restarted)"))];
                actions.extend(self.failed(pid, &how, status, now));
                actions
            }
            (Life::Running { pid, .. }, Event::Exited { how, status: Some(status) }) if status == bad_input() => {
                self.failed(pid, &how, status, now)
            }
            (Life::Starting { pid, .. }, Event::Exited { how, status }) => {
                let actions = vec![Action::NotReady(how.clone())];
                self.crashed(pid, None, &how, status == Some(0), now, t);
                actions
            }
            (Life::Running { pid, ready_at, .. }, Event::Exited { how, status }) => {
                self.crashed(pid, Some(ready_at), &how, status == Some(0), now, t);
                vec![]
            }
            (Life::Running { pid, since, ready_at, .. }, Event::Ping) => {
                self.life = Life::Running { pid, since, ready_at, last_ping: now };
                vec![]
            }
            (Life::Running { pid, since, ready_at, last_ping }, Event::Tick)
                if t.watchdog.is_some_and(|w| last_ping + w <= now) =>
            {
                tracing::warn!(
                    "instance {name} (pid {pid}) sent no WATCHDOG=1 for {:?}: killing it with SIGABRT",
                    t.watchdog.unwrap_or_default()
                );
                self.life = stopping(pid, since, Some(ready_at), Then::Restart, now + t.stop_timeout);
                self.stop_cause = Some("watchdog");
                vec![Action::Signal(pid, Signal::SIGABRT)]
            }
            (Life::Starting { pid, since }, e @ (Event::Stopping | Event::WatchdogTrigger | Event::Stop(_)))
            | (Life::Running { pid, since, .. }, e @ (Event::Stopping | Event::WatchdogTrigger | Event::Stop(_))) => {
                let ready_at = match self.life {
                    Life::Running { ready_at, .. } => Some(ready_at),
                    _ => None,
                };
                let deadline = now + t.stop_timeout;
                let (then, mut actions) = match e {
                    Event::Stopping => (Then::Restart, vec![]),
                    Event::WatchdogTrigger => {
                        tracing::warn!("instance {name} asked for its watchdog to fire: SIGABRT");
                        self.stop_cause = Some("watchdog");
                        (Then::Restart, vec![Action::Signal(pid, Signal::SIGABRT)])
                    }
                    Event::Stop(Then::RestartNow) => {
                        (Then::RestartNow, vec![Action::CreateHandoverFlag, Action::Signal(pid, Signal::SIGTERM)])
                    }
                    Event::Stop(then) => (then, vec![Action::RemoveHandoverFlag, Action::Signal(pid, Signal::SIGTERM)]),
                    _ => unreachable!("matched above"),
                };
                if ready_at.is_none() && then != Then::Stay {
                    actions.push(Action::NotReady("it stopped before READY=1".into()));
                }
                self.life = stopping(pid, since, ready_at, then, deadline);
                actions
            }

            (Life::Stopping { pid, since, ready_at, then, deadline, killed }, Event::Stop(new)) => {
                // Never a second SIGTERM (it would abort the drain): only what comes after
                // the exit changes. Once for good, always for good.
                let then = if then == Then::Stay { Then::Stay } else { new };
                self.life = Life::Stopping { pid, since, ready_at, then, deadline, killed };
                match then {
                    Then::RestartNow => vec![Action::CreateHandoverFlag],
                    Then::Stay | Then::Restart => vec![Action::RemoveHandoverFlag],
                }
            }
            (Life::Stopping { pid, .. }, Event::WatchdogTrigger) => {
                tracing::warn!("instance {name} asked for its watchdog to fire: SIGABRT");
                self.stop_cause = Some("watchdog");
                vec![Action::Signal(pid, Signal::SIGABRT)]
            }
            (Life::Stopping { pid, since, ready_at, then, deadline, killed: false }, Event::Tick)
                if deadline <= now =>
            {
                tracing::warn!("instance {name} did not stop within {:?}: SIGKILL", t.stop_timeout);
                self.life = Life::Stopping { pid, since, ready_at, then, deadline, killed: true };
                self.stop_cause = self.stop_cause.or(Some("stop-timeout"));
                vec![Action::Signal(pid, Signal::SIGKILL)]
            }
            // It stopped by itself (STOPPING=1), nobody made it: its exit status stands.
            (Life::Stopping { pid, then: Then::Restart, .. }, Event::Exited { how, status: Some(status) })
                if status == bad_input() && self.stop_cause.is_none() =>
            {
                self.failed(pid, &how, status, now)
            }
            (Life::Stopping { pid, ready_at, then, .. }, Event::Exited { how, status }) => match then {
                Then::Stay => {
                    tracing::info!("instance {name} (pid {pid}) {how}");
                    self.life = Life::Stopped;
                    vec![Action::RemoveHandoverFlag, Action::DropStore]
                }
                Then::RestartNow => {
                    tracing::info!("instance {name} (pid {pid}) {how}; starting it again");
                    self.life = Life::Waiting { until: now };
                    vec![Action::RemoveHandoverFlag]
                }
                Then::Restart => {
                    self.crashed(pid, ready_at, &how, status == Some(0), now, t);
                    vec![Action::RemoveHandoverFlag]
                }
            },

            (Life::Running { pid, since, ready_at, last_ping }, Event::Stalled(stall)) => {
                // Never past now: a stall grants the time it took, not a head start.
                let last_ping = (last_ping + stall).min(now).max(last_ping);
                self.life = Life::Running { pid, since, ready_at, last_ping };
                vec![]
            }
            (Life::Stopping { pid, since, ready_at, then, deadline, killed: false }, Event::Stalled(stall)) => {
                self.life = Life::Stopping { pid, since, ready_at, then, deadline: deadline + stall, killed: false };
                vec![]
            }

            (Life::Failed { .. }, Event::Stop(Then::Stay)) => {
                self.life = Life::Stopped;
                vec![Action::RemoveHandoverFlag, Action::DropStore]
            }
            (Life::Failed { .. }, Event::Stop(Then::RestartNow)) => {
                tracing::info!("instance {name} had failed: starting it again");
                self.crashes = 0;
                self.life = Life::Waiting { until: now };
                vec![]
            }
            _ => vec![],
        }
    }

    /// An end with [`EXIT_BAD_INPUT`]: no restart; its store goes (systemd releases a failed
    /// unit's fd store).
    fn failed(&mut self, pid: Pid, how: &str, status: i32, now: Instant) -> Vec<Action> {
        tracing::error!(
            "instance {} (pid {pid}) {how}: bad input (exit status {EXIT_BAD_INPUT}): restarting won't help, not restarted; fix it, then `sdcluster restart --rolling`",
            self.name
        );
        self.life = Life::Failed { at: now, status };
        vec![Action::RemoveHandoverFlag, Action::DropStore]
    }

    /// An unplanned end: count it and wait the backed-off delay.
    fn crashed(&mut self, pid: Pid, ready_at: Option<Instant>, how: &str, clean: bool, now: Instant, t: &Timing) {
        let stable = ready_at.is_some_and(|r| now - r >= STABLE_AFTER);
        self.crashes = if stable { 1 } else { self.crashes + 1 };
        self.restarts += 1;
        let delay = backoff(t.restart_delay, t.restart_max_delay, self.crashes);
        let why = if clean { "" } else { " (unexpected)" };
        tracing::warn!("instance {} (pid {pid}) {how}{why}; restarting in {delay:?}", self.name);
        self.life = Life::Waiting { until: now + delay };
    }
}

fn stopping(pid: Pid, since: Instant, ready_at: Option<Instant>, then: Then, deadline: Instant) -> Life {
    Life::Stopping { pid, since, ready_at, then, deadline, killed: false }
}

fn bad_input() -> i32 {
    i32::from(EXIT_BAD_INPUT)
}

/// The restart delay after the `crashes`-th death in a row: the spec's delay first, then
/// doubling up to the ceiling.
pub fn backoff(delay: Duration, max: Duration, crashes: u32) -> Duration {
    if crashes <= 1 {
        return delay;
    }
    let step = delay.max(MIN_BACKOFF_STEP);
    step.saturating_mul(1 << (crashes - 1).min(20)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> Timing {
        Timing {
            start_timeout: 90_000 * MS,
            stop_timeout: 30_000 * MS,
            watchdog: Some(1_000 * MS),
            restart_delay: 100 * MS,
            restart_max_delay: 2_000 * MS,
            ready: Readiness::Notify,
        }
    }

    /// An instance started at `t0` as pid 42 that sent READY=1 at once.
    fn running(t0: Instant) -> Machine {
        let mut m = Machine::new("1", t0);
        assert_eq!(m.handle(Event::Tick, t0, &timing()), [Action::Spawn]);
        assert!(m.handle(Event::Spawned(Pid::from_raw(42)), t0, &timing()).is_empty());
        assert_eq!(m.state_name(), "starting");
        assert_eq!(m.handle(Event::Ready, t0, &timing()), [Action::Ready]);
        m
    }

    fn exited(status: i32) -> Event {
        Event::Exited { how: format!("exited with status {status}"), status: Some(status) }
    }

    const PID: Pid = Pid::from_raw(42);

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let (d, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let steps: Vec<u128> = (1..=7).map(|n| backoff(d, max, n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(Duration::ZERO, max, 1), Duration::ZERO);
        assert_eq!(backoff(Duration::ZERO, max, 2), Duration::from_millis(100));
    }

    #[test]
    fn a_waiting_instance_starts_when_due() {
        let t0 = Instant::now();
        let mut m = Machine::new("1", t0 + 10 * MS);
        assert!(m.handle(Event::Tick, t0, &timing()).is_empty(), "not yet");
        assert_eq!(m.next_deadline(&timing()), Some(t0 + 10 * MS));
        assert_eq!(m.handle(Event::Tick, t0 + 10 * MS, &timing()), [Action::Spawn]);
        m.handle(Event::Spawned(PID), t0 + 10 * MS, &timing());
        assert_eq!(m.life, Life::Starting { pid: PID, since: t0 + 10 * MS });
        assert_eq!(m.next_deadline(&timing()), Some(t0 + 10 * MS + timing().start_timeout));
    }

    #[test]
    fn crashes_back_off_and_a_stable_run_resets_the_delay() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            now += 10 * MS;
            assert!(m.handle(exited(3), now, &timing()).is_empty());
            let Life::Waiting { until } = m.life else { panic!("{:?}", m.life) };
            delays.push((until - now).as_millis());
            now = until;
            assert_eq!(m.handle(Event::Tick, now, &timing()), [Action::Spawn]);
            m.handle(Event::Spawned(PID), now, &timing());
            m.handle(Event::Ready, now, &timing());
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600]);
        assert_eq!(m.restarts, 5);
        // Up for longer than STABLE_AFTER after READY=1: the next crash is a first one.
        now += STABLE_AFTER;
        m.handle(exited(3), now, &timing());
        assert_eq!(m.life, Life::Waiting { until: now + 100 * MS });
        assert_eq!(m.restarts, 6);
    }

    #[test]
    fn a_spawn_failure_waits_and_counts() {
        let t0 = Instant::now();
        let mut m = Machine::new("1", t0);
        let actions = m.handle(Event::SpawnFailed("ENOENT".into()), t0, &timing());
        assert_eq!(actions, [Action::NotReady("cannot start it: ENOENT".into())]);
        assert_eq!(m.life, Life::Waiting { until: t0 + 100 * MS });
    }

    #[test]
    fn death_before_ready_is_not_ready() {
        let t0 = Instant::now();
        let mut m = Machine::new("1", t0);
        m.handle(Event::Spawned(PID), t0, &timing());
        let actions = m.handle(exited(1), t0, &timing());
        assert_eq!(actions, [Action::NotReady("exited with status 1".into())]);
        assert_eq!(m.restarts, 1);
        assert_eq!(m.state_name(), "restarting");
    }

    #[test]
    fn the_start_timeout_stops_a_silent_process() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = Machine::new("1", t0);
        m.handle(Event::Spawned(PID), t0, &t);
        assert!(m.handle(Event::Tick, t0 + t.start_timeout - MS, &t).is_empty());
        let actions = m.handle(Event::Tick, t0 + t.start_timeout, &t);
        assert_eq!(
            actions,
            [
                Action::Signal(PID, Signal::SIGTERM),
                Action::NotReady(format!("sent no READY=1 within {:?}", t.start_timeout))
            ]
        );
        assert!(matches!(m.life, Life::Stopping { then: Then::Restart, killed: false, .. }));
        assert_eq!(m.stop_cause, Some("start-timeout"), "what status shows for its exit");
    }

    #[test]
    fn the_watchdog_aborts_a_silent_worker() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        m.handle(Event::Ping, t0 + 900 * MS, &t);
        assert!(m.handle(Event::Tick, t0 + 1_000 * MS, &t).is_empty(), "the ping moved the deadline");
        assert_eq!(m.next_deadline(&t), Some(t0 + 1_900 * MS));
        assert_eq!(m.handle(Event::Tick, t0 + 1_900 * MS, &t), [Action::Signal(PID, Signal::SIGABRT)]);
        assert!(matches!(m.life, Life::Stopping { then: Then::Restart, .. }));
        let actions =
            m.handle(Event::Exited { how: "was killed by SIGABRT".into(), status: None }, t0 + 2_000 * MS, &t);
        assert_eq!(actions, [Action::RemoveHandoverFlag]);
        assert_eq!(m.restarts, 1, "a watchdog kill is a crash");
        assert_eq!(m.stop_cause, Some("watchdog"), "what status shows for its exit");
        m.handle(Event::Tick, t0 + 3_000 * MS, &t);
        m.handle(Event::Spawned(PID), t0 + 3_000 * MS, &t);
        assert_eq!(m.stop_cause, None, "the next process is not being stopped");
        // Without a watchdog, a running worker has no deadline.
        let quiet = Timing { watchdog: None, ..t };
        assert_eq!(running(t0).next_deadline(&quiet), None);
    }

    /// A supervisor that did not run for 5 s (SIGSTOP) does not hold those 5 s against its
    /// workers: the watchdog and the stop deadline move on by the stall; a worker silent
    /// beyond that is still killed.
    #[test]
    fn a_stall_of_the_supervisor_is_not_a_missed_ping() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        m.handle(Event::Ping, t0 + 500 * MS, &t);
        let resumed = t0 + 5_500 * MS;
        assert!(m.handle(Event::Stalled(5_000 * MS), resumed, &t).is_empty());
        assert_eq!(m.next_deadline(&t), Some(t0 + 5_500 * MS + t.watchdog.unwrap()), "a full period from the resume");
        assert!(m.handle(Event::Tick, resumed, &t).is_empty(), "not killed at the resume");
        assert_eq!(m.handle(Event::Tick, resumed + 1_000 * MS, &t), [Action::Signal(PID, Signal::SIGABRT)]);
        // A short stall postpones by as much, no more.
        let mut m = running(t0);
        m.handle(Event::Stalled(200 * MS), t0 + 600 * MS, &t);
        assert_eq!(m.next_deadline(&t), Some(t0 + 1_200 * MS));
        // A draining worker gets its stop timeout in supervisor time too.
        let mut s = running(t0);
        s.handle(Event::Stop(Then::Stay), t0, &t);
        s.handle(Event::Stalled(5_000 * MS), t0 + 6_000 * MS, &t);
        assert_eq!(s.next_deadline(&t), Some(t0 + t.stop_timeout + 5_000 * MS));
        assert!(s.handle(Event::Tick, t0 + t.stop_timeout, &t).is_empty());
        // Other states have nothing to postpone.
        let mut w = Machine::new("2", t0);
        assert!(w.handle(Event::Stalled(5_000 * MS), t0, &t).is_empty());
        assert_eq!(w.life, Life::Waiting { until: t0 });
    }

    #[test]
    fn a_worker_that_does_not_stop_is_killed_once() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        m.handle(Event::Stop(Then::Stay), t0, &t);
        assert!(m.handle(Event::Tick, t0 + t.stop_timeout - MS, &t).is_empty());
        assert_eq!(m.handle(Event::Tick, t0 + t.stop_timeout, &t), [Action::Signal(PID, Signal::SIGKILL)]);
        assert!(m.handle(Event::Tick, t0 + t.stop_timeout * 2, &t).is_empty(), "one SIGKILL");
        assert_eq!(m.next_deadline(&t), None);
    }

    #[test]
    fn a_planned_restart_hands_over_and_keeps_the_store() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        let actions = m.handle(Event::Stop(Then::RestartNow), t0, &t);
        assert_eq!(actions, [Action::CreateHandoverFlag, Action::Signal(PID, Signal::SIGTERM)]);
        assert_eq!(m.state_name(), "stopping");
        // Its own STOPPING=1 changes nothing.
        assert!(m.handle(Event::Stopping, t0, &t).is_empty());
        let actions = m.handle(exited(0), t0 + MS, &t);
        assert_eq!(actions, [Action::RemoveHandoverFlag], "no DropStore");
        assert_eq!(m.life, Life::Waiting { until: t0 + MS });
        assert_eq!(m.restarts, 0, "a planned restart is no crash");
    }

    #[test]
    fn a_stop_for_good_drops_the_store() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        let actions = m.handle(Event::Stop(Then::Stay), t0, &t);
        assert_eq!(actions, [Action::RemoveHandoverFlag, Action::Signal(PID, Signal::SIGTERM)]);
        assert!(m.stays_stopped());
        assert_eq!(m.handle(exited(0), t0, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
        assert_eq!(m.life, Life::Stopped);
        // A waiting instance stops at once.
        let mut w = Machine::new("2", t0 + MS);
        assert_eq!(w.handle(Event::Stop(Then::Stay), t0, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
        assert_eq!(w.life, Life::Stopped);
        assert!(w.handle(Event::Tick, t0 + MS, &t).is_empty(), "and stays so");
    }

    #[test]
    fn never_a_second_sigterm() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        m.handle(Event::Stop(Then::RestartNow), t0, &t);
        // Scale-down (or shutdown) while it drains for a restart: only the aftermath changes.
        assert_eq!(m.handle(Event::Stop(Then::Stay), t0 + MS, &t), [Action::RemoveHandoverFlag]);
        // Once for good, a restart request does not bring it back.
        assert_eq!(m.handle(Event::Stop(Then::RestartNow), t0 + MS, &t), [Action::RemoveHandoverFlag]);
        let Life::Stopping { deadline, then, .. } = m.life else { panic!() };
        assert_eq!((deadline, then), (t0 + t.stop_timeout, Then::Stay), "the first stop's deadline holds");
        assert_eq!(m.handle(exited(0), t0 + 2 * MS, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
    }

    #[test]
    fn exits_of_other_states_and_stray_events_do_nothing() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = Machine::new("1", t0);
        assert!(m.handle(Event::Ready, t0, &t).is_empty());
        assert!(m.handle(exited(0), t0, &t).is_empty());
        let mut r = running(t0);
        assert!(r.handle(Event::Ready, t0, &t).is_empty(), "READY=1 twice is no second Ready");
        assert!(r.handle(Event::Spawned(Pid::from_raw(7)), t0, &t).is_empty());
        assert_eq!(r.pid(), Some(PID));
    }

    #[test]
    fn stopping_before_ready_is_not_ready() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = Machine::new("1", t0);
        m.handle(Event::Spawned(PID), t0, &t);
        let actions = m.handle(Event::WatchdogTrigger, t0, &t);
        assert_eq!(
            actions,
            [Action::Signal(PID, Signal::SIGABRT), Action::NotReady("it stopped before READY=1".into())]
        );
    }

    #[test]
    fn ready_exec_is_ready_once_the_program_runs() {
        let t0 = Instant::now();
        let exec = Timing { ready: Readiness::Exec, ..timing() };
        let mut m = Machine::new("1", t0);
        m.handle(Event::Spawned(PID), t0, &exec);
        assert_eq!(m.state_name(), "starting");
        assert_eq!(m.handle(Event::Executed, t0 + MS, &exec), [Action::Ready]);
        assert_eq!(m.life, Life::Running { pid: PID, since: t0, ready_at: t0 + MS, last_ping: t0 + MS });
        // With notify readiness, the exec is no READY=1.
        let mut n = Machine::new("1", t0);
        n.handle(Event::Spawned(PID), t0, &timing());
        assert!(n.handle(Event::Executed, t0 + MS, &timing()).is_empty());
        assert_eq!(n.state_name(), "starting");
        assert_eq!(n.handle(Event::Ready, t0 + 2 * MS, &timing()), [Action::Ready]);
        assert!(n.handle(Event::Executed, t0 + 3 * MS, &timing()).is_empty(), "no second Ready");
    }

    #[test]
    fn bad_input_is_not_restarted_until_a_rolling_restart() {
        let t0 = Instant::now();
        let t = timing();
        let mut m = running(t0);
        assert_eq!(m.handle(exited(2), t0 + MS, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
        assert_eq!(m.life, Life::Failed { at: t0 + MS, status: 2 });
        assert_eq!((m.state_name(), m.restarts, m.pid()), ("failed", 0, None));
        assert!(m.is_failed() && !m.stays_stopped(), "a failed instance still counts (scale, roll)");
        assert_eq!(m.next_deadline(&t), None);
        assert!(m.handle(Event::Tick, t0 + 60_000 * MS, &t).is_empty(), "never restarted by itself");
        // A rolling restart starts it again, at once and with a fresh backoff.
        assert!(m.handle(Event::Stop(Then::RestartNow), t0 + 2 * MS, &t).is_empty());
        assert_eq!((m.life.clone(), m.crashes), (Life::Waiting { until: t0 + 2 * MS }, 0));
        assert_eq!(m.handle(Event::Tick, t0 + 2 * MS, &t), [Action::Spawn]);
        // Exiting 2 before READY=1: not ready (a roll stops), and failed.
        m.handle(Event::Spawned(PID), t0 + 3 * MS, &t);
        let actions = m.handle(exited(2), t0 + 4 * MS, &t);
        assert_eq!(
            actions,
            [
                Action::NotReady("exited with status 2 (bad input: not restarted)".into()),
                Action::RemoveHandoverFlag,
                Action::DropStore
            ]
        );
        assert!(m.is_failed());
        // Scale-down or shutdown: stopped for good.
        assert_eq!(m.handle(Event::Stop(Then::Stay), t0 + 5 * MS, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
        assert_eq!(m.life, Life::Stopped);
    }

    #[test]
    fn bad_input_counts_only_when_the_worker_ended_by_itself() {
        let t0 = Instant::now();
        let t = timing();
        // STOPPING=1 of its own, then exit 2: failed.
        let mut m = running(t0);
        m.handle(Event::Stopping, t0, &t);
        assert_eq!(m.handle(exited(2), t0 + MS, &t), [Action::RemoveHandoverFlag, Action::DropStore]);
        assert!(m.is_failed());
        // Killed by the watchdog (it caught SIGABRT and exited 2): a crash, restarted.
        let mut w = running(t0);
        w.handle(Event::Tick, t0 + 1_000 * MS, &t);
        assert_eq!(w.handle(exited(2), t0 + 1_001 * MS, &t), [Action::RemoveHandoverFlag]);
        assert!(matches!(w.life, Life::Waiting { .. }) && w.restarts == 1, "{:?}", w.life);
        // A planned restart: it starts again whatever its status.
        let mut r = running(t0);
        r.handle(Event::Stop(Then::RestartNow), t0, &t);
        assert_eq!(r.handle(exited(2), t0 + MS, &t), [Action::RemoveHandoverFlag]);
        assert_eq!(r.life, Life::Waiting { until: t0 + MS });
        // Any other status is a crash, as before.
        let mut c = running(t0);
        assert!(c.handle(exited(1), t0 + MS, &t).is_empty());
        assert!(matches!(c.life, Life::Waiting { .. }));
    }
}
