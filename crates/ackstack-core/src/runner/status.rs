//! What a run reports: the live [`Status`] and its [`Health`], the [`Summary`] it returns
//! and the [`ConsumerError`] it may stop with, and the counters behind them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::time::Instant;

use crate::context::RunStats;
use crate::error::SourceError;

use super::config::{ConfigError, HealthConfig};
use super::control::Control;
use super::state::ConsumerState;
use crate::metrics::Metrics;

/// The consumer could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The source failed in a way receiving again cannot fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The configuration cannot work.
    #[error("invalid consumer configuration: {0}")]
    Config(#[from] ConfigError),
    /// A bug: the run could not be wound down cleanly.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// What a run did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Deliveries received.
    pub received: u64,
    /// Deliveries whose handler succeeded (duplicates, acked without calling it, are in
    /// [`deduplicated`](Summary::deduplicated), not here).
    pub succeeded: u64,
    /// Acks the broker confirmed: of the successes, of the duplicates, and of the originals
    /// of dead letters (acked once their copy was confirmed). Not a count of successes.
    pub acked: u64,
    /// Ack calls made (each a batch).
    pub ack_calls: u64,
    /// Deliveries settled for a later retry.
    pub retried: u64,
    /// Deliveries forwarded to the dead-letter destination.
    pub dead_lettered: u64,
    /// Deferrals the handler asked for ([`HandlerError::defer`](crate::HandlerError::defer)),
    /// in place or at the broker: not attempts, and not in [`retried`](Summary::retried).
    pub deferred: u64,
    /// Deliveries acked as duplicates without calling the handler.
    pub deduplicated: u64,
    /// Deliveries processed without deduplication because their key was missing or empty.
    pub dedup_keyless: u64,
    /// Acks the broker refused (the messages come back).
    pub ack_failures: u64,
    /// Retries or dead-letters the broker did not confirm (the messages come back).
    pub settle_failures: u64,
    /// Deliveries whose lease was lost while they ran (never acked).
    pub leases_lost: u64,
    /// Deliveries still running at the shutdown deadline (abandoned, never acked).
    pub abandoned: u64,
    /// Receive calls that failed.
    pub receive_errors: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) succeeded: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) settle_failures: AtomicU64,
    pub(super) leases_lost: AtomicU64,
}

/// A live view of a running consumer, from [`Consumer::status`](crate::Consumer::status): for health checks, progress
/// reports and "stop when idle" conditions.
#[derive(Clone, Debug)]
pub struct Status {
    pub(super) inner: Arc<StatusInner>,
}

#[derive(Debug)]
pub(super) struct StatusInner {
    started: Instant,
    received: AtomicU64,
    finished: AtomicU64,
    last_activity_ms: AtomicU64,
    pub(super) stats: Arc<RunStats>,
    /// Receive calls that failed in a row (0 once one succeeds).
    receive_failures: std::sync::atomic::AtomicU32,
    /// Whether the last receive call failed, and since when.
    broker: Condition,
    /// How long the broker may be unreachable before the consumer counts as unhealthy (ms).
    unhealthy_after_ms: AtomicU64,
    control: Control,
    /// The adaptive concurrency limit now; 0 when concurrency is fixed.
    concurrency_limit: std::sync::atomic::AtomicUsize,
}

impl Default for Status {
    /// The status of a consumer not yet running, with a control of its own.
    fn default() -> Self {
        Status::new(Control::default())
    }
}

