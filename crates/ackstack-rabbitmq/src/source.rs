//! [`RabbitSource`]: consuming in manual-ack mode, reconnecting by itself; and
//! [`RabbitSettler`]: acks, delayed retries, dead-lettering.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ackstack_core::deadletter::{DeadLetter, millis};
use ackstack_core::{
    AckReport, Capabilities, Delivery, Failure, Origin, Received, Settle, SettleError,
    SettleFailure, Settled, Source, SourceError,
};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use crate::amqp::{self, KEY_HEADER, attempt_of, bounded, copy_properties, headers_from_table};
use crate::config::RabbitConfig;
use crate::error::RabbitError;
use crate::tracker::{AckPlan, AckTracker, Completion};

/// How long one `basic.ack`/`basic.reject` frame may take to be written.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a dead or abandoned connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between reconnect attempts.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// Counters of what the adapter sent, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitStats {
    /// `basic.ack` frames sent (cumulative and individual).
    pub ack_frames: u64,
    /// Of those, `multiple=true` frames.
    pub multiple_ack_frames: u64,
    /// Negative acknowledgements sent for releases: `basic.reject requeue=true` frames (the
    /// name predates the switch from `basic.nack`, see [`Settle::release`]).
    pub nack_frames: u64,
    /// Completed deliveries acked at the broker, each counted once, when the frame that acks
    /// it was sent (not when it was queued or held back behind an unfinished delivery).
    pub acked_tokens: u64,
    /// Settlements refused because the token's channel is gone (no frame sent).
    pub lease_lost: u64,
    /// Connections opened by the source (1 + reconnects).
    pub connects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    ack_frames: AtomicU64,
    multiple_ack_frames: AtomicU64,
    nack_frames: AtomicU64,
    acked_tokens: AtomicU64,
    lease_lost: AtomicU64,
    connects: AtomicU64,
}

/// State shared by the source and its settler.
struct Shared {
    config: RabbitConfig,
    counters: Counters,
    /// The generation the source currently consumes on.
    current: Mutex<Option<Arc<Generation>>>,
}

impl Shared {
    fn current(&self) -> MutexGuard<'_, Option<Arc<Generation>>> {
        // A panic elsewhere while holding this lock cannot leave the Option inconsistent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> RabbitStats {
        let c = &self.counters;
        RabbitStats {
            ack_frames: c.ack_frames.load(Ordering::Relaxed),
            multiple_ack_frames: c.multiple_ack_frames.load(Ordering::Relaxed),
            nack_frames: c.nack_frames.load(Ordering::Relaxed),
            acked_tokens: c.acked_tokens.load(Ordering::Relaxed),
            lease_lost: c.lease_lost.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
        }
    }
}

/// One connection and its consuming channel. Delivery tags are only meaningful on the
/// channel that delivered them, so every token points at its generation, and a token of a
/// dead generation is never acked anywhere (its delivery is redelivered by the broker).
struct Generation {
    id: u64,
    connection: Connection,
    consume: Channel,
    /// A confirm-mode channel on the same connection, reopened when it closes.
    publish: tokio::sync::Mutex<Option<Channel>>,
    /// [`RabbitConfig::operation_timeout`]: bounds reopening `publish`.
    timeout: Duration,
    /// The tags of `consume`; the lock also orders the frames sent for them.
    tracker: tokio::sync::Mutex<AckTracker>,
    /// Woken when ack frames were sent or the generation died: ack calls waiting for their
    /// held tags look again.
    progress: tokio::sync::Notify,
    dead: AtomicBool,
}

