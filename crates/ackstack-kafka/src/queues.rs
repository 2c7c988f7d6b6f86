//! Flow control without pausing: every assigned partition's records come from its own
//! librdkafka queue, which the poll thread simply stops reading while the runner has no room.
//!
//! Pausing a partition throws away librdkafka's prefetched records of it (they are fetched
//! again after the resume), so a consumer that falls behind now and then pays for a refetch
//! each time. Instead, each partition's fetch queue is split from the consumer queue before the
//! partition is assigned ([`PartitionQueues::split`], called from the rebalance callback):
//! librdkafka keeps fetching into it up to its own `queued.min.messages` /
//! `queued.max.messages.kbytes` bound, and the poll thread takes records from it only while the
//! channel to the runner has room. The consumer queue itself (rebalances, errors, commit
//! results, logs) is polled on every turn of the loop, so the member keeps serving its group.
//!
//! Splitting before the assignment takes effect means every record of a generation arrives on
//! one queue, so a partition's records are never reordered (librdkafka does not forward a queue
//! that the application split, even when fetching starts again). A partition that could not be
//! split keeps delivering through the consumer queue, where the poll thread falls back to
//! pausing it when the runner has no room.
//!
//! [`Flow`](crate::flow::Flow) is how the poll thread sleeps without polling every queue in
//! turn: a queue that becomes non-empty, or a receive that makes room in a full channel, wakes
//! it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};

/// The partitions split so far, and the queues the poll thread has not taken over yet. `C` is
/// the consumer's context (the one whose rebalance callback owns this).
pub(crate) struct PartitionQueues<C: ConsumerContext + 'static> {
    /// The consumer, set once it is shared; weak, so that the context (which the consumer
    /// owns) does not keep it alive.
    consumer: OnceLock<Weak<BaseConsumer<C>>>,
    state: Mutex<SplitState<C>>,
}

struct SplitState<C: ConsumerContext + 'static> {
    /// Every partition ever split (a split queue is kept for good: dropping one would leave
    /// its partition's records in a queue nobody reads).
    split: HashSet<(String, i32)>,
    /// New queues, for the poll thread to take.
    new: Vec<PartitionQueue<C>>,
    /// Set when the poll thread stops: nothing more is split.
    closed: bool,
}

impl<C: ConsumerContext + 'static> Default for PartitionQueues<C> {
    fn default() -> Self {
        PartitionQueues {
            consumer: OnceLock::new(),
            state: Mutex::new(SplitState {
                split: HashSet::new(),
                new: Vec::new(),
                closed: false,
            }),
        }
    }
}

impl<C: ConsumerContext + 'static> PartitionQueues<C> {
    /// Gives the rebalance callback the shared consumer to split queues from.
    pub(crate) fn set_consumer(&self, consumer: &Arc<BaseConsumer<C>>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// Splits the queues of `tpl`'s partitions that are not split yet; each calls `wake` when
    /// it becomes non-empty. Called before the assignment takes effect.
    pub(crate) fn split<W>(&self, tpl: &TopicPartitionList, wake: W)
    where
        W: Fn() + Clone + Send + Sync + 'static,
    {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut state = self.lock();
        if state.closed {
            return;
        }
        for e in tpl.elements() {
            let key = (e.topic().to_string(), e.partition());
            if state.split.contains(&key) {
                continue;
            }
            let Some(mut queue) = consumer.split_partition_queue(e.topic(), e.partition()) else {
                tracing::warn!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "cannot split the partition's queue; its records come through the consumer queue"
                );
                continue;
            };
            queue.set_nonempty_callback(wake.clone());
            state.new.push(queue);
            state.split.insert(key);
        }
    }

    /// The queues split since the last call.
    pub(crate) fn take_new(&self) -> Vec<PartitionQueue<C>> {
        std::mem::take(&mut self.lock().new)
    }

    /// Drops every queue not taken yet and splits no more (each queue holds the consumer).
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.new.clear();
    }

    fn lock(&self) -> MutexGuard<'_, SplitState<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
