//! The builder: [`Consumer`], its setters and the settings it will run with.

use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::dedup::{DedupKey, DedupStore};
use crate::delivery::Delivery;
use crate::handler::{Classifier, Identity, Stack};
use crate::outcome::Outcome;
use crate::source::Source;

use super::config::{ConfigError, ConsumerConfig, DeliveryMode, KeyOrdering, Overrides};
use super::control::Control;
use super::status::Status;

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
    pub(super) source: S,
    pub(super) layers: L,
    pub(super) config: ConsumerConfig,
    pub(super) overrides: Overrides,
    pub(super) dedup: Option<(Arc<dyn DedupStore>, DedupKey)>,
    pub(super) classifier: Option<Classifier>,
    pub(super) name: Option<Arc<str>>,
    pub(super) inspector: Option<Inspector>,
    pub(super) status: Status,
    pub(super) control: Control,
}

impl<S: Source> Consumer<S> {
    /// A consumer of `source` with the default config.
    pub fn new(source: S) -> Self {
        let control = Control::default();
        Consumer {
            source,
            layers: Identity,
            config: ConsumerConfig::default(),
            overrides: Overrides::default(),
            dedup: None,
            classifier: None,
            name: None,
            inspector: None,
            status: Status::new(control.clone()),
            control,
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
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.overrides.backoff = Some(backoff);
        self
    }

    /// The former name of [`Consumer::backoff`].
    #[deprecated(
        since = "0.1.0",
        note = "renamed to `backoff`: it sets the retry delays"
    )]
    pub fn retry(self, backoff: Backoff) -> Self {
        self.backoff(backoff)
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

    /// Fails a handler attempt that runs longer than `limit` (transiently: retried, then
    /// dead-lettered); see [`ConsumerConfig::handler_timeout`].
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.overrides.handler_timeout = Some(limit);
        self
    }

    /// Names this consumer in deliveries' origin, spans and dead-letter metadata (instead of
    /// the name the source gave).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Overrides the kind of handler errors; see [`Terminal::classify`](crate::Terminal::classify).
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

    /// Pauses and resumes this consumer, and shows whether it receives (a pause, or the kill
    /// switch of [`ConsumerConfig::kill_switch`]); take it before [`Consumer::run_until`].
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Adds a layer around the handler, inside the layers added before it: calls read from
    /// the outside in, as with `tower::ServiceBuilder`. `.layer(audit).layer(timeout)` runs
    /// `audit`, then `timeout`, then the handler. Retry and dedup stay outside every layer
    /// of yours.
    pub fn layer<N>(self, layer: N) -> Consumer<S, Stack<N, L>> {
        Consumer {
            source: self.source,
            layers: Stack::new(layer, self.layers),
            config: self.config,
            overrides: self.overrides,
            dedup: self.dedup,
            classifier: self.classifier,
            name: self.name,
            inspector: self.inspector,
            status: self.status,
            control: self.control,
        }
    }
}
