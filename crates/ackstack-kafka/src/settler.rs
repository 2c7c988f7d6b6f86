//! [`KafkaSettler`]: acks as watermark commits, dead letters to the dead-letter topic,
//! partition ownership as the lease, releases as rewinds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ackstack_core::deadletter::{DROPPED_ERROR_TRUNCATED, DROPPED_HEADER};
use ackstack_core::{
    AckReport, Armed, Backlog, DeadLetter, Delivery, Failure, Headers, SettleError, SettleFailure,
    Settled,
};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::commit::Shared;
use crate::error::KafkaError;
use crate::headers as record_headers;
use crate::poller::KafkaContext;
use crate::publisher::{produce, record_size};
use crate::stats::KafkaStats;
use crate::token::{KafkaToken, lease_lost};
use crate::watermark::Arming;

/// What the source and every settler share; when the last one goes, the poll thread stops and
/// closes the consumer (which revokes and commits its partitions).
pub(crate) struct Inner {
    pub(crate) consumer: Arc<BaseConsumer<KafkaContext>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) producer: crate::oauth::Producer,
    pub(crate) dlq_topic: String,
    pub(crate) produce_timeout: Duration,
    /// The producer's `message.max.bytes`.
    pub(crate) max_message_bytes: usize,
    /// [`KafkaConfig::commit_timeout`](crate::KafkaConfig::commit_timeout).
    pub(crate) commit_timeout: Duration,
    /// Reported as the lease: see [`KafkaConfig::ownership_check`].
    ///
    /// [`KafkaConfig::ownership_check`]: crate::KafkaConfig::ownership_check
    pub(crate) ownership_check: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.flow.wake();
    }
}

