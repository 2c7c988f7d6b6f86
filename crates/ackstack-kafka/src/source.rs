//! [`KafkaSource`] and [`KafkaSettler`]: a consumer-group member over a polled
//! [`BaseConsumer`], with watermark commits tied to the assignment generation.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackstack_core::{
    AckReport, Capabilities, DeadLetter, Delivery, Failure, Headers, Origin, Received, SettleError,
    SettleFailure, Settled, SourceError,
};
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::headers as record_headers;
use crate::publisher::{produce, record_size};
use crate::watermark::Assignments;
use crate::{DROPPED_ERROR_TRUNCATED, DROPPED_HEADER, KafkaError, MESSAGE_ID_HEADER};

/// How long one poll of the consumer blocks; also the period of time-based commits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long [`KafkaSource::receive`] waits for a first record before returning none.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long moving a partition's read position back (for a released record) may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// The handle of one received record: where it is and in which assignment generation it was
/// received. Acks of a token whose generation has ended (the partition was revoked) are refused
/// with [`SettleError::LeaseLost`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaToken {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl KafkaToken {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// The record's offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The assignment generation the record was received in.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// State shared by the poll thread, the rebalance callbacks and the settler.
struct Shared {
    assignments: Mutex<Assignments>,
    /// Held from taking commit positions until their commit is sent (a synchronous one until
    /// it is answered), so that commits reach the broker in the order their positions were
    /// taken: an older position never lands after a newer one. Taken before `assignments`.
    commit_order: Mutex<()>,
    batch: Mutex<CommitBatch>,
    /// Set by [`KafkaSource::close`]: stop handing out records.
    closing: AtomicBool,
    /// Set when the source and every settler are gone: the poll thread ends.
    stop: AtomicBool,
    commit_interval: Duration,
    commit_max_count: usize,
    /// Released records whose partitions the poll thread is to read again from them.
    rewinds: Mutex<Vec<KafkaToken>>,
    /// Offset commit requests sent (async, sync and on revoke).
    commits: Arc<AtomicU64>,
}

/// Acks since the last commit, and when that was.
struct CommitBatch {
    acked_since: usize,
    last: Instant,
}

impl Shared {
    fn assignments(&self) -> MutexGuard<'_, Assignments> {
        // The state stays consistent even if a holder panicked: every update is one call.
        self.assignments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn batch(&self) -> MutexGuard<'_, CommitBatch> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rewinds(&self) -> MutexGuard<'_, Vec<KafkaToken>> {
        self.rewinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a commit is due by count or by time.
    fn commit_due(&self) -> bool {
        let b = self.batch();
        b.acked_since > 0
            && (b.acked_since >= self.commit_max_count || b.last.elapsed() >= self.commit_interval)
    }

    /// Commits every position that moved, asynchronously (or synchronously with `sync`, then
    /// every committable position).
    ///
    /// Positions are taken and sent under [`Shared::commit_order`], so two commits never reach
    /// the broker out of order. A synchronous commit keeps it until answered; an asynchronous
    /// one does not wait for it: while a synchronous commit is on its way it is skipped and
    /// stays due (`Ok(0)`), so acks and the poll thread never block behind the broker.
    fn commit(&self, consumer: &impl CommitSink, sync: bool) -> KafkaResult<usize> {
        let _order = if sync {
            self.commit_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        } else {
            match self.commit_order.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return Ok(0),
            }
        };
        {
            let mut b = self.batch();
            b.acked_since = 0;
            b.last = Instant::now();
        }
        let positions = self.assignments().take_commits(sync);
        if positions.is_empty() {
            return Ok(0);
        }
        let tpl = position_list(&positions)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        consumer.send_commit(&tpl, mode)?;
        Ok(positions.len())
    }

