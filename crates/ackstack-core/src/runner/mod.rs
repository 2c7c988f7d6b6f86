//! The runner: receives, processes with bounded concurrency, settles, and shuts down cleanly.

pub(crate) mod acker;
pub(crate) mod lease;
pub(crate) mod ordering;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::deadletter::DeadLetter;
use crate::dedup::{DedupConfig, DedupKey, DedupLayer, DedupStore};
use crate::delivery::Delivery;
use crate::error::SettleError;
use crate::error::SourceError;
use crate::handler::{
    Classifier, Context, Handler, Identity, Layer, Process, RunStats, Stack, Terminal,
};
use crate::outcome::Outcome;
use crate::retry::{RetryConfig, RetryLayer};
use crate::source::{Received, Settle, SettleFailure, Settled, Source};
use acker::{AckQueue, BatchAcker};
use lease::{LeaseConfig, LeaseGuard, LeaseKeeper};
use ordering::{KeyGate, Turn};

/// When a delivery is acknowledged, as users know the modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Ack on receipt, before the handler: a crash or failure loses the message. No retries,
    /// no dead letters. Only for disposable messages (metrics samples, cache invalidations).
    AtMostOnce,
    /// Ack after the handler succeeded (the default): nothing is lost; a crash between the
    /// effect and the ack repeats the effect.
    #[default]
    AtLeastOnce,
    /// At-least-once plus deduplication: a repeat is acked without calling the handler. The
    /// consumer refuses to start without a dedup store.
    EffectivelyOnce,
}

/// Whether deliveries sharing a key are processed in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyOrdering {
    /// Per key where the broker retries in place (Kafka: a retrying record holds back the
    /// later records of its key, as Kafka users expect), none elsewhere. The default.
    #[default]
    Auto,
    /// No ordering: deliveries run concurrently whatever their key.
    None,
    /// Deliveries with the same key run one at a time in receive order, and a failing one is
    /// retried in place (holding its key) so that later ones wait for it.
    PerKey,
}

/// The runner's settings. Deserializable, so it can come from a config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Handlers running at once, at most.
    pub concurrency: usize,
    /// Deliveries asked for per receive call, at most (also bounded by free concurrency).
    pub receive_batch: usize,
    /// Acks per broker call, at most (further bounded by the broker's own limit).
    pub ack_batch: Option<usize>,
    /// How long a completed delivery may wait for its batch before the ack is sent.
    #[serde(with = "crate::config::duration")]
    pub ack_delay: Duration,
    /// How long shutdown waits for in-flight handlers before abandoning them unacked.
    #[serde(with = "crate::config::duration")]
    pub shutdown_deadline: Duration,
    /// At-most-once, at-least-once or effectively-once.
    pub mode: DeliveryMode,
    /// Per-key ordering.
    pub ordering: KeyOrdering,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Lease keeping (brokers with visibility timeouts).
    pub lease: LeaseConfig,
    /// Deduplication (used when a store is given).
    pub dedup: DedupConfig,
    /// A header whose value is recorded as `correlation_id` in each delivery's span.
    pub correlation_header: Option<String>,
    /// What happens to a delivery whose dead-letter copy the broker refuses for good (too
    /// large even after shrinking, invalid): it is never acked either way.
    pub on_dead_letter_refused: OnRefused,
}

/// What happens to a delivery whose dead-letter copy the broker refuses for good
/// ([`SettleError::Rejected`]). Never an ack: the message stays
/// at the broker until an operator deals with it (`ackstack_dead_letters_refused_total`,
/// [`Status::dead_letters_refused`], an error log line per message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRefused {
    /// Release it for redelivery after a pause that grows with its attempts (up to 30 s): it
    /// is handled and dead-lettered again later. The default.
    #[default]
    Release,
    /// Keep it in process (lease kept, permit held) and try the dead-letter write again with
    /// backoff until the broker takes it, the lease is lost or shutdown. Where the broker
    /// cannot redeliver a released message by itself (Kafka), this is what happens anyway.
    Hold,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            concurrency: 16,
            receive_batch: 64,
            ack_batch: None,
            ack_delay: Duration::from_millis(50),
            shutdown_deadline: Duration::from_secs(30),
            mode: DeliveryMode::AtLeastOnce,
            ordering: KeyOrdering::Auto,
            retry: RetryConfig::default(),
            lease: LeaseConfig::default(),
            dedup: DedupConfig::default(),
            correlation_header: None,
            on_dead_letter_refused: OnRefused::Release,
        }
    }
}

