//! [`KafkaToken`], the handle of one received record, and its helpers.

use std::sync::Arc;

use ackstack_core::SettleError;
use ackstack_core::adapter::Generation;

/// The handle of one received record: where it is and in which assignment generation it was
/// received. Acks of a token whose generation has ended (the partition was revoked) are refused
/// with [`SettleError::LeaseLost`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KafkaToken {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) generation: Generation,
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
        self.generation.get()
    }
}

/// The error for a token whose generation has ended: its partition was revoked (or rewound).
pub(crate) fn lease_lost(t: &KafkaToken) -> SettleError {
    t.generation.lease_lost(format_args!(
        "partition {}/{} was revoked",
        t.topic, t.partition
    ))
}
