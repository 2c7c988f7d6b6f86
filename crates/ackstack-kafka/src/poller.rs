//! The poll thread: serves the consumer queue (rebalances, errors, commit results) on every
//! turn, takes records from the partitions' own queues while the runner has room, tracks each
//! record in its partition's watermark, hands records to the runner, rewinds released
//! partitions; and [`KafkaContext`], whose rebalance callbacks run on that thread. See
//! [`crate::queues`] for the flow control.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackstack_core::{Delivery, Origin, Received, SourceError};
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::commit::Shared;
use crate::headers as record_headers;
use crate::headers::MESSAGE_ID_HEADER;
use crate::oauth::Tokens;
use crate::queues::PartitionQueues;
use crate::token::KafkaToken;

/// How long the poll thread sleeps at most when it has nothing to do; also the period of
/// time-based commits.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Events and records taken from the consumer queue per turn at most.
const MAIN_BATCH: usize = 64;
/// Records taken from one partition's queue per turn at most, so that partitions take turns.
const PARTITION_BATCH: usize = 256;
/// How long moving a partition's read position back (for a released record) may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// The consumer's context: rebalance callbacks commit revoked partitions' watermarks and start
/// new generations; librdkafka's log lines go to `tracing`.
pub(crate) struct KafkaContext {
    shared: Arc<Shared>,
    /// SASL/OAUTHBEARER tokens, when the configuration has a provider.
    tokens: Tokens,
    /// The partitions' own queues, split here before each assignment takes effect.
    pub(crate) queues: PartitionQueues<KafkaContext>,
}

impl KafkaContext {
    pub(crate) fn new(shared: Arc<Shared>, tokens: Tokens) -> Self {
        KafkaContext {
            shared,
            tokens,
            queues: PartitionQueues::default(),
        }
    }
}

