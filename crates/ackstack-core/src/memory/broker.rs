//! The broker's queues and what they store, and its publisher.

use crate::config::later;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::SettleError;
use crate::id_hash::IdHash;
use crate::publish::{Message, Publish, PublishError};

/// The suffix of a queue's dead-letter queue.
pub const DLQ_SUFFIX: &str = "-dlq";

/// An in-memory broker. Cloning shares the same queues.
#[derive(Clone, Debug, Default)]
pub struct MemoryBroker {
    pub(super) shared: Arc<Shared>,
}

#[derive(Debug, Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Woken when a message becomes due or is published.
    pub(super) notify: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Where each queue is in `queues`: a name is looked up without being copied, and copied
    /// only when its queue is created.
    index: HashMap<String, usize>,
    queues: Vec<Queue>,
    next_id: u64,
}

impl State {
    /// `queue`, created on first use (its name copied only then).
    fn queue(&mut self, queue: &str) -> &mut Queue {
        let at = match self.index.get(queue) {
            Some(&at) => at,
            None => {
                self.queues.push(Queue::default());
                let at = self.queues.len() - 1;
                self.index.insert(queue.to_string(), at);
                at
            }
        };
        &mut self.queues[at]
    }

    /// `queue`, if it was ever used.
    fn existing(&self, queue: &str) -> Option<&Queue> {
        self.index.get(queue).and_then(|&at| self.queues.get(at))
    }
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) messages: HashMap<u64, Stored, IdHash>,
    ready: VecDeque<u64>,
    hidden: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    pub(super) stats: QueueStats,
}

#[derive(Debug)]
pub(super) struct Stored {
    pub(super) message: Message,
    receives: u32,
    pub(super) in_flight: bool,
    generation: u64,
    pub(super) first_failure: Option<SystemTime>,
    /// Receives that followed a deferral (not attempts).
    pub(super) deferrals: u32,
    /// When it was published.
    published_at: SystemTime,
}

/// One message as [`MemoryBroker::receive_now`] hands it out.
pub(super) struct Handed {
    pub(super) id: u64,
    pub(super) message: Message,
    /// Receives so far, counting this one (the token's identity).
    pub(super) receives: u32,
    /// The attempt number: receives that were not deferrals.
    pub(super) attempt: u32,
    /// When it was published.
    pub(super) published_at: SystemTime,
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
    pub(super) id: u64,
    pub(super) receive: u32,
}

impl Queue {
    pub(super) fn promote_due(&mut self, now: Instant) {
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

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.hidden.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The stored message if `token` still owns it.
    pub(super) fn owned(&mut self, token: MemoryToken) -> Result<&mut Stored, SettleError> {
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

    pub(super) fn hide(&mut self, id: u64, until: Instant) {
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
        let q = state.queue(queue);
        q.messages.insert(
            id,
            Stored {
                message,
                receives: 0,
                in_flight: false,
                generation: 0,
                first_failure: None,
                deferrals: 0,
                published_at: SystemTime::now(),
            },
        );
        q.ready.push_back(id);
        q.stats.published += 1;
        drop(state);
        self.shared.notify.notify_waiters();
    }

    /// Messages in `queue`, visible or not.
    pub fn len(&self, queue: &str) -> usize {
        self.lock().existing(queue).map_or(0, |q| q.messages.len())
    }

    /// Whether `queue` holds no message.
    pub fn is_empty(&self, queue: &str) -> bool {
        self.len(queue) == 0
    }

    /// Copies of every message in `queue`, in no particular order (the dead-letter queue is
    /// `<queue>-dlq`).
    pub fn peek_all(&self, queue: &str) -> Vec<Message> {
        let state = self.lock();
        let Some(q) = state.existing(queue) else {
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
            .existing(queue)
            .map(|q| q.stats)
            .unwrap_or_default()
    }

    /// A publisher to `queue`.
    pub fn publisher(&self, queue: &str) -> MemoryPublisher {
        MemoryPublisher {
            broker: self.clone(),
            queue: queue.into(),
        }
    }

    pub(super) fn receive_now(
        &self,
        queue: &str,
        max: usize,
        visibility: Duration,
    ) -> (Vec<Handed>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.lock();
        let q = state.queue(queue);
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
                published_at: m.published_at,
            });
            q.hide(id, later(now, visibility));
        }
        q.stats.received += out.len() as u64;
        (out, q.next_due())
    }

    pub(super) fn with_queue<R>(&self, queue: &str, f: impl FnOnce(&mut Queue) -> R) -> R {
        let mut state = self.lock();
        f(state.queue(queue))
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
