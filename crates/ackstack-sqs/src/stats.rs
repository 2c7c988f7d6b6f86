//! Counters of SQS API calls and settlement results, for tests and benchmarks.

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

ackstack_core::counters! {
    /// The live counts behind [`SqsStats`].
    pub(crate) struct Counters for SqsStats {
        receive_calls,
        received,
        delete_batch_calls,
        deleted,
        ack_failures,
        lease_lost,
        change_visibility_calls,
        send_calls,
        dead_lettered,
    }
}