/// A librdkafka log line, through `tracing` at its level.
pub(crate) fn log(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
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

impl ClientContext for KafkaContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log(level, fac, log_message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.tokens.generate(config)
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error
            .rdkafka_error_code()
            .is_some_and(crate::reach::means_unreachable)
        {
            self.shared.reach.lost(reason);
        }
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
                let lost = consumer.assignment_lost();
                self.shared.revocations.add(partitions.len() as u64);
                if lost {
                    self.shared.lost.add(partitions.len() as u64);
                }
                self.shared.revoke(consumer, &partitions, lost);
            }
            Rebalance::Assign(tpl) => {
                let shared = self.shared.clone();
                self.queues.split(tpl, move || shared.flow.wake());
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let recovered = crate::marks::recover_marks(consumer, tpl);
            let mut a = self.shared.assignments();
            for e in tpl.elements() {
                a.assign(e.topic(), e.partition());
            }
            for (topic, partition, marks) in recovered {
                a.recover(&topic, partition, marks);
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

/// Starts the poll thread of `consumer`; it hands records of `topic` to `tx` and ends once
/// [`Shared::stop`] is set.
pub(crate) fn spawn(
    consumer: Arc<BaseConsumer<KafkaContext>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<Received<KafkaToken>, SourceError>>,
    topic: Arc<str>,
    consumer_name: Arc<str>,
) -> std::io::Result<JoinHandle<()>> {
    let poller = Poller {
        consumer,
        shared,
        tx,
        topic,
        consumer_name,
        pending: VecDeque::new(),
        paused: HashSet::new(),
        queues: Vec::new(),
        next_queue: 0,
    };
    std::thread::Builder::new()
        .name("ackstack-kafka-poll".to_string())
        .spawn(move || poller.run())
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
    /// Partitions paused because `pending` holds records of theirs that came through the
    /// consumer queue (partitions whose queue could not be split).
    paused: HashSet<(Arc<str>, i32)>,
    /// The partitions' own queues, read while the runner has room.
    queues: Vec<PartitionQueue<KafkaContext>>,
    /// Which queue is read first on the next turn (they take turns).
    next_queue: usize,
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
            // Wake-ups from here on are kept for the wait below.
            self.shared.flow.reset();
            if self.shared.reach.probe_due() {
                self.probe();
            }
            let mut busy = self.serve_consumer_queue();
            self.queues
                .extend(self.consumer.context().queues.take_new());
            busy |= self.take_from_partitions();
            if !busy {
                self.idle();
            }
        }
        // Each split queue holds the consumer: drop them first. Then, the settlers being gone
        // (their final flush has run), wait (briefly) for the last other reference so that the
        // consumer is closed here, on this thread: closing leaves the group, which revokes (and
        // commits) the partitions through the rebalance callback.
        self.queues.clear();
        self.consumer.context().queues.close();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.consumer) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!("Kafka poll thread stopping; closing the consumer");
    }

    /// Serves what waits on the consumer queue (rebalance callbacks run in here); returns
    /// whether anything did.
    fn serve_consumer_queue(&mut self) -> bool {
        let consumer = self.consumer.clone();
        let mut busy = false;
        // `None` also answers a poll that served an event (a rebalance, a commit result), with
        // more possibly behind it: stop at the second `None` in a row.
        let mut empty = 0;
        for _ in 0..MAIN_BATCH {
            match consumer.poll(Duration::ZERO) {
                None => {
                    empty += 1;
                    if empty == 2 {
                        break;
                    }
                    continue;
                }
                Some(Ok(message)) => self.on_message(&message, false),
                Some(Err(error)) => self.on_error(error),
            }
            empty = 0;
            busy = true;
        }
        busy
    }

    /// Takes records from the partitions' own queues, each in turn, while the runner has room;
    /// returns whether any came.
    fn take_from_partitions(&mut self) -> bool {
        if self.queues.is_empty() || self.shared.closing.load(Ordering::SeqCst) {
            return false;
        }
        let n = self.queues.len();
        let first = self.next_queue % n;
        self.next_queue = first + 1;
        // Out of `self` while records borrowed from them are handled.
        let queues = std::mem::take(&mut self.queues);
        let mut busy = false;
        'partitions: for i in 0..n {
            let queue = &queues[(first + i) % n];
            for _ in 0..PARTITION_BATCH {
                if !self.has_room() {
                    break 'partitions;
                }
                match queue.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => self.on_message(&message, true),
                    Some(Err(error)) => self.on_error(error),
                }
                busy = true;
            }
        }
        self.queues = queues;
        busy
    }

    /// Whether a record taken now would go straight to the runner.
    fn has_room(&self) -> bool {
        self.pending.is_empty() && self.tx.capacity() > 0
    }

    /// Sleeps until a queue becomes non-empty, a receive makes room (if the runner has none
    /// now), or the next commit check is due.
    fn idle(&mut self) {
        if !self.has_room() && !self.shared.closing.load(Ordering::SeqCst) {
            self.shared.flow.want_room();
            // A receive between the look above and asking for room does not wake the thread:
            // hand over what waits and look again.
            self.hand_over();
            if self.has_room() {
                return;
            }
        }
        self.shared.flow.wait(POLL_INTERVAL);
    }

    /// Tracks a record and hands it to the runner (or keeps it in `pending`). A record that
    /// came through the consumer queue (`split` false) pauses its partition if it had to be
    /// kept; a split partition is not paused: its queue is simply not read until there is room.
    fn on_message(&mut self, m: &BorrowedMessage<'_>, split: bool) {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        if self.shared.closing.load(Ordering::SeqCst) {
            // Not tracked and never handed out: read again by the next owner.
            self.pause(topic, partition);
            return;
        }
        let tracked = {
            let mut a = self.shared.assignments();
            a.track(topic, partition, offset)
                .map(|g| (g, a.is_suspect(topic, partition, offset)))
        };
        let Some((generation, suspect)) = tracked else {
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
        self.pending
            .push_back(Received::new(delivery, token).suspect(suspect));
        self.hand_over();
        if split {
            return;
        }
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
                if other
                    .rdkafka_error_code()
                    .is_some_and(crate::reach::means_unreachable)
                {
                    self.shared.reach.lost(&other.to_string());
                }
                tracing::warn!(error = %other, "consumer error (librdkafka retries by itself)")
            }
        }
    }

    /// Asks the cluster for the topic's metadata: an answer means it is reachable again.
    fn probe(&self) {
        match self
            .consumer
            .fetch_metadata(Some(&*self.topic), crate::reach::PROBE_EVERY)
        {
            Ok(_) => self.shared.reach.regained(),
            Err(error) => tracing::debug!(%error, "Kafka cluster still unreachable"),
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
                    topic = %t.topic, partition = t.partition, position, generation = generation.get(),
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
                self.shared.pauses.add(1);
                self.paused.insert(key);
            }
            Err(error) => tracing::debug!(%error, topic, partition, "pause failed"),
        }
    }
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
        produced_at: m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .and_then(|ms| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))),
    }
}
