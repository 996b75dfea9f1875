//! A rolling restart: every instance that runs, one at a time, each new process ready
//! before the next instance goes; it stops at the first one that does not come back.
//!
//! It begins with a canary: one extra instance ([`CANARY`]) started on the current release
//! beside the others and stopped once it is ready. An instance that is restarted hands its
//! kept-alive connections to its own next process; if that process never came up, its
//! clients would wait. A release that does not start fails in the canary, and no instance is
//! touched.
//!
//! Instances that failed (exited with bad input, not restarted) are in the roll too: they
//! are started again, in their turn, as systemd's `restart` of a failed unit starts it.

/// The name of the canary instance (instances are numbered from 1).
pub const CANARY: &str = "0";

use std::collections::{BTreeSet, VecDeque};

/// What the supervisor does next for a roll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollStep {
    /// Start the canary instance.
    StartCanary,
    /// The canary is ready: stop it, then [`Roll::advance`].
    StopCanary,
    /// Restart this instance (planned: it gets the hand-over flag).
    Restart(String),
    /// Every instance came back ready.
    Done {
        /// How many running ones were restarted.
        restarted: usize,
        /// The failed ones that were started again, by name.
        started: Vec<String>,
    },
    /// An instance did not come back ready; the rest keep their old processes.
    Failed {
        /// For people, naming the instance.
        message: String,
    },
}

/// The instances still to restart and the one under way.
#[derive(Debug, Clone)]
pub struct Roll {
    queue: VecDeque<String>,
    current: Option<String>,
    restarted: usize,
    /// The instances of the queue that had failed.
    failed: BTreeSet<String>,
    started: Vec<String>,
    /// The canary is still to start.
    canary: bool,
}

impl Roll {
    /// A roll over `instances` (the ones that run, and those that failed, named again in
    /// `failed`), in order, after a canary when `canary`; call [`Roll::advance`] first.
    pub fn new(instances: Vec<String>, failed: BTreeSet<String>, canary: bool) -> Self {
        let canary = canary && !instances.is_empty();
        Self { queue: instances.into(), current: None, restarted: 0, failed, started: Vec::new(), canary }
    }

    /// The instance being restarted.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// The next instance to restart, skipping those that no longer run or failed (scaled
    /// down, crashed meanwhile: `may_roll` says), or the end.
    pub fn advance(&mut self, may_roll: impl Fn(&str) -> bool) -> RollStep {
        self.current = None;
        if std::mem::take(&mut self.canary) {
            self.current = Some(CANARY.to_owned());
            return RollStep::StartCanary;
        }
        while let Some(name) = self.queue.pop_front() {
            if may_roll(&name) {
                self.current = Some(name.clone());
                return RollStep::Restart(name);
            }
        }
        RollStep::Done { restarted: self.restarted, started: self.started.clone() }
    }

    /// Instance `name`'s new process sent `READY=1`.
    pub fn ready(&mut self, name: &str, may_roll: impl Fn(&str) -> bool) -> Option<RollStep> {
        (self.current.as_deref() == Some(name)).then(|| {
            if name == CANARY {
                self.current = None;
                return RollStep::StopCanary;
            }
            if self.failed.contains(name) {
                self.started.push(name.to_owned());
            } else {
                self.restarted += 1;
            }
            self.advance(may_roll)
        })
    }

    /// Instance `name`'s new process ended or timed out before `READY=1`: the roll stops.
    pub fn not_ready(&mut self, name: &str, why: &str) -> Option<RollStep> {
        (self.current.as_deref() == Some(name)).then(|| {
            self.current = None;
            let left = std::mem::take(&mut self.queue).len();
            if name == CANARY {
                return RollStep::Failed {
                    message: format!(
                        "the release does not start: the canary (instance {CANARY}, started beside the others before any was restarted) did not become ready: {why}; no instance was restarted, {left} keep their old processes"
                    ),
                };
            }
            RollStep::Failed {
                message: format!(
                    "instance {name} did not come back ready: {why}; {left} instances still run the old version"
                ),
            }
        })
    }

