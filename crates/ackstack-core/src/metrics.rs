//! Metric names and labels, recorded through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any `metrics` recorder (Prometheus, StatsD, ...) **before** a consumer starts to
//! collect them; with none installed, recording costs next to nothing. Every metric carries
//! the labels `consumer` (the name given to [`Consumer::name`](crate::Consumer::name), or the
//! source's), `broker` (`memory`, `rabbitmq`, `sqs`, `kafka`) and `queue` (queue or topic), so
//! two consumers in one process are told apart. Some carry one more: `outcome` (`ack`, `retry`,
//! `dead_letter`, `release`, `defer`) or `error_kind` (`transient`, `permanent`).
//!
//! The label sets are built once per consumer and queue when a run starts (or when a queue is
//! first seen), and the handles kept: recording a delivery's metrics allocates nothing.
//!
//! `acked` counts what the adapter accepted as acknowledged (RabbitMQ may still hold a tag back
//! for its next cumulative ack; Kafka commits on its next commit tick).
//!
//! | name | kind | extra label | meaning |
//! |---|---|---|---|
//! | `ackstack_received_total` | counter | | deliveries received |
//! | `ackstack_outcomes_total` | counter | `outcome` | deliveries by the outcome the handler stack decided |
//! | `ackstack_acked_total` | counter | | deliveries acked by the broker |
//! | `ackstack_retried_total` | counter | `error_kind` | deliveries settled for a later retry (in place or at the broker) |
//! | `ackstack_dead_lettered_total` | counter | `error_kind` | deliveries forwarded to the dead-letter destination |
//! | `ackstack_deduplicated_total` | counter | | deliveries acked without calling the handler (already done) |
//! | `ackstack_ack_failures_total` | counter | | acks the broker refused (the message will come back) |
//! | `ackstack_settle_failures_total` | counter | | retries or dead-letters the broker did not confirm |
//! | `ackstack_lease_extensions_total` | counter | | lease extensions made |
//! | `ackstack_lease_extension_failures_total` | counter | | lease extensions the broker refused or did not answer |
//! | `ackstack_leases_lost_total` | counter | | leases lost while a handler ran (work cancelled, not acked) |
//! | `ackstack_handler_panics_total` | counter | | handler panics caught (counted as transient failures) |
//! | `ackstack_handler_timeouts_total` | counter | | handler attempts cut off at `handler_timeout` (counted as transient failures) |
//! | `ackstack_deferred_total` | counter | | deferrals the handler asked for (`HandlerError::defer`; in place or at the broker; not attempts) |
//! | `ackstack_abandoned_total` | counter | | deliveries left unacked at the shutdown deadline |
//! | `ackstack_dedup_held_total` | counter | | deliveries held in process because the dedup store was unreachable or their key busy (not counted as attempts) |
//! | `ackstack_dedup_keyless_total` | counter | | deliveries without a (non-empty) dedup key, processed without deduplication |
//! | `ackstack_store_errors_total` | counter | | dedup store calls that failed (the store is unreachable or erring) |
//! | `ackstack_dead_letters_refused_total` | counter | | dead-letter copies the broker refused for good (too large, invalid); the message is kept unacked |
//! | `ackstack_receive_errors_total` | counter | | receive calls that failed (the broker is unreachable or refusing) |
//! | `ackstack_in_flight` | gauge | | deliveries being processed now |
//! | `ackstack_concurrency_limit` | gauge | | the limit adaptive concurrency decided ([`ConsumerConfig::adaptive_concurrency`](crate::ConsumerConfig::adaptive_concurrency)); not set when concurrency is fixed |
//! | `ackstack_consumer_state` | gauge | `state` | 1 for the state the consumer is in (`running`, `paused`, `circuit_open`, `half_open`), 0 for the others |
//! | `ackstack_circuit_trips_total` | counter | | times the kill switch opened |
//! | `ackstack_handler_seconds` | histogram | `outcome` | time the processing stack took to decide: the handler, its retries in place, waits for the dedup store |
//! | `ackstack_queue_seconds` | histogram | | how long each delivery waited, from when the broker says it was produced ([`Delivery::produced_at`](crate::Delivery::produced_at)) to the start of its handling; RabbitMQ only when publishers set the `timestamp` property |
//! | `ackstack_batch_size` | histogram | | deliveries per call of a batch handler ([`Consumer::run_batches_until`](crate::Consumer::run_batches_until)) |
//! | `ackstack_backlog` | gauge | | messages waiting at the broker (RabbitMQ ready messages, SQS `ApproximateNumberOfMessages`, Kafka total lag), asked every `backlog_interval` |
//! | `ackstack_partition_lag` | gauge | `partition` | a Kafka partition's lag: high watermark minus the position this member can commit (before it has one, the committed offset) |
//!
//! [`HISTOGRAM_BUCKETS`] lists the buckets to give a Prometheus recorder for each histogram.
//!
//! # OpenTelemetry names
//!
//! With [`ConsumerConfig::otel_metric_names`](crate::ConsumerConfig::otel_metric_names) set,
//! two metrics of the OpenTelemetry messaging semantic conventions are recorded beside the
//! `ackstack_*` ones, with the attributes `messaging.system` (`rabbitmq`, `aws_sqs`, `kafka`,
//! `nats`, `redis`, `memory`), `messaging.destination.name` (the queue, topic or stream),
//! `messaging.consumer.group.name` (the consumer's name) and `messaging.operation.name`
//! (`process`, `receive`):
//!
//! | name | kind | extra attribute | meaning |
//! |---|---|---|---|
//! | `messaging.client.consumed.messages` | counter | | deliveries received |
//! | `messaging.process.duration` | histogram | `error.type` (`transient`, `permanent`) when the attempt failed | seconds the processing stack took, as `ackstack_handler_seconds` |

