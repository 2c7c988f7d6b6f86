//! [`NatsToken`]: what settling one delivery needs (its ack subject), and [`Retried`], the
//! deliveries this process delayed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use async_nats::Subject;
use tokio::time::Instant;

/// The handle of one JetStream delivery: its ack subject, its stream sequence and delivery
/// count, and when its lease was last renewed.
#[derive(Clone, Debug)]
pub struct NatsToken(pub(crate) Arc<TokenInner>);

#[derive(Debug)]
pub(crate) struct TokenInner {
    /// The `$JS.ACK...` subject acks, naks and progress go to.
    pub(crate) reply: Subject,
    /// The message's sequence in its stream.
    pub(crate) stream_seq: u64,
    /// JetStream's count of deliveries of the message, this one included.
    pub(crate) delivered: u32,
    /// When the lease (the consumer's `ack_wait`) was last started: at receipt, then at each
    /// `+WPI`.
    pub(crate) renewed: Mutex<Instant>,
}

impl NatsToken {
    /// The message's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.0.stream_seq
    }

    /// JetStream's count of deliveries of the message, this one included.
    pub fn delivered(&self) -> u32 {
        self.0.delivered
    }

    pub(crate) fn renewed(&self) -> Instant {
        *self
            .0
            .renewed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn renew(&self, at: Instant) {
        *self
            .0
            .renewed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = at;
    }
}

/// How many delayed messages are remembered at most.
const CAPACITY: usize = 65_536;

/// Stream sequences this process nak'ed for a retry, with the delivery count they had:
/// when one comes back exactly one delivery later, it is this process's own retry, not a
/// delivery a crashed consumer held (JetStream counts both the same way). Bounded.
#[derive(Debug, Default)]
pub(crate) struct Retried {
    inner: Mutex<(HashMap<u64, u32>, VecDeque<u64>)>,
}

impl Retried {
    pub(crate) fn delayed(&self, seq: u64, delivered: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, order) = &mut *inner;
        if count.insert(seq, delivered).is_none() {
            order.push_back(seq);
        }
        while order.len() > CAPACITY {
            if let Some(old) = order.pop_front() {
                count.remove(&old);
            }
        }
    }

    pub(crate) fn came_back(&self, seq: u64, delivered: u32) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, order) = &mut *inner;
        match count.remove(&seq) {
            Some(then) => {
                order.retain(|s| *s != seq);
                then.saturating_add(1) == delivered
            }
            None => false,
        }
    }
}
