//! The per-delivery [`Context`] a handler gets, the run's counts that layers report through
//! it ([`RunStats`]), and [`StoreHooks`], what dedup stores report through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use tokio_util::sync::CancellationToken;

use crate::cancel::Cancel;
use crate::metrics::{Metrics, unregistered};

/// Per-delivery context handed to the handler.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The delivery's cancellation: a token made only when something waits for it.
    cancel: Cancel,
    /// The consumer's shutdown signal, shared (a token's clone and drop each take its lock).
    stopping: Arc<CancellationToken>,
    stats: Arc<RunStats>,
    /// Where the retry layer records the attempt it is on when it retries in place (set by
    /// the runner only where retries happen in place). Held inline, not shared: the runner's
    /// retry layer is the outermost and writes it on the runner's own context.
    attempt: Option<AttemptSlot>,
    /// The delivery's metric handles (its consumer and queue); none outside a consumer.
    metrics: Option<Arc<Metrics>>,
    /// The kill switch's half-open period this delivery probes, if it is a probe.
    probe: Option<u64>,
    /// The run's attempt gate, where suspects run alone among attempts.
    gate: Option<crate::runner::AttemptGate>,
    /// A suspect's hold on that gate.
    seat: Option<Arc<crate::runner::Seat>>,
    /// The last moment the delivery's lease is sure to be kept (`lease.max_total`).
    lease_deadline: Option<tokio::time::Instant>,
}

/// The attempt in-place retrying reached; a clone starts from the value copied.
#[derive(Debug, Default)]
struct AttemptSlot(std::sync::atomic::AtomicU32);

impl Clone for AttemptSlot {
    fn clone(&self) -> Self {
        AttemptSlot(std::sync::atomic::AtomicU32::new(
            self.0.load(AtomicOrdering::Relaxed),
        ))
    }
}

/// Counts that layers report to the runner's [`Summary`](crate::Summary).
#[derive(Debug, Default)]
pub(crate) struct RunStats {
    /// Deliveries acked without calling the handler.
    pub(crate) deduplicated: AtomicU64,
    /// Retries performed in place by the retry layer.
    pub(crate) retried_in_place: AtomicU64,
    /// Deferrals the retry layer passed on or performed in place.
    pub(crate) deferred: AtomicU64,
    /// Deliveries whose dedup key was missing or empty (processed without deduplication).
    pub(crate) dedup_keyless: AtomicU64,
    /// Deliveries held in process right now, waiting for the dedup store or a busy key.
    pub(crate) held: AtomicU64,
    /// Dead-letter copies the broker refused for good.
    pub(crate) dead_letters_refused: AtomicU64,
    /// Whether the dedup store's last answer was an error, and since when.
    pub(crate) store: crate::runner::Condition,
    /// Whether the last dead-letter write failed, and since when.
    pub(crate) dead_letters: crate::runner::Condition,
    /// Whether the last lease extension failed, and since when.
    pub(crate) leases: crate::runner::Condition,
}

impl RunStats {
    /// Counts a delivery as held until the guard is dropped.
    pub(crate) fn hold(self: &Arc<Self>) -> HeldGuard {
        self.held.fetch_add(1, AtomicOrdering::Relaxed);
        HeldGuard(self.clone())
    }
}