impl ConsumerConfig {
    /// Checks the settings on their own (see also [`Consumer::validate`], which knows whether
    /// a dedup store was given).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::ZeroConcurrency);
        }
        if self.receive_batch == 0 {
            return Err(ConfigError::ZeroReceiveBatch);
        }
        if self.ack_batch == Some(0) {
            return Err(ConfigError::ZeroAckBatch);
        }
        let extend_at = self.lease.extend_at;
        if !(extend_at > 0.0 && extend_at < 1.0) {
            return Err(ConfigError::ExtendAt(extend_at));
        }
        if self.lease.max_total.is_zero() {
            return Err(ConfigError::ZeroLeaseTotal);
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::ZeroMaxAttempts);
        }
        let factor = self.retry.backoff.factor;
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(ConfigError::BackoffFactor(factor));
        }
        if self.dedup.claim_lease.is_zero() {
            return Err(ConfigError::ZeroClaimLease);
        }
        if self.dedup.done_ttl.is_zero() {
            return Err(ConfigError::ZeroDoneTtl);
        }
        if self.dedup.store_retry_after.is_zero() || self.dedup.busy_retry_after.is_zero() {
            return Err(ConfigError::ZeroDedupPause);
        }
        Ok(())
    }
}

/// A consumer configuration that cannot work, found before anything is received.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `concurrency` is 0.
    #[error("concurrency must be at least 1")]
    ZeroConcurrency,
    /// `receive_batch` is 0.
    #[error("receive_batch must be at least 1")]
    ZeroReceiveBatch,
    /// `ack_batch` is 0.
    #[error("ack_batch must be at least 1 (or unset for the broker's limit)")]
    ZeroAckBatch,
    /// `lease.extend_at` is not strictly between 0 and 1.
    #[error("lease.extend_at must be strictly between 0 and 1, got {0}")]
    ExtendAt(f64),
    /// `lease.max_total` is zero.
    #[error("lease.max_total must not be zero")]
    ZeroLeaseTotal,
    /// `retry.max_attempts` is 0.
    #[error("retry.max_attempts must be at least 1")]
    ZeroMaxAttempts,
    /// `retry.factor` is below 1 or not a number.
    #[error("retry.factor must be a finite number of at least 1, got {0}")]
    BackoffFactor(f64),
    /// `dedup.claim_lease` is zero.
    #[error("dedup.claim_lease must not be zero")]
    ZeroClaimLease,
    /// `dedup.done_ttl` is zero.
    #[error("dedup.done_ttl must not be zero")]
    ZeroDoneTtl,
    /// `dedup.store_retry_after` or `dedup.busy_retry_after` is zero (a hot loop on the store).
    #[error("dedup.store_retry_after and dedup.busy_retry_after must not be zero")]
    ZeroDedupPause,
    /// At-most-once acks before the handler runs: deduplication would run on a message
    /// already acked.
    #[error(
        "at-most-once cannot be combined with deduplication (the message is acked before dedup could act)"
    )]
    AtMostOnceWithDedup,
    /// Effectively-once was asked for without a dedup store.
    #[error("effectively-once needs a dedup store: call .dedup(store, key)")]
    EffectivelyOnceWithoutStore,
}

