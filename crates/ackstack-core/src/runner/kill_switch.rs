//! The kill switch: a circuit breaker over the failure rate that closes the gate of
//! [`Control`](super::Control) while a consumer fails most of what it handles.
//!
//! Closed, it counts the outcomes of the deliveries that finished within a sliding `window`.
//! Once at least `activation` did and the share of failures reaches `trip`, it opens: nothing
//! is received for `cooldown`. It also opens once `activation` deliveries finished since the
//! start without a single success, however sparse they were. Then it is half-open: `probes`
//! deliveries are let through; if all of them succeed it closes (and counts afresh), and the
//! first failure opens it again. Only the deliveries received while it is half-open are its
//! probes: one received before it opened that finishes now says nothing about the cooldown,
//! and is neither a probe's success nor its failure.
//!
//! A failure is an attempt that failed transiently (an error or a panic, retried or
//! dead-lettered after the last attempt). A dead letter of a permanent error (a payload that
//! does not decode) counts only with `count_permanent`: one bad message is not a broken
//! consumer. A release (shutdown while waiting for the dedup store), a lost lease and work
//! abandoned at the shutdown deadline count as nothing; a half-open probe that ends so is
//! replaced by another delivery.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::state::{Admit, ConsumerState};
use crate::error::ErrorKind;
use crate::outcome::Outcome;

/// The kill switch's settings; off unless [`ConsumerConfig::kill_switch`](super::ConsumerConfig)
/// is set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KillSwitchConfig {
    /// The sliding window over which the failure rate is computed. Default 60 s.
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// Deliveries that must have finished within the window before it can trip. Default 20.
    pub activation: u32,
    /// The share of failures (above 0, at most 1) at which it trips. Default 0.5.
    pub trip: f64,
    /// How long it stays open before letting probes through. Default 30 s.
    #[serde(with = "crate::config::duration")]
    pub cooldown: Duration,
    /// Deliveries let through when half-open; all must succeed for it to close. Default 3.
    pub probes: u32,
    /// Whether dead letters of permanent errors count as failures. Default false.
    pub count_permanent: bool,
}

impl Default for KillSwitchConfig {
    fn default() -> Self {
        KillSwitchConfig {
            window: Duration::from_secs(60),
            activation: 20,
            trip: 0.5,
            cooldown: Duration::from_secs(30),
            probes: 3,
            count_permanent: false,
        }
    }
}

impl KillSwitchConfig {
    /// Why these settings cannot work, if they cannot.
    pub(super) fn problem(&self) -> Option<&'static str> {
        if self.window.is_zero() {
            return Some("kill_switch.window must not be zero");
        }
        if self.activation == 0 {
            return Some("kill_switch.activation must be at least 1");
        }
        if !(self.trip > 0.0 && self.trip <= 1.0) {
            return Some("kill_switch.trip must be above 0 and at most 1");
        }
        if self.cooldown.is_zero() {
            return Some("kill_switch.cooldown must not be zero");
        }
        if self.probes == 0 {
            return Some("kill_switch.probes must be at least 1");
        }
        None
    }
}

/// What recording an outcome did to the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    None,
    Opened,
    Closed,
    /// A half-open probe ended without a verdict: another delivery may take its place.
    ProbeFreed,
}

#[derive(Debug)]
enum Circuit {
    Closed,
    Open { until: Instant },
    HalfOpen { left: u32, pending: u32 },
}

/// Which half-open period a delivery was admitted in as a probe (a number that grows with each
/// period), so that only that period's probes decide it.
pub(super) type Probe = u64;

/// The window is kept as this many buckets, each a tenth of it.
const BUCKETS: u32 = 10;

/// The circuit and the window of outcomes behind it; [`Control`](super::Control) keeps it
/// under its lock.
#[derive(Debug)]
pub(super) struct Breaker {
    config: KillSwitchConfig,
    circuit: Circuit,
    /// (bucket start, successes, failures), oldest first.
    buckets: VecDeque<(Instant, u32, u32)>,
    /// Outcomes since the start (or the last close), and whether one was a success.
    seen: u64,
    succeeded: bool,
    /// When it opened (kept through half-open and re-opening; cleared when it closes).
    opened_at: Option<Instant>,
    /// The current (or last) half-open period.
    period: Probe,
}

impl Breaker {
    pub(super) fn new(config: KillSwitchConfig) -> Self {
        Breaker {
            config,
            circuit: Circuit::Closed,
            buckets: VecDeque::new(),
            seen: 0,
            succeeded: false,
            opened_at: None,
            period: 0,
        }
    }

    /// The state it puts the consumer in.
    pub(super) fn state(&self) -> ConsumerState {
        match self.circuit {
            Circuit::Closed => ConsumerState::Running,
            Circuit::Open { .. } => ConsumerState::CircuitOpen,
            Circuit::HalfOpen { .. } => ConsumerState::HalfOpen,
        }
    }