/// Counts one delivery in [`RunStats::held`] while alive.
pub(crate) struct HeldGuard(Arc<RunStats>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

impl Context {
    /// A context with a fresh cancellation token.
    pub fn new() -> Self {
        Context::default()
    }

    /// A context observing `cancel`.
    pub fn with_token(cancel: CancellationToken) -> Self {
        Context::with_stats(cancel, Arc::default())
    }

    /// A context observing `cancel` that reports to `stats`.
    pub(crate) fn with_stats(cancel: CancellationToken, stats: Arc<RunStats>) -> Self {
        Context::for_run(Cancel::Token(cancel), Arc::default(), stats)
    }

    /// A delivery's context in a run: `cancel` is the delivery's, `stopping` the run's.
    pub(crate) fn for_run(
        cancel: Cancel,
        stopping: Arc<CancellationToken>,
        stats: Arc<RunStats>,
    ) -> Self {
        Context {
            cancel,
            stopping,
            stats,
            attempt: None,
            metrics: None,
            probe: None,
            gate: None,
            seat: None,
            lease_deadline: None,
        }
    }

    /// With `stopping` as the consumer's shutdown signal (see [`Context::stopping`]).
    pub fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = Arc::new(stopping);
        self
    }

    /// With the last moment the delivery's lease is sure to be kept.
    pub(crate) fn with_lease_deadline(mut self, deadline: Option<tokio::time::Instant>) -> Self {
        self.lease_deadline = deadline;
        self
    }

    /// The last moment the delivery's lease is sure to be kept, where it has one.
    pub(crate) fn lease_deadline(&self) -> Option<tokio::time::Instant> {
        self.lease_deadline
    }

    /// A context for nested work: cancelled with this one, and cancellable on its own.
    pub fn child(&self) -> Context {
        Context {
            cancel: self.cancel.child(),
            stopping: self.stopping.clone(),
            stats: self.stats.clone(),
            attempt: self.attempt.clone(),
            metrics: self.metrics.clone(),
            probe: self.probe,
            gate: self.gate.clone(),
            seat: self.seat.clone(),
            lease_deadline: self.lease_deadline,
        }
    }

    /// Completes once the consumer has begun to shut down. In-flight work still runs to its
    /// end (up to the shutdown deadline, when [`Context::cancelled`] fires); work that only
    /// waits, such as a delivery held for its dedup store, gives the delivery back instead.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await
    }

    /// Whether the consumer has begun to shut down (see [`Context::stopping`]).
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// With the metric handles of the delivery's consumer and queue.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// As a probe of the kill switch's half-open period `probe`, if it is one.
    pub(crate) fn with_probe(mut self, probe: Option<u64>) -> Self {
        self.probe = probe;
        self
    }

    /// The kill switch's half-open period this delivery probes, if it is a probe.
    pub(crate) fn probe(&self) -> Option<u64> {
        self.probe
    }

    /// The delivery's metric handles (handles that record nothing outside a consumer).
    pub(crate) fn metrics(&self) -> &Metrics {
        match &self.metrics {
            Some(m) => m,
            None => unregistered(),
        }
    }

    pub(crate) fn stats(&self) -> &Arc<RunStats> {
        &self.stats
    }

    /// Passing `gate` for each attempt; with `seat` for a suspect that holds it exclusive.
    pub(crate) fn with_gate(
        mut self,
        gate: crate::runner::AttemptGate,
        seat: Option<Arc<crate::runner::Seat>>,
    ) -> Self {
        self.gate = Some(gate);
        self.seat = seat;
        self
    }

    /// Waits for the attempt gate (see `runner/gate.rs`) and returns its shared guard, held for
    /// one attempt (`None` without a gate, or when this delivery holds it exclusive);
    /// `Err(())` when the work is cancelled first.
    pub(crate) async fn enter_attempt(
        &self,
    ) -> Result<Option<tokio::sync::OwnedRwLockReadGuard<()>>, ()> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        if self.seat.as_ref().is_some_and(|s| s.holds_alone()) {
            return Ok(None);
        }
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(()),
            guard = gate.shared() => Ok(Some(guard)),
        }
    }

    /// Before an in-place retry's wait: a suspect that holds the attempt gate exclusive gives
    /// it back, once the adapter recorded that a crash from now on is not its own.
    pub(crate) async fn step_aside(&self) {
        if let Some(seat) = &self.seat {
            seat.step_aside(false).await;
        }
    }

    /// After an in-place retry's wait: a suspect takes the attempt gate exclusive again, armed
    /// again. `false` when the work was cancelled first.
    pub(crate) async fn rejoin(&self) -> bool {
        match &self.seat {
            Some(seat) => seat.rejoin(&self.cancel).await,
            None => true,
        }
    }

    /// Tracks in-place attempts (see [`Context::attempt_reached`]).
    pub(crate) fn with_attempt_slot(mut self) -> Self {
        self.attempt = Some(AttemptSlot::default());
        self
    }

    /// Records that in-place retrying reached attempt `n`.
    pub(crate) fn note_attempt(&self, n: u32) {
        if let Some(slot) = &self.attempt {
            slot.0.store(n, AtomicOrdering::Relaxed);
        }
    }

    /// The attempt in-place retrying reached, if it ran.
    pub(crate) fn attempt_reached(&self) -> Option<u32> {
        self.attempt
            .as_ref()
            .map(|slot| slot.0.load(AtomicOrdering::Relaxed))
            .filter(|&n| n > 0)
    }

    pub(crate) fn note_deferred(&self) {
        self.metrics().deferred.increment(1);
        self.stats.deferred.fetch_add(1, AtomicOrdering::Relaxed);
    }

    pub(crate) fn note_retried_in_place(&self, kind: crate::error::ErrorKind) {
        self.metrics().retried(kind);
        self.stats
            .retried_in_place
            .fetch_add(1, AtomicOrdering::Relaxed);
    }

    /// Completes when this delivery's work should stop: its lease was lost, or shutdown reached
    /// its deadline. Whatever the handler returns afterwards, the delivery is not acked.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Cancels this context's work (and its children's), as cancelling [`Context::token`]
    /// would, without making a token.
    pub(crate) fn cancel_work(&self) {
        self.cancel.cancel();
    }

    /// Whether the work should stop (see [`Context::cancelled`]).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The underlying token, to pass to code that takes a [`CancellationToken`]. Made the
    /// first time it is asked for (a delivery's cancellation is a flag until then); it is
    /// cancelled whenever [`Context::is_cancelled`] says so, and cancelling it cancels this
    /// context's work.
    pub fn token(&self) -> &CancellationToken {
        self.cancel.token()
    }
}

/// What a dedup store or a transactional inbox reports about a delivery to the runner: the
/// counts of [`Summary`](crate::Summary), the metrics, and the store's part in
/// [`Status::health`](crate::Status::health). Meant for store and layer authors (it lives in
/// [`dedup`](crate::dedup), out of a handler's way).
pub trait StoreHooks {
    /// Records that the delivery was acked as a duplicate, without calling the handler.
    fn note_deduplicated(&self);
    /// Records that the delivery had no (non-empty) dedup key and runs without
    /// deduplication.
    fn note_keyless(&self);
    /// Records whether a call to the dedup store (or inbox database) just failed: while the
    /// last one failed, [`Status::health`](crate::Status::health) reports the store
    /// unavailable.
    fn note_store(&self, ok: bool);
}

impl StoreHooks for Context {
    fn note_deduplicated(&self) {
        self.metrics().deduplicated.increment(1);
        self.stats
            .deduplicated
            .fetch_add(1, AtomicOrdering::Relaxed);
    }

    fn note_keyless(&self) {
        self.metrics().dedup_keyless.increment(1);
        self.stats
            .dedup_keyless
            .fetch_add(1, AtomicOrdering::Relaxed);
    }

    fn note_store(&self, ok: bool) {
        if !ok {
            self.metrics().store_errors.increment(1);
        }
        self.stats.store.set(!ok);
    }
}