    /// Instance `name` stays stopped (scaled down, shutdown) or is gone: skip it.
    pub fn gone(&mut self, name: &str, may_roll: impl Fn(&str) -> bool) -> Option<RollStep> {
        (self.current.as_deref() == Some(name)).then(|| self.advance(may_roll))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| i.to_string()).collect()
    }

    #[test]
    fn one_at_a_time_each_ready_before_the_next() {
        let mut roll = Roll::new(names(3), BTreeSet::new(), false);
        assert_eq!(roll.advance(|_| true), RollStep::Restart("1".into()));
        assert_eq!(roll.ready("2", |_| true), None, "only the current instance counts");
        assert_eq!(roll.ready("1", |_| true), Some(RollStep::Restart("2".into())));
        assert_eq!(roll.ready("2", |_| true), Some(RollStep::Restart("3".into())));
        assert_eq!(roll.ready("3", |_| true), Some(RollStep::Done { restarted: 3, started: vec![] }));
        assert_eq!(roll.current(), None);
    }

    #[test]
    fn it_stops_at_the_first_instance_that_does_not_come_back() {
        let mut roll = Roll::new(names(4), BTreeSet::new(), false);
        roll.advance(|_| true);
        roll.ready("1", |_| true);
        assert_eq!(roll.not_ready("3", "exited with status 1"), None);
        let step = roll.not_ready("2", "exited with status 1");
        assert_eq!(
            step,
            Some(RollStep::Failed {
                message:
                    "instance 2 did not come back ready: exited with status 1; 2 instances still run the old version"
                        .into()
            })
        );
        assert_eq!(roll.current(), None);
        assert_eq!(roll.advance(|_| true), RollStep::Done { restarted: 1, started: vec![] }, "nothing left to restart");
    }

    #[test]
    fn a_canary_comes_first_and_a_failed_one_touches_no_instance() {
        let mut roll = Roll::new(names(2), BTreeSet::new(), true);
        assert_eq!(roll.advance(|_| true), RollStep::StartCanary);
        assert_eq!(roll.ready(CANARY, |_| true), Some(RollStep::StopCanary));
        assert_eq!(roll.advance(|_| true), RollStep::Restart("1".into()));
        assert_eq!(roll.ready("1", |_| true), Some(RollStep::Restart("2".into())));
        assert_eq!(roll.ready("2", |_| true), Some(RollStep::Done { restarted: 2, started: vec![] }));

        let mut roll = Roll::new(names(2), BTreeSet::new(), true);
        roll.advance(|_| true);
        let Some(RollStep::Failed { message }) = roll.not_ready(CANARY, "exited with status 1") else {
            panic!("a failed canary stops the roll")
        };
        assert!(message.contains("no instance was restarted, 2 keep their old processes"), "{message}");
        assert_eq!(roll.advance(|_| true), RollStep::Done { restarted: 0, started: vec![] });
    }

    #[test]
    fn instances_that_no_longer_run_are_skipped() {
        let mut roll = Roll::new(names(3), BTreeSet::new(), false);
        assert_eq!(roll.advance(|n| n != "1"), RollStep::Restart("2".into()));
        assert_eq!(roll.gone("2", |n| n == "3"), Some(RollStep::Restart("3".into())));
        assert_eq!(roll.ready("3", |_| true), Some(RollStep::Done { restarted: 1, started: vec![] }));
        assert_eq!(
            Roll::new(vec![], BTreeSet::new(), true).advance(|_| true),
            RollStep::Done { restarted: 0, started: vec![] }
        );
    }

    #[test]
    fn failed_instances_are_started_again_in_their_turn() {
        let failed = BTreeSet::from(["2".to_owned()]);
        let mut roll = Roll::new(names(3), failed, true);
        assert_eq!(roll.advance(|_| true), RollStep::StartCanary);
        assert_eq!(roll.ready(CANARY, |_| true), Some(RollStep::StopCanary));
        assert_eq!(roll.advance(|_| true), RollStep::Restart("1".into()));
        assert_eq!(roll.ready("1", |_| true), Some(RollStep::Restart("2".into())));
        assert_eq!(roll.ready("2", |_| true), Some(RollStep::Restart("3".into())));
        assert_eq!(roll.ready("3", |_| true), Some(RollStep::Done { restarted: 2, started: vec!["2".into()] }));
    }
}
