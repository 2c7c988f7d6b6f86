//! An in-memory broker with real at-least-once behaviour, for examples and users' tests.
//!
//! It behaves like SQS: a received message is invisible for the visibility timeout and comes
//! back with its receive count (the delivery's `attempt`) one higher if it is not acked in time;
//! [`Settle::retry`] hides it for the retry delay; dead letters go to the queue `<queue>-dlq`,
//! which is an ordinary queue (consume it to replay). Acks are batched. Nothing is persisted:
//! the broker lives as long as the process.
//!
//! ```
//! use ackstack_core::memory::MemoryBroker;
//! use ackstack_core::Message;
//!
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"order_id":"A-1"}"#));
//! assert_eq!(broker.len("orders"), 1);
//! let source = broker.source("orders");
//! # drop(source);
//! ```

use crate::config::later;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::deadletter::{DeadLetter, millis};
use crate::delivery::{Delivery, Origin};
use crate::error::{Failure, SettleError, SourceError};
use crate::publish::{Message, Publish, PublishError};
use crate::source::{
    AckReport, Backlog, Capabilities, Received, Settle, SettleFailure, Settled, Source,
};

/// The suffix of a queue's dead-letter queue.
pub const DLQ_SUFFIX: &str = "-dlq";

/// An in-memory broker. Cloning shares the same queues.
#[derive(Clone, Debug, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct Queue {
    messages: HashMap<u64, Stored>,
    ready: VecDeque<u64>,
    hidden: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    stats: QueueStats,
}

#[derive(Debug)]
struct Stored {
    message: Message,
    receives: u32,
    in_flight: bool,
    generation: u64,
    first_failure: Option<SystemTime>,
    /// Receives that followed a deferral (not attempts).
    deferrals: u32,
}

/// One message as [`MemoryBroker::receive_now`] hands it out.
struct Handed {
    id: u64,
    message: Message,
    /// Receives so far, counting this one (the token's identity).
    receives: u32,
    /// The attempt number: receives that were not deferrals.
    attempt: u32,
}

/// Counts for one queue, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Messages published.
    pub published: u64,
    /// Deliveries handed out (counting redeliveries).
    pub received: u64,
    /// Messages acked.
    pub acked: u64,
    /// Ack calls (each a batch).
    pub ack_calls: u64,
    /// Lease extensions.
    pub extends: u64,
    /// Retries settled.
    pub retries: u64,
    /// Deferrals settled (hidden with the attempt kept).
    pub deferrals: u64,
    /// Messages dead-lettered from this queue.
    pub dead_lettered: u64,
}

/// A delivery's handle: the message and which receive of it this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryToken {
    id: u64,
    receive: u32,
}

