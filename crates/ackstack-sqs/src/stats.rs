//! Counters of SQS API calls and settlement results, for tests and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the adapter's counters (shared by a source, its settler and its publishers
/// created with [`SqsPublisher::for_source`](crate::SqsPublisher::for_source)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqsStats {
    /// `ReceiveMessage` calls.
    pub receive_calls: u64,
    /// Messages received.
    pub received: u64,
    /// `DeleteMessageBatch` calls (including retries of failed entries).
    pub delete_batch_calls: u64,
    /// Messages deleted (acked), including ones SQS reported as already gone.
    pub deleted: u64,
    /// Tokens reported as failed by [`Settle::ack`](ackstack_core::Settle::ack).
    pub ack_failures: u64,
    /// Settlements that found the lease lost (ack, extend, retry).
    pub lease_lost: u64,
    /// `ChangeMessageVisibility` calls (retry, extend, release).
    pub change_visibility_calls: u64,
    /// `SendMessage` calls (dead-letter copies and publishes).
    pub send_calls: u64,
    /// Dead-letter copies confirmed by SQS.
    pub dead_lettered: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) receive_calls: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) delete_batch_calls: AtomicU64,
    pub(crate) deleted: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) change_visibility_calls: AtomicU64,
    pub(crate) send_calls: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SqsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SqsStats {
            receive_calls: get(&self.receive_calls),
            received: get(&self.received),
            delete_batch_calls: get(&self.delete_batch_calls),
            deleted: get(&self.deleted),
            ack_failures: get(&self.ack_failures),
            lease_lost: get(&self.lease_lost),
            change_visibility_calls: get(&self.change_visibility_calls),
            send_calls: get(&self.send_calls),
            dead_lettered: get(&self.dead_lettered),
        }
    }
}
