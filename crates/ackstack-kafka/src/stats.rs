//! [`KafkaStats`]: counts of a source's broker calls.

use std::sync::Arc;

use ackstack_core::adapter::Counter;

use crate::commit::Shared;

/// Counts of a [`KafkaSource`]'s broker calls, readable while and after it runs.
///
/// [`KafkaSource`]: crate::KafkaSource
#[derive(Clone, Debug, Default)]
pub struct KafkaStats {
    commits: Arc<Counter>,
    pauses: Arc<Counter>,
    revocations: Arc<Counter>,
    lost: Arc<Counter>,
}

impl KafkaStats {
    pub(crate) fn new(shared: &Shared) -> Self {
        KafkaStats {
            commits: shared.commits.clone(),
            pauses: shared.pauses.clone(),
            revocations: shared.revocations.clone(),
            lost: shared.lost.clone(),
        }
    }

    /// Partitions revoked from this member so far (rebalances, a lost assignment). A consumer
    /// paused by [`Control::pause`](ackstack_core::Control::pause) or its kill switch keeps
    /// polling and so keeps its partitions, unless the group rebalances of its own accord
    /// (a member joins or leaves); see [`lost`](KafkaStats::lost).
    pub fn revocations(&self) -> u64 {
        self.revocations.get()
    }

    /// Of the [`revocations`](KafkaStats::revocations), partitions whose assignment was lost:
    /// the group evicted this member (it stopped polling for longer than
    /// `max.poll.interval.ms`, or its session timed out) rather than rebalancing with it. A
    /// paused consumer keeps polling, so pausing never adds to this.
    pub fn lost(&self) -> u64 {
        self.lost.get()
    }

    /// Partitions paused for flow control so far. Each pause throws away librdkafka's
    /// prefetched records of the partition; it happens only to a partition whose queue could
    /// not be split from the consumer queue (normally never) and to records polled while the
    /// source closes.
    pub fn pauses(&self) -> u64 {
        self.pauses.get()
    }

    /// Offset commit requests sent so far (timed and counted batches, flushes, revokes).
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
}
