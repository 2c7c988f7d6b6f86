//! The runner's settings: [`ConsumerConfig`] with its checks, the delivery modes and the
//! setters' overrides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::dedup::DedupConfig;
use crate::retry::RetryConfig;

use super::adaptive::AdaptiveConcurrency;
use super::kill_switch::KillSwitchConfig;
use super::lease::LeaseConfig;

/// When a delivery is acknowledged, as users know the modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// The longest one handler attempt may run; past it the attempt is dropped (its future
    /// is not polled again) and counts as a transient failure: retried with backoff, then
    /// dead-lettered. Off (`None`) by default. Applies to the handler alone, inside the
    /// layers.
    #[serde(with = "crate::config::duration::option")]
    pub handler_timeout: Option<Duration>,
    /// Lease keeping (brokers with visibility timeouts).
    pub lease: LeaseConfig,
    /// Deduplication (used when a store is given).
    pub dedup: DedupConfig,
    /// A header whose value is recorded as `correlation_id` in each delivery's span.
    pub correlation_header: Option<String>,
    /// What happens to a delivery whose dead-letter copy the broker refuses for good (too
    /// large even after shrinking, invalid): it is never acked either way.
    pub on_dead_letter_refused: OnRefused,
    /// The kill switch (a circuit breaker over the failure rate); off when `None`, the
    /// default. See [`KillSwitchConfig`].
    pub kill_switch: Option<KillSwitchConfig>,
    /// What [`Status::health`](crate::Status::health) counts as unhealthy.
    pub health: HealthConfig,
    /// How often the broker is asked for the backlog ([`Settle::backlog`](crate::Settle::backlog),
    /// the `ackstack_backlog` gauge); zero: never. Default 15 s.
    #[serde(with = "crate::config::duration")]
    pub backlog_interval: Duration,
    /// Adaptive concurrency: the limit moves between `min` and `max` with the handler's
    /// latency and transient-error rate, in place of the fixed `concurrency` (see
    /// [`AdaptiveConcurrency`]). Off (`None`) by default.
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
    /// Also records the OpenTelemetry messaging convention's metrics
    /// (`messaging.process.duration`, `messaging.client.consumed.messages`) beside the
    /// `ackstack_*` ones; see [`metrics`](crate::metrics#opentelemetry-names). Off by default.
    pub otel_metric_names: bool,
}

/// Health settings, [`ConsumerConfig::health`](crate::ConsumerConfig::health).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthConfig {
    /// How long the broker may stay unreachable (every receive failing) before
    /// [`Status::health`](crate::Status::health) says unhealthy rather than degraded
    /// (default 60 s).
    #[serde(with = "crate::config::duration")]
    pub unhealthy_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            unhealthy_after: Duration::from_secs(60),
        }
    }
}

/// What happens to a delivery whose dead-letter copy the broker refuses for good
/// ([`SettleError::Rejected`](crate::SettleError::Rejected)). Never an ack: the message stays
/// at the broker until an operator deals with it (`ackstack_dead_letters_refused_total`,
/// [`Status::dead_letters_refused`](crate::Status::dead_letters_refused), an error log line per message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
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
            handler_timeout: None,
            lease: LeaseConfig::default(),
            dedup: DedupConfig::default(),
            correlation_header: None,
            on_dead_letter_refused: OnRefused::Release,
            kill_switch: None,
            health: HealthConfig::default(),
            backlog_interval: Duration::from_secs(15),
            adaptive_concurrency: None,
            otel_metric_names: false,
        }
    }
}

impl ConsumerConfig {
    /// The most handlers that may run at once: `concurrency`, or adaptive concurrency's `max`.
    pub fn max_concurrency(&self) -> usize {
        self.adaptive_concurrency
            .map_or(self.concurrency, |adaptive| adaptive.max)
    }

    /// Checks the settings on their own (see also [`Consumer::validate`](crate::Consumer::validate), which knows whether
    /// a dedup store was given).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::ZeroConcurrency);
        }
        if self.receive_batch == 0 {
            return Err(ConfigError::ZeroReceiveBatch);
        }
        if let Some(problem) = self.adaptive_concurrency.and_then(|a| a.problem()) {
            return Err(ConfigError::AdaptiveConcurrency(problem));
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
        if self.handler_timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroHandlerTimeout);
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
        if let Some(problem) = self
            .kill_switch
            .as_ref()
            .and_then(KillSwitchConfig::problem)
        {
            return Err(ConfigError::KillSwitch(problem));
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
    /// `handler_timeout` is zero (leave it unset for no limit).
    #[error("handler_timeout must not be zero (leave it unset for no limit)")]
    ZeroHandlerTimeout,
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
    /// A kill-switch setting that cannot work (a zero window, cooldown, activation or
    /// probes, or a trip level outside (0, 1]).
    #[error("{0}")]
    KillSwitch(&'static str),
    /// The broker moves a message away itself after `deliveries` deliveries (SQS's redrive
    /// policy), which is not above `max_attempts`: it would pre-empt ackstack's retries.
    #[error(
        "the broker moves a message to its own dead-letter queue after {deliveries} deliveries \
         (SQS: the queue's redrive policy, maxReceiveCount), which is not above max_attempts \
         {max_attempts}, so it would take messages away before their retries are done: raise \
         maxReceiveCount above {max_attempts}, or lower max_attempts below {deliveries} (or \
         let ackstack lower it: SQS redrive: trust)"
    )]
    BrokerLimit {
        /// The broker's limit.
        deliveries: u32,
        /// `RetryConfig::max_attempts`.
        max_attempts: u32,
    },
    /// Effectively-once was asked for without a dedup store.
    #[error("effectively-once needs a dedup store: call .dedup(store, key)")]
    EffectivelyOnceWithoutStore,
    /// Adaptive concurrency settings that cannot work.
    #[error("{0}")]
    AdaptiveConcurrency(&'static str),
    /// A batch size of zero, or larger than the consumer's concurrency (a batch holds
    /// deliveries in flight, so it could never fill).
    #[error(
        "batch max_size {max_size} must be between 1 and concurrency {concurrency} (a batch \
         holds deliveries in flight, so it could never fill): raise concurrency, best to a \
         multiple of max_size so that the next batch fills while one runs"
    )]
    BatchSize {
        /// `BatchConfig::max_size`.
        max_size: usize,
        /// `ConsumerConfig::concurrency`.
        concurrency: usize,
    },
}

/// What the setters of [`Consumer`](crate::Consumer) changed, applied over its base config.
#[derive(Clone, Debug, Default)]
pub(super) struct Overrides {
    pub(super) concurrency: Option<usize>,
    pub(super) backoff: Option<Backoff>,
    pub(super) max_attempts: Option<u32>,
    pub(super) mode: Option<DeliveryMode>,
    pub(super) ordering: Option<KeyOrdering>,
    pub(super) shutdown_deadline: Option<Duration>,
    pub(super) handler_timeout: Option<Duration>,
}

impl Overrides {
    pub(super) fn apply(&self, mut config: ConsumerConfig) -> ConsumerConfig {
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
        if let Some(limit) = self.handler_timeout {
            config.handler_timeout = Some(limit);
        }
        config
    }
}