    /// Ends the generation of the revoked `partitions` (later acks of theirs are refused),
    /// then commits what was contiguously completed, synchronously, unless the assignment was
    /// `lost` (another member may own the partitions already). Work still in flight is
    /// abandoned: the position never passes it, so the next owner reads it again.
    ///
    /// Waits for a commit already on its way ([`Shared::commit_order`]): its positions of these
    /// partitions are older and must land first.
    fn revoke(&self, consumer: &impl CommitSink, partitions: &[(String, i32)], lost: bool) {
        let _order = self
            .commit_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut positions = Vec::new();
        {
            let mut a = self.assignments();
            for (topic, partition) in partitions {
                if let Some(pos) = a.revoke(topic, *partition) {
                    positions.push((topic.clone(), *partition, pos));
                }
            }
        }
        tracing::info!(
            partitions = partitions.len(),
            commits = positions.len(),
            "partitions revoked"
        );
        if positions.is_empty() || lost {
            return;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        let result =
            position_list(&positions).and_then(|t| consumer.send_commit(&t, CommitMode::Sync));
        if let Err(error) = result {
            tracing::warn!(%error, "commit on revoke failed; the records will be read again");
        }
    }
}

/// Where offset commits go: the consumer (or, in unit tests, a recorder).
pub(crate) trait CommitSink {
    /// Commits `offsets` in `mode`.
    fn send_commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()>;
}

impl<C: ConsumerContext> CommitSink for BaseConsumer<C> {
    fn send_commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
        self.commit(offsets, mode)
    }
}

fn position_list(positions: &[(String, i32, i64)]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, pos) in positions {
        // A committed position is the next offset to read: the watermark already is one, so
        // nothing is added here (storing a message's offset would add 1; we never do that).
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*pos))?;
    }
    Ok(tpl)
}

/// The consumer's context: rebalance callbacks commit revoked partitions' watermarks and start
/// new generations; librdkafka's log lines go to `tracing`.
pub struct KafkaContext {
    shared: Arc<Shared>,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "client error");
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                self.shared
                    .revoke(consumer, &partitions, consumer.assignment_lost());
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut a = self.shared.assignments();
            for e in tpl.elements() {
                a.assign(e.topic(), e.partition());
            }
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(partitions = offsets.count(), "offsets committed"),
            Err(error) => {
                tracing::warn!(%error, "offset commit failed; the records will be read again")
            }
        }
    }
}

/// What the source and every settler share; when the last one goes, the poll thread stops and
/// closes the consumer (which revokes and commits its partitions).
struct Inner {
    consumer: Arc<BaseConsumer<KafkaContext>>,
    shared: Arc<Shared>,
    producer: FutureProducer,
    dlq_topic: String,
    produce_timeout: Duration,
    /// The producer's `message.max.bytes`.
    max_message_bytes: usize,
    /// [`KafkaConfig::commit_timeout`].
    commit_timeout: Duration,
    /// Reported as the lease: see [`KafkaConfig::ownership_check`].
    ownership_check: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// A Kafka consumer-group member as an ackstack [`Source`](ackstack_core::Source).
///
/// # Design
///
/// A [`BaseConsumer`] is polled on a dedicated thread rather than a `StreamConsumer` being
/// polled from [`receive`](ackstack_core::Source::receive):
///
/// * the consumer is polled every 50 ms whatever the runner does, so rebalance callbacks run
///   promptly, `max.poll.interval.ms` is never exceeded while handlers (or in-place retries)
///   hold every runner slot, and every queued event (logs, statistics, errors, commit results)
///   is drained, which is what stops a `StreamConsumer` from waking when neglected;
/// * records pass to the runner through a bounded channel of [`KafkaConfig::buffer`] records.
///   When it is full the thread keeps the record and **pauses** its partition (still polling);
///   once the backlog is handed over, the partitions are resumed. So a record that retries in
///   place never makes the consumer buffer without bound nor leave its group;
/// * every offset is tracked in its partition's watermark on the poll thread, before the runner
///   sees it, and rebalance callbacks run on that same thread, so a token's generation is always
///   the one the record was fetched in.
///
/// Commits: see [`KafkaSettler`]. The consumer always runs with `enable.auto.commit=false` and
/// `enable.auto.offset.store=false`; positions are committed explicitly as offset lists.
pub struct KafkaSource {
    inner: Arc<Inner>,
    rx: mpsc::Receiver<Result<Received<KafkaToken>, SourceError>>,
    thread: Option<JoinHandle<()>>,
}

/// Counts of a [`KafkaSource`]'s broker calls, readable while and after it runs.
#[derive(Clone, Debug, Default)]
pub struct KafkaStats {
    commits: Arc<AtomicU64>,
}

impl KafkaStats {
    /// Offset commit requests sent so far (timed and counted batches, flushes, revokes).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("dlq_topic", &self.inner.dlq_topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Counts of this source's broker calls (shared with its settlers).
    pub fn stats(&self) -> KafkaStats {
        KafkaStats {
            commits: self.inner.shared.commits.clone(),
        }
    }

