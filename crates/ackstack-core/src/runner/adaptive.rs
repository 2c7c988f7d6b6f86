//! Adaptive concurrency: how many handlers may run at once, lowered when the handler's
//! downstream struggles and raised again when it recovers.
//!
//! The control is AIMD (additive increase, multiplicative decrease, as TCP's congestion
//! window) over rounds: a round ends once as many deliveries finished as the limit allows at
//! once, or after [`AdaptiveConcurrency::round`] with at least one finished. At the end of a
//! round:
//!
//! - if the share of attempts that failed transiently reached `max_error_rate`, or the round's
//!   mean handler latency is above `latency_tolerance` times the best mean seen lately (the
//!   baseline, which drifts up slowly so that a slower steady state is accepted), the limit is
//!   multiplied by `backoff` (at least `min`);
//! - else, if the round used the limit (deliveries waited for a permit), it grows by one (at
//!   most `max`).
//!
//! The limit is enforced on the runner's semaphore, sized for `max`, by holding back the
//! permits above the limit: lowering it waits for running handlers to finish, never stops
//! one. It shows as the `ackstack_concurrency_limit` gauge and in
//! [`Status::concurrency_limit`](crate::Status::concurrency_limit).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::outcome::Outcome;

/// Adaptive concurrency settings ([`ConsumerConfig::adaptive_concurrency`](crate::ConsumerConfig::adaptive_concurrency)).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdaptiveConcurrency {
    /// The lowest limit (at least 1). Default 1.
    pub min: usize,
    /// The highest limit; the consumer starts at `min` and grows from there. Default 64.
    pub max: usize,
    /// A round's share of transient failures at which the limit is lowered. Default 0.1.
    pub max_error_rate: f64,
    /// How far a round's mean latency may rise above the baseline before the limit is
    /// lowered. Default 2.0.
    pub latency_tolerance: f64,
    /// What the limit is multiplied by when lowered. Default 0.7.
    pub backoff: f64,
    /// The longest a round lasts. Default 1 s.
    #[serde(with = "crate::config::duration")]
    pub round: Duration,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            min: 1,
            max: 64,
            max_error_rate: 0.1,
            latency_tolerance: 2.0,
            backoff: 0.7,
            round: Duration::from_secs(1),
        }
    }
}

impl AdaptiveConcurrency {
    /// Limits from `min` to `max`, the other settings at their defaults.
    pub fn new(min: usize, max: usize) -> Self {
        AdaptiveConcurrency {
            min,
            max,
            ..AdaptiveConcurrency::default()
        }
    }

    /// What cannot work: a zero or inverted range, a rate or factor out of range.
    pub(super) fn problem(&self) -> Option<&'static str> {
        if self.min == 0 || self.max < self.min {
            Some("adaptive_concurrency needs 1 <= min <= max")
        } else if !(self.max_error_rate > 0.0 && self.max_error_rate <= 1.0) {
            Some("adaptive_concurrency.max_error_rate must be in (0, 1]")
        } else if !(self.latency_tolerance.is_finite() && self.latency_tolerance > 1.0) {
            Some("adaptive_concurrency.latency_tolerance must be a finite number above 1")
        } else if !(self.backoff > 0.0 && self.backoff < 1.0) {
            Some("adaptive_concurrency.backoff must be strictly between 0 and 1")
        } else if self.round.is_zero() {
            Some("adaptive_concurrency.round must not be zero")
        } else {
            None
        }
    }
}

/// One round's counts.
#[derive(Debug)]
struct Round {
    started: Instant,
    finished: usize,
    failed: usize,
    seconds: f64,
    /// Whether a delivery waited for a permit during the round.
    saturated: bool,
}

impl Round {
    fn new() -> Self {
        Round {
            started: Instant::now(),
            finished: 0,
            failed: 0,
            seconds: 0.0,
            saturated: false,
        }
    }
}

/// The controller of one run: decides the limit and holds back the permits above it.
#[derive(Debug)]
pub(crate) struct Controller {
    config: AdaptiveConcurrency,
    permits: Arc<Semaphore>,
    round: Mutex<(Round, Option<f64>)>,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    status: super::Status,
}

impl Drop for Controller {
    fn drop(&mut self) {
        // The run is over: the holder's pending acquire or wait ends.
        self.permits.close();
        self.changed.notify_one();
    }
}