use std::sync::{Arc, PoisonError, RwLock};

use metrics::{Counter, Gauge, Histogram, Label};

use crate::delivery::Origin;
use crate::error::ErrorKind;
use crate::outcome::Outcome;
use crate::runner::ConsumerState;

/// Deliveries received.
pub const RECEIVED: &str = "ackstack_received_total";
/// Deliveries by outcome (label `outcome`).
pub const OUTCOMES: &str = "ackstack_outcomes_total";
/// Deliveries acked by the broker.
pub const ACKED: &str = "ackstack_acked_total";
/// Deliveries settled for a later retry (label `error_kind`).
pub const RETRIED: &str = "ackstack_retried_total";
/// Deliveries forwarded to the dead-letter destination (label `error_kind`).
pub const DEAD_LETTERED: &str = "ackstack_dead_lettered_total";
/// Deliveries acked without calling the handler because their key was already done.
pub const DEDUPLICATED: &str = "ackstack_deduplicated_total";
/// Acks the broker refused.
pub const ACK_FAILURES: &str = "ackstack_ack_failures_total";
/// Retries or dead-letters the broker did not confirm.
pub const SETTLE_FAILURES: &str = "ackstack_settle_failures_total";
/// Lease extensions made.
pub const LEASE_EXTENSIONS: &str = "ackstack_lease_extensions_total";
/// Lease extensions that failed.
pub const LEASE_EXTENSION_FAILURES: &str = "ackstack_lease_extension_failures_total";
/// Leases lost while a handler ran.
pub const LEASES_LOST: &str = "ackstack_leases_lost_total";
/// Handler panics caught.
pub const HANDLER_PANICS: &str = "ackstack_handler_panics_total";
/// Handler attempts cut off at `handler_timeout`.
pub const HANDLER_TIMEOUTS: &str = "ackstack_handler_timeouts_total";
/// Deferrals the handler asked for (not counted as attempts).
pub const DEFERRED: &str = "ackstack_deferred_total";
/// Deliveries left unacked at the shutdown deadline.
pub const ABANDONED: &str = "ackstack_abandoned_total";
/// Deliveries being processed now.
pub const IN_FLIGHT: &str = "ackstack_in_flight";
/// The adaptive concurrency limit.
pub const CONCURRENCY_LIMIT: &str = "ackstack_concurrency_limit";
/// Handler latency in seconds (label `outcome`).
pub const HANDLER_SECONDS: &str = "ackstack_handler_seconds";
/// Deliveries held in process while the dedup store was unreachable or their key busy.
pub const DEDUP_HELD: &str = "ackstack_dedup_held_total";
/// Deliveries without a non-empty dedup key (not deduplicated).
pub const DEDUP_KEYLESS: &str = "ackstack_dedup_keyless_total";
/// Dedup store calls that failed.
pub const STORE_ERRORS: &str = "ackstack_store_errors_total";
/// Dead-letter copies the broker refused for good.
pub const DEAD_LETTERS_REFUSED: &str = "ackstack_dead_letters_refused_total";
/// Receive calls that failed.
pub const RECEIVE_ERRORS: &str = "ackstack_receive_errors_total";
/// The consumer's state, one gauge per `state` label value (1 for the current one).
pub const CONSUMER_STATE: &str = "ackstack_consumer_state";
/// Times the kill switch opened.
pub const CIRCUIT_TRIPS: &str = "ackstack_circuit_trips_total";
/// Seconds from a delivery's production to the start of its handling.
pub const QUEUE_SECONDS: &str = "ackstack_queue_seconds";
/// Deliveries per call of a batch handler.
pub const BATCH_SIZE: &str = "ackstack_batch_size";
/// Messages waiting at the broker.
pub const BACKLOG: &str = "ackstack_backlog";
/// A partition's lag (label `partition`).
pub const PARTITION_LAG: &str = "ackstack_partition_lag";

