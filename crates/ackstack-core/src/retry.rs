//! The retry layer: turns transient failures into broker-delayed retries with exponential
//! backoff, until the attempt limit; then dead-letters.
//!
//! | inner outcome | attempt < max | attempt >= max |
//! |---|---|---|
//! | `Ack` | `Ack` | `Ack` |
//! | `Retry` (transient failure) | `Retry { after: backoff.delay(attempt) }` | `DeadLetter` |
//! | `DeadLetter` (permanent failure) | `DeadLetter` | `DeadLetter` |
//!
//! The attempt number comes from the broker, so the limit holds across restarts. An optional
//! immediate tier re-runs the handler in process a few times before falling back to the
//! broker: a message then gets at most `max_attempts * (1 + immediate)` handler calls.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::delivery::Delivery;
use crate::handler::{Context, Layer, Process};
use crate::outcome::Outcome;

/// Retry configuration: the backoff policy and the optional immediate tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Broker-level backoff and the attempt limit.
    #[serde(flatten)]
    pub backoff: Backoff,
    /// In-process retries right after a transient failure, before a broker-level retry.
    pub immediate: u32,
    /// The pause between immediate retries.
    #[serde(with = "crate::config::duration")]
    pub immediate_delay: Duration,
}

/// Applies a [`RetryConfig`]; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer {
    config: RetryConfig,
}

impl RetryLayer {
    /// A retry layer with `backoff` and no immediate tier.
    pub fn new(backoff: Backoff) -> Self {
        RetryLayer {
            config: RetryConfig {
                backoff,
                ..RetryConfig::default()
            },
        }
    }

    /// A retry layer from a full config.
    pub fn from_config(config: RetryConfig) -> Self {
        RetryLayer { config }
    }

    /// With `n` immediate in-process retries `delay` apart before each broker-level retry.
    pub fn immediate(mut self, n: u32, delay: Duration) -> Self {
        self.config.immediate = n;
        self.config.immediate_delay = delay;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }
}

impl<P: Process> Layer<P> for RetryLayer {
    type Process = Retry<P>;
    fn layer(&self, inner: P) -> Retry<P> {
        Retry {
            inner,
            config: self.config,
        }
    }
}

/// The process a [`RetryLayer`] makes.
#[derive(Clone, Debug)]
pub struct Retry<P> {
    inner: P,
    config: RetryConfig,
}

impl<P: Process> Process for Retry<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let mut outcome = self.inner.process(delivery, cx).await;
        let mut immediate = 0;
        while matches!(outcome, Outcome::Retry { .. })
            && immediate < self.config.immediate
            && !cx.is_cancelled()
        {
            immediate += 1;
            tokio::time::sleep(self.config.immediate_delay).await;
            outcome = self.inner.process(delivery, cx).await;
        }
        decide(&self.config.backoff, delivery.attempt, outcome)
    }
}

/// What the retry policy makes of `outcome` on attempt `attempt`.
pub fn decide(backoff: &Backoff, attempt: u32, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Retry { failure, .. } if backoff.allows_retry_after(attempt) => Outcome::Retry {
            after: backoff.delay(attempt),
            failure,
        },
        Outcome::Retry { failure, .. } => Outcome::DeadLetter(failure),
        other => other,
    }
}