impl Status {
    /// The status of a consumer driven by `control`.
    pub(super) fn new(control: Control) -> Self {
        Status {
            inner: Arc::new(StatusInner {
                started: Instant::now(),
                received: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                last_activity_ms: AtomicU64::new(0),
                stats: Arc::default(),
                receive_failures: std::sync::atomic::AtomicU32::new(0),
                broker: Condition::default(),
                unhealthy_after_ms: AtomicU64::new(millis(HealthConfig::default().unhealthy_after)),
                control,
                concurrency_limit: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    fn touch(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner
            .last_activity_ms
            .fetch_max(ms, AtomicOrdering::Relaxed);
    }

    pub(super) fn received(&self, n: u64) {
        if n > 0 {
            self.inner.received.fetch_add(n, AtomicOrdering::Relaxed);
            self.touch();
        }
    }

    fn finished(&self) {
        self.inner.finished.fetch_add(1, AtomicOrdering::Relaxed);
        self.touch();
    }

    /// The limit adaptive concurrency decided now
    /// ([`ConsumerConfig::adaptive_concurrency`](crate::ConsumerConfig::adaptive_concurrency));
    /// `None` when concurrency is fixed, or before the run starts.
    pub fn concurrency_limit(&self) -> Option<usize> {
        match self.inner.concurrency_limit.load(AtomicOrdering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    pub(super) fn set_concurrency_limit(&self, n: usize) {
        self.inner
            .concurrency_limit
            .store(n, AtomicOrdering::Relaxed);
    }

    /// Deliveries received so far.
    pub fn received_total(&self) -> u64 {
        self.inner.received.load(AtomicOrdering::Relaxed)
    }

    /// Deliveries being processed or settled now.
    pub fn in_flight(&self) -> u64 {
        let finished = self.inner.finished.load(AtomicOrdering::Relaxed);
        self.received_total().saturating_sub(finished)
    }

    /// Dead-letter copies the broker refused for good so far (see [`OnRefused`](crate::OnRefused)). Rising means
    /// messages are stuck: too large, or invalid, for the dead-letter destination.
    pub fn dead_letters_refused(&self) -> u64 {
        self.inner
            .stats
            .dead_letters_refused
            .load(AtomicOrdering::Relaxed)
    }

    /// Receive calls that failed in a row just now (the broker is unreachable or refusing;
    /// the consumer keeps trying with backoff). 0 once a receive succeeds.
    pub fn receive_failures(&self) -> u32 {
        self.inner.receive_failures.load(AtomicOrdering::Relaxed)
    }

    pub(super) fn set_receive_failures(&self, n: u32) {
        self.inner
            .receive_failures
            .store(n, AtomicOrdering::Relaxed);
        self.inner.broker.set(n > 0);
    }

    pub(super) fn configure_health(&self, config: HealthConfig) {
        self.inner
            .unhealthy_after_ms
            .store(millis(config.unhealthy_after), AtomicOrdering::Relaxed);
    }

    /// How the consumer is doing now: healthy; degraded, with the reasons, while it still
    /// makes progress or waits safely (the dedup store or inbox database unavailable, the kill
    /// switch open, dead-letter writes or lease extensions failing, the broker unreachable
    /// for a short while); unhealthy once the broker has been unreachable for longer than
    /// [`HealthConfig::unhealthy_after`]. A reason whose failure has not recurred for a
    /// minute is dropped even without a success (nothing may have tried again). Cheap:
    /// atomic loads and one short lock (the kill switch's).
    pub fn health(&self) -> Health {
        let inner = &self.inner;
        let stats = &inner.stats;
        let mut reasons = Vec::new();
        let mut unhealthy = false;
        if let Some(since) = inner.broker.failing_for() {
            let limit =
                Duration::from_millis(inner.unhealthy_after_ms.load(AtomicOrdering::Relaxed));
            unhealthy = since >= limit;
            reasons.push(HealthReason {
                problem: Problem::BrokerUnreachable,
                since,
            });
        }
        for (condition, problem) in [
            (&stats.store, Problem::StoreUnavailable),
            (&stats.dead_letters, Problem::DeadLetterWritesFailing),
            (&stats.leases, Problem::LeaseExtensionsFailing),
        ] {
            if let Some(since) = condition.failing_for() {
                reasons.push(HealthReason { problem, since });
            }
        }
        if let (ConsumerState::CircuitOpen | ConsumerState::HalfOpen, Some(since)) =
            (inner.control.state(), inner.control.open_for())
        {
            reasons.push(HealthReason {
                problem: Problem::CircuitOpen,
                since,
            });
        }
        let level = if unhealthy {
            HealthLevel::Unhealthy
        } else if reasons.is_empty() {
            HealthLevel::Healthy
        } else {
            HealthLevel::Degraded
        };
        Health { level, reasons }
    }

    /// Deliveries held in process right now because the dedup store does not answer or their
    /// key is busy elsewhere. Non-zero for long means the store is down.
    pub fn held_for_store(&self) -> u64 {
        self.inner.stats.held.load(AtomicOrdering::Relaxed)
    }

    /// How long nothing has been received and nothing has been in flight (zero while busy).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.inner.last_activity_ms.load(AtomicOrdering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last)
    }

    /// Completes once the consumer has been idle for `period`: a ready-made shutdown signal.
    pub async fn idle(&self, period: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= period {
                return;
            }
            tokio::time::sleep((period - idle).max(Duration::from_millis(5))).await;
        }
    }
}

/// How a consumer is doing, from [`Status::health`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// Healthy, degraded or unhealthy.
    #[serde(rename = "status")]
    pub level: HealthLevel,
    /// What is wrong, most serious first; empty when healthy.
    pub reasons: Vec<HealthReason>,
}

impl Health {
    /// Whether nothing is wrong.
    pub fn is_healthy(&self) -> bool {
        self.level == HealthLevel::Healthy
    }

    /// Whether an orchestrator should take the consumer out of service (restart it): only
    /// when unhealthy. A degraded consumer still makes progress or waits safely.
    pub fn is_unhealthy(&self) -> bool {
        self.level == HealthLevel::Unhealthy
    }

    /// The worst of several consumers' health (one process, many consumers), their reasons
    /// together.
    pub fn worst(all: impl IntoIterator<Item = Health>) -> Health {
        let mut out = Health {
            level: HealthLevel::Healthy,
            reasons: Vec::new(),
        };
        for h in all {
            out.level = out.level.max(h.level);
            out.reasons.extend(h.reasons);
        }
        out
    }
}

/// The three levels of [`Health`], in order of seriousness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthLevel {
    /// Nothing is wrong.
    Healthy,
    /// Something is wrong, but the consumer makes progress or waits without losing anything.
    Degraded,
    /// The broker has been unreachable for longer than [`HealthConfig::unhealthy_after`].
    Unhealthy,
}

/// One thing wrong with a consumer, and for how long.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthReason {
    /// What is wrong.
    #[serde(rename = "reason")]
    pub problem: Problem,
    /// How long it has been wrong.
    #[serde(rename = "for_seconds", serialize_with = "seconds")]
    pub since: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_millis() as f64) / 1000.0)
}

