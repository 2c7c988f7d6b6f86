//! [`RabbitSource`]: consuming in manual-ack mode, reconnecting by itself.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};

use ackstack_core::adapter;
use ackstack_core::{Capabilities, Delivery, Origin, Received, Source, SourceError};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::BasicCancelOptions;
use tokio::time::Instant;

use crate::channel::{self, CLOSE_TIMEOUT, Generation, Shared};
use crate::config::RabbitConfig;

mod alone;
use crate::error::RabbitError;
use crate::headers::{KEY_HEADER, attempt_of, headers_from_table};
use crate::settler::RabbitSettler;
use crate::stats::{Counters, RabbitStats};
use crate::token::RabbitToken;

struct Active {
    generation: Arc<Generation>,
    consumer: lapin::Consumer,
    origin: Origin,
    /// Deliveries taken off the consumer stream (and tracked) while getting a suspect: their
    /// tags are below the got one. Handed out before anything else.
    held: VecDeque<lapin::message::Delivery>,
    /// The consumer stream ended (or failed) while `held` was filled: reconnect once they are
    /// handed out.
    ended: bool,
}

/// Consumes one RabbitMQ queue in manual-ack mode.
///
/// Reconnects by itself: when the connection or channel is lost (or the consumer stream
/// ends), [`receive`](Source::receive) returns [`SourceError::Disconnected`] once and the
/// next call opens a new connection (with a growing pause after failed attempts, up to 5 s),
/// declares the topology again and re-consumes. This is a new channel *generation*;
/// deliveries of the old one are never acked on the new one: settling their tokens reports
/// [`SettleError::LeaseLost`] without sending a frame, and the broker redelivers them.
///
/// lapin 4's own automatic recovery (`ConnectionProperties::enable_auto_recover`) is not
/// used: it keeps the same `Channel` object across reconnects, where delivery tags restart
/// at 1, so an ack for a pre-reconnect delivery would silently ack a different message.
///
/// [`SettleError::LeaseLost`]: ackstack_core::SettleError::LeaseLost
pub struct RabbitSource {
    shared: Arc<Shared>,
    active: Option<Active>,
    /// The last generation opened (none yet: the default).
    last_generation: adapter::Generation,
    failures: u32,
    closed: bool,
    /// When the queue of suspects is next looked at without a reason.
    next_alone_look: Instant,
    /// Since when suspects wait for what is in flight to finish.
    busy_since: Option<Instant>,
    /// Generations that were lost while their deliveries may still run in this process (their
    /// tokens hold them): a suspect does not run alone beside them.
    lost: Vec<Weak<Generation>>,
}

