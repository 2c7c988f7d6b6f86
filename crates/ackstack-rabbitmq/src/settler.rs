//! [`RabbitSettler`]: acks, delayed retries, dead-lettering, releases.

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::deadletter::{DeadLetter, millis};
use ackstack_core::{
    AckReport, Armed, Backlog, Delivery, Failure, Settle, SettleError, SettleFailure, Settled,
};
use lapin::options::{BasicRejectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::amqp;
use crate::channel::{CLOSE_TIMEOUT, FRAME_TIMEOUT, Generation, Shared};
use crate::copies::{self, Moving, fits_frame};
use crate::error::RabbitError;
use crate::metadata::{self, copy_properties};
use crate::stats::RabbitStats;
use crate::token::RabbitToken;
use crate::tracker::Completion;

/// Settles [`RabbitSource`] deliveries: batched acks, retries through delay queues,
/// dead-lettering to the DLQ, and releases. Cheap to clone.
///
/// [`RabbitSource`]: crate::RabbitSource
#[derive(Clone)]
pub struct RabbitSettler {
    pub(crate) shared: Arc<Shared>,
}

impl RabbitSettler {
    /// What was sent so far (shared with the source).
    pub fn stats(&self) -> RabbitStats {
        self.shared.stats()
    }

    fn lease_lost(&self, token: &RabbitToken) -> SettleError {
        copies::lease_lost(&self.shared, token)
    }

    /// Acks `tokens` of one generation and returns once a frame acking each was sent (or
    /// failed): at once for those the cumulative ack reaches; those held above an unfinished
    /// delivery wait for a later cumulative ack (another ack call, a release, a flush) up to
    /// [`RabbitConfig::held_ack_delay`], then are acked one by one.
    ///
    /// [`RabbitConfig::held_ack_delay`]: crate::RabbitConfig::held_ack_delay
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

    /// Publishes a copy of the token's message with `headers` to the delay queue of the
    /// bucket for `after` (nothing when its channel is gone: the lease is lost);
    /// [`Settled::AckOriginal`] once the broker confirmed it. `what`
    /// names the copy in errors.
    async fn delay_copy(
        &self,
        token: RabbitToken,
        after: Duration,
        headers: FieldTable,
        what: &str,
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
        let properties = copy_properties(&token.properties, headers);
        if let Err(err) = fits_frame(&token, &properties, what) {
            return Err(SettleFailure::new(token, err));
        }
        match copies::publish_copy(&self.shared, &token, &queue, properties).await {
            Ok(()) => Ok(Settled::AckOriginal(token)),
            Err(err) => Err(SettleFailure::new(token, err.into_settle_error())),
        }
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
    ///
    /// [`RabbitConfig::bucket_for`]: crate::RabbitConfig::bucket_for
    async fn retry(
        &self,
        token: RabbitToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<RabbitToken>, SettleFailure<RabbitToken>> {
        let next_attempt = delivery.attempt.max(1).saturating_add(1);
        let first_failure = millis(failure.at);
        let headers = metadata::retry_table(&token.properties, next_attempt, first_failure);
        self.delay_copy(token, after, headers, "retry").await
    }

    /// Republishes like [`retry`](Settle::retry), with
    /// [`ATTEMPT_HEADER`](ackstack_core::deadletter::ATTEMPT_HEADER) kept at this attempt and
    /// [`DEFERRED_SINCE_HEADER`](ackstack_core::deadletter::DEFERRED_SINCE_HEADER) set to the
    /// first deferral's time.
    async fn defer(
        &self,
        token: RabbitToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<RabbitToken>, SettleFailure<RabbitToken>> {
        let since = millis(failure.deferred_since.unwrap_or(failure.at));
        let headers = metadata::defer_table(&token.properties, delivery.attempt.max(1), since);
        self.delay_copy(token, after, headers, "deferral").await
    }

    /// A suspect of the work queue (redelivered) is moved to the queue of runs alone
    /// ([`RabbitConfig::alone_queue_name`]): a copy with its [`CRASHES_HEADER`] kept,
    /// confirmed before the original is acked ([`Armed::Moved`]). The source gets it from
    /// there one at a time, with nothing else in flight. Got from there for the first time
    /// since its move, it runs ([`Armed::Run`]); got again redelivered, its run alone ended
    /// with the process dead: counted, and moved again, or given up on at `give_up_at`.
    ///
    /// A run alone that ended by a lost connection or a shutdown that released it counts the
    /// same: the broker's `redelivered` bit cannot tell them apart from a crash. When the
    /// queue of runs alone does not exist, a suspect runs in place, its crashes not counted.
    ///
    /// [`RabbitConfig::alone_queue_name`]: crate::RabbitConfig::alone_queue_name
    /// [`CRASHES_HEADER`]: ackstack_core::deadletter::CRASHES_HEADER
    async fn arm(
        &self,
        token: RabbitToken,
        _delivery: &Delivery,
        give_up_at: u32,
    ) -> Result<Armed<RabbitToken>, SettleFailure<RabbitToken>> {
        let earlier = metadata::crashes_of(&token.properties);
        if token.alone && !token.redelivered {
            return Ok(Armed::Run {
                token,
                crashes: earlier,
            });
        }
        let crashes = if token.alone {
            earlier.saturating_add(1)
        } else {
            earlier
        };
        if token.alone && crashes >= give_up_at {
            return Ok(Armed::GiveUp { token, crashes });
        }
        if self.shared.alone_missing() {
            return Ok(Armed::Run { token, crashes });
        }
        match copies::move_alone(&self.shared, &token, crashes).await {
            Ok(()) => Ok(Armed::Moved(Settled::AckOriginal(token))),
            Err(Moving::Missing) => {
                self.shared.set_alone_missing();
                Ok(Armed::Run { token, crashes })
            }
            Err(Moving::Refused(why)) => {
                // This copy cannot be made (its content header does not fit, a property the
                // broker refuses): it runs where it is, alone, its crashes not counted.
                tracing::warn!(error = %why, "a suspect cannot be moved to run alone; it runs in place, its crashes not counted");
                Ok(Armed::Run { token, crashes })
            }
            Err(Moving::Failed(err)) => Err(SettleFailure::new(token, err)),
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
        let fitted = match metadata::fit_dead_letter(&token.properties, &metadata, frame_max) {
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
        match copies::publish_copy(&self.shared, &token, &dlq, fitted.properties).await {
            Ok(()) => Ok(Settled::AckOriginal(token)),
            Err(err) => Err(SettleFailure::new(token, err.into_settle_error())),
        }
    }

    /// RabbitMQ has no leases ([`Capabilities::lease`] is `None`), so this is never called by
    /// the runner; it succeeds without doing anything.
    ///
    /// [`Capabilities::lease`]: ackstack_core::Capabilities::lease
    async fn extend(&self, _token: &RabbitToken, _by: Duration) -> Result<(), SettleError> {
        Ok(())
    }

    /// `basic.reject requeue=true` for this delivery, when its channel is still open (a closed
    /// channel has already given it back); then the acks the release unblocked.
    ///
    /// `basic.reject`, not `basic.nack`: RabbitMQ 4.3 and later increment a quorum queue's
    /// `delivery-count` only for `basic.reject` (a nack "did not process" the message and is
    /// not counted), and earlier releases count both; a configured
    /// [`delivery_limit`](crate::RabbitConfig::delivery_limit) counts releases either way.
    ///
    /// A delivery got from the queue of runs alone is moved back there instead (a copy
    /// confirmed, then the original acked), so that a release is not counted as a crash.
    ///
    /// A released tag no longer holds the cumulative ack back, so completed tags above it are
    /// acked here (`basic.ack multiple=true` as far as the watermark now reaches) rather than
    /// waiting for the next ack call, which on an idle queue may never come.
    async fn release(&self, token: RabbitToken) {
        let generation = token.generation.clone();
        if !generation.alive() {
            return;
        }
        if token.alone && !self.shared.alone_missing() {
            // Given back to the queue of runs alone, it would come back `redelivered` and be
            // counted as a crash: moved there again instead, its count unchanged (but for the
            // crash that made it redelivered, if it was not armed yet).
            let crashes = metadata::crashes_of(&token.properties)
                .saturating_add(u32::from(token.redelivered));
            if copies::move_alone(&self.shared, &token, crashes)
                .await
                .is_ok()
            {
                let report = self.ack(vec![token]).await;
                if let Some((_, err)) = report.failed.first() {
                    tracing::warn!(error = %err, "acking a released suspect after its move failed; it comes back twice");
                }
                return;
            }
            // Given back where it was: the source is to look there again.
            self.shared.set_alone_pending(true);
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
                self.shared.counters.nack_frames.add(1);
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

    /// The queue's ready messages, from a passive declare on a throwaway channel of the
    /// consumer's connection (a passive declare that fails closes its channel; the consuming
    /// one is never risked).
    async fn backlog(&self) -> Option<Backlog> {
        let generation = self.shared.current().clone()?;
        let config = &self.shared.config;
        let count = async {
            let open = generation.connection.create_channel();
            let channel = amqp::bounded("channel open", config.operation_timeout, open).await?;
            let declare = channel.queue_declare(
                amqp::short(&config.queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            );
            let queue = amqp::bounded("queue.declare", config.operation_timeout, declare).await;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "ok".into())).await;
            Ok::<_, RabbitError>(queue?.message_count())
        };
        match count.await {
            Ok(n) => Some(Backlog::new(u64::from(n))),
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the queue's backlog");
                None
            }
        }
    }
}