/// Every metric name above, for exporters and tests that check dashboards against the code.
pub const ALL: &[&str] = &[
    RECEIVED,
    OUTCOMES,
    ACKED,
    RETRIED,
    DEAD_LETTERED,
    DEDUPLICATED,
    ACK_FAILURES,
    SETTLE_FAILURES,
    LEASE_EXTENSIONS,
    LEASE_EXTENSION_FAILURES,
    LEASES_LOST,
    HANDLER_PANICS,
    HANDLER_TIMEOUTS,
    DEFERRED,
    ABANDONED,
    IN_FLIGHT,
    CONCURRENCY_LIMIT,
    HANDLER_SECONDS,
    QUEUE_SECONDS,
    BATCH_SIZE,
    DEDUP_HELD,
    DEDUP_KEYLESS,
    STORE_ERRORS,
    DEAD_LETTERS_REFUSED,
    RECEIVE_ERRORS,
    CONSUMER_STATE,
    CIRCUIT_TRIPS,
    BACKLOG,
    PARTITION_LAG,
];

/// Bucket bounds (seconds) for [`HANDLER_SECONDS`]: 1 ms to 60 s, about three per decade.
pub const HANDLER_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds (seconds) for [`QUEUE_SECONDS`]: 10 ms to 6 hours (a backlog's wait).
pub const QUEUE_SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 21600.0,
];

/// Bucket bounds for [`BATCH_SIZE`]: 1 to 1,000 deliveries.
pub const BATCH_SIZE_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Each histogram with its bucket bounds, for a recorder that needs them (a Prometheus
/// exporter without them shows a histogram as a summary, which has no buckets to alert on):
///
/// ```
/// let names: Vec<&str> = ackstack_core::metrics::HISTOGRAM_BUCKETS.iter().map(|(n, _)| *n).collect();
/// assert_eq!(names, ["ackstack_handler_seconds", "ackstack_queue_seconds", "ackstack_batch_size"]);
/// ```
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (HANDLER_SECONDS, HANDLER_SECONDS_BUCKETS),
    (QUEUE_SECONDS, QUEUE_SECONDS_BUCKETS),
    (BATCH_SIZE, BATCH_SIZE_BUCKETS),
];