impl std::fmt::Debug for RabbitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSource")
            .field("queue", &self.shared.config.queue)
            .field("connected", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl RabbitSource {
    /// Connects, declares the topology (unless disabled) and starts consuming.
    pub async fn connect(config: RabbitConfig) -> Result<Self, RabbitError> {
        config.validate()?;
        let mut source = RabbitSource {
            shared: Arc::new(Shared {
                config,
                counters: Counters::default(),
                current: Mutex::new(None),
                alone_pending: AtomicBool::new(false),
                alone_missing: AtomicBool::new(false),
            }),
            active: None,
            last_generation: adapter::Generation::default(),
            failures: 0,
            closed: false,
            next_alone_look: Instant::now(),
            busy_since: None,
            lost: Vec::new(),
        };
        source.open().await?;
        Ok(source)
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.shared.config
    }

    /// What was sent so far.
    pub fn stats(&self) -> RabbitStats {
        self.shared.stats()
    }

    /// The current channel generation, if connected.
    pub fn generation(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.generation.id.get())
    }

    /// The name of the current connection as the broker shows it
    /// (`<connection_name>-consumer`).
    pub fn connection_name(&self) -> String {
        format!("{}-consumer", self.shared.config.connection_name())
    }

    /// Closes the connection now. Every unacked delivery goes back to the queue; tokens
    /// already handed out become unsettleable ([`SettleError::LeaseLost`]). The next
    /// [`receive`](Source::receive) reconnects.
    ///
    /// [`SettleError::LeaseLost`]: ackstack_core::SettleError::LeaseLost
    pub async fn disconnect(&mut self) {
        self.drop_active("disconnect requested").await;
    }

    async fn open(&mut self) -> Result<(), RabbitError> {
        let config = &self.shared.config;
        let id = self.last_generation.next();
        let (generation, consumer) = Generation::open(config, id).await?;
        self.last_generation = id;
        let generation = Arc::new(generation);
        let origin = Origin::new("rabbitmq", config.queue.as_str(), consumer.tag().as_str());
        *self.shared.current() = Some(generation.clone());
        self.shared.counters.connects.add(1);
        tracing::debug!(generation = id.get(), queue = %config.queue, "rabbitmq consumer started");
        self.active = Some(Active {
            generation,
            consumer,
            origin,
            held: VecDeque::new(),
            ended: false,
        });
        // Whatever a stopped consumer left waiting to run alone goes first.
        self.next_alone_look = Instant::now();
        Ok(())
    }

    /// Forgets the current generation and closes its connection (so its unacked deliveries
    /// are requeued even if the connection itself was still up).
    async fn drop_active(&mut self, why: &str) {
        self.busy_since = None;
        let Some(active) = self.active.take() else {
            return;
        };
        self.lost.push(Arc::downgrade(&active.generation));
        tracing::warn!(
            generation = active.generation.id.get(),
            reason = why,
            "rabbitmq channel lost"
        );
        active.generation.kill();
        {
            let mut current = self.shared.current();
            if current
                .as_ref()
                .is_some_and(|g| g.id == active.generation.id)
            {
                *current = None;
            }
        }
        drop(active.consumer);
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            active
                .generation
                .connection
                .close(200, "ackstack reconnect".into()),
        )
        .await;
    }

    async fn reconnect(&mut self) -> Result<(), SourceError> {
        if self.failures > 0 {
            tokio::time::sleep(channel::reconnect_pause(self.failures)).await;
        }
        match self.open().await {
            Ok(()) => {
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                Err(e.into_source_error())
            }
        }
    }

    /// `alone`: got from the queue of suspects; it is a suspect either way.
    fn convert(
        &self,
        active: &Active,
        d: lapin::message::Delivery,
        alone: bool,
    ) -> Received<RabbitToken> {
        let config = &self.shared.config;
        let table = d.properties.headers().as_ref();
        let headers = headers_from_table(table);
        let attempt = attempt_of(table);
        let routing_key = d.routing_key.as_str();
        let key = match headers.get(KEY_HEADER) {
            Some(k) => Some(k.clone()),
            None => {
                let is_ours = routing_key == config.queue
                    || routing_key.is_empty()
                    || routing_key.starts_with(&format!("{}.delay.", config.queue))
                    || (alone && routing_key == config.alone_queue_name());
                (!is_ours).then(|| Bytes::copy_from_slice(routing_key.as_bytes()))
            }
        };
        let payload = Bytes::from(d.data);
        let delivery = Delivery {
            payload: payload.clone(),
            headers,
            key,
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
            attempt,
            origin: active.origin.clone(),
            produced_at: produced_at(*d.properties.timestamp()),
        };
        let redelivered = d.redelivered;
        let token = RabbitToken {
            tag: d.delivery_tag,
            generation: active.generation.clone(),
            properties: Arc::new(d.properties),
            payload,
            redelivered,
            alone,
        };
        Received::new(delivery, token).suspect(redelivered || alone)
    }

    /// Converts deliveries of the work queue. A redelivered one is a suspect; so is every
    /// later one of the same key in the batch, so that they wait to run alone behind it, in
    /// their order, instead of running before it.
    fn convert_batch(
        &self,
        active: &Active,
        raw: Vec<lapin::message::Delivery>,
    ) -> Vec<Received<RabbitToken>> {
        let mut suspect_keys: HashSet<Bytes> = HashSet::new();
        raw.into_iter()
            .map(|d| {
                let mut received = self.convert(active, d, false);
                if let Some(key) = &received.delivery.key {
                    if received.suspect {
                        suspect_keys.insert(key.clone());
                    } else if suspect_keys.contains(key) {
                        received.suspect = true;
                    }
                }
                received
            })
            .collect()
    }
}

