//! Counters of SQS API calls and settlement results, for tests and benchmarks.

use ackstack_core::adapter::Counter;

/// A snapshot of the adapter's counters (shared by a source, its settler and its publishers
/// created with [`SqsPublisher::for_source`](crate::SqsPublisher::for_source)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// The live counts behind [`SqsStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) receive_calls: Counter,
    pub(crate) received: Counter,
    pub(crate) delete_batch_calls: Counter,
    pub(crate) deleted: Counter,
    pub(crate) ack_failures: Counter,
    pub(crate) lease_lost: Counter,
    pub(crate) change_visibility_calls: Counter,
    pub(crate) send_calls: Counter,
    pub(crate) dead_lettered: Counter,
}

impl Counters {
    /// Every count so far.
    pub(crate) fn snapshot(&self) -> SqsStats {
        SqsStats {
            receive_calls: self.receive_calls.get(),
            received: self.received.get(),
            delete_batch_calls: self.delete_batch_calls.get(),
            deleted: self.deleted.get(),
            ack_failures: self.ack_failures.get(),
            lease_lost: self.lease_lost.get(),
            change_visibility_calls: self.change_visibility_calls.get(),
            send_calls: self.send_calls.get(),
            dead_lettered: self.dead_lettered.get(),
        }
    }
}