/// The consumer could not run.
#[derive(Debug, thiserror::Error)]
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
pub struct Summary {
    /// Deliveries received.
    pub received: u64,
    /// Deliveries the handler stack decided to ack (including deduplicated ones).
    pub succeeded: u64,
    /// Acks the broker confirmed.
    pub acked: u64,
    /// Ack calls made (each a batch).
    pub ack_calls: u64,
    /// Deliveries settled for a later retry.
    pub retried: u64,
    /// Deliveries forwarded to the dead-letter destination.
    pub dead_lettered: u64,
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
struct Counters {
    received: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    settle_failures: AtomicU64,
    leases_lost: AtomicU64,
}

/// A live view of a running consumer, from [`Consumer::status`]: for health checks, progress
/// reports and "stop when idle" conditions.
#[derive(Clone, Debug)]
pub struct Status {
    inner: Arc<StatusInner>,
}

#[derive(Debug)]
struct StatusInner {
    started: Instant,
    received: AtomicU64,
    finished: AtomicU64,
    last_activity_ms: AtomicU64,
    stats: Arc<RunStats>,
    /// Receive calls that failed in a row (0 once one succeeds).
    receive_failures: std::sync::atomic::AtomicU32,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            inner: Arc::new(StatusInner {
                started: Instant::now(),
                received: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                last_activity_ms: AtomicU64::new(0),
                stats: Arc::default(),
                receive_failures: std::sync::atomic::AtomicU32::new(0),
            }),
        }
    }
}

impl Status {
    fn touch(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner
            .last_activity_ms
            .fetch_max(ms, AtomicOrdering::Relaxed);
    }

    fn received(&self, n: u64) {
        if n > 0 {
            self.inner.received.fetch_add(n, AtomicOrdering::Relaxed);
            self.touch();
        }
    }

    fn finished(&self) {
        self.inner.finished.fetch_add(1, AtomicOrdering::Relaxed);
        self.touch();
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

    /// Dead-letter copies the broker refused for good so far (see [`OnRefused`]). Rising means
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

    fn set_receive_failures(&self, n: u32) {
        self.inner
            .receive_failures
            .store(n, AtomicOrdering::Relaxed);
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

/// Counts a delivery as in flight until dropped (also when its task is aborted).
struct InFlight {
    status: Status,
}

impl InFlight {
    fn start(status: Status) -> Self {
        metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        InFlight { status }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
        self.status.finished();
    }
}

/// What the setters of [`Consumer`] changed, applied over its base config.
#[derive(Clone, Debug, Default)]
struct Overrides {
    concurrency: Option<usize>,
    backoff: Option<Backoff>,
    max_attempts: Option<u32>,
    mode: Option<DeliveryMode>,
    ordering: Option<KeyOrdering>,
    shutdown_deadline: Option<Duration>,
}

impl Overrides {
    fn apply(&self, mut config: ConsumerConfig) -> ConsumerConfig {
        if let Some(n) = self.concurrency {
            config.concurrency = n;
        }
        if let Some(backoff) = self.backoff {
            config.retry.backoff = backoff;
        }
        if let Some(n) = self.max_attempts {
            config.retry.max_attempts = n;
        }
        if let Some(mode) = self.mode {
            config.mode = mode;
        }
        if let Some(ordering) = self.ordering {
            config.ordering = ordering;
        }
        if let Some(deadline) = self.shutdown_deadline {
            config.shutdown_deadline = deadline;
        }
        config
    }
}

/// Called with each delivery and its outcome, before it is settled; see [`Consumer::inspect`].
pub type Inspector = Arc<dyn Fn(&Delivery, &Outcome) + Send + Sync>;

/// A consumer: a source, a handler stack and the settings that drive them.
///
/// The processing stack is fixed: `retry → dedup → your layers → handler`. Retry is
/// outermost, the one place that turns a failure (an error, a panic anywhere inside it) into a
/// retry or a dead letter; dedup claims the key before each attempt and marks it done after
/// success, holding the delivery in process (not counting an attempt) while its store does not
/// answer; your layers wrap the handler itself.
pub struct Consumer<S, L = Identity> {
    source: S,
    layers: L,
    config: ConsumerConfig,
    overrides: Overrides,
    dedup: Option<(Arc<dyn DedupStore>, DedupKey)>,
    classifier: Option<Classifier>,
    name: Option<Arc<str>>,
    inspector: Option<Inspector>,
    status: Status,
}

impl<S: Source> Consumer<S> {
    /// A consumer of `source` with the default config.
    pub fn new(source: S) -> Self {
        Consumer {
            source,
            layers: Identity,
            config: ConsumerConfig::default(),
            overrides: Overrides::default(),
            dedup: None,
            classifier: None,
            name: None,
            inspector: None,
            status: Status::default(),
        }
    }
}

impl<S: Source, L> Consumer<S, L> {
    /// Uses `config` as the base settings. The individual setters (`concurrency`, `retry`,
    /// `max_attempts`, `mode`, `ordering`, `shutdown_deadline`) override it whatever the order
    /// of the calls.
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// The settings the consumer will run with: the base config with the setters applied.
    pub fn effective_config(&self) -> ConsumerConfig {
        let mut config = self.overrides.apply(self.config.clone());
        // A dedup store turns the default at-least-once into effectively-once.
        if self.dedup.is_some() && config.mode == DeliveryMode::AtLeastOnce {
            config.mode = DeliveryMode::EffectivelyOnce;
        }
        config
    }

    /// Checks that the effective settings can work; [`Consumer::run_until`] does this first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let config = self.effective_config();
        config.validate()?;
        match (config.mode, self.dedup.is_some()) {
            (DeliveryMode::AtMostOnce, true) => Err(ConfigError::AtMostOnceWithDedup),
            (DeliveryMode::EffectivelyOnce, false) => Err(ConfigError::EffectivelyOnceWithoutStore),
            _ => Ok(()),
        }
    }

    /// Runs at most `n` handlers at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.overrides.concurrency = Some(n);
        self
    }

    /// Delays retries of transient failures by `backoff`'s schedule.
    pub fn retry(mut self, backoff: Backoff) -> Self {
        self.overrides.backoff = Some(backoff);
        self
    }

    /// Dead-letters a message after `n` failed handler attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.overrides.max_attempts = Some(n);
        self
    }