/// The settling half of a [`KafkaSource`](crate::KafkaSource).
///
/// * [`ack`](ackstack_core::Settle::ack) marks offsets complete in their partition's watermark
///   and commits the new contiguous position asynchronously, batched: after
///   [`KafkaConfig::commit_max_count`] acks, or [`KafkaConfig::commit_interval`] after the
///   first uncommitted ack (the poll thread commits on time even when acks stop). Tokens from
///   an ended generation are refused with [`SettleError::LeaseLost`]: their partition was
///   revoked and its new owner reads them again.
/// * [`retry`](ackstack_core::Settle::retry): Kafka retries in place in the runner
///   ([`Capabilities::with_in_place_retry`]), so the runner does not call it. If it is called,
///   the record is left uncommitted ([`Settled::Done`]): the watermark of its partition stays
///   at it until the partition is reassigned or the consumer restarts, which then reads it
///   (and the records after it) again. No retry topic is implemented.
/// * [`dead_letter`](ackstack_core::Settle::dead_letter) produces the record to the
///   dead-letter topic with the same key, payload and headers plus
///   [`DeadLetterMetadata`](ackstack_core::DeadLetterMetadata) headers (replacing earlier
///   `x-ackstack-dl-*`), waits for the delivery report, then returns
///   [`Settled::AckOriginal`] so that the offset may pass. A copy refused for its size is
///   produced again with the error message cut (recorded in [`DROPPED_HEADER`](crate::DROPPED_HEADER));
///   if that is refused too, [`SettleError::Rejected`] (see the crate documentation).
/// * [`extend`](ackstack_core::Settle::extend) checks that the token's partition is still ours
///   in the generation the record was received in (the "lease" is partition ownership, see
///   [`KafkaConfig::ownership_check`]); after a revoke it returns [`SettleError::LeaseLost`], so
///   the runner cancels the handler and never acks the record.
/// * [`release`](ackstack_core::Settle::release) has the record read again: the poll thread
///   seeks its partition back to the lowest unfinished offset (at or below the released one)
///   and starts a new generation there. Every record of the partition still in flight becomes
///   stale (acks refused, `extend` fails so their handlers are cancelled) and is read again, as
///   after a revoke; records completed above the released one are read (and handled) again.
///   If the seek fails, the record stays in flight and the partition's commits are held before
///   it until the partition is reassigned or the consumer restarts (logged at warn). The
///   runner releases only after a failed settlement or cancelled work, not on a lost lease.
/// * [`flush`](ackstack_core::Settle::flush) commits every committable position synchronously.
///
/// [`KafkaConfig::commit_max_count`]: crate::KafkaConfig::commit_max_count
/// [`KafkaConfig::commit_interval`]: crate::KafkaConfig::commit_interval
/// [`KafkaConfig::ownership_check`]: crate::KafkaConfig::ownership_check
/// [`Capabilities::with_in_place_retry`]: ackstack_core::Capabilities::with_in_place_retry
#[derive(Clone)]
pub struct KafkaSettler {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettler")
            .field("dlq_topic", &self.inner.dlq_topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSettler {
    /// Counts of the source's broker calls.
    pub fn stats(&self) -> KafkaStats {
        KafkaStats::new(&self.inner.shared)
    }

    fn is_current(&self, t: &KafkaToken) -> bool {
        self.inner
            .shared
            .assignments()
            .is_current(&t.topic, t.partition, t.generation)
    }

    /// Commits every committable position synchronously and waits for the broker's answer at
    /// most [`KafkaConfig::commit_timeout`]; returns how many partitions were committed.
    ///
    /// [`KafkaError::CommitTimeout`] when no answer came in time. The commit is not withdrawn:
    /// it runs on in a blocking task, which keeps the commit lock until librdkafka answers or
    /// gives up itself (after `socket.timeout.ms`, default 60 s, or without a coordinator
    /// after `session.timeout.ms`). Meanwhile periodic commits skip their turn and stay due,
    /// and they resume as soon as the lock is free.
    ///
    /// [`KafkaConfig::commit_timeout`]: crate::KafkaConfig::commit_timeout
    pub async fn commit_now(&self) -> Result<usize, KafkaError> {
        let consumer = self.inner.consumer.clone();
        let shared = self.inner.shared.clone();
        let task = tokio::task::spawn_blocking(move || shared.commit(&*consumer, true));
        let timeout = self.inner.commit_timeout;
        match tokio::time::timeout(timeout, task).await {
            Ok(joined) => joined
                .map_err(|e| KafkaError::Config(format!("commit task failed: {e}")))?
                .map_err(KafkaError::Client),
            Err(_) => {
                tracing::warn!(
                    ?timeout,
                    "synchronous offset commit not answered in time; it stays queued"
                );
                Err(KafkaError::CommitTimeout(timeout))
            }
        }
    }
}

impl ackstack_core::Settle for KafkaSettler {
    type Token = KafkaToken;

    async fn ack(&self, tokens: Vec<KafkaToken>) -> AckReport<KafkaToken> {
        let mut report = AckReport::all(0);
        {
            let mut a = self.inner.shared.assignments();
            for t in tokens {
                match a.complete(&t.topic, t.partition, t.offset, t.generation) {
                    Ok(()) => report.acked += 1,
                    Err(_) => {
                        let e = lease_lost(&t);
                        report.failed.push((t, e));
                    }
                }
            }
        }
        let shared = &self.inner.shared;
        shared.batch().acked_since += report.acked;
        if shared.commit_due()
            && let Err(error) = shared.commit(&*self.inner.consumer, false)
        {
            // The completions stand; the next commit carries them.
            tracing::warn!(%error, "offset commit could not be queued");
        }
        report
    }

    /// Marks the suspect as running alone in its partition's commit metadata, committed
    /// synchronously before it runs (see `marks.rs`), or gives up on it after `give_up_at`
    /// crashes alone. If that commit fails, it runs anyway (a crash during it is then not
    /// counted; logged).
    async fn arm(
        &self,
        token: KafkaToken,
        _delivery: &Delivery,
        give_up_at: u32,
    ) -> Result<Armed<KafkaToken>, SettleFailure<KafkaToken>> {
        let arming = self.inner.shared.assignments().arm(
            &token.topic,
            token.partition,
            token.offset,
            token.generation,
            give_up_at,
        );
        match arming {
            Err(_) => {
                let e = lease_lost(&token);
                Err(SettleFailure::new(token, e))
            }
            Ok(Arming::GiveUp { crashes }) => Ok(Armed::GiveUp { token, crashes }),
            Ok(Arming::Run { crashes }) => {
                if let Err(error) = self.commit_now().await {
                    tracing::warn!(
                        %error,
                        "could not record a suspect's run alone; a crash during it is not counted"
                    );
                }
                Ok(Armed::Run { token, crashes })
            }
        }
    }

    /// Clears the suspect's run-alone mark and commits synchronously (its own ack, if it was
    /// acked, goes with it).
    async fn step_aside(&self, token: &KafkaToken) -> Result<(), SettleError> {
        self.inner
            .shared
            .assignments()
            .step_aside(&token.topic, token.partition, token.offset);
        match self.commit_now().await {
            Ok(_) => Ok(()),
            Err(error) => Err(SettleError::Broker(Box::new(error))),
        }
    }

    async fn retry(
        &self,
        token: KafkaToken,
        _delivery: &Delivery,
        _after: Duration,
        _failure: &Failure,
    ) -> Result<Settled<KafkaToken>, SettleFailure<KafkaToken>> {
        if !self.is_current(&token) {
            let e = lease_lost(&token);
            return Err(SettleFailure::new(token, e));
        }
        // Left uncommitted: see the type's documentation.
        Ok(Settled::Done)
    }

    async fn dead_letter(
        &self,
        token: KafkaToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<KafkaToken>, SettleFailure<KafkaToken>> {
        if !self.is_current(&token) {
            // Its new owner reads it again and decides; a copy now would be a duplicate.
            let e = lease_lost(&token);
            return Err(SettleFailure::new(token, e));
        }
        let mut metadata = letter.metadata(delivery);
        let mut truncated = false;
        loop {
            let headers = dead_letter_headers(delivery, &metadata, truncated);
            let result = produce(
                &self.inner.producer,
                &self.inner.dlq_topic,
                delivery.key.as_ref(),
                &delivery.payload,
                record_headers::to_record(&headers),
                self.inner.produce_timeout,
            )
            .await;
            let error = match result {
                Ok(()) => {
                    if truncated {
                        tracing::warn!(
                            topic = %token.topic, partition = token.partition, offset = token.offset,
                            "dead-letter copy produced with its error message cut to fit the size limit"
                        );
                    }
                    return Ok(Settled::AckOriginal(token));
                }
                Err(e) if e.is_too_large() => e,
                Err(e) => return Err(SettleFailure::new(token, SettleError::Broker(Box::new(e)))),
            };
            if truncated && metadata.error_message.is_empty() {
                tracing::error!(
                    topic = %token.topic, partition = token.partition, offset = token.offset,
                    %error, "dead-letter copy refused for its size even without an error message"
                );
                let e = SettleError::Rejected(format!(
                    "the dead-letter copy is too large for {} even with the error message cut: {error}",
                    self.inner.dlq_topic
                ));
                return Err(SettleFailure::new(token, e));
            }
            // Cut the message by what the copy is over the producer's limit; when it is within
            // that limit the broker's is lower and unknown: leave none.
            truncated = true;
            let shrunk = dead_letter_headers(delivery, &metadata, true);
            let over = record_size(delivery.key.as_ref(), &delivery.payload, &shrunk)
                .saturating_sub(self.inner.max_message_bytes);
            metadata.cut_error_message(if over == 0 { usize::MAX } else { over });
        }
    }

    /// Kafka has no per-record lease: the "lease" is ownership of the record's partition in
    /// the generation it was received in. `Ok` while that generation is current;
    /// [`SettleError::LeaseLost`] once the partition was revoked (or rewound by a release),
    /// which makes the runner cancel the handler and never ack the record.
    async fn extend(&self, token: &KafkaToken, _by: Duration) -> Result<(), SettleError> {
        if self.is_current(token) {
            Ok(())
        } else {
            Err(lease_lost(token))
        }
    }

    /// Has the poll thread read the partition again from the released record (see
    /// [`KafkaSettler`]). A token whose generation already ended needs nothing: its
    /// partition's new owner reads it again.
    async fn release(&self, token: KafkaToken) {
        if !self.is_current(&token) {
            tracing::debug!(
                topic = %token.topic, partition = token.partition, offset = token.offset,
                "released record's partition was already revoked; its new owner reads it again"
            );
            return;
        }
        tracing::warn!(
            topic = %token.topic, partition = token.partition, offset = token.offset,
            "record released: its partition is rewound to its lowest unfinished offset and the \
             records of the partition still in flight are read again"
        );
        self.inner.shared.rewinds().push(token);
    }

    /// Leaves the record unfinished: the partition's final commit stops right before it, and
    /// the next owner reads it (and what follows it) again. A rewind here would start a new
    /// generation and throw away the completions of the partition's records still finishing
    /// in the drain, so the final commit would fall short of them.
    async fn release_at_shutdown(&self, token: KafkaToken) {
        tracing::debug!(
            topic = %token.topic, partition = token.partition, offset = token.offset,
            "record left unfinished at shutdown; its partition's commit stops before it"
        );
    }

    /// Commits every position synchronously; the records handed out took nothing down, so
    /// the marks say no suspect beyond the position but those an earlier owner left.
    async fn flush(&self) {
        self.inner.shared.assignments().stop_handing_out();
        match self.commit_now().await {
            Ok(n) => tracing::debug!(partitions = n, "offsets flushed"),
            Err(error) => tracing::warn!(%error, "final offset commit failed"),
        }
    }

    /// The lag of each assigned partition: its high watermark minus the position this member
    /// can commit (or, before it has one, the committed offset; or the low watermark).
    async fn backlog(&self) -> Option<Backlog> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.lag()).await {
            Ok(Ok(backlog)) => Some(backlog),
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot read the partitions' lag");
                None
            }
            Err(_) => None,
        }
    }
}