    /// Creates the consumer, subscribes to the topic and starts the poll thread.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            assignments: Mutex::new(Assignments::new()),
            commit_order: Mutex::new(()),
            batch: Mutex::new(CommitBatch {
                acked_since: 0,
                last: Instant::now(),
            }),
            closing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            commit_interval: config.commit_interval,
            commit_max_count: config.commit_max_count,
            rewinds: Mutex::new(Vec::new()),
            commits: Arc::default(),
        });
        let consumer: BaseConsumer<KafkaContext> = config
            .consumer_config()
            .create_with_context(KafkaContext {
                shared: shared.clone(),
            })
            .map_err(KafkaError::Client)?;
        consumer
            .subscribe(&[config.topic.as_str()])
            .map_err(KafkaError::Client)?;
        let consumer = Arc::new(consumer);
        let producer: FutureProducer = config
            .producer_config()
            .create()
            .map_err(KafkaError::Client)?;
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        let poller = Poller {
            consumer: consumer.clone(),
            shared: shared.clone(),
            tx,
            topic: Arc::from(config.topic.as_str()),
            consumer_name: Arc::from(config.consumer_name()),
            pending: VecDeque::new(),
            paused: HashSet::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ackstack-kafka-poll".to_string())
            .spawn(move || poller.run())
            .map_err(|e| KafkaError::Config(format!("cannot start the poll thread: {e}")))?;
        Ok(KafkaSource {
            inner: Arc::new(Inner {
                consumer,
                shared,
                producer,
                dlq_topic: config.dlq_topic(),
                produce_timeout: config.produce_timeout,
                max_message_bytes: config.max_message_bytes(),
                commit_timeout: config.commit_timeout,
                ownership_check: config.ownership_check,
            }),
            rx,
            thread: Some(thread),
        })
    }

    /// The committable position of `partition` in its current generation (for tests and
    /// diagnostics); `None` when not assigned or nothing is known yet.
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.inner
            .shared
            .assignments()
            .committable(topic, partition)
    }

    /// How many partitions are assigned to this member now.
    pub fn assigned_partitions(&self) -> usize {
        self.inner.shared.assignments().len()
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // The poll thread ends by itself once the settlers are gone too; it is not joined here
        // so that dropping never blocks an async task.
        drop(self.thread.take());
    }
}

impl ackstack_core::Source for KafkaSource {
    type Token = KafkaToken;
    type Settler = KafkaSettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<KafkaToken>>, SourceError> {
        let mut out = Vec::new();
        if self.inner.shared.closing.load(Ordering::SeqCst) {
            return Ok(out);
        }
        let first = match tokio::time::timeout(IDLE_WAIT, self.rx.recv()).await {
            Err(_) => return Ok(out),
            Ok(None) => {
                return Err(SourceError::Fatal(
                    "the Kafka poll thread has stopped".into(),
                ));
            }
            Ok(Some(item)) => item,
        };
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let received = item?;
            let t = &received.token;
            if self
                .inner
                .shared
                .assignments()
                .is_current(&t.topic, t.partition, t.generation)
            {
                out.push(received);
            }
            if out.len() >= max.max(1) {
                break;
            }
            next = self.rx.try_recv().ok();
        }
        Ok(out)
    }

    fn settler(&self) -> KafkaSettler {
        KafkaSettler {
            inner: self.inner.clone(),
        }
    }

    /// Acks up to 1000 per call, retries in place, and a "lease" of
    /// [`KafkaConfig::ownership_check`]: partition ownership, checked by
    /// [`extend`](ackstack_core::Settle::extend) (see the crate documentation).
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(1000)
            .with_in_place_retry()
            .with_lease(self.inner.ownership_check)
    }

    async fn close(&mut self) {
        // Stop handing out records; the member stays in the group (and keeps its partitions)
        // so that in-flight work can still be acked and committed by the final flush. Records
        // already buffered stay tracked as in flight, so no commit passes them.
        self.inner.shared.closing.store(true, Ordering::SeqCst);
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

/// The settling half of a [`KafkaSource`].
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
#[derive(Clone)]
pub struct KafkaSettler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaSettler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettler")
            .field("dlq_topic", &self.inner.dlq_topic)
            .finish_non_exhaustive()
    }
}

