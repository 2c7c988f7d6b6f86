//! Commit batching: the state shared by the poll thread, the rebalance callbacks and the
//! settler, and the commits of the partitions' watermarks, in the order their positions were
//! taken.

use crate::reach::Reachability;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use ackstack_core::adapter::Counter;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::flow::Flow;
use crate::token::KafkaToken;
use crate::watermark::{Assignments, Commit};

/// State shared by the poll thread, the rebalance callbacks and the settler.
pub(crate) struct Shared {
    assignments: Mutex<Assignments>,
    /// Held from taking commit positions until their commit is sent (a synchronous one until
    /// it is answered), so that commits reach the broker in the order their positions were
    /// taken: an older position never lands after a newer one. Taken before `assignments`.
    commit_order: Mutex<()>,
    batch: Mutex<CommitBatch>,
    /// Set by the source's [`close`](ackstack_core::Source::close): stop handing out records.
    pub(crate) closing: AtomicBool,
    /// Set when the source and every settler are gone: the poll thread ends.
    pub(crate) stop: AtomicBool,
    /// Set while a synchronous commit of raised crash marks runs in the background.
    pub(crate) raising: AtomicBool,
    commit_interval: Duration,
    commit_max_count: usize,
    /// Released records whose partitions the poll thread is to read again from them.
    rewinds: Mutex<Vec<KafkaToken>>,
    /// Offset commit requests sent (async, sync and on revoke).
    pub(crate) commits: Arc<Counter>,
    /// Partitions paused by the poll thread.
    pub(crate) pauses: Arc<Counter>,
    /// Partitions revoked from this member (rebalances, lost assignments).
    pub(crate) revocations: Arc<Counter>,
    /// Of those, partitions whose assignment was lost (the member was evicted).
    pub(crate) lost: Arc<Counter>,
    /// Wakes the poll thread when records arrive or the runner makes room.
    pub(crate) flow: Flow,
    /// Whether the cluster can be reached (librdkafka's all-brokers-down errors).
    pub(crate) reach: Reachability,
}

/// Acks since the last commit, and when that was.
pub(crate) struct CommitBatch {
    pub(crate) acked_since: usize,
    last: Instant,
}

impl Shared {
    /// Nothing assigned yet; commits are due every `commit_max_count` acks or
    /// `commit_interval` after the first uncommitted one.
    pub(crate) fn new(commit_interval: Duration, commit_max_count: usize) -> Self {
        Shared {
            assignments: Mutex::new(Assignments::new()),
            commit_order: Mutex::new(()),
            batch: Mutex::new(CommitBatch {
                acked_since: 0,
                last: Instant::now(),
            }),
            closing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            raising: AtomicBool::new(false),
            commit_interval,
            commit_max_count,
            rewinds: Mutex::new(Vec::new()),
            commits: Arc::default(),
            pauses: Arc::default(),
            revocations: Arc::default(),
            lost: Arc::default(),
            flow: Flow::default(),
            reach: Reachability::default(),
        }
    }

    pub(crate) fn assignments(&self) -> MutexGuard<'_, Assignments> {
        // The state stays consistent even if a holder panicked: every update is one call.
        self.assignments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn batch(&self) -> MutexGuard<'_, CommitBatch> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn rewinds(&self) -> MutexGuard<'_, Vec<KafkaToken>> {
        self.rewinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a commit is due by count or by time.
    pub(crate) fn commit_due(&self) -> bool {
        let b = self.batch();
        b.acked_since > 0
            && (b.acked_since >= self.commit_max_count || b.last.elapsed() >= self.commit_interval)
    }

    /// Commits every position that moved, asynchronously (or synchronously with `sync`, then
    /// every committable position).
    ///
    /// Positions are taken and sent under [`Shared::commit_order`], so two commits never reach
    /// the broker out of order. A synchronous commit keeps it until answered; an asynchronous
    /// one does not wait for it: while a synchronous commit is on its way it is skipped and
    /// stays due (`Ok(0)`), so acks and the poll thread never block behind the broker.
    pub(crate) fn commit(&self, consumer: &impl CommitSink, sync: bool) -> KafkaResult<usize> {
        let _order = if sync {
            self.commit_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        } else {
            match self.commit_order.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return Ok(0),
            }
        };
        {
            let mut b = self.batch();
            b.acked_since = 0;
            b.last = Instant::now();
        }
        let positions = self.assignments().take_commits(sync);
        if positions.is_empty() {
            return Ok(0);
        }
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        self.commits.add(1);
        let sent = position_list(&positions).and_then(|tpl| consumer.send_commit(&tpl, mode));
        if let Err(error) = sent {
            // Their crash marks go with the next commit.
            self.assignments().unsent(&positions);
            return Err(error);
        }
        if sync {
            self.assignments().confirmed(&positions);
        }
        Ok(positions.len())
    }

    /// Ends the generation of the revoked `partitions` (later acks of theirs are refused),
    /// then commits what was contiguously completed, synchronously, unless the assignment was
    /// `lost` (another member may own the partitions already). Work still in flight is
    /// abandoned: the position never passes it, so the next owner reads it again.
    ///
    /// Waits for a commit already on its way ([`Shared::commit_order`]): its positions of these
    /// partitions are older and must land first.
    pub(crate) fn revoke(
        &self,
        consumer: &impl CommitSink,
        partitions: &[(String, i32)],
        lost: bool,
    ) {
        let _order = self
            .commit_order
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut positions = Vec::new();
        {
            let mut a = self.assignments();
            for (topic, partition) in partitions {
                if let Some(commit) = a.revoke(topic, *partition) {
                    positions.push(commit);
                }
            }
        }
        tracing::info!(
            partitions = partitions.len(),
            commits = positions.len(),
            "partitions revoked"
        );
        if positions.is_empty() || lost {
            return;
        }
        self.commits.add(1);
        let result =
            position_list(&positions).and_then(|t| consumer.send_commit(&t, CommitMode::Sync));
        if let Err(error) = result {
            tracing::warn!(%error, "commit on revoke failed; the records will be read again");
        }
    }
}