/// The OpenTelemetry messaging convention's counter of received messages.
pub const OTEL_CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
/// The OpenTelemetry messaging convention's histogram of processing time.
pub const OTEL_PROCESS_DURATION: &str = "messaging.process.duration";

/// The outcomes in label order; [`outcome_index`] maps an [`Outcome`] into it.
const OUTCOME_LABELS: [&str; 5] = ["ack", "retry", "dead_letter", "release", "defer"];
const ERROR_KIND_LABELS: [&str; 2] = ["transient", "permanent"];
const STATE_LABELS: [&str; 4] = ["running", "paused", "circuit_open", "half_open"];

fn outcome_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Ack => 0,
        Outcome::Retry { .. } => 1,
        Outcome::DeadLetter(_) => 2,
        Outcome::Release => 3,
        Outcome::Defer { .. } => 4,
    }
}

fn kind_index(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::Transient => 0,
        ErrorKind::Permanent => 1,
    }
}

fn state_index(state: ConsumerState) -> usize {
    match state {
        ConsumerState::Running => 0,
        ConsumerState::Paused => 1,
        ConsumerState::CircuitOpen => 2,
        ConsumerState::HalfOpen => 3,
    }
}

/// The handles of one consumer reading one queue, registered with the recorder installed when
/// they were made.
#[derive(Debug)]
pub(crate) struct Metrics {
    broker: &'static str,
    queue: Arc<str>,
    /// The labels every handle carries, for the per-partition gauges made later.
    base: Vec<Label>,
    received: Counter,
    outcomes: [Counter; 5],
    pub(crate) acked: Counter,
    retried: [Counter; 2],
    dead_lettered: [Counter; 2],
    pub(crate) deduplicated: Counter,
    pub(crate) ack_failures: Counter,
    pub(crate) settle_failures: Counter,
    pub(crate) lease_extensions: Counter,
    pub(crate) lease_extension_failures: Counter,
    pub(crate) leases_lost: Counter,
    pub(crate) handler_panics: Counter,
    pub(crate) handler_timeouts: Counter,
    pub(crate) deferred: Counter,
    pub(crate) abandoned: Counter,
    pub(crate) dedup_held: Counter,
    pub(crate) dedup_keyless: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) dead_letters_refused: Counter,
    pub(crate) receive_errors: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) concurrency_limit: Gauge,
    state: [Gauge; 4],
    pub(crate) circuit_trips: Counter,
    handler_seconds: [Histogram; 5],
    pub(crate) batch_size: Histogram,
    queue_seconds: Histogram,
    /// The OpenTelemetry-named handles, when asked for.
    otel: Option<OtelNames>,
    pub(crate) backlog: Gauge,
}