impl Controller {
    /// A controller over `permits` (sized `config.max`), starting at `config.min`; spawns the
    /// task that holds back the permits above the limit.
    pub(crate) fn start(
        config: AdaptiveConcurrency,
        permits: Arc<Semaphore>,
        metrics: Arc<Metrics>,
        status: super::Status,
    ) -> Arc<Self> {
        let controller = Arc::new(Controller {
            config,
            permits,
            round: Mutex::new((Round::new(), None)),
            changed: Arc::new(Notify::new()),
            metrics,
            status,
        });
        controller.metrics.concurrency_limit.set(config.min as f64);
        controller.status.set_concurrency_limit(config.min);
        // Held before the first receive, so that it takes no more than `min`.
        let above = u32::try_from(config.max - config.min).unwrap_or(u32::MAX);
        let held = controller
            .permits
            .clone()
            .try_acquire_many_owned(above)
            .ok();
        tokio::spawn(hold_back(Arc::downgrade(&controller), held));
        controller
    }

    /// The limit decided now (kept where [`Status::concurrency_limit`](super::Status::concurrency_limit)
    /// shows it).
    pub(crate) fn limit(&self) -> usize {
        self.status.concurrency_limit().unwrap_or(self.config.min)
    }

    /// Notes that a delivery had to wait for a permit.
    pub(crate) fn saturated(&self) {
        self.round
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .saturated = true;
    }

    /// Counts a finished delivery: its outcome and how long the stack took.
    pub(crate) fn record(&self, outcome: &Outcome, seconds: f64) {
        let failed = match outcome {
            Outcome::Retry { failure, .. } | Outcome::DeadLetter(failure) => {
                // A permanent failure (a payload that does not decode) says nothing about
                // the downstream, and its latency would drag the baseline down.
                if failure.kind == crate::ErrorKind::Permanent {
                    return;
                }
                true
            }
            Outcome::Ack => false,
            // Not an attempt's verdict on the downstream.
            Outcome::Defer { .. } | Outcome::Release => return,
        };
        self.count(failed, seconds);
    }

    /// Counts a delivery whose handler outlived its lease as a transient failure.
    pub(crate) fn lost(&self, seconds: f64) {
        self.count(true, seconds);
    }

    fn count(&self, failed: bool, seconds: f64) {
        let mut guard = self.round.lock().unwrap_or_else(PoisonError::into_inner);
        let (round, baseline) = &mut *guard;
        round.finished += 1;
        round.failed += usize::from(failed);
        round.seconds += seconds;
        let limit = self.limit();
        if round.finished < limit && round.started.elapsed() < self.config.round {
            return;
        }
        let mean = round.seconds / round.finished as f64;
        let error_rate = round.failed as f64 / round.finished as f64;
        let slow = baseline.is_some_and(|b| mean > b * self.config.latency_tolerance);
        let next = if error_rate >= self.config.max_error_rate || slow {
            ((limit as f64 * self.config.backoff) as usize).max(self.config.min)
        } else if round.saturated {
            (limit + 1).min(self.config.max)
        } else {
            limit
        };
        // The baseline: the best recent mean of a healthy round, drifting up 5% a round so
        // that a slower steady state becomes the new normal.
        if error_rate < self.config.max_error_rate {
            *baseline = Some(match *baseline {
                None => mean,
                Some(b) => mean.min(b * 1.05),
            });
        }
        *round = Round::new();
        drop(guard);
        if next != limit {
            tracing::debug!(
                from = limit,
                to = next,
                error_rate,
                mean,
                "concurrency limit"
            );
            self.metrics.concurrency_limit.set(next as f64);
            self.status.set_concurrency_limit(next);
            self.changed.notify_one();
        }
    }
}

/// Holds back the permits above the limit in one merged permit: takes them as handlers give
/// them back when the limit falls, returns them at once when it rises. Ends with the run (its
/// controller dropped).
async fn hold_back(
    controller: std::sync::Weak<Controller>,
    mut held: Option<OwnedSemaphorePermit>,
) {
    let count = |held: &Option<OwnedSemaphorePermit>| held.as_ref().map_or(0, |p| p.num_permits());
    loop {
        let Some(c) = controller.upgrade() else {
            return;
        };
        let want = c.config.max - c.limit();
        let have = count(&held);
        if have > want
            && let Some(all) = held.as_mut()
        {
            drop(all.split(have - want));
        }
        let permits = c.permits.clone();
        let notify = c.changed.clone();
        // Not kept alive while waiting: its drop at the end of the run wakes this task.
        drop(c);
        let changed = notify.notified();
        if count(&held) < want {
            tokio::select! {
                permit = permits.acquire_owned() => match permit {
                    Ok(p) => match held.as_mut() {
                        Some(all) => all.merge(p),
                        None => held = Some(p),
                    },
                    Err(_) => return,
                },
                () = changed => {}
            }
        } else {
            changed.await;
        }
    }
}