impl Queue {
    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse((at, id, generation))) = self.hidden.peek().copied() {
            if at > now {
                break;
            }
            self.hidden.pop();
            if let Some(m) = self.messages.get_mut(&id)
                && m.generation == generation
            {
                m.in_flight = false;
                m.generation += 1;
                self.ready.push_back(id);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.hidden.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The stored message if `token` still owns it.
    fn owned(&mut self, token: MemoryToken) -> Result<&mut Stored, SettleError> {
        match self.messages.get_mut(&token.id) {
            Some(m) if m.in_flight && m.receives == token.receive => Ok(m),
            Some(_) => Err(SettleError::LeaseLost(
                "visibility timeout expired; the message was or will be redelivered".into(),
            )),
            None => Err(SettleError::LeaseLost(
                "message no longer in the queue".into(),
            )),
        }
    }

    fn hide(&mut self, id: u64, until: Instant) {
        if let Some(m) = self.messages.get_mut(&id) {
            m.generation += 1;
            self.hidden.push(Reverse((until, id, m.generation)));
        }
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        MemoryBroker::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes `message` to `queue` (created on first use).
    pub fn publish(&self, queue: &str, message: Message) {
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        let q = state.queues.entry(queue.to_string()).or_default();
        q.messages.insert(
            id,
            Stored {
                message,
                receives: 0,
                in_flight: false,
                generation: 0,
                first_failure: None,
                deferrals: 0,
            },
        );
        q.ready.push_back(id);
        q.stats.published += 1;
        drop(state);
        self.shared.notify.notify_waiters();
    }

    /// Messages in `queue`, visible or not.
    pub fn len(&self, queue: &str) -> usize {
        self.lock()
            .queues
            .get(queue)
            .map_or(0, |q| q.messages.len())
    }

    /// Whether `queue` holds no message.
    pub fn is_empty(&self, queue: &str) -> bool {
        self.len(queue) == 0
    }

    /// Copies of every message in `queue`, in no particular order (the dead-letter queue is
    /// `<queue>-dlq`).
    pub fn peek_all(&self, queue: &str) -> Vec<Message> {
        let state = self.lock();
        let Some(q) = state.queues.get(queue) else {
            return Vec::new();
        };
        let mut ids: Vec<_> = q.messages.keys().copied().collect();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| q.messages.get(id))
            .map(|m| m.message.clone())
            .collect()
    }

    /// The dead letters of `queue`.
    pub fn dead_letters(&self, queue: &str) -> Vec<Message> {
        self.peek_all(&format!("{queue}{DLQ_SUFFIX}"))
    }

    /// The counts for `queue`.
    pub fn stats(&self, queue: &str) -> QueueStats {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.stats)
            .unwrap_or_default()
    }

    /// A source on `queue` with a 30 s visibility timeout.
    pub fn source(&self, queue: &str) -> MemorySource {
        MemorySource {
            broker: self.clone(),
            queue: queue.into(),
            consumer: "memory-consumer".into(),
            visibility: Duration::from_secs(30),
            poll_wait: Duration::from_millis(500),
            max_ack_batch: 100,
        }
    }

    /// A publisher to `queue`.
    pub fn publisher(&self, queue: &str) -> MemoryPublisher {
        MemoryPublisher {
            broker: self.clone(),
            queue: queue.into(),
        }
    }

    fn receive_now(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> (Vec<Handed>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.lock();
        let q = state.queues.entry(queue.to_string()).or_default();
        q.promote_due(now);
        let mut out = Vec::new();
        while out.len() < max {
            let Some(id) = q.ready.pop_front() else { break };
            let Some(m) = q.messages.get_mut(&id) else {
                continue;
            };
            m.receives = m.receives.saturating_add(1);
            m.in_flight = true;
            out.push(Handed {
                id,
                message: m.message.clone(),
                receives: m.receives,
                attempt: m.receives.saturating_sub(m.deferrals).max(1),
            });
            q.hide(id, later(now, visibility));
        }
        q.stats.received += out.len() as u64;
        (out, q.next_due())
    }

    fn with_queue<R>(&self, queue: &str, f: impl FnOnce(&mut Queue) -> R) -> R {
        let mut state = self.lock();
        f(state.queues.entry(queue.to_string()).or_default())
    }
}

/// A [`Source`] on one in-memory queue.
#[derive(Clone, Debug)]
pub struct MemorySource {
    broker: MemoryBroker,
    queue: Arc<str>,
    consumer: Arc<str>,
    visibility: Duration,
    poll_wait: Duration,
    max_ack_batch: usize,
}

impl MemorySource {
    /// With this visibility timeout (the lease).
    pub fn visibility_timeout(mut self, t: Duration) -> Self {
        self.visibility = t;
        self
    }

    /// Returning an empty batch after waiting this long with nothing to receive.
    pub fn poll_wait(mut self, t: Duration) -> Self {
        self.poll_wait = t;
        self
    }

    /// Acking at most `n` messages per ack call.
    pub fn max_ack_batch(mut self, n: usize) -> Self {
        self.max_ack_batch = n.max(1);
        self
    }

    /// Naming the consumer `name` in deliveries' origin.
    pub fn consumer_name(mut self, name: &str) -> Self {
        self.consumer = name.into();
        self
    }
}

impl Source for MemorySource {
    type Token = MemoryToken;
    type Settler = MemorySettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        let deadline = later(Instant::now(), self.poll_wait);
        loop {
            let notified = self.broker.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next_due) =
                self.broker
                    .receive_now(&self.queue, max.max(1), self.visibility);
            if !batch.is_empty() {
                return Ok(batch
                    .into_iter()
                    .map(
                        |Handed {
                             id,
                             message,
                             receives,
                             attempt,
                         }| {
                            let mut origin =
                                Origin::new("memory", self.queue.clone(), self.consumer.clone());
                            origin.offset = i64::try_from(id).ok();
                            Received {
                                delivery: Delivery {
                                    payload: message.payload,
                                    headers: message.headers,
                                    key: message.key,
                                    message_id: message.message_id,
                                    attempt,
                                    origin,
                                },
                                token: MemoryToken {
                                    id,
                                    receive: receives,
                                },
                                // The broker lives in the consumer's process: no redelivery
                                // outlives a crash.
                                suspect: false,
                            }
                        },
                    )
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn settler(&self) -> MemorySettler {
        MemorySettler {
            broker: self.broker.clone(),
            queue: self.queue.clone(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.max_ack_batch)
            .with_lease(self.visibility)
            .with_deferrals()
    }

    fn origin(&self) -> Origin {
        Origin::new("memory", self.queue.clone(), self.consumer.clone())
    }
}

/// Settles deliveries of a [`MemorySource`].
#[derive(Clone, Debug)]
pub struct MemorySettler {
    broker: MemoryBroker,
    queue: Arc<str>,
}

impl MemorySettler {
    /// Hides the owned message for `after`, once `record` has noted why on it and in the
    /// queue's counts.
    fn hold_back(
        &self,
        token: MemoryToken,
        after: Duration,
        record: impl FnOnce(&mut Stored, &mut QueueStats),
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let result = self.broker.with_queue(&self.queue, |q| {
            let mut stats = q.stats;
            record(q.owned(token)?, &mut stats);
            q.stats = stats;
            q.hide(token.id, later(Instant::now(), after));
            Ok(())
        });
        match result {
            Ok(()) => {
                // A receive already waiting must learn of the new due time.
                self.broker.shared.notify.notify_waiters();
                Ok(Settled::Done)
            }
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }
}

impl Settle for MemorySettler {
    type Token = MemoryToken;

    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        self.broker.with_queue(&self.queue, |q| {
            q.stats.ack_calls += 1;
            let mut report = AckReport::all(0);
            for token in tokens {
                match q.owned(token) {
                    Ok(_) => {
                        q.messages.remove(&token.id);
                        report.acked += 1;
                    }
                    Err(e) => report.failed.push((token, e)),
                }
            }
            q.stats.acked += report.acked as u64;
            report
        })
    }

    async fn retry(
        &self,
        token: MemoryToken,
        _delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.hold_back(token, after, |m, stats| {
            m.first_failure.get_or_insert(failure.at);
            stats.retries += 1;
        })
    }

    /// Hides the message for `after` and counts the receive that follows as a deferral, not
    /// an attempt; the first deferral's time travels in its
    /// [`DEFERRED_SINCE_HEADER`](crate::deadletter::DEFERRED_SINCE_HEADER).
    async fn defer(
        &self,
        token: MemoryToken,
        _delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let since = failure.deferred_since.unwrap_or(failure.at);
        self.hold_back(token, after, |m, stats| {
            m.deferrals = m.deferrals.saturating_add(1);
            m.message.headers.insert(
                crate::deadletter::DEFERRED_SINCE_HEADER,
                millis(since).to_string(),
            );
            stats.deferrals += 1;
        })
    }

    async fn dead_letter(
        &self,
        token: MemoryToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let copy = self.broker.with_queue(&self.queue, |q| {
            let m = q.owned(token)?;
            let mut meta = letter.metadata(delivery);
            if let Some(first) = m.first_failure {
                meta.first_failure_ms = Some(millis(first));
            }
            let mut message = m.message.clone();
            meta.apply_to(&mut message.headers);
            q.stats.dead_lettered += 1;
            Ok(message)
        });
        match copy {
            Ok(message) => {
                self.broker
                    .publish(&format!("{}{DLQ_SUFFIX}", self.queue), message);
                Ok(Settled::AckOriginal(token))
            }
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }

    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        self.broker.with_queue(&self.queue, |q| {
            q.owned(*token)?;
            q.hide(token.id, later(Instant::now(), by));
            q.stats.extends += 1;
            Ok(())
        })
    }

    async fn release(&self, token: MemoryToken) {
        let released = self.broker.with_queue(&self.queue, |q| {
            if q.owned(token).is_err() {
                return false;
            }
            q.hide(token.id, Instant::now());
            true
        });
        if released {
            self.broker.shared.notify.notify_waiters();
        }
    }

    /// The messages of the queue not received by anyone now.
    async fn backlog(&self) -> Option<Backlog> {
        let waiting = self.broker.with_queue(&self.queue, |q| {
            q.messages.values().filter(|m| !m.in_flight).count()
        });
        Some(Backlog {
            total: waiting as u64,
            partitions: Vec::new(),
        })
    }
}

/// Publishes to one in-memory queue.
#[derive(Clone, Debug)]
pub struct MemoryPublisher {
    broker: MemoryBroker,
    queue: Arc<str>,
}

impl Publish for MemoryPublisher {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        self.broker.publish(&self.queue, message);
        Ok(())
    }
}