/// The longest one backlog question may take.
const LAG_BUDGET: Duration = Duration::from_secs(10);

impl Inner {
    /// Asks the cluster for the committed offsets and watermarks of the assignment (blocking).
    fn lag(&self) -> rdkafka::error::KafkaResult<Backlog> {
        // Bounded as a whole, so that a slow cluster cannot keep this thread (and the
        // consumer it holds) long after the run: at most LAG_BUDGET, however many partitions.
        let started = std::time::Instant::now();
        let left = || LAG_BUDGET.saturating_sub(started.elapsed());
        let committed = self.consumer.committed(left().min(self.commit_timeout))?;
        let mut backlog = Backlog::default();
        for tp in committed.elements() {
            if left().is_zero() {
                return Err(rdkafka::error::KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            let (low, high) = self.consumer.fetch_watermarks(
                tp.topic(),
                tp.partition(),
                left().min(self.commit_timeout),
            )?;
            let ours = self
                .shared
                .assignments()
                .committable(tp.topic(), tp.partition());
            let position = ours
                .or_else(|| tp.offset().to_raw().filter(|&o| o >= 0))
                .unwrap_or(low)
                .max(low);
            let lag = u64::try_from(high.saturating_sub(position)).unwrap_or(0);
            backlog.total += lag;
            backlog.partitions.push((tp.partition(), lag));
        }
        Ok(backlog)
    }
}

/// The headers of a dead-letter copy: the original ones, then `metadata` (replacing earlier
/// metadata), then [`DROPPED_HEADER`] when the error message was cut.
fn dead_letter_headers(
    delivery: &Delivery,
    metadata: &ackstack_core::DeadLetterMetadata,
    truncated: bool,
) -> Headers {
    let mut headers = delivery.headers.clone();
    metadata.apply_to(&mut headers);
    if truncated {
        headers.append(DROPPED_HEADER, DROPPED_ERROR_TRUNCATED);
    }
    headers
}
