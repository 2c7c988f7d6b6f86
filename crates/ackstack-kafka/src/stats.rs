//! [`KafkaStats`]: counts of a source's broker calls.

use std::sync::Arc;

use ackstack_core::adapter::Counter;

/// Counts of a [`KafkaSource`]'s broker calls, readable while and after it runs.
///
/// [`KafkaSource`]: crate::KafkaSource
#[derive(Clone, Debug, Default)]
pub struct KafkaStats {
    commits: Arc<Counter>,
    pauses: Arc<Counter>,
}

impl KafkaStats {
    pub(crate) fn new(commits: Arc<Counter>, pauses: Arc<Counter>) -> Self {
        KafkaStats { commits, pauses }
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
