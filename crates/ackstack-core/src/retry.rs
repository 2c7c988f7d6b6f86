//! The retry layer: the one place where a failed attempt becomes a retry or a dead letter.
//!
//! It is the outermost step of the processing stack, so it sees every failure: a handler's
//! error, a panic anywhere inside it (a user layer, the dedup layer, a [`DedupKey::Func`]
//! extractor, the handler), and a classifier's verdict. Per attempt:
//!
//! | inner outcome | attempt < max_attempts | attempt >= max_attempts |
//! |---|---|---|
//! | `Ack` | `Ack` | `Ack` |
//! | `Retry` (transient failure, or a panic) | retry after `backoff.delay(attempt)` | `DeadLetter` |
//! | `DeadLetter` (permanent failure) | `DeadLetter` | `DeadLetter` |
//!
//! A retry happens at the broker (`Outcome::Retry` is returned and the runner settles it) or,
//! where the broker cannot delay a message or per-key ordering holds it, in place: the layer
//! waits out the delay itself, with the delivery's permit and lease kept, and runs the next
//! attempt with the attempt number counted up. [`Capabilities`](crate::Capabilities) decide
//! which. An optional immediate tier re-runs the handler in process a few times before each
//! retry, without counting attempts: a message then gets at most
//! `max_attempts * (1 + immediate)` handler calls.
//!
//! The attempt number comes from the broker, so the limit holds across restarts. The delay
//! is the backoff's, unless the handler asked for one ([`HandlerError::retry_after`], which
//! arrives as a non-zero `after` of the inner `Retry`): that delay, capped by the backoff's
//! cap. No other step below decides a delay.
//!
//! [`HandlerError::retry_after`]: crate::HandlerError::retry_after
//!
//! [`DedupKey::Func`]: crate::DedupKey::Func

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::delivery::Delivery;
use crate::error::{ErrorKind, Failure};
use crate::handler::{Context, Layer, Process};
use crate::outcome::Outcome;

/// The retry policy: the delay schedule, the attempt limit and the optional immediate tier.
///
/// In a config file its fields sit side by side (`base`, `factor`, `cap`, `jitter`,
/// `max_attempts`, `immediate`, `immediate_delay`, `defer_limit`); an unknown field is an
/// error.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RetryFields", into = "RetryFields")]
#[non_exhaustive]
pub struct RetryConfig {
    /// The delay schedule between attempts.
    pub backoff: Backoff,
    /// The most handler attempts a message gets; after the last one fails it is dead-lettered.
    pub max_attempts: u32,
    /// In-process retries right after a transient failure, before the next attempt.
    pub immediate: u32,
    /// The pause between immediate retries.
    pub immediate_delay: Duration,
    /// How long a message may be deferred in all ([`HandlerError::defer`]), counted from its
    /// first deferral: a deferral asked for later than that dead-letters it (reason
    /// `deferred`). Deferrals use no attempts, so this is what bounds them. Default 1 hour.
    ///
    /// [`HandlerError::defer`]: crate::HandlerError::defer
    pub defer_limit: Duration,
}

/// [`RetryConfig`] as it is written in config files: flat, with unknown fields refused (serde's
/// `flatten` cannot refuse them).
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RetryFields {
    #[serde(with = "crate::config::duration")]
    base: Duration,
    factor: f64,
    #[serde(with = "crate::config::duration")]
    cap: Duration,
    jitter: crate::backoff::Jitter,
    max_attempts: u32,
    immediate: u32,
    #[serde(with = "crate::config::duration")]
    immediate_delay: Duration,
    #[serde(with = "crate::config::duration")]
    defer_limit: Duration,
}

impl Default for RetryFields {
    fn default() -> Self {
        RetryConfig::default().into()
    }
}

impl From<RetryConfig> for RetryFields {
    fn from(c: RetryConfig) -> Self {
        RetryFields {
            base: c.backoff.base,
            factor: c.backoff.factor,
            cap: c.backoff.cap,
            jitter: c.backoff.jitter,
            max_attempts: c.max_attempts,
            immediate: c.immediate,
            immediate_delay: c.immediate_delay,
            defer_limit: c.defer_limit,
        }
    }
}