    /// Deduplicates deliveries by `key` in `store`.
    pub fn dedup(self, store: impl DedupStore, key: DedupKey) -> Self {
        self.dedup_shared(Arc::new(store), key)
    }

    /// Deduplicates deliveries by `key` in a shared `store`.
    ///
    /// A dedup store makes the default at-least-once mode effectively-once.
    pub fn dedup_shared(mut self, store: Arc<dyn DedupStore>, key: DedupKey) -> Self {
        self.dedup = Some((store, key));
        self
    }

    /// Acknowledges in this mode.
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.overrides.mode = Some(mode);
        self
    }

    /// Processes deliveries sharing a key in order.
    pub fn ordering(mut self, ordering: KeyOrdering) -> Self {
        self.overrides.ordering = Some(ordering);
        self
    }

    /// Waits at most `deadline` for in-flight handlers at shutdown.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.overrides.shutdown_deadline = Some(deadline);
        self
    }

    /// Names this consumer in deliveries' origin, spans and dead-letter metadata (instead of
    /// the name the source gave).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Overrides the kind of handler errors; see [`Terminal::classify`].
    pub fn classify(
        mut self,
        classifier: impl Fn(&crate::HandlerError) -> crate::ErrorKind + Send + Sync + 'static,
    ) -> Self {
        self.classifier = Some(Arc::new(classifier));
        self
    }

    /// Calls `f` with every delivery and the outcome decided for it, before it is settled (and
    /// with each in-place retry): for audit logs and progress output. Keep it quick; it runs on
    /// the delivery's task.
    pub fn inspect(mut self, f: impl Fn(&Delivery, &Outcome) + Send + Sync + 'static) -> Self {
        self.inspector = Some(Arc::new(f));
        self
    }

    /// A live view of this consumer's progress, valid before, during and after the run.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Adds a layer around the handler (outside the layers added before it).
    pub fn layer<N>(self, layer: N) -> Consumer<S, Stack<L, N>> {
        Consumer {
            source: self.source,
            layers: Stack::new(self.layers, layer),
            config: self.config,
            overrides: self.overrides,
            dedup: self.dedup,
            classifier: self.classifier,
            name: self.name,
            inspector: self.inspector,
            status: self.status,
        }
    }

    /// Runs until `shutdown` completes, then drains, flushes and returns what happened.
    pub async fn run_until<H, F>(
        mut self,
        handler: H,
        shutdown: F,
    ) -> Result<Summary, ConsumerError>
    where
        H: Handler,
        L: Layer<Terminal<H>>,
        F: Future<Output = ()> + Send,
    {
        self.validate()?;
        let cfg = self.effective_config();
        let caps = self.source.capabilities();
        let settler = self.source.settler();
        let per_key = match cfg.ordering {
            KeyOrdering::PerKey => true,
            KeyOrdering::None => false,
            KeyOrdering::Auto => !caps.broker_delay,
        };
        // At-most-once acks on receipt: there is nothing left to retry in place.
        let in_place = (!caps.broker_delay || per_key) && cfg.mode != DeliveryMode::AtMostOnce;
        let stats = self.status.inner.stats.clone();
        let on_in_place: Option<crate::retry::OnInPlaceRetry> =
            self.inspector.clone().map(|inspect| {
                Arc::new(move |d: &Delivery, o: &Outcome| call_inspector(&inspect, d, o))
                    as crate::retry::OnInPlaceRetry
            });
        let terminal = Terminal::new(handler).classify(self.classifier.clone());
        let dedup = self
            .dedup
            .take()
            .map(|(store, key)| DedupLayer::shared(store, key).config(cfg.dedup));
        let retry = RetryLayer::from_config(cfg.retry)
            .in_place(in_place)
            .max_delay(caps.max_retry_delay)
            .on_in_place_retry(on_in_place);
        let stack = retry.layer(dedup.layer(self.layers.layer(terminal)));
        let ack_batch = cfg
            .ack_batch
            .unwrap_or(caps.max_ack_batch)
            .clamp(1, caps.max_ack_batch);
        let acker = BatchAcker::spawn(
            settler.clone(),
            ack_batch,
            cfg.ack_delay,
            caps.parallel_acks,
            (ack_batch * (caps.parallel_acks + 1)).max(cfg.concurrency * 2),
        );
        let leases = caps
            .lease
            .map(|lease| LeaseKeeper::spawn(settler.clone(), lease, cfg.lease));
        let shared = Arc::new(Shared {
            stack,
            settler,
            acks: acker.queue(),
            mode: cfg.mode,
            in_place,
            counters: Counters::default(),
            stats: stats.clone(),
            correlation_header: cfg.correlation_header.clone(),
            name: self.name.clone(),
            inspector: self.inspector.clone(),
            backoff: cfg.retry.backoff,
            release_redelivers: caps.broker_delay,
            status: self.status.clone(),
            stopping: CancellationToken::new(),
            on_refused: cfg.on_dead_letter_refused,
            refusals: Refusals::default(),
        });
        let gate = per_key.then(KeyGate::new);
        let hard_stop = CancellationToken::new();
        let stopping = shared.stopping.clone();
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let receive_batch = cfg.receive_batch;
        let reconnect = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
            .equal_jitter();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut receive_errors = 0u64;
        let mut consecutive_errors = 0u32;
        tokio::pin!(shutdown);

        let result = loop {
            while let Some(done) = tasks.try_join_next() {
                log_join_error(done);
            }
            let first = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            let max = (1 + permits.available_permits()).min(receive_batch);
            let batch = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                batch = self.source.receive(max) => batch,
            };
            let batch = match batch {
                Ok(batch) => {
                    if consecutive_errors > 0 {
                        consecutive_errors = 0;
                        shared.status.set_receive_failures(0);
                    }
                    batch
                }
                Err(err) if err.is_fatal() => break Err(ConsumerError::Source(err)),
                Err(err) => {
                    receive_errors += 1;
                    consecutive_errors = consecutive_errors.saturating_add(1);
                    shared.status.set_receive_failures(consecutive_errors);
                    let wait = reconnect.delay(consecutive_errors);
                    tracing::warn!(error = %err, retry_in = ?wait, "receive failed");
                    drop(first);
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            let received_at = Instant::now();
            shared.status.received(batch.len() as u64);
            let mut first = Some(first);
            for received in batch {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                shared
                    .counters
                    .received
                    .fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!(crate::metrics::RECEIVED).increment(1);
                let cancel = hard_stop.child_token();
                let lease = leases
                    .as_ref()
                    .map(|k| k.hold(received.token.clone(), received_at, cancel.clone()));
                let turn = match (&gate, &received.delivery.key) {
                    (Some(gate), Some(key)) => Some(gate.enter(key.clone())),
                    _ => None,
                };
                let shared = shared.clone();
                let in_flight = InFlight::start(shared.status.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let _in_flight = in_flight;
                    shared.run_one(received, cancel, lease, turn).await;
                });
            }
        };

        // Shutdown: stop receiving, drain up to the deadline, abandon the rest, flush.
        stopping.cancel();
        self.source.close().await;
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                log_join_error(done);
            }
        };
        let mut abandoned = 0;
        if tokio::time::timeout(cfg.shutdown_deadline, drain)
            .await
            .is_err()
        {
            abandoned = tasks.len() as u64;
            tracing::warn!(
                abandoned,
                "shutdown deadline reached; abandoning in-flight work unacked"
            );
            metrics::counter!(crate::metrics::ABANDONED).increment(abandoned);
            hard_stop.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let Ok(shared) = Arc::try_unwrap(shared) else {
            return Err(ConsumerError::Internal("tasks outlived shutdown"));
        };
        let Shared {
            settler,
            acks,
            counters,
            ..
        } = shared;
        drop(acks);
        let ack_stats = acker.stats().clone();
        acker.shutdown().await;
        settler.flush().await;
        if let Some(leases) = leases {
            leases.shutdown();
        }
        result?;
        Ok(Summary {
            received: counters.received.into_inner(),
            succeeded: counters.succeeded.into_inner(),
            acked: ack_stats.acked.load(AtomicOrdering::Relaxed),
            ack_calls: ack_stats.calls.load(AtomicOrdering::Relaxed),
            retried: counters.retried.into_inner()
                + stats.retried_in_place.load(AtomicOrdering::Relaxed),
            dead_lettered: counters.dead_lettered.into_inner(),
            deduplicated: stats.deduplicated.load(AtomicOrdering::Relaxed),
            dedup_keyless: stats.dedup_keyless.load(AtomicOrdering::Relaxed),
            ack_failures: ack_stats.failed.load(AtomicOrdering::Relaxed),
            settle_failures: counters.settle_failures.into_inner(),
            leases_lost: counters.leases_lost.into_inner()
                + ack_stats.lost.load(AtomicOrdering::Relaxed),
            abandoned,
            receive_errors,
        })
    }
}