fn lease_lost(t: &KafkaToken) -> SettleError {
    SettleError::LeaseLost(format!(
        "partition {}/{} was revoked (generation {} ended)",
        t.topic, t.partition, t.generation
    ))
}

impl KafkaSettler {
    /// Counts of the source's broker calls.
    pub fn stats(&self) -> KafkaStats {
        KafkaStats {
            commits: self.inner.shared.commits.clone(),
        }
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
            let keep = if over == 0 {
                0
            } else {
                metadata.error_message.len().saturating_sub(over)
            };
            metadata.error_message = if keep <= '…'.len_utf8() {
                String::new()
            } else {
                ackstack_core::error::truncate(std::mem::take(&mut metadata.error_message), keep)
            };
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

    async fn flush(&self) {
        match self.commit_now().await {
            Ok(n) => tracing::debug!(partitions = n, "offsets flushed"),
            Err(error) => tracing::warn!(%error, "final offset commit failed"),
        }
    }
}

/// The poll loop's own state.
struct Poller {
    consumer: Arc<BaseConsumer<KafkaContext>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Received<KafkaToken>, SourceError>>,
    topic: Arc<str>,
    consumer_name: Arc<str>,
    /// Records received but not yet handed to the runner (the channel was full).
    pending: VecDeque<Received<KafkaToken>>,
    /// Partitions paused because `pending` holds records of theirs.
    paused: HashSet<(Arc<str>, i32)>,
}

impl Poller {
    fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            if self.shared.closing.load(Ordering::SeqCst) {
                self.pending.clear();
            }
            self.rewind();
            self.hand_over();
            if self.shared.commit_due()
                && let Err(error) = self.shared.commit(&*self.consumer, false)
            {
                tracing::warn!(%error, "offset commit could not be queued");
            }
            let consumer = self.consumer.clone();
            match consumer.poll(POLL_INTERVAL) {
                None => {}
                Some(Ok(message)) => self.on_message(&message),
                Some(Err(error)) => self.on_error(error),
            }
            drop(consumer);
        }
        // The settlers are gone: their final flush has run. Wait (briefly) for the last other
        // reference so that the consumer is closed here, on this thread: closing leaves the
        // group, which revokes (and commits) the partitions through the rebalance callback.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.consumer) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!("Kafka poll thread stopping; closing the consumer");
    }

    fn on_message(&mut self, m: &BorrowedMessage<'_>) {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        if self.shared.closing.load(Ordering::SeqCst) {
            // Not tracked and never handed out: read again by the next owner.
            self.pause(topic, partition);
            return;
        }
        let Some(generation) = self.shared.assignments().track(topic, partition, offset) else {
            tracing::debug!(
                topic,
                partition,
                offset,
                "record of an unassigned partition dropped"
            );
            return;
        };
        let topic_arc: Arc<str> = if *self.topic == *topic {
            self.topic.clone()
        } else {
            Arc::from(topic)
        };
        let delivery = to_delivery(m, topic_arc.clone(), self.consumer_name.clone());
        let token = KafkaToken {
            topic: topic_arc,
            partition,
            offset,
            generation,
        };
        self.pending.push_back(Received { delivery, token });
        self.hand_over();
        if let Some(last) = self.pending.back() {
            let (t, p) = (last.token.topic.clone(), last.token.partition);
            self.pause(&t, p);
        }
    }

    fn on_error(&mut self, error: rdkafka::error::KafkaError) {
        use rdkafka::error::KafkaError as E;
        match error {
            E::PartitionEOF(_) => {}
            E::MessageConsumptionFatal(code) => {
                tracing::error!(%code, "fatal consumer error");
                let e = SourceError::Fatal(Box::new(E::MessageConsumptionFatal(code)));
                // Best effort; the runner stops receiving on a fatal error.
                let _ = self.tx.try_send(Err(e));
                self.shared.closing.store(true, Ordering::SeqCst);
            }
            other => {
                tracing::warn!(error = %other, "consumer error (librdkafka retries by itself)")
            }
        }
    }

    /// Reads the partitions of released records again: seeks each back to its lowest
    /// unfinished offset, then starts a new generation there (in that order, so that a failed
    /// seek changes nothing: the record then stays in flight and its partition's commits stop
    /// before it until the partition is reassigned). Runs on the poll thread, between polls,
    /// so no record of the old read position is tracked in the new generation (and the new
    /// watermark holds the position until the record there is read again regardless).
    fn rewind(&mut self) {
        let requests = std::mem::take(&mut *self.shared.rewinds());
        for t in requests {
            let position =
                self.shared
                    .assignments()
                    .rewind_position(&t.topic, t.partition, t.generation);
            let position = match position {
                // Revoked or already rewound (several releases of one generation): nothing to do.
                Err(_) => continue,
                Ok(None) => t.offset,
                Ok(Some(p)) => p.min(t.offset),
            };
            if let Err(error) = self.consumer.seek(
                &t.topic,
                t.partition,
                Offset::Offset(position),
                SEEK_TIMEOUT,
            ) {
                tracing::warn!(
                    %error, topic = %t.topic, partition = t.partition, offset = t.offset,
                    "cannot rewind the partition of a released record; its commits are held \
                     before the record until the partition is reassigned or the consumer restarts"
                );
                continue;
            }
            let rewound =
                self.shared
                    .assignments()
                    .rewind(&t.topic, t.partition, t.generation, position);
            match rewound {
                Ok(generation) => tracing::info!(
                    topic = %t.topic, partition = t.partition, position, generation,
                    "partition rewound for a released record"
                ),
                // Cannot happen: only this thread revokes (inside poll) or rewinds.
                Err(_) => tracing::debug!("partition revoked while rewinding"),
            }
        }
    }

    /// Hands buffered records to the runner while the channel has room; resumes paused
    /// partitions once nothing is buffered and the channel is at least half empty. (Resuming
    /// as soon as one slot frees would pause again on the next record: each pause drops
    /// librdkafka's prefetched records of the partition, to be fetched again.)
    fn hand_over(&mut self) {
        while let Some(r) = self.pending.pop_front() {
            let t = &r.token;
            if !self
                .shared
                .assignments()
                .is_current(&t.topic, t.partition, t.generation)
            {
                continue;
            }
            match self.tx.try_send(Ok(r)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Ok(r))) => {
                    self.pending.push_front(r);
                    return;
                }
                Err(_) => {
                    // The source was dropped or closed: nothing more is handed out.
                    self.pending.clear();
                    self.shared.closing.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        let half_empty = self.tx.capacity() * 2 >= self.tx.max_capacity();
        if !self.paused.is_empty() && half_empty && !self.shared.closing.load(Ordering::SeqCst) {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in self.paused.drain() {
                tpl.add_partition(&t, p);
            }
            if let Err(error) = self.consumer.resume(&tpl) {
                tracing::debug!(%error, "resume failed (partition no longer assigned?)");
            }
        }
    }

    fn pause(&mut self, topic: &str, partition: i32) {
        let key: (Arc<str>, i32) = (Arc::from(topic), partition);
        if self.paused.contains(&key) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        match self.consumer.pause(&tpl) {
            Ok(()) => {
                self.paused.insert(key);
            }
            Err(error) => tracing::debug!(%error, topic, partition, "pause failed"),
        }
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

/// Converts a record. A header with a null value becomes a header with an empty value (the
/// core [`Headers`](ackstack_core::Headers) hold bytes only), so a dead-letter copy carries it as empty, not null; a
/// header whose name is not UTF-8 is left out (logged). A null payload (tombstone) becomes an
/// empty payload.
fn to_delivery(m: &BorrowedMessage<'_>, topic: Arc<str>, consumer: Arc<str>) -> Delivery {
    let converted = record_headers::from_record(m.headers());
    if converted.skipped > 0 {
        tracing::warn!(
            topic = &*topic,
            partition = m.partition(),
            offset = m.offset(),
            skipped = converted.skipped,
            "record headers whose name is not UTF-8 were left out"
        );
    }
    let headers = converted.headers;
    let attempt = record_headers::attempt_of(&headers);
    let message_id = headers.get_str(MESSAGE_ID_HEADER).map(str::to_string);
    let mut origin = Origin::new("kafka", topic, consumer);
    origin.partition = Some(m.partition());
    origin.offset = Some(m.offset());
    Delivery {
        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
        key: m.key().map(Bytes::copy_from_slice),
        message_id,
        attempt,
        origin,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::mpsc as std_mpsc;

    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            assignments: Mutex::new(Assignments::new()),
            commit_order: Mutex::new(()),
            batch: Mutex::new(CommitBatch {
                acked_since: 0,
                last: Instant::now(),
            }),
            closing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            commit_interval: Duration::from_secs(1),
            commit_max_count: 1000,
            rewinds: Mutex::new(Vec::new()),
            commits: Arc::default(),
        })
    }

    /// Records the committed positions of `t`/0 in the order they reach it. The first commit
    /// stalls (a slow network, a descheduled thread) after telling `entered`, until `release`.
    struct Recorder {
        positions: Mutex<Vec<i64>>,
        gate: Mutex<Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>>,
    }

    impl Recorder {
        fn gated() -> (Arc<Self>, std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
            let (entered_tx, entered_rx) = std_mpsc::channel();
            let (release_tx, release_rx) = std_mpsc::channel();
            let recorder = Recorder {
                positions: Mutex::new(Vec::new()),
                gate: Mutex::new(Some((entered_tx, release_rx))),
            };
            (Arc::new(recorder), entered_rx, release_tx)
        }

        fn positions(&self) -> Vec<i64> {
            self.positions.lock().unwrap().clone()
        }
    }

    impl CommitSink for Recorder {
        fn send_commit(&self, offsets: &TopicPartitionList, _mode: CommitMode) -> KafkaResult<()> {
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, release)) = gate {
                entered.send(()).unwrap();
                release.recv().unwrap();
            }
            for e in offsets.elements() {
                if let Offset::Offset(pos) = e.offset() {
                    self.positions.lock().unwrap().push(pos);
                }
            }
            Ok(())
        }
    }

    /// `t`/0 assigned, offsets 0..10 received, 0..done completed.
    fn partition(shared: &Shared, done: i64) -> u64 {
        let mut a = shared.assignments();
        let g = a.assign("t", 0);
        for o in 0..10 {
            a.track("t", 0, o);
        }
        for o in 0..done {
            a.complete("t", 0, o, g).unwrap();
        }
        g
    }

    fn complete(shared: &Shared, g: u64, offsets: std::ops::Range<i64>) {
        let mut a = shared.assignments();
        for o in offsets {
            a.complete("t", 0, o, g).unwrap();
        }
        drop(a);
        shared.batch().acked_since += 1;
    }

    fn assert_never_backwards(positions: &[i64]) {
        assert!(
            positions.windows(2).all(|w| w[0] <= w[1]),
            "a commit went backwards: {positions:?}"
        );
    }

    #[test]
    fn a_stalled_sync_flush_never_lands_after_a_newer_async_commit() {
        let shared = shared();
        let g = partition(&shared, 5);
        let (sink, entered, release) = Recorder::gated();
        // The flush takes position 5 and stalls before its commit is sent.
        let flush = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, true)
        });
        entered.recv().unwrap();
        // Meanwhile more completes and the periodic commit runs (to its end, before the
        // flush's commit goes out).
        complete(&shared, g, 5..8);
        std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, false)
        })
        .join()
        .unwrap()
        .unwrap();
        release.send(()).unwrap();
        flush.join().unwrap().unwrap();
        // Whatever was held back goes with the next periodic commit.
        shared.commit(&*sink, false).unwrap();
        let positions = sink.positions();
        assert_never_backwards(&positions);
        assert_eq!(positions.last(), Some(&8), "{positions:?}");
    }

    #[test]
    fn a_revoke_commit_never_lands_before_an_older_stalled_flush() {
        let shared = shared();
        let g = partition(&shared, 5);
        let (sink, entered, release) = Recorder::gated();
        let flush = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, true)
        });
        entered.recv().unwrap();
        complete(&shared, g, 5..8);
        // The partition is revoked while the flush's older commit is still on its way.
        let (revoked_tx, revoked_rx) = std_mpsc::channel();
        let revoke = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || {
                shared.revoke(&*sink, &[("t".to_string(), 0)], false);
                revoked_tx.send(()).unwrap();
            }
        });
        // Let the revoke finish first if it can (it must not commit before the flush does).
        let _ = revoked_rx.recv_timeout(Duration::from_millis(500));
        release.send(()).unwrap();
        flush.join().unwrap().unwrap();
        revoke.join().unwrap();
        let positions = sink.positions();
        assert_never_backwards(&positions);
        assert_eq!(positions, vec![5, 8]);
        assert!(!shared.assignments().is_current("t", 0, g));
    }
}
