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

/// Stream sequences this process nak'ed for a retry, with the attempt they were on: when one
/// comes back exactly one attempt later, it is this process's own retry, not a delivery a
/// crashed consumer held (JetStream counts both the same way); and it never comes back with a
/// lower attempt than that. Bounded.
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

    /// The attempt `seq` was on when this process delayed it, if it did (and forgets it).
    pub(crate) fn take(&self, seq: u64) -> Option<u32> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, order) = &mut *inner;
        let then = count.remove(&seq)?;
        order.retain(|s| *s != seq);
        Some(then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delayed_sequence_is_remembered_once_and_bounded() {
        let r = Retried::default();
        r.delayed(7, 1);
        assert_eq!(r.take(7), Some(1));
        assert_eq!(r.take(7), None, "forgotten once taken");
        for seq in 0..(CAPACITY as u64 + 10) {
            r.delayed(seq, 2);
        }
        assert_eq!(r.take(0), None, "the oldest are forgotten first");
        assert_eq!(r.take(CAPACITY as u64 + 9), Some(2));
    }
}