impl Generation {
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
            && self.consume.status().connected()
            && self.connection.status().connected()
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.progress.notify_waiters();
    }

    /// The connection's negotiated maximum frame size (0: no limit). A content header (the
    /// properties with the header table) must fit one frame.
    fn frame_max(&self) -> u32 {
        self.connection.configuration().frame_max()
    }

    async fn publish_channel(&self) -> Result<Channel, RabbitError> {
        let mut guard = self.publish.lock().await;
        if let Some(channel) = guard.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = amqp::confirm_channel(&self.connection, self.timeout).await?;
        *guard = Some(channel.clone());
        Ok(channel)
    }

    /// Sends the planned frames, counting the deliveries they ack as each is sent. On error
    /// the channel is broken: the generation is killed.
    async fn send(&self, plan: &AckPlan, counters: &Counters) -> Result<(), SettleError> {
        if let Some(tag) = plan.multiple {
            self.ack_frame(tag, true, counters).await?;
            counters
                .acked_tokens
                .fetch_add(plan.multiple_covers as u64, Ordering::Relaxed);
        }
        for &tag in &plan.singles {
            self.ack_frame(tag, false, counters).await?;
            counters.acked_tokens.fetch_add(1, Ordering::Relaxed);
        }
        if plan.multiple.is_some() || !plan.singles.is_empty() {
            self.progress.notify_waiters();
        }
        Ok(())
    }

    async fn ack_frame(&self, tag: u64, multiple: bool, c: &Counters) -> Result<(), SettleError> {
        let sent = tokio::time::timeout(
            FRAME_TIMEOUT,
            self.consume.basic_ack(tag, BasicAckOptions { multiple }),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                c.ack_frames.fetch_add(1, Ordering::Relaxed);
                if multiple {
                    c.multiple_ack_frames.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.kill();
                Err(SettleError::LeaseLost(format!(
                    "channel closed while acking tag {tag}: {e}"
                )))
            }
            Err(_) => {
                self.kill();
                Err(SettleError::LeaseLost(format!(
                    "timed out acking tag {tag}; channel presumed dead"
                )))
            }
        }
    }
}

/// The handle of one RabbitMQ delivery: its delivery tag, the channel generation it came
/// from, and the original payload and AMQP properties (so a dead-letter copy keeps typed
/// header values byte for byte).
#[derive(Clone)]
pub struct RabbitToken {
    tag: u64,
    generation: Arc<Generation>,
    properties: Arc<BasicProperties>,
    payload: Bytes,
}

impl RabbitToken {
    /// The delivery tag on its channel.
    pub fn delivery_tag(&self) -> u64 {
        self.tag
    }

    /// The channel generation the delivery came from (1 for the first connection, counting
    /// up with each reconnect).
    pub fn generation(&self) -> u64 {
        self.generation.id
    }

    /// The original AMQP properties, including the header table.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// Whether the channel the delivery came from is still open (its delivery can be acked).
    pub fn is_live(&self) -> bool {
        self.generation.alive()
    }
}

impl fmt::Debug for RabbitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitToken")
            .field("tag", &self.tag)
            .field("generation", &self.generation.id)
            .finish()
    }
}

impl PartialEq for RabbitToken {
    fn eq(&self, other: &Self) -> bool {
        self.tag == other.tag && self.generation.id == other.generation.id
    }
}

impl Eq for RabbitToken {}