impl Metrics {
    /// Registers every handle for `consumer` reading `queue` on `broker`.
    pub(crate) fn new(
        consumer: Arc<str>,
        broker: &'static str,
        queue: Arc<str>,
        otel: bool,
    ) -> Self {
        let otel = otel.then(|| OtelNames::new(&consumer, broker, &queue));
        let base = vec![
            Label::new("consumer", consumer.to_string()),
            Label::new("broker", broker),
            Label::new("queue", queue.to_string()),
        ];
        let with = |name: &'static str, value: &'static str| {
            let mut labels = base.clone();
            labels.push(Label::new(name, value));
            labels
        };
        let counter = |name: &'static str| metrics::counter!(name, base.clone());
        let by_outcome = |name: &'static str| {
            OUTCOME_LABELS.map(|o| metrics::counter!(name, with("outcome", o)))
        };
        let by_kind = |name: &'static str| {
            ERROR_KIND_LABELS.map(|k| metrics::counter!(name, with("error_kind", k)))
        };
        Metrics {
            received: counter(RECEIVED),
            outcomes: by_outcome(OUTCOMES),
            acked: counter(ACKED),
            retried: by_kind(RETRIED),
            dead_lettered: by_kind(DEAD_LETTERED),
            deduplicated: counter(DEDUPLICATED),
            ack_failures: counter(ACK_FAILURES),
            settle_failures: counter(SETTLE_FAILURES),
            lease_extensions: counter(LEASE_EXTENSIONS),
            lease_extension_failures: counter(LEASE_EXTENSION_FAILURES),
            leases_lost: counter(LEASES_LOST),
            handler_panics: counter(HANDLER_PANICS),
            handler_timeouts: counter(HANDLER_TIMEOUTS),
            deferred: counter(DEFERRED),
            abandoned: counter(ABANDONED),
            dedup_held: counter(DEDUP_HELD),
            dedup_keyless: counter(DEDUP_KEYLESS),
            store_errors: counter(STORE_ERRORS),
            dead_letters_refused: counter(DEAD_LETTERS_REFUSED),
            receive_errors: counter(RECEIVE_ERRORS),
            in_flight: metrics::gauge!(IN_FLIGHT, base.clone()),
            concurrency_limit: metrics::gauge!(CONCURRENCY_LIMIT, base.clone()),
            state: STATE_LABELS.map(|s| metrics::gauge!(CONSUMER_STATE, with("state", s))),
            circuit_trips: counter(CIRCUIT_TRIPS),
            handler_seconds: OUTCOME_LABELS
                .map(|o| metrics::histogram!(HANDLER_SECONDS, with("outcome", o))),
            batch_size: metrics::histogram!(BATCH_SIZE, base.clone()),
            queue_seconds: metrics::histogram!(QUEUE_SECONDS, base.clone()),
            otel,
            backlog: metrics::gauge!(BACKLOG, base.clone()),
            broker,
            queue,
            base,
        }
    }

    /// The lag gauge of one partition (registered on each call: keep it).
    pub(crate) fn partition_lag(&self, partition: i32) -> Gauge {
        let mut labels = self.base.clone();
        labels.push(Label::new("partition", partition.to_string()));
        metrics::gauge!(PARTITION_LAG, labels)
    }

    /// Handles registered with no recorder: they record nothing.
    pub(crate) fn detached() -> Self {
        metrics::with_local_recorder(&metrics::NoopRecorder, || {
            Metrics::new("".into(), "", "".into(), false)
        })
    }

    fn is(&self, broker: &str, queue: &str) -> bool {
        self.broker == broker && *self.queue == *queue
    }

    /// Counts the outcome the stack decided for a delivery and how long it took.
    pub(crate) fn outcome(&self, outcome: &Outcome, seconds: Option<f64>) {
        let i = outcome_index(outcome);
        self.outcomes[i].increment(1);
        if let Some(seconds) = seconds {
            self.handler_seconds[i].record(seconds);
            if let Some(otel) = &self.otel {
                let error = match outcome {
                    Outcome::Retry { failure, .. } | Outcome::DeadLetter(failure) => {
                        1 + kind_index(failure.kind)
                    }
                    _ => 0,
                };
                otel.process_duration[error].record(seconds);
            }
        }
    }

    /// Counts a received delivery.
    pub(crate) fn received(&self) {
        self.received.increment(1);
        if let Some(otel) = &self.otel {
            otel.consumed.increment(1);
        }
    }

    /// Records how long a delivery produced at `produced_at` waited before its handling
    /// starts now (zero where the producer's clock is ahead).
    pub(crate) fn queue_time(&self, produced_at: std::time::SystemTime) {
        let waited = std::time::SystemTime::now()
            .duration_since(produced_at)
            .unwrap_or_default();
        self.queue_seconds.record(waited.as_secs_f64());
    }

    /// Counts a retry of a failure of this kind.
    pub(crate) fn retried(&self, kind: ErrorKind) {
        self.retried[kind_index(kind)].increment(1);
    }

    /// Counts a dead letter of a failure of this kind.
    pub(crate) fn dead_lettered(&self, kind: ErrorKind) {
        self.dead_lettered[kind_index(kind)].increment(1);
    }

    /// Shows `state` as the current one.
    pub(crate) fn state(&self, state: ConsumerState) {
        let current = state_index(state);
        for (i, gauge) in self.state.iter().enumerate() {
            gauge.set(if i == current { 1.0 } else { 0.0 });
        }
    }
}