/// What can be wrong with a consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Problem {
    /// Every receive call fails: the broker is down, unreachable or refusing.
    BrokerUnreachable,
    /// The dedup store (or inbox database) does not answer: deliveries are held in process.
    StoreUnavailable,
    /// The kill switch is open (or half-open): the consumer does not receive.
    CircuitOpen,
    /// The last dead-letter write failed: dead letters stay on the work queue meanwhile.
    DeadLetterWritesFailing,
    /// The last lease extension failed: long handlers may lose their lease.
    LeaseExtensionsFailing,
}

/// A failure not seen again for this long no longer counts (nothing may have asked since:
/// the delivery whose lease extension failed finished, or another replica took the message
/// whose dead letter failed).
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Whether something is failing now, and since when: set by the last answer (a success
/// clears it), and forgotten once no failure was seen for [`STALE_AFTER`]. Cheap to update on
/// every call: a load when nothing changes.
#[derive(Debug, Default)]
pub(crate) struct Condition {
    /// Milliseconds since [`epoch`] plus one when it began failing; 0 while it is fine.
    since: AtomicU64,
    /// Milliseconds since [`epoch`] of the last failure.
    last: AtomicU64,
}

impl Condition {
    /// Records the last answer: failing or not.
    pub(crate) fn set(&self, failing: bool) {
        let current = self.since.load(AtomicOrdering::Relaxed);
        if failing {
            let now = millis(epoch().elapsed());
            let stale = current != 0 && self.stale(now);
            self.last.store(now, AtomicOrdering::Relaxed);
            if current == 0 || stale {
                self.since.store(now + 1, AtomicOrdering::Relaxed);
            }
        } else if current != 0 {
            self.since.store(0, AtomicOrdering::Relaxed);
        }
    }

    fn stale(&self, now: u64) -> bool {
        let last = self.last.load(AtomicOrdering::Relaxed);
        Duration::from_millis(now.saturating_sub(last)) >= STALE_AFTER
    }

    /// How long it has been failing, if it is.
    pub(crate) fn failing_for(&self) -> Option<Duration> {
        let now = millis(epoch().elapsed());
        match self.since.load(AtomicOrdering::Relaxed) {
            0 => None,
            _ if self.stale(now) => None,
            since => Some(Duration::from_millis(now.saturating_sub(since - 1))),
        }
    }
}

/// The instant conditions are measured from (the first time one is looked at).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts a delivery as in flight until dropped (also when its task is aborted).
pub(super) struct InFlight {
    status: Status,
    metrics: Arc<Metrics>,
}

impl InFlight {
    pub(super) fn start(status: Status, metrics: Arc<Metrics>) -> Self {
        metrics.in_flight.increment(1.0);
        InFlight { status, metrics }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.decrement(1.0);
        self.status.finished();
    }
}