impl From<RetryFields> for RetryConfig {
    fn from(f: RetryFields) -> Self {
        RetryConfig {
            backoff: Backoff {
                base: f.base,
                factor: f.factor,
                cap: f.cap,
                jitter: f.jitter,
            },
            max_attempts: f.max_attempts,
            immediate: f.immediate,
            immediate_delay: f.immediate_delay,
            defer_limit: f.defer_limit,
        }
    }
}

impl Default for RetryConfig {
    /// The default [`Backoff`], 8 attempts, no immediate tier, deferrals for up to an hour.
    fn default() -> Self {
        RetryConfig {
            backoff: Backoff::default(),
            max_attempts: 8,
            immediate: 0,
            immediate_delay: Duration::ZERO,
            defer_limit: DEFAULT_DEFER_LIMIT,
        }
    }
}

/// [`RetryConfig::defer_limit`]'s default.
pub const DEFAULT_DEFER_LIMIT: Duration = Duration::from_secs(3600);

impl RetryConfig {
    /// Whether a message whose attempt `attempt` failed transiently may be tried again.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

/// Called with each retry the layer performs in place, before it waits: for the runner's
/// counts and the outcome inspector.
pub(crate) type OnInPlaceRetry = Arc<dyn Fn(&Delivery, &Outcome, &Context) + Send + Sync>;

/// Applies a [`RetryConfig`]; see the module docs.
#[derive(Clone, Default)]
pub struct RetryLayer {
    config: RetryConfig,
    in_place: bool,
    /// Whether the broker keeps a deferred message's attempt (`Capabilities::defers`).
    defers: bool,
    max_delay: Option<Duration>,
    on_in_place: Option<OnInPlaceRetry>,
    /// Whether each attempt passes the runner's attempt gate (the runner's own layer only).
    gated: bool,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.config)
            .field("in_place", &self.in_place)
            .field("max_delay", &self.max_delay)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A retry layer with `backoff`, the default attempt limit and no immediate tier.
    pub fn new(backoff: Backoff) -> Self {
        RetryLayer::from_config(RetryConfig {
            backoff,
            ..RetryConfig::default()
        })
    }

    /// A retry layer from a full config.
    pub fn from_config(config: RetryConfig) -> Self {
        RetryLayer {
            config,
            in_place: false,
            defers: false,
            max_delay: None,
            on_in_place: None,
            gated: false,
        }
    }

    /// With this attempt limit (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n.max(1);
        self
    }

    /// With deferrals allowed for `limit` in all (see [`RetryConfig::defer_limit`]).
    pub fn defer_limit(mut self, limit: Duration) -> Self {
        self.config.defer_limit = limit;
        self
    }

    /// With `n` immediate in-process retries `delay` apart before each retry.
    pub fn immediate(mut self, n: u32, delay: Duration) -> Self {
        self.config.immediate = n;
        self.config.immediate_delay = delay;
        self
    }

    /// Retries in place (the layer waits out each delay) instead of returning
    /// [`Outcome::Retry`] for the broker to delay.
    pub fn in_place(mut self, in_place: bool) -> Self {
        self.in_place = in_place;
        self
    }

    /// Passes deferrals on to the broker as deferrals (`Outcome::Defer`), for an adapter
    /// that keeps their attempt number ([`Capabilities::defers`](crate::Capabilities::defers)).
    /// Without it, and not in place, a deferral is a retry after the delay it asked for.
    pub fn defers(mut self, defers: bool) -> Self {
        self.defers = defers;
        self
    }

    /// Caps every delay at `max` (the longest delay the broker can honour).
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = Some(max);
        self
    }

    pub(crate) fn on_in_place_retry(mut self, f: Option<OnInPlaceRetry>) -> Self {
        self.on_in_place = f;
        self
    }

    /// Each attempt passes the runner's attempt gate (see `runner/gate.rs`).
    pub(crate) fn gated(mut self) -> Self {
        self.gated = true;
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
            layer: self.clone(),
        }
    }
}