impl Source for RabbitSource {
    type Token = RabbitToken;
    type Settler = RabbitSettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<RabbitToken>>, SourceError> {
        if self.closed {
            return Ok(Vec::new());
        }
        if self.active.is_none() {
            self.reconnect().await?;
        }
        let poll = self.shared.config.poll_interval;
        if self.active.as_ref().is_some_and(|a| !a.generation.alive()) {
            // Its deliveries, held ones included, cannot be acked: the broker redelivers them.
            self.drop_active("channel closed").await;
            return Err(SourceError::Disconnected("channel closed".into()));
        }
        if let Some(active) = self.active.as_mut()
            && !active.held.is_empty()
        {
            let n = max.max(1).min(active.held.len());
            let raw: Vec<_> = active.held.drain(..n).collect();
            let Some(active) = self.active.as_ref() else {
                return Err(SourceError::Disconnected("not connected".into()));
            };
            return Ok(self.convert_batch(active, raw));
        }
        if self.active.as_ref().is_some_and(|a| a.ended) {
            self.drop_active("consumer stream ended").await;
            return Err(SourceError::Disconnected("consumer cancelled".into()));
        }
        if let Some(batch) = self.alone_turn().await? {
            return Ok(batch);
        }
        let Some(active) = self.active.as_mut() else {
            return Err(SourceError::Disconnected("not connected".into()));
        };
        let first = match tokio::time::timeout(poll, active.consumer.next()).await {
            Err(_) => {
                // Silence is not trusted: a consumer can go idle after a broker restart.
                if active.generation.alive() {
                    return Ok(Vec::new());
                }
                self.drop_active("channel closed while idle").await;
                return Err(SourceError::Disconnected("channel closed".into()));
            }
            Ok(None) => {
                self.drop_active("consumer stream ended").await;
                return Err(SourceError::Disconnected("consumer cancelled".into()));
            }
            Ok(Some(Err(e))) => {
                self.drop_active("consumer error").await;
                return Err(SourceError::Disconnected(Box::new(e)));
            }
            Ok(Some(Ok(d))) => d,
        };
        let mut raw = vec![first];
        let mut broken: Option<SourceError> = None;
        while raw.len() < max.max(1) {
            match active.consumer.next().now_or_never() {
                None => break,
                Some(Some(Ok(d))) => raw.push(d),
                Some(Some(Err(e))) => {
                    broken = Some(SourceError::Disconnected(Box::new(e)));
                    break;
                }
                Some(None) => {
                    broken = Some(SourceError::Disconnected("consumer cancelled".into()));
                    break;
                }
            }
        }
        if let Some(err) = broken {
            // These deliveries belong to a channel that is gone: they cannot be acked, and
            // the broker redelivers them. Handing them out would only duplicate work.
            self.drop_active("consumer error").await;
            return Err(err);
        }
        let Some(active) = self.active.as_ref() else {
            return Err(SourceError::Disconnected("not connected".into()));
        };
        {
            let mut tracker = active.generation.tracker.lock().await;
            for d in &raw {
                tracker.delivered(d.delivery_tag);
            }
        }
        Ok(self.convert_batch(active, raw))
    }

    fn settler(&self) -> RabbitSettler {
        RabbitSettler {
            shared: self.shared.clone(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let prefetch = usize::from(self.shared.config.prefetch);
        let batch = if prefetch == 0 {
            250
        } else {
            (prefetch / 4).clamp(1, 250)
        };
        // Acks may run in parallel: the tracker orders the frames, and an ack call waiting for
        // its held tags must not hold back the call that carries the straggler's completion.
        Capabilities::new(batch)
            .with_max_retry_delay(self.shared.config.max_delay())
            .with_parallel_acks(4)
            .with_deferrals()
    }

    /// The consumer is named by its configured consumer tag, or else by its queue: the
    /// broker's generated tags change with every reconnect.
    fn origin(&self) -> Origin {
        let config = &self.shared.config;
        let consumer = config.consumer_tag.as_deref().unwrap_or(&config.queue);
        Origin::new("rabbitmq", config.queue.as_str(), consumer)
    }

    async fn close(&mut self) {
        self.closed = true;
        if let Some(active) = self.active.as_ref() {
            let tag = active.consumer.tag();
            let cancelled = tokio::time::timeout(
                CLOSE_TIMEOUT,
                active
                    .generation
                    .consume
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
            if !matches!(cancelled, Ok(Ok(()))) {
                tracing::debug!("basic.cancel failed; the channel is probably gone");
            }
        }
    }
}

/// The produce time an AMQP `timestamp` property says (seconds since the epoch); `None` for
/// one past what the clock can hold (a publisher that wrote -1 as unsigned).
fn produced_at(timestamp: Option<u64>) -> Option<std::time::SystemTime> {
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(timestamp?))
}

#[cfg(test)]
mod produced_at_tests {
    use super::produced_at;

    #[test]
    fn any_timestamp_is_read_without_a_panic() {
        assert_eq!(produced_at(None), None);
        let at = produced_at(Some(1_765_000_000)).unwrap();
        assert_eq!(
            at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            1_765_000_000
        );
        // `UNIX_EPOCH + Duration::from_secs(u64::MAX)` panics (overflow).
        assert_eq!(produced_at(Some(u64::MAX)), None);
        assert_eq!(produced_at(Some(1 << 63)), None);
    }
}