/// Where offset commits go: the consumer (or, in unit tests, a recorder).
pub(crate) trait CommitSink {
    /// Commits `offsets` in `mode`.
    fn send_commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()>;
}

impl<C: ConsumerContext> CommitSink for BaseConsumer<C> {
    fn send_commit(&self, offsets: &TopicPartitionList, mode: CommitMode) -> KafkaResult<()> {
        self.commit(offsets, mode)
    }
}

fn position_list(commits: &[Commit]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for c in commits {
        // A committed position is the next offset to read: the watermark already is one, so
        // nothing is added here (storing a message's offset would add 1; we never do that).
        let mut element = tpl.add_partition(&c.topic, c.partition);
        element.set_offset(Offset::Offset(c.position))?;
        element.set_metadata(c.metadata.as_str());
    }
    Ok(tpl)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::mpsc as std_mpsc;

    use super::*;
    use ackstack_core::adapter::Generation;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared::new(Duration::from_secs(1), 1000))
    }

    /// Records the committed positions of `t`/0 in the order they reach it. The first commit
    /// stalls (a slow network, a descheduled thread) after telling `entered`, until `release`.
    struct Recorder {
        positions: Mutex<Vec<i64>>,
        gate: Mutex<Option<(std_mpsc::Sender<()>, std_mpsc::Receiver<()>)>>,
    }

    impl Recorder {
        fn gated() -> (Arc<Self>, std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
            let (entered_tx, entered_rx) = std_mpsc::channel();
            let (release_tx, release_rx) = std_mpsc::channel();
            let recorder = Recorder {
                positions: Mutex::new(Vec::new()),
                gate: Mutex::new(Some((entered_tx, release_rx))),
            };
            (Arc::new(recorder), entered_rx, release_tx)
        }

        fn positions(&self) -> Vec<i64> {
            self.positions.lock().unwrap().clone()
        }
    }

    impl CommitSink for Recorder {
        fn send_commit(&self, offsets: &TopicPartitionList, _mode: CommitMode) -> KafkaResult<()> {
            let gate = self.gate.lock().unwrap().take();
            if let Some((entered, release)) = gate {
                entered.send(()).unwrap();
                release.recv().unwrap();
            }
            for e in offsets.elements() {
                if let Offset::Offset(pos) = e.offset() {
                    self.positions.lock().unwrap().push(pos);
                }
            }
            Ok(())
        }
    }

    /// `t`/0 assigned, offsets 0..10 received, 0..done completed.
    fn partition(shared: &Shared, done: i64) -> Generation {
        let mut a = shared.assignments();
        let g = a.assign("t", 0);
        for o in 0..10 {
            a.track("t", 0, o);
        }
        for o in 0..done {
            a.complete("t", 0, o, g).unwrap();
        }
        g
    }

    fn complete(shared: &Shared, g: Generation, offsets: std::ops::Range<i64>) {
        let mut a = shared.assignments();
        for o in offsets {
            a.complete("t", 0, o, g).unwrap();
        }
        drop(a);
        shared.batch().acked_since += 1;
    }

    fn assert_never_backwards(positions: &[i64]) {
        assert!(
            positions.windows(2).all(|w| w[0] <= w[1]),
            "a commit went backwards: {positions:?}"
        );
    }

    #[test]
    fn a_stalled_sync_flush_never_lands_after_a_newer_async_commit() {
        let shared = shared();
        let g = partition(&shared, 5);
        let (sink, entered, release) = Recorder::gated();
        // The flush takes position 5 and stalls before its commit is sent.
        let flush = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, true)
        });
        entered.recv().unwrap();
        // Meanwhile more completes and the periodic commit runs (to its end, before the
        // flush's commit goes out).
        complete(&shared, g, 5..8);
        std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, false)
        })
        .join()
        .unwrap()
        .unwrap();
        release.send(()).unwrap();
        flush.join().unwrap().unwrap();
        // Whatever was held back goes with the next periodic commit.
        shared.commit(&*sink, false).unwrap();
        let positions = sink.positions();
        assert_never_backwards(&positions);
        assert_eq!(positions.last(), Some(&8), "{positions:?}");
    }

    #[test]
    fn a_revoke_commit_never_lands_before_an_older_stalled_flush() {
        let shared = shared();
        let g = partition(&shared, 5);
        let (sink, entered, release) = Recorder::gated();
        let flush = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || shared.commit(&*sink, true)
        });
        entered.recv().unwrap();
        complete(&shared, g, 5..8);
        // The partition is revoked while the flush's older commit is still on its way.
        let (revoked_tx, revoked_rx) = std_mpsc::channel();
        let revoke = std::thread::spawn({
            let (shared, sink) = (shared.clone(), sink.clone());
            move || {
                shared.revoke(&*sink, &[("t".to_string(), 0)], false);
                revoked_tx.send(()).unwrap();
            }
        });
        // Let the revoke finish first if it can (it must not commit before the flush does).
        let _ = revoked_rx.recv_timeout(Duration::from_millis(500));
        release.send(()).unwrap();
        flush.join().unwrap().unwrap();
        revoke.join().unwrap();
        let positions = sink.positions();
        assert_never_backwards(&positions);
        assert_eq!(positions, vec![5, 8]);
        assert!(!shared.assignments().is_current("t", 0, g));
    }
}
