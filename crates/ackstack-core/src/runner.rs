//! The runner: receives, processes with bounded concurrency, settles, and shuts down cleanly.

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

use crate::acker::{AckQueue, BatchAcker};
use crate::backoff::Backoff;
use crate::deadletter::DeadLetter;
use crate::dedup::{DedupConfig, DedupKey, DedupLayer, DedupStore};
use crate::delivery::Delivery;
use crate::error::{ErrorKind, Failure, SourceError};
use crate::handler::{
    Classifier, Context, Handler, Identity, Layer, Process, RunStats, Stack, Terminal,
};
use crate::lease::{LeaseConfig, LeaseGuard, LeaseKeeper};
use crate::ordering::{KeyGate, Turn};
use crate::outcome::Outcome;
use crate::retry::{RetryConfig, RetryLayer};
use crate::source::{Received, Settle, SettleFailure, Settled, Source};

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
            ordering: KeyOrdering::None,
            retry: RetryConfig::default(),
            lease: LeaseConfig::default(),
            dedup: DedupConfig::default(),
            correlation_header: None,
        }
    }
}

/// The consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The source failed in a way receiving again cannot fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The configuration is inconsistent.
    #[error("invalid consumer configuration: {0}")]
    Config(String),
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
}

impl Default for Status {
    fn default() -> Self {
        Status {
            inner: Arc::new(StatusInner {
                started: Instant::now(),
                received: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                last_activity_ms: AtomicU64::new(0),
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

/// Called with each delivery and its outcome, before it is settled; see [`Consumer::inspect`].
pub type Inspector = Arc<dyn Fn(&Delivery, &Outcome) + Send + Sync>;

/// A consumer: a source, a handler stack and the settings that drive them.
///
/// The processing stack is fixed: `dedup → retry → your layers → handler`. Deduplication is
/// outermost so that it sees the final outcome (mark done on ack, release on anything else);
/// retry decides delays and the attempt limit from the handler's result; your layers wrap the
/// handler itself.
pub struct Consumer<S, L = Identity> {
    source: S,
    layers: L,
    config: ConsumerConfig,
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
            dedup: None,
            classifier: None,
            name: None,
            inspector: None,
            status: Status::default(),
        }
    }
}

impl<S: Source, L> Consumer<S, L> {
    /// Replaces the whole config.
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// Runs at most `n` handlers at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Retries transient failures with `backoff`, dead-lettering after its attempt limit.
    pub fn retry(mut self, backoff: Backoff) -> Self {
        self.config.retry.backoff = backoff;
        self
    }

    /// Deduplicates deliveries by `key` in `store`.
    pub fn dedup(self, store: impl DedupStore, key: DedupKey) -> Self {
        self.dedup_shared(Arc::new(store), key)
    }

    /// Deduplicates deliveries by `key` in a shared `store`.
    pub fn dedup_shared(mut self, store: Arc<dyn DedupStore>, key: DedupKey) -> Self {
        self.dedup = Some((store, key));
        if self.config.mode == DeliveryMode::AtLeastOnce {
            self.config.mode = DeliveryMode::EffectivelyOnce;
        }
        self
    }

    /// Acknowledges in this mode.
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// Processes deliveries sharing a key in order.
    pub fn ordering(mut self, ordering: KeyOrdering) -> Self {
        self.config.ordering = ordering;
        self
    }

    /// Waits at most `deadline` for in-flight handlers at shutdown.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.config.shutdown_deadline = deadline;
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
        let cfg = self.config.clone();
        if cfg.concurrency == 0 {
            return Err(ConsumerError::Config(
                "concurrency must be at least 1".into(),
            ));
        }
        if cfg.mode == DeliveryMode::EffectivelyOnce && self.dedup.is_none() {
            return Err(ConsumerError::Config(
                "effectively-once needs a dedup store: call .dedup(store, key)".into(),
            ));
        }
        let caps = self.source.capabilities();
        let settler = self.source.settler();
        let terminal =
            Terminal::new(handler, cfg.retry.backoff.base).classify(self.classifier.clone());
        let dedup = self
            .dedup
            .take()
            .map(|(store, key)| DedupLayer::shared(store, key).config(cfg.dedup));
        let stack =
            dedup.layer(RetryLayer::from_config(cfg.retry).layer(self.layers.layer(terminal)));
        let per_key = match cfg.ordering {
            KeyOrdering::PerKey => true,
            KeyOrdering::None => false,
            KeyOrdering::Auto => !caps.broker_delay,
        };
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
            max_retry_delay: caps.max_retry_delay,
            in_place: !caps.broker_delay || per_key,
            mode: cfg.mode,
            counters: Counters::default(),
            stats: Arc::new(RunStats::default()),
            correlation_header: cfg.correlation_header.clone(),
            name: self.name.clone(),
            inspector: self.inspector.clone(),
            backoff: cfg.retry.backoff,
            release_redelivers: caps.broker_delay,
            status: self.status.clone(),
        });
        let gate = per_key.then(KeyGate::new);
        let hard_stop = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(cfg.concurrency));
        let receive_batch = cfg.receive_batch.max(1);
        let reconnect = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10));
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
                    consecutive_errors = 0;
                    batch
                }
                Err(err) if err.is_fatal() => break Err(ConsumerError::Source(err)),
                Err(err) => {
                    receive_errors += 1;
                    consecutive_errors = consecutive_errors.saturating_add(1);
                    let wait =
                        reconnect.delay_with(consecutive_errors, 0.5 + rand::random::<f64>() / 2.0);
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
            return Err(ConsumerError::Config(
                "internal: tasks outlived shutdown".into(),
            ));
        };
        let Shared {
            settler,
            acks,
            counters,
            stats,
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
            retried: counters.retried.into_inner(),
            dead_lettered: counters.dead_lettered.into_inner(),
            deduplicated: stats.deduplicated.load(AtomicOrdering::Relaxed),
            ack_failures: ack_stats.failed.load(AtomicOrdering::Relaxed),
            settle_failures: counters.settle_failures.into_inner(),
            leases_lost: counters.leases_lost.into_inner(),
            abandoned,
            receive_errors,
        })
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
    max_retry_delay: Duration,
    in_place: bool,
    mode: DeliveryMode,
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
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30));
        let mut tries = 0;
        loop {
            match self.settler.dead_letter(token, delivery, letter).await {
                Err(failure)
                    if !self.release_redelivers
                        && !failure.error.is_lease_lost()
                        && !cx.is_cancelled() =>
                {
                    tries += 1;
                    let wait = backoff.delay_with(tries, 0.5 + rand::random::<f64>() / 2.0);
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

    /// Runs the processing stack. A panic anywhere in it (a layer, a key extractor, a
    /// classifier; the handler's own panics are caught closer to it) is a transient failure.
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        use futures::FutureExt;
        match std::panic::AssertUnwindSafe(self.stack.process(delivery, cx))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                metrics::counter!(crate::metrics::HANDLER_PANICS).increment(1);
                Outcome::Retry {
                    after: self.backoff.delay(delivery.attempt),
                    failure: Failure::new(ErrorKind::Transient, "a layer panicked"),
                }
            }
        }
    }

    /// Calls the inspector, if any; its panics are logged, never propagated.
    fn inspect(&self, delivery: &Delivery, outcome: &Outcome) {
        if let Some(inspect) = &self.inspector
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inspect(delivery, outcome)))
                .is_err()
        {
            tracing::error!("the outcome inspector panicked");
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
                turn.wait().await;
            }
            let cx = self.context(&cancel);
            if self.mode == DeliveryMode::AtMostOnce {
                // Acked on receipt: the lease no longer matters.
                drop(lease.take());
                self.acks.push(token).await;
                let outcome = self.process(&delivery, &cx).await;
                tracing::Span::current().record("outcome", outcome.as_str());
                if outcome == Outcome::Ack {
                    self.counters
                        .succeeded
                        .fetch_add(1, AtomicOrdering::Relaxed);
                }
                return;
            }
            let started = Instant::now();
            let mut outcome = self.process(&delivery, &cx).await;
            while self.in_place && !cx.is_cancelled() {
                let Outcome::Retry { after, failure } = &outcome else {
                    break;
                };
                tracing::info!(after = ?after, error = %failure, "retrying in place");
                self.inspect(&delivery, &outcome);
                self.counters.retried.fetch_add(1, AtomicOrdering::Relaxed);
                metrics::counter!(crate::metrics::RETRIED).increment(1);
                tokio::select! {
                    _ = cx.cancelled() => break,
                    _ = tokio::time::sleep(*after) => {}
                }
                delivery.attempt = delivery.attempt.saturating_add(1);
                outcome = self.process(&delivery, &cx).await;
            }
            metrics::histogram!(crate::metrics::HANDLER_SECONDS)
                .record(started.elapsed().as_secs_f64());
            if lease.as_ref().is_some_and(|l| l.state().is_lost()) {
                // Not ours any more: the broker redelivers it. Never ack, never release.
                tracing::Span::current().record("outcome", "lease_lost");
                self.counters
                    .leases_lost
                    .fetch_add(1, AtomicOrdering::Relaxed);
                return;
            }
            if cx.is_cancelled() {
                // The shutdown deadline passed: abandoned unacked.
                tracing::Span::current().record("outcome", "abandoned");
                return;
            }
            tracing::Span::current().record("outcome", outcome.as_str());
            self.inspect(&delivery, &outcome);
            self.settle(token, &delivery, outcome, lease, &cx).await;
        }
        .instrument(span)
        .await
    }

    fn context(&self, cancel: &CancellationToken) -> Context {
        Context::with_stats(cancel.clone(), self.stats.clone())
    }

    /// Settles from the outcome. The lease is kept until the ack is confirmed (or, for a
    /// retry, dropped just before the broker is told to hold the message back, so that no
    /// extension undoes the delay).
    async fn settle(
        &self,
        token: S::Token,
        delivery: &Delivery,
        outcome: Outcome,
        mut lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
    ) {
        let settled = match outcome {
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
                let after = after.min(self.max_retry_delay);
                tracing::info!(after = ?after, error = %failure, "retry");
                drop(lease.take());
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
                self.settler.release(token).await;
                drop(lease);
            }
        }
    }
}