/// The process a [`RetryLayer`] makes.
pub struct Retry<P> {
    inner: P,
    layer: RetryLayer,
}

impl<P> std::fmt::Debug for Retry<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<P: Process> Retry<P> {
    /// One run of the inner stack, through the attempt gate (where a suspect runs alone); a
    /// panic anywhere in it is a transient failure.
    async fn attempt(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let entered = if self.layer.gated {
            cx.enter_attempt().await
        } else {
            Ok(None)
        };
        let Ok(_entered) = entered else {
            // Not settled by the runner (the lease is lost or the deadline passed).
            return Outcome::Retry {
                after: Duration::ZERO,
                failure: Failure::new(ErrorKind::Transient, "cancelled while a suspect ran alone"),
            };
        };
        match std::panic::AssertUnwindSafe(self.inner.process(delivery, cx))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(panic) => {
                cx.metrics().handler_panics.increment(1);
                Outcome::Retry {
                    after: Duration::ZERO,
                    failure: Failure::new(
                        ErrorKind::Transient,
                        format!("panicked: {}", crate::error::panic_message(panic.as_ref())),
                    ),
                }
            }
        }
    }

    /// Decides a deferral: a dead letter past the defer limit, else the delay (capped by the
    /// time left and by the broker), settled by the broker or waited out here.
    fn defer(&self, after: Duration, mut failure: Failure, cx: &Context) -> Deferral {
        let limit = self.layer.config.defer_limit;
        if failure.attempt > self.layer.config.max_attempts {
            // Only where an adapter made an earlier deferral a retry (see `Settle::defer`): the
            // attempts ran out, which is what the letter says.
            failure.deferred_since = None;
            let why = format!(
                "deferred on attempt {}, past max_attempts ({})",
                failure.attempt, self.layer.config.max_attempts
            );
            return Deferral::ended(failure, &why);
        }
        let spent = failure
            .deferred_since
            .and_then(|since| crate::clock::now().duration_since(since).ok())
            .unwrap_or_default();
        if spent >= limit {
            let why = format!(
                "deferred by the handler for {spent:?} in all, longer than defer_limit ({limit:?})"
            );
            return Deferral::ended(failure, &why);
        }
        // Not sooner than the backoff's base: `defer(0)` must not be a hot loop.
        let mut after = after.max(self.layer.config.backoff.base).min(limit - spent);
        if let Some(max) = self.layer.max_delay {
            after = after.min(max);
        }
        if self.layer.in_place
            && let Some(deadline) = cx.lease_deadline()
            && tokio::time::Instant::now() + after >= deadline
        {
            // Held in place, the delivery would outlive its lease's max_total and come back
            // with its first deferral forgotten: the limit in place is the lease's.
            return Deferral::ended(
                failure,
                "deferred in place for longer than lease.max_total allows",
            );
        }
        cx.note_deferred();
        if self.layer.in_place {
            tracing::info!(after = ?after, attempt = failure.attempt, "deferred in place");
            Deferral::InPlace(after, Outcome::Defer { after, failure })
        } else {
            Deferral::Settle(Outcome::Defer { after, failure })
        }
    }

    /// Waits `d` unless the delivery's work is cancelled first; returns whether it waited.
    async fn pause(d: Duration, cx: &Context) -> bool {
        tokio::select! {
            biased;
            _ = cx.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

impl<P: Process> Process for Retry<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let config = &self.layer.config;
        // A copy with the attempt counted up, made only once a retry happens in place.
        let mut later_attempt: Option<Delivery> = None;
        let mut immediate = 0;
        // When the message was first deferred, where deferrals happen in place.
        let mut deferred: Option<std::time::SystemTime> = None;
        loop {
            let current = later_attempt.as_ref().unwrap_or(delivery);
            let outcome = self.attempt(current, cx).await;
            if cx.is_cancelled() {
                // Lease lost or shutdown deadline: the runner settles nothing, so decide nothing.
                return outcome;
            }
            let (failure, asked) = match outcome {
                Outcome::Retry { failure, after } => (failure, after),
                Outcome::Defer { mut failure, after }
                    if !self.layer.in_place && !self.layer.defers =>
                {
                    // The broker cannot keep the attempt: a retry after the delay asked for.
                    failure.deferred_since = None;
                    (failure, after)
                }
                Outcome::Defer { after, mut failure } => {
                    // In place, the first deferral of this run counts too.
                    let since = match (deferred, failure.deferred_since) {
                        (Some(a), Some(b)) => a.min(b),
                        (a, b) => a.or(b).unwrap_or_else(crate::clock::now),
                    };
                    failure.deferred_since = Some(since);
                    failure.attempt = current.attempt;
                    match self.defer(after, failure, cx) {
                        Deferral::Settle(outcome) => return outcome,
                        Deferral::InPlace(after, outcome) => {
                            deferred = Some(since);
                            if let Some(observe) = &self.layer.on_in_place {
                                observe(current, &outcome, cx);
                            }
                            // As for a retry in place: others may run while it waits.
                            cx.step_aside().await;
                            if !Self::pause(after, cx).await || !cx.rejoin().await {
                                return outcome;
                            }
                            immediate = 0;
                            continue;
                        }
                    }
                }
                Outcome::DeadLetter(mut failure) => {
                    failure.attempt = current.attempt;
                    return Outcome::DeadLetter(failure);
                }
                other => return other,
            };
            // A delay the handler asked for is not cut short by the immediate tier.
            if asked.is_zero() && immediate < config.immediate {
                immediate += 1;
                if !Self::pause(config.immediate_delay, cx).await {
                    return Outcome::Retry {
                        after: Duration::ZERO,
                        failure,
                    };
                }
                continue;
            }
            let attempt = current.attempt;
            let mut failure = failure;
            failure.attempt = attempt;
            if !config.allows_retry_after(attempt) {
                return Outcome::DeadLetter(failure);
            }
            let mut after = if asked.is_zero() {
                config.backoff.delay(attempt)
            } else {
                asked.min(config.backoff.cap)
            };
            if let Some(max) = self.layer.max_delay {
                after = after.min(max);
            }
            let outcome = Outcome::Retry { after, failure };
            if !self.layer.in_place {
                return outcome;
            }
            tracing::info!(after = ?after, attempt, "retrying in place");
            cx.note_retried_in_place(failure_kind(&outcome));
            if let Some(observe) = &self.layer.on_in_place {
                observe(current, &outcome, cx);
            }
            // A suspect runs alone attempt by attempt: others may run while it waits.
            cx.step_aside().await;
            if !Self::pause(after, cx).await || !cx.rejoin().await {
                return outcome;
            }
            let mut next = current.clone();
            next.attempt = attempt.saturating_add(1);
            cx.note_attempt(next.attempt);
            later_attempt = Some(next);
            immediate = 0;
        }
    }
}

/// What [`Retry::defer`] decided.
enum Deferral {
    /// Return this outcome for the runner to settle.
    Settle(Outcome),
    /// Wait this long here, then run the same attempt again (the outcome, if the wait is
    /// cancelled).
    InPlace(Duration, Outcome),
}

impl Deferral {
    /// Deferring ends here: `failure` is dead-lettered, its message saying `why` first.
    fn ended(mut failure: Failure, why: &str) -> Deferral {
        failure.message = crate::error::truncate(
            format!("{why}; last: {}", failure.message),
            crate::error::MAX_FAILURE_MESSAGE,
        );
        Deferral::Settle(Outcome::DeadLetter(failure))
    }
}

/// The kind of a retry's failure (transient, unless a classifier said otherwise).
fn failure_kind(outcome: &Outcome) -> crate::ErrorKind {
    match outcome {
        Outcome::Retry { failure, .. }
        | Outcome::Defer { failure, .. }
        | Outcome::DeadLetter(failure) => failure.kind,
        Outcome::Ack | Outcome::Release => crate::ErrorKind::Transient,
    }
}

#[cfg(test)]
mod tests;