struct Active {
    generation: Arc<Generation>,
    consumer: lapin::Consumer,
    origin: Origin,
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
pub struct RabbitSource {
    shared: Arc<Shared>,
    active: Option<Active>,
    next_generation: u64,
    failures: u32,
    closed: bool,
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
            }),
            active: None,
            next_generation: 1,
            failures: 0,
            closed: false,
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
        self.active.as_ref().map(|a| a.generation.id)
    }

    /// The name of the current connection as the broker shows it
    /// (`<connection_name>-consumer`).
    pub fn connection_name(&self) -> String {
        format!("{}-consumer", self.shared.config.connection_name())
    }

    /// Closes the connection now. Every unacked delivery goes back to the queue; tokens
    /// already handed out become unsettleable ([`SettleError::LeaseLost`]). The next
    /// [`receive`](Source::receive) reconnects.
    pub async fn disconnect(&mut self) {
        self.drop_active("disconnect requested").await;
    }

    async fn open(&mut self) -> Result<(), RabbitError> {
        let config = &self.shared.config;
        let timeout = config.operation_timeout;
        let connection = amqp::connect(config, "consumer").await?;
        let consume = bounded("channel open", timeout, connection.create_channel()).await?;
        if config.declare_topology {
            amqp::declare_topology(&consume, config).await?;
        }
        bounded(
            "basic.qos",
            timeout,
            consume.basic_qos(config.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = match &config.consumer_tag {
            Some(tag) => amqp::short(tag)?,
            None => ShortString::default(),
        };
        let consume_call = consume.basic_consume(
            amqp::short(&config.queue)?,
            tag,
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        );
        let consumer = bounded("basic.consume", timeout, consume_call).await?;
        let publish = amqp::confirm_channel(&connection, timeout).await?;
        let id = self.next_generation;
        self.next_generation += 1;
        let generation = Arc::new(Generation {
            id,
            connection,
            consume,
            publish: tokio::sync::Mutex::new(Some(publish)),
            timeout,
            tracker: tokio::sync::Mutex::new(AckTracker::new(config.prefetch)),
            progress: tokio::sync::Notify::new(),
            dead: AtomicBool::new(false),
        });
        let origin = Origin::new("rabbitmq", config.queue.as_str(), consumer.tag().as_str());
        *self.shared.current() = Some(generation.clone());
        self.shared
            .counters
            .connects
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(generation = id, queue = %config.queue, "rabbitmq consumer started");
        self.active = Some(Active {
            generation,
            consumer,
            origin,
        });
        Ok(())
    }

    /// Forgets the current generation and closes its connection (so its unacked deliveries
    /// are requeued even if the connection itself was still up).
    async fn drop_active(&mut self, why: &str) {
        let Some(active) = self.active.take() else {
            return;
        };
        tracing::warn!(
            generation = active.generation.id,
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
            let pause = Duration::from_millis(100)
                .saturating_mul(1u32 << self.failures.min(6))
                .min(MAX_RECONNECT_PAUSE);
            tokio::time::sleep(pause).await;
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

    fn convert(&self, active: &Active, d: lapin::message::Delivery) -> Received<RabbitToken> {
        let config = &self.shared.config;
        let table = d.properties.headers().as_ref();
        let headers = headers_from_table(table);
        let attempt = attempt_of(table, config.queue_type);
        let routing_key = d.routing_key.as_str();
        let key = match headers.get(KEY_HEADER) {
            Some(k) => Some(k.clone()),
            None => {
                let is_ours = routing_key == config.queue
                    || routing_key.is_empty()
                    || routing_key.starts_with(&format!("{}.delay.", config.queue));
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
        };
        let token = RabbitToken {
            tag: d.delivery_tag,
            generation: active.generation.clone(),
            properties: Arc::new(d.properties),
            payload,
        };
        Received { delivery, token }
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
        let out = raw.into_iter().map(|d| self.convert(active, d)).collect();
        Ok(out)
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

/// Settles [`RabbitSource`] deliveries: batched acks, retries through delay queues,
/// dead-lettering to the DLQ, and releases. Cheap to clone.
#[derive(Clone)]
pub struct RabbitSettler {
    shared: Arc<Shared>,
}

impl RabbitSettler {
    /// What was sent so far (shared with the source).
    pub fn stats(&self) -> RabbitStats {
        self.shared.stats()
    }

    fn lease_lost(&self, token: &RabbitToken) -> SettleError {
        self.shared
            .counters
            .lease_lost
            .fetch_add(1, Ordering::Relaxed);
        SettleError::LeaseLost(format!(
            "delivery tag {} belongs to closed channel generation {}",
            token.tag, token.generation.id
        ))
    }

    /// Acks `tokens` of one generation and returns once a frame acking each was sent (or
    /// failed): at once for those the cumulative ack reaches; those held above an unfinished
    /// delivery wait for a later cumulative ack (another ack call, a release, a flush) up to
    /// [`RabbitConfig::held_ack_delay`], then are acked one by one.
    ///
    /// Frames are sent with the tracker locked, and a failed frame kills the generation
    /// before the lock is released; so a tag the tracker shows settled while the generation
    /// is alive was acked by a frame that was sent.
    async fn ack_generation(
        &self,
        generation: Arc<Generation>,
        tokens: Vec<RabbitToken>,
        report: &mut AckReport<RabbitToken>,
    ) {
        let deadline = tokio::time::Instant::now() + self.shared.config.held_ack_delay;
        let mut tracker = generation.tracker.lock().await;
        if generation.alive() {
            for token in &tokens {
                // Already settled tags count as acked ("found already gone").
                let _: Completion = tracker.complete(token.tag);
            }
            let plan = tracker.plan(false);
            // A failure kills the generation; the loop below then reports the tokens.
            let _ = generation.send(&plan, &self.shared.counters).await;
        }
        let mut pending = tokens;
        let mut taken = false;
        loop {
            if !generation.alive() {
                for token in pending {
                    let err = self.lease_lost(&token);
                    report.failed.push((token, err));
                }
                return;
            }
            let before = pending.len();
            pending.retain(|t| !tracker.is_settled(t.tag));
            report.acked += before - pending.len();
            if pending.is_empty() {
                return;
            }
            if taken {
                // Every tag of this call was completed or settled above; none can be left.
                for token in pending {
                    let err =
                        SettleError::Rejected(format!("delivery tag {} untracked", token.tag));
                    report.failed.push((token, err));
                }
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let held: Vec<u64> = pending.iter().map(|t| t.tag).collect();
                let plan = tracker.take(&held);
                // Success settles them all; a failure kills the generation: both are
                // reported by the next turn.
                let _ = generation.send(&plan, &self.shared.counters).await;
                taken = true;
                continue;
            }
            // Registered before the lock is released, so no send in between is missed.
            let progress = generation.progress.notified();
            drop(tracker);
            tokio::select! {
                () = progress => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            tracker = generation.tracker.lock().await;
        }
    }

    /// Publishes a copy of the token's message (its payload with `properties`) to `queue` on
    /// the generation's publish channel and waits for its confirm.
    ///
    /// When the broker closes the channel with a permanent error
    /// ([`RabbitError::is_permanent_channel_error`]), the cause may be another copy in flight
    /// on the same shared channel: this copy is published once more, alone on a channel of
    /// its own, and only a refusal there is [`SettleError::Rejected`].
    async fn publish_copy(
        &self,
        token: &RabbitToken,
        queue: &str,
        properties: BasicProperties,
    ) -> Result<(), SettleError> {
        let generation = &token.generation;
        let confirm_timeout = self.shared.config.confirm_timeout;
        let channel = generation
            .publish_channel()
            .await
            .map_err(RabbitError::into_settle_error)?;
        let shared = amqp::publish_confirmed(
            &channel,
            queue,
            &token.payload,
            properties.clone(),
            confirm_timeout,
        )
        .await;
        match shared {
            Ok(()) => return Ok(()),
            Err(e) if e.is_permanent_channel_error() => {
                tracing::debug!(error = %e, "publish channel closed by the broker; publishing the copy again alone");
            }
            Err(e) => return Err(e.into_settle_error()),
        }
        let alone = amqp::confirm_channel(&generation.connection, generation.timeout)
            .await
            .map_err(RabbitError::into_settle_error)?;
        let result =
            amqp::publish_confirmed(&alone, queue, &token.payload, properties, confirm_timeout)
                .await;
        if alone.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, alone.close(200, "done".into())).await;
        }
        result.map_err(RabbitError::into_settle_error)
    }
}

impl Settle for RabbitSettler {
    type Token = RabbitToken;

    async fn ack(&self, tokens: Vec<RabbitToken>) -> AckReport<RabbitToken> {
        let mut report = AckReport::all(0);
        // Tokens normally share one generation; group them in order of appearance.
        let mut groups: Vec<(Arc<Generation>, Vec<RabbitToken>)> = Vec::new();
        for token in tokens {
            match groups.iter_mut().find(|(g, _)| g.id == token.generation.id) {
                Some((_, group)) => group.push(token),
                None => groups.push((token.generation.clone(), vec![token])),
            }
        }
        for (generation, group) in groups {
            self.ack_generation(generation, group, &mut report).await;
        }
        report
    }

    /// Republishes the original payload and properties to the delay queue of the bucket
    /// chosen by [`RabbitConfig::bucket_for`] with
    /// [`ATTEMPT_HEADER`](ackstack_core::deadletter::ATTEMPT_HEADER) = attempt + 1 and
    /// [`FIRST_FAILURE_HEADER`](ackstack_core::deadletter::FIRST_FAILURE_HEADER) kept (or set
    /// to this failure's time); the broker's own
    /// `x-delivery-count` is dropped so the copy starts its count afresh. A per-message
    /// `expiration` is not copied (it would cut the delay short) but recorded in
    /// [`ORIGINAL_EXPIRATION_HEADER`](crate::ORIGINAL_EXPIRATION_HEADER). Returns
    /// [`Settled::AckOriginal`] once the copy is confirmed.
    async fn retry(
        &self,
        token: RabbitToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<RabbitToken>, SettleFailure<RabbitToken>> {
        if !token.generation.alive() {
            let err = self.lease_lost(&token);
            return Err(SettleFailure::new(token, err));
        }
        let config = &self.shared.config;
        let Some(bucket) = config.bucket_for(after) else {
            let err = SettleError::Rejected("no delay buckets configured".into());
            return Err(SettleFailure::new(token, err));
        };
        let queue = config.delay_queue_name(bucket);
        let next_attempt = delivery.attempt.max(1).saturating_add(1);
        let first_failure = millis(failure.at);
        let headers = amqp::retry_table(&token.properties, next_attempt, first_failure);
        let properties = copy_properties(&token.properties, headers);
        // A content header over `frame_max` would make the broker close the whole connection
        // (and with it every other unacked delivery of this generation).
        let frame_max = token.generation.frame_max();
        match amqp::content_header_frame_size(&properties) {
            Ok(size) if frame_max == 0 || size <= frame_max as usize => {}
            Ok(size) => {
                let err = SettleError::Rejected(format!(
                    "the retry copy's content header is {size} bytes; the connection's \
                     frame_max is {frame_max}"
                ));
                return Err(SettleFailure::new(token, err));
            }
            Err(why) => return Err(SettleFailure::new(token, SettleError::Rejected(why))),
        }
        match self.publish_copy(&token, &queue, properties).await {
            Ok(()) => Ok(Settled::AckOriginal(token)),
            Err(err) => Err(SettleFailure::new(token, err)),
        }
    }

    /// Publishes the original payload and AMQP properties, every original header value
    /// unchanged (typed), plus the `x-ackstack-dl-*` metadata (replacing earlier metadata) to
    /// the DLQ; returns [`Settled::AckOriginal`] once the copy is confirmed. The copy has no
    /// `expiration` (a publisher's TTL would delete the dead letter): the original one is in
    /// [`ORIGINAL_EXPIRATION_HEADER`](crate::ORIGINAL_EXPIRATION_HEADER).
    ///
    /// The copy's content header (properties and header table) must fit the connection's
    /// negotiated `frame_max`, or the broker closes the connection. When the metadata would
    /// push it over, the error message in the metadata is cut to fit, recorded in
    /// [`DROPPED_HEADER`](crate::DROPPED_HEADER); when even the copy without an error message
    /// does not fit, nothing is published and the result is [`SettleError::Rejected`], as it
    /// is when the broker closes the channel over the publish with a permanent error such as
    /// `PRECONDITION_FAILED`. A publisher-confirm nack stays [`SettleError::Broker`]
    /// (transient). The original is never acked on an error.
    async fn dead_letter(
        &self,
        token: RabbitToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<RabbitToken>, SettleFailure<RabbitToken>> {
        if !token.generation.alive() {
            let err = self.lease_lost(&token);
            return Err(SettleFailure::new(token, err));
        }
        let metadata = letter.metadata(delivery);
        let frame_max = token.generation.frame_max();
        let fitted = match amqp::fit_dead_letter(&token.properties, &metadata, frame_max) {
            Ok(fitted) => fitted,
            Err(why) => return Err(SettleFailure::new(token, SettleError::Rejected(why))),
        };
        if !fitted.dropped.is_empty() {
            tracing::warn!(
                delivery_tag = token.tag,
                size = fitted.size,
                frame_max,
                dropped = ?fitted.dropped,
                "dead-letter copy's metadata shortened to fit the connection's frame_max"
            );
        }
        let dlq = self.shared.config.dlq_name();
        match self.publish_copy(&token, &dlq, fitted.properties).await {
            Ok(()) => Ok(Settled::AckOriginal(token)),
            Err(err) => Err(SettleFailure::new(token, err)),
        }
    }

    /// RabbitMQ has no leases ([`Capabilities::lease`] is `None`), so this is never called by
    /// the runner; it succeeds without doing anything.
    async fn extend(&self, _token: &RabbitToken, _by: Duration) -> Result<(), SettleError> {
        Ok(())
    }

    /// `basic.reject requeue=true` for this delivery, when its channel is still open (a closed
    /// channel has already given it back); then the acks the release unblocked.
    ///
    /// `basic.reject`, not `basic.nack`: RabbitMQ 4.3 and later increment a quorum queue's
    /// `delivery-count` only for `basic.reject` (a nack "did not process" the message and is
    /// not counted), and earlier releases count both. A released delivery must count as an
    /// attempt, so that the attempt number grows and `x-delivery-limit` can stop a crash loop.
    ///
    /// A released tag no longer holds the cumulative ack back, so completed tags above it are
    /// acked here (`basic.ack multiple=true` as far as the watermark now reaches) rather than
    /// waiting for the next ack call, which on an idle queue may never come.
    async fn release(&self, token: RabbitToken) {
        let generation = token.generation.clone();
        if !generation.alive() {
            return;
        }
        let mut tracker = generation.tracker.lock().await;
        if !tracker.settle_individually(token.tag) {
            return;
        }
        let sent = tokio::time::timeout(
            FRAME_TIMEOUT,
            generation
                .consume
                .basic_reject(token.tag, BasicRejectOptions { requeue: true }),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                self.shared
                    .counters
                    .nack_frames
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                // The channel is gone; the broker gives back this delivery and every other
                // unacked one by itself.
                generation.kill();
                return;
            }
        }
        let plan = tracker.plan(false);
        if let Err(err) = generation.send(&plan, &self.shared.counters).await {
            tracing::warn!(error = %err, "acking after a release failed; the held deliveries will be redelivered");
        }
    }

    /// Acks every completed delivery still held back above an unfinished one (individually),
    /// and advances the cumulative ack as far as possible.
    async fn flush(&self) {
        let current = self.shared.current().clone();
        let Some(generation) = current else {
            return;
        };
        if !generation.alive() {
            return;
        }
        let mut tracker = generation.tracker.lock().await;
        let plan = tracker.plan(true);
        if let Err(err) = generation.send(&plan, &self.shared.counters).await {
            tracing::warn!(error = %err, "flushing rabbitmq acks failed");
        }
    }
}