/// Calls `inspect`; its panics are logged, never propagated.
fn call_inspector(inspect: &Inspector, delivery: &Delivery, outcome: &Outcome) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inspect(delivery, outcome)))
        .is_err()
    {
        tracing::error!("the outcome inspector panicked");
    }
}

fn log_join_error(done: Result<(), tokio::task::JoinError>) {
    if let Err(err) = done
        && err.is_panic()
    {
        tracing::error!(error = %err, "delivery task panicked outside the handler");
    }
}

struct Shared<P, S: Settle> {
    stack: P,
    settler: S,
    acks: AckQueue<S::Token>,
    mode: DeliveryMode,
    /// Whether the retry layer retries in place.
    in_place: bool,
    counters: Counters,
    stats: Arc<RunStats>,
    correlation_header: Option<String>,
    name: Option<Arc<str>>,
    inspector: Option<Inspector>,
    backoff: Backoff,
    /// Whether a released delivery comes back by itself (false for cumulative-commit brokers
    /// such as Kafka, where an unsettled record holds its partition back).
    release_redelivers: bool,
    status: Status,
    /// Fired when shutdown begins.
    stopping: CancellationToken,
    on_refused: OnRefused,
    refusals: Refusals,
}

impl<P: Process, S: Settle> Shared<P, S> {
    /// Dead-letters; where a released delivery would not come back by itself (cumulative
    /// commits), keeps trying in place until the copy is confirmed, the lease is lost or the
    /// work is cancelled.
    async fn dead_letter(
        &self,
        mut token: S::Token,
        delivery: &Delivery,
        letter: &DeadLetter,
        cx: &Context,
    ) -> Result<Settled<S::Token>, SettleFailure<S::Token>> {
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30))
            .equal_jitter();
        let mut tries = 0;
        loop {
            let result = self.settler.dead_letter(token, delivery, letter).await;
            if let Err(failure) = &result
                && matches!(failure.error, SettleError::Rejected(_))
            {
                self.refused(delivery, &failure.error);
            }
            match result {
                Err(failure)
                    if (!self.release_redelivers
                        || (self.on_refused == OnRefused::Hold
                            && matches!(failure.error, SettleError::Rejected(_))))
                        && !failure.error.is_lease_lost()
                        && !cx.is_cancelled() =>
                {
                    tries += 1;
                    let wait = backoff.delay(tries);
                    tracing::warn!(error = %failure.error, retry_in = ?wait, "dead-letter not confirmed; trying again");
                    tokio::select! {
                        _ = cx.cancelled() => return Err(failure),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    token = failure.token;
                }
                other => return other,
            }
        }
    }

    /// Counts a dead-letter copy the broker refused for good; logs it at error once per message.
    fn refused(&self, delivery: &Delivery, error: &SettleError) {
        metrics::counter!(crate::metrics::DEAD_LETTERS_REFUSED).increment(1);
        self.stats
            .dead_letters_refused
            .fetch_add(1, AtomicOrdering::Relaxed);
        if self.refusals.first_time(delivery) {
            tracing::error!(
                error = %error,
                message_id = delivery.message_id.as_deref().unwrap_or(""),
                "the broker refuses this message's dead-letter copy for good; it is kept \
                 unacked (policy {:?}) until an operator deals with it",
                self.on_refused
            );
        } else {
            tracing::debug!(error = %error, "dead-letter copy refused again");
        }
    }

    /// Calls the inspector, if any; its panics are logged, never propagated.
    fn inspect(&self, delivery: &Delivery, outcome: &Outcome) {
        if let Some(inspect) = &self.inspector {
            call_inspector(inspect, delivery, outcome);
        }
    }

    async fn run_one(
        &self,
        received: Received<S::Token>,
        cancel: CancellationToken,
        mut lease: Option<LeaseGuard<S::Token>>,
        mut turn: Option<Turn>,
    ) {
        let Received {
            mut delivery,
            token,
        } = received;
        if let Some(name) = &self.name {
            delivery.origin.consumer = name.clone();
        }
        let correlation = self
            .correlation_header
            .as_deref()
            .and_then(|h| delivery.headers.get_str(h))
            .unwrap_or("");
        let span = tracing::info_span!(
            "delivery",
            consumer = %delivery.origin.consumer,
            broker = delivery.origin.broker,
            queue = %delivery.origin.queue,
            message_id = delivery.message_id.as_deref().unwrap_or(""),
            attempt = delivery.attempt,
            correlation_id = correlation,
            outcome = tracing::field::Empty,
        );
        async {
            if let Some(turn) = &mut turn {
                // Waiting for the key's turn; a lost lease or the deadline ends the wait.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    _ = turn.wait() => {}
                }
            }
            if cancel.is_cancelled() {
                // Checked right before the handler: a delivery whose lease was lost (or a
                // partition revoked) while it waited is never processed.
                self.not_processed(lease.as_ref());
                return;
            }
            let cx = self.context(&cancel);
            if self.mode == DeliveryMode::AtMostOnce {
                // Acked on receipt: the lease no longer matters.
                drop(lease.take());
                self.acks.push(token).await;
                let outcome = self.stack.process(&delivery, &cx).await;
                tracing::Span::current().record("outcome", outcome.as_str());
                if outcome == Outcome::Ack {
                    self.counters
                        .succeeded
                        .fetch_add(1, AtomicOrdering::Relaxed);
                }
                return;
            }
            let started = Instant::now();
            let cx = if self.in_place {
                cx.with_attempt_slot()
            } else {
                cx
            };
            let outcome = self.stack.process(&delivery, &cx).await;
            if let Some(attempt) = cx.attempt_reached() {
                // Retried in place: report and dead-letter with the attempt it reached.
                delivery.attempt = attempt;
            }
            metrics::histogram!(crate::metrics::HANDLER_SECONDS)
                .record(started.elapsed().as_secs_f64());
            if cx.is_cancelled() {
                self.not_processed(lease.as_ref());
                return;
            }
            tracing::Span::current().record("outcome", outcome.as_str());
            self.inspect(&delivery, &outcome);
            self.settle(token, &delivery, outcome, lease, &cx).await;
        }
        .instrument(span)
        .await
    }

    /// Records why a cancelled delivery is left unsettled.
    fn not_processed(&self, lease: Option<&LeaseGuard<S::Token>>) {
        if lease.is_some_and(|l| l.state().is_lost()) {
            // Not ours any more: the broker redelivers it. Never ack, never release.
            tracing::Span::current().record("outcome", "lease_lost");
            self.counters
                .leases_lost
                .fetch_add(1, AtomicOrdering::Relaxed);
        } else {
            // The shutdown deadline passed: abandoned unacked.
            tracing::Span::current().record("outcome", "abandoned");
        }
    }

    fn context(&self, cancel: &CancellationToken) -> Context {
        Context::with_stats(cancel.clone(), self.stats.clone()).with_stopping(self.stopping.clone())
    }

    /// Releases the delivery for redelivery: its lease first (waiting out an extension in
    /// flight, so none lands after the release), then the message. A lease already lost is
    /// not ours to release.
    async fn give_back(&self, token: S::Token, lease: Option<LeaseGuard<S::Token>>) {
        if let Some(lease) = lease {
            if lease.state().is_lost() {
                return;
            }
            lease.release().await;
        }
        self.settler.release(token).await;
    }

    /// Settles from the outcome. The lease is kept until the ack is confirmed; for a retry it
    /// is released (waiting out an extension in flight) before the broker is told to hold the
    /// message back, so that no extension undoes the delay.
    async fn settle(
        &self,
        token: S::Token,
        delivery: &Delivery,
        outcome: Outcome,
        mut lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
    ) {
        let settled = match outcome {
            Outcome::Release => {
                self.give_back(token, lease).await;
                return;
            }
            Outcome::Ack => {
                self.counters
                    .succeeded
                    .fetch_add(1, AtomicOrdering::Relaxed);
                self.acks.push_held(token, lease).await;
                return;
            }
            Outcome::Retry { after, failure } => {
                self.counters.retried.fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!(crate::metrics::RETRIED).increment(1);
                tracing::info!(after = ?after, error = %failure, "retry");
                if let Some(lease) = lease.take() {
                    lease.release().await;
                }
                self.settler.retry(token, delivery, after, &failure).await
            }
            Outcome::DeadLetter(failure) => {
                self.counters
                    .dead_lettered
                    .fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!(crate::metrics::DEAD_LETTERED).increment(1);
                tracing::warn!(error = %failure, "dead-letter");
                let letter = DeadLetter::new(delivery, failure);
                self.dead_letter(token, delivery, &letter, cx).await
            }
        };
        match settled {
            Ok(Settled::Done) => {}
            Ok(Settled::AckOriginal(token)) => {
                self.acks.push_held(token, lease).await;
            }
            Err(SettleFailure { token, error }) => {
                self.counters
                    .settle_failures
                    .fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!(crate::metrics::SETTLE_FAILURES).increment(1);
                if error.is_lease_lost() {
                    tracing::warn!(error = %error, "settlement failed: the delivery is no longer ours");
                    return;
                }
                // Give it back after a pause, so that a failure that repeats (an unroutable
                // dead-letter queue, a broker alarm) does not become a hot redelivery loop. The
                // lease is still kept meanwhile.
                let pause = self
                    .backoff
                    .delay_with(delivery.attempt, 1.0)
                    .min(Duration::from_secs(30));
                tracing::warn!(error = %error, release_in = ?pause, "settlement failed; the delivery will be released for redelivery");
                tokio::select! {
                    _ = cx.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                self.give_back(token, lease).await;
            }
        }
    }
}

/// The messages whose refused dead letter was already logged at error: bounded, forgetting
/// everything once full (a message then logs again, which is harmless).
#[derive(Debug, Default)]
struct Refusals {
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Refusals {
    const CAPACITY: usize = 4096;

    /// Whether `delivery`'s message was not seen before (and remembers it).
    fn first_time(&self, delivery: &Delivery) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        delivery.origin.queue.hash(&mut h);
        match &delivery.message_id {
            Some(id) => id.hash(&mut h),
            None => {
                delivery.origin.partition.hash(&mut h);
                delivery.origin.offset.hash(&mut h);
                delivery.payload.hash(&mut h);
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= Self::CAPACITY {
            seen.clear();
        }
        seen.insert(h.finish())
    }
}
