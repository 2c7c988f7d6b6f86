//! [`NatsToken`]: what settling one delivery needs (its ack subject).

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
    /// The subject the message was published to.
    pub(crate) subject: Subject,
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
