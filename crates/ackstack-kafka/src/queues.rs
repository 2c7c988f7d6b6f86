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
//! [`Flow`] is how the poll thread sleeps without polling every queue in turn: a queue that
//! becomes non-empty, or a receive that makes room in a full channel, wakes it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::BaseConsumer;
use rdkafka::consumer::base_consumer::PartitionQueue;

use crate::commit::Shared;
use crate::poller::KafkaContext;

/// Wakes the poll thread: records arrived, or the runner made room.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    woken: Mutex<bool>,
    cv: Condvar,
    /// Set by the poll thread before it sleeps on a full channel; a receive that finds it set
    /// wakes the thread.
    wants_room: AtomicBool,
}

impl Flow {
    /// Wakes the poll thread (or makes its next wait return at once).
    pub(crate) fn wake(&self) {
        *self.lock() = true;
        self.cv.notify_one();
    }

    /// Forgets earlier wake-ups: called before the thread looks at its queues, so a wake-up
    /// after that look is never lost.
    pub(crate) fn reset(&self) {
        *self.lock() = false;
    }

    /// Sleeps until woken or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) {
        let woken = self.lock();
        let (mut woken, _) = self
            .cv
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(PoisonError::into_inner);
        *woken = false;
    }

    /// Asks the next receive to wake the thread once it has taken records.
    pub(crate) fn want_room(&self) {
        self.wants_room.store(true, Ordering::SeqCst);
    }

    /// Called by a receive after it took records: wakes the thread if it waits for room.
    pub(crate) fn room_made(&self) {
        if self.wants_room.load(Ordering::SeqCst) && self.wants_room.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.woken.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The partitions split so far, and the queues the poll thread has not taken over yet.
#[derive(Default)]
pub(crate) struct PartitionQueues {
    /// The consumer, set once it is shared; weak, so that the context (which the consumer
    /// owns) does not keep it alive.
    consumer: OnceLock<Weak<BaseConsumer<KafkaContext>>>,
    state: Mutex<SplitState>,
}

#[derive(Default)]
struct SplitState {
    /// Every partition ever split (a split queue is kept for good: dropping one would leave
    /// its partition's records in a queue nobody reads).
    split: HashSet<(String, i32)>,
    /// New queues, for the poll thread to take.
    new: Vec<PartitionQueue<KafkaContext>>,
    /// Set when the poll thread stops: nothing more is split.
    closed: bool,
}

impl PartitionQueues {
    /// Gives the rebalance callback the shared consumer to split queues from.
    pub(crate) fn set_consumer(&self, consumer: &Arc<BaseConsumer<KafkaContext>>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// Splits the queues of `tpl`'s partitions that are not split yet; each wakes the poll
    /// thread when it becomes non-empty. Called before the assignment takes effect.
    pub(crate) fn split(&self, tpl: &TopicPartitionList, shared: &Arc<Shared>) {
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
            let shared = shared.clone();
            queue.set_nonempty_callback(move || shared.flow.wake());
            state.new.push(queue);
            state.split.insert(key);
        }
    }

    /// The queues split since the last call.
    pub(crate) fn take_new(&self) -> Vec<PartitionQueue<KafkaContext>> {
        std::mem::take(&mut self.lock().new)
    }

    /// Drops every queue not taken yet and splits no more (each queue holds the consumer).
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.new.clear();
    }

    fn lock(&self) -> MutexGuard<'_, SplitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use super::*;

    #[test]
    fn a_wake_before_the_wait_is_not_lost_and_a_reset_forgets_it() {
        let flow = Flow::default();
        flow.wake();
        let t = Instant::now();
        flow.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
        flow.wake();
        flow.reset();
        let t = Instant::now();
        flow.wait(Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn room_made_wakes_only_a_thread_that_asked_for_room() {
        let flow = Arc::new(Flow::default());
        flow.room_made();
        let t = Instant::now();
        flow.wait(Duration::from_millis(50));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "woken without asking"
        );
        flow.want_room();
        let f = flow.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            f.room_made();
        });
        let t = Instant::now();
        flow.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
        waker.join().unwrap();
    }
}
