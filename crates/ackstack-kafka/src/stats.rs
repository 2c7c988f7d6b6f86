//! [`KafkaStats`]: counts of a source's broker calls.

use std::sync::Arc;

use ackstack_core::adapter::Counter;

/// Counts of a [`KafkaSource`]'s broker calls, readable while and after it runs.
///
/// [`KafkaSource`]: crate::KafkaSource
#[derive(Clone, Debug, Default)]
pub struct KafkaStats {
    commits: Arc<Counter>,
}

impl KafkaStats {
    pub(crate) fn new(commits: Arc<Counter>) -> Self {
        KafkaStats { commits }
    }

    /// Offset commit requests sent so far (timed and counted batches, flushes, revokes).
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
}