/// The handles named by the OpenTelemetry messaging semantic conventions.
#[derive(Debug)]
struct OtelNames {
    consumed: Counter,
    /// Without `error.type`, then with `transient` and `permanent`.
    process_duration: [Histogram; 3],
}

impl OtelNames {
    fn new(consumer: &str, broker: &'static str, queue: &str) -> Self {
        let system = match broker {
            "sqs" => "aws_sqs",
            "redis-streams" => "redis",
            other => other,
        };
        let base = vec![
            Label::new("messaging.system", system),
            Label::new("messaging.destination.name", queue.to_string()),
            Label::new("messaging.consumer.group.name", consumer.to_string()),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut labels = base.clone();
            labels.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            labels
        };
        let process = |error: Option<&'static str>| {
            let mut extra = vec![("messaging.operation.name", "process")];
            extra.extend(error.map(|e| ("error.type", e)));
            metrics::histogram!(OTEL_PROCESS_DURATION, with(&extra))
        };
        OtelNames {
            consumed: metrics::counter!(
                OTEL_CONSUMED_MESSAGES,
                with(&[("messaging.operation.name", "receive")])
            ),
            process_duration: [
                process(None),
                process(Some(ERROR_KIND_LABELS[0])),
                process(Some(ERROR_KIND_LABELS[1])),
            ],
        }
    }
}

/// Handles that record nothing, for a context outside any consumer.
pub(crate) fn unregistered() -> &'static Metrics {
    static NOOP: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    NOOP.get_or_init(Metrics::detached)
}

/// A run's label sets: one per queue its deliveries come from (one, unless a Kafka consumer
/// reads several topics), and the consumer's own for what belongs to no single delivery.
#[derive(Debug)]
pub(crate) struct MetricSets {
    /// The `consumer` label: the name given to the consumer, or else the source's (not the
    /// deliveries': a broker may name each connection anew).
    consumer: Arc<str>,
    own: Arc<Metrics>,
    queues: RwLock<Vec<Arc<Metrics>>>,
    /// Whether the OpenTelemetry names are recorded too.
    otel: bool,
}

impl MetricSets {
    /// The sets of a run over `source` (its origin: broker, queue, consumer), named `name`.
    /// With `otel`, the OpenTelemetry names are recorded too.
    pub(crate) fn new(source: &Origin, name: Option<Arc<str>>, otel: bool) -> Self {
        let consumer = name.unwrap_or_else(|| source.consumer.clone());
        let own = Arc::new(Metrics::new(
            consumer.clone(),
            source.broker,
            source.queue.clone(),
            otel,
        ));
        MetricSets {
            consumer,
            queues: RwLock::new(vec![own.clone()]),
            own,
            otel,
        }
    }

    /// The set for what belongs to the consumer as a whole: acks, leases, state, receive errors.
    pub(crate) fn own(&self) -> &Arc<Metrics> {
        &self.own
    }

    /// The set for a delivery from `origin` (made the first time its queue is seen).
    pub(crate) fn of(&self, origin: &Origin) -> Arc<Metrics> {
        let found = |sets: &[Arc<Metrics>]| {
            sets.iter()
                .find(|m| m.is(origin.broker, &origin.queue))
                .cloned()
        };
        if let Some(m) = found(&self.queues.read().unwrap_or_else(PoisonError::into_inner)) {
            return m;
        }
        let mut sets = self.queues.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = found(&sets) {
            return m;
        }
        let m = Arc::new(Metrics::new(
            self.consumer.clone(),
            origin.broker,
            origin.queue.clone(),
            self.otel,
        ));
        sets.push(m.clone());
        m
    }
}
