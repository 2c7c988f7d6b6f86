//! [`KafkaSource`] and [`KafkaSettler`]: a consumer-group member over a polled
//! [`BaseConsumer`], with watermark commits tied to the assignment generation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use ackstack_core::{Alone, Capabilities, Origin, Received, SourceError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;

use crate::oauth::{Producer, ProducerContext};
use crate::poller::KafkaContext;
pub use crate::settler::KafkaSettler;
pub use crate::stats::KafkaStats;
pub use crate::token::KafkaToken;
use crate::watermark::Raise;

use crate::commit::Shared;
use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::poller;
use crate::settler::Inner;

/// How long [`KafkaSource::receive`] waits for a first record before returning none.
const IDLE_WAIT: Duration = Duration::from_secs(1);

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
///   Each assigned partition's records come from its own librdkafka queue, which the thread
///   does not read while the channel is full (it keeps serving the consumer queue): nothing
///   prefetched is thrown away, and librdkafka's `queued.min.messages` /
///   `queued.max.messages.kbytes` bound what waits, per partition (see
///   [`KafkaConfig::buffer`]). So a record that retries in place never
///   makes the consumer buffer without bound nor leave its group (see `queues.rs`);
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
    origin: Origin,
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
        KafkaStats::new(&self.inner.shared)
    }

    /// Creates the consumer, subscribes to the topic and starts the poll thread.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        config.validate()?;
        let shared = Arc::new(Shared::new(config.commit_interval, config.commit_max_count));
        let mut consumer: BaseConsumer<KafkaContext> = config
            .consumer_config()
            .create_with_context(KafkaContext::new(shared.clone(), config.tokens.clone()))
            .map_err(KafkaError::from)?;
        let waker = shared.clone();
        consumer.set_nonempty_callback(move || waker.flow.wake());
        consumer
            .subscribe(&[config.topic.as_str()])
            .map_err(KafkaError::from)?;
        let consumer = Arc::new(consumer);
        consumer.context().queues.set_consumer(&consumer);
        let producer: Producer = config
            .producer_config()
            .create_with_context(ProducerContext {
                tokens: config.tokens.clone(),
            })
            .map_err(KafkaError::from)?;
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        let origin = Origin::new("kafka", config.topic.as_str(), config.consumer_name());
        let thread = poller::spawn(
            consumer.clone(),
            shared.clone(),
            tx,
            origin.queue.clone(),
            origin.consumer.clone(),
        )
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
            origin,
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

    /// Before `records` go to handlers: where one is not below its partition's confirmed
    /// `started_below` mark, raises the mark and commits it synchronously first; where one
    /// comes within half a chunk of it, raises it with a synchronous commit in the background
    /// (see `marks.rs`). So a crash in a handler of theirs leaves them suspects for the next
    /// owner, and `receive` rarely waits for a commit.
    async fn mark_started(&self, records: &[Received<KafkaToken>]) {
        let (now, ahead) = {
            let mut a = self.inner.shared.assignments();
            let mut now = false;
            for r in records {
                let t = &r.token;
                now |= a.raise_started(&t.topic, t.partition, t.offset) == Raise::Now;
            }
            (now, a.raise_pending())
        };
        if !now && !ahead {
            return;
        }
        let settler = KafkaSettler {
            inner: self.inner.clone(),
        };
        if now {
            if let Err(error) = settler.commit_now().await {
                tracing::warn!(
                    %error,
                    "could not record which records go to handlers; a crash in one of these \
                     is not counted"
                );
            }
            return;
        }
        let shared = &self.inner.shared;
        if ahead && !shared.raising.swap(true, Ordering::SeqCst) {
            tokio::spawn(async move {
                if let Err(error) = settler.commit_now().await {
                    tracing::debug!(%error, "raising the crash marks ahead failed; raised later");
                }
                settler.inner.shared.raising.store(false, Ordering::SeqCst);
            });
        }
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
        let stopped = || SourceError::Fatal("the Kafka poll thread has stopped".into());
        let first = match self.rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => return Err(stopped()),
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing buffered: while the cluster cannot be reached, say so (the runner
                // counts it and shows the broker unreachable) instead of waiting in silence.
                if let Some(why) = self.inner.shared.reach.error() {
                    return Err(SourceError::Disconnected(why.into()));
                }
                match tokio::time::timeout(IDLE_WAIT, self.rx.recv()).await {
                    Err(_) => return Ok(out),
                    Ok(None) => return Err(stopped()),
                    Ok(Some(item)) => item,
                }
            }
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
        self.inner.shared.flow.room_made();
        self.mark_started(&out).await;
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
            .with_alone(Alone::Attempts)
            .with_lease(self.inner.ownership_check)
    }

    fn origin(&self) -> Origin {
        self.origin.clone()
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