    /// When it opened, while it is open or half-open.
    pub(super) fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// How many of `want` deliveries may be received at `now`, and whether it turned
    /// half-open just now (its cooldown over).
    pub(super) fn admit(&mut self, want: usize, now: Instant) -> (Admit, bool) {
        let mut half_opened = false;
        if let Circuit::Open { until } = self.circuit {
            if now < until {
                return (Admit::Wait(Some(until)), false);
            }
            tracing::info!(probes = self.config.probes, "kill switch half-open");
            self.circuit = Circuit::HalfOpen {
                left: self.config.probes,
                pending: 0,
            };
            self.period += 1;
            half_opened = true;
        }
        let admit = match self.circuit {
            Circuit::HalfOpen { left: 0, .. } => Admit::Wait(None),
            Circuit::HalfOpen { left, .. } => {
                Admit::Take(want.min(usize::try_from(left).unwrap_or(usize::MAX)))
            }
            _ => Admit::Take(want),
        };
        (admit, half_opened)
    }

    /// Counts `n` received deliveries against the half-open probes; while half-open they are
    /// its probes, and the period they probe is returned.
    pub(super) fn admitted(&mut self, n: usize) -> Option<Probe> {
        if let Circuit::HalfOpen { left, pending } = &mut self.circuit {
            let n = u32::try_from(n).unwrap_or(u32::MAX).min(*left);
            *left -= n;
            *pending += n;
            return Some(self.period);
        }
        None
    }

    /// Records a finished delivery's outcome at `now` (`None`: it finished without one);
    /// `probe` is the half-open period it was admitted in as a probe, if it was one.
    pub(super) fn record(
        &mut self,
        outcome: Option<&Outcome>,
        probe: Option<Probe>,
        now: Instant,
    ) -> Change {
        if matches!(self.circuit, Circuit::HalfOpen { .. }) && probe != Some(self.period) {
            // Received before this half-open period: not one of its probes.
            return Change::None;
        }
        let verdict = outcome.and_then(|o| self.classify(o));
        self.judge(verdict, now)
    }

    /// `Some(true)` for a failure, `Some(false)` for a success, `None` for what does not count.
    fn classify(&self, outcome: &Outcome) -> Option<bool> {
        match outcome {
            Outcome::Ack => Some(false),
            Outcome::Retry { .. } => Some(true),
            Outcome::DeadLetter(failure) => match failure.kind {
                ErrorKind::Transient => Some(true),
                ErrorKind::Permanent => self.config.count_permanent.then_some(true),
            },
            // Neither: a deferral is not a failed attempt.
            Outcome::Release | Outcome::Defer { .. } => None,
        }
    }

    /// Records one finished delivery: `Some(true)` failed, `Some(false)` succeeded, `None`
    /// says nothing either way.
    fn judge(&mut self, verdict: Option<bool>, now: Instant) -> Change {
        match &mut self.circuit {
            // Deliveries that were in flight when it opened: already judged.
            Circuit::Open { .. } => Change::None,
            Circuit::HalfOpen { left, pending } => {
                *pending = pending.saturating_sub(1);
                let Some(failed) = verdict else {
                    // Not a verdict on the failures: let another delivery probe instead.
                    *left += 1;
                    return Change::ProbeFreed;
                };
                if failed {
                    self.open(now, "a probe failed");
                    Change::Opened
                } else if *pending == 0 && *left == 0 {
                    tracing::info!("kill switch closed: the probes succeeded");
                    self.circuit = Circuit::Closed;
                    self.buckets.clear();
                    self.seen = 0;
                    self.succeeded = false;
                    self.opened_at = None;
                    Change::Closed
                } else {
                    Change::None
                }
            }
            Circuit::Closed => {
                let Some(failed) = verdict else {
                    return Change::None;
                };
                self.count(failed, now);
                self.seen += 1;
                self.succeeded |= !failed;
                let (ok, bad) = self
                    .buckets
                    .iter()
                    .fold((0u64, 0u64), |(o, b), &(_, ok, bad)| {
                        (o + u64::from(ok), b + u64::from(bad))
                    });
                let total = ok + bad;
                let activation = u64::from(self.config.activation);
                if total >= activation && bad as f64 >= self.config.trip * total as f64 {
                    self.open(now, "the failure rate reached the trip level");
                    Change::Opened
                } else if !self.succeeded && self.seen >= activation {
                    self.open(now, "nothing has succeeded since the start");
                    Change::Opened
                } else {
                    Change::None
                }
            }
        }
    }

    fn count(&mut self, failed: bool, now: Instant) {
        let width = self.config.window / BUCKETS;
        while let Some(&(start, _, _)) = self.buckets.front() {
            if now.duration_since(start) >= self.config.window {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
        match self.buckets.back_mut() {
            Some((start, ok, bad)) if now.duration_since(*start) < width => {
                if failed {
                    *bad += 1;
                } else {
                    *ok += 1;
                }
            }
            _ => self
                .buckets
                .push_back((now, u32::from(!failed), u32::from(failed))),
        }
    }

    fn open(&mut self, now: Instant, why: &str) {
        tracing::warn!(cooldown = ?self.config.cooldown, "kill switch open: {why}; receiving stops");
        self.circuit = Circuit::Open {
            until: now + self.config.cooldown,
        };
        self.opened_at.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests;
