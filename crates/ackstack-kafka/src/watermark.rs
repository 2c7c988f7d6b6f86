//! Per-partition watermarks tied to the assignment generation.
//!
//! Kafka commits one position per partition: "everything before this offset is done". With
//! concurrent, out-of-order completion, that position must never pass an offset that is still
//! in flight (invariant 8 in docs/CONTRACT.md). Each assigned partition keeps one core
//! [`Watermark`]: offsets are tracked when received and completed when acked,
//! and the partition's commit position is the watermark's
//! [`resume_position`](Watermark::resume_position): the lowest offset still in flight, or one
//! past the highest completed offset when nothing is in flight. Only offsets actually received
//! are tracked, so gaps (compacted records, transaction markers) never hold the position back.
//!
//! [`Assignments`] is the Kafka-specific layer on top: one watermark per assigned partition
//! together with the assignment's generation. A partition that is revoked and assigned again
//! gets a new generation and a fresh watermark, so completions that arrive late from the
//! previous generation are refused ([`Stale`]) instead of moving the new position.

use std::collections::HashMap;

use ackstack_core::Watermark;
use ackstack_core::adapter::Generation;

/// A completion for a partition that is no longer assigned to us in the generation the
/// delivery was received in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale;

/// One assigned partition: its generation, watermark and last committed position.
#[derive(Clone, Debug)]
struct Entry {
    generation: Generation,
    watermark: Watermark,
    committed: Option<i64>,
}

/// Watermarks of every assigned partition, each tied to its assignment generation.
#[derive(Debug, Default)]
pub struct Assignments {
    topics: HashMap<String, HashMap<i32, Entry>>,
    /// The last generation started (of any partition).
    last_generation: Generation,
}

impl Assignments {
    /// No partitions assigned.
    pub fn new() -> Self {
        Assignments::default()
    }

    /// Starts a new generation of `topic`/`partition` with an empty watermark and returns the
    /// generation. Any earlier generation of the partition becomes stale.
    pub fn assign(&mut self, topic: &str, partition: i32) -> Generation {
        self.last_generation = self.last_generation.next();
        let generation = self.last_generation;
        self.topics.entry(topic.to_string()).or_default().insert(
            partition,
            Entry {
                generation,
                watermark: Watermark::new(),
                committed: None,
            },
        );
        generation
    }

    /// Ends the partition's current generation. Returns its commit position, to be
    /// committed (again, even if an earlier asynchronous commit carried it: that one may have
    /// failed) before the partition goes.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let parts = self.topics.get_mut(topic)?;
        let entry = parts.remove(&partition)?;
        if parts.is_empty() {
            self.topics.remove(topic);
        }
        entry.watermark.resume_position()
    }

    /// Tracks a received offset; returns the partition's current generation, or `None` when the
    /// partition is not assigned.
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Generation> {
        let entry = self.topics.get_mut(topic)?.get_mut(&partition)?;
        entry.watermark.track(offset);
        Some(entry.generation)
    }

    /// Completes `offset` if `generation` is still the partition's current one.
    ///
    /// An offset of the current generation that is not in flight (a duplicate completion) is
    /// accepted and changes nothing.
    pub fn complete(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: Generation,
    ) -> Result<(), Stale> {
        let entry = self.entry_mut(topic, partition, generation)?;
        entry.watermark.complete(offset);
        Ok(())
    }

    /// Whether `generation` is the partition's current generation.
    pub fn is_current(&self, topic: &str, partition: i32, generation: Generation) -> bool {
        self.topics
            .get(topic)
            .and_then(|p| p.get(&partition))
            .is_some_and(|e| e.generation == generation)
    }

    /// The partition's commit position in its current generation: its watermark's
    /// [`resume_position`](Watermark::resume_position).
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.topics
            .get(topic)?
            .get(&partition)?
            .watermark
            .resume_position()
    }

    /// Positions that moved past the last commit, marked as committed. With `all`, every
    /// committable position is returned even if it was committed before (for a synchronous
    /// flush that must not rely on an earlier asynchronous commit having succeeded). A
    /// position below the last one taken (the high-water mark of the partition, kept across
    /// rewinds) is never returned: commits never go backwards.
    pub fn take_commits(&mut self, all: bool) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, parts) in &mut self.topics {
            for (&partition, entry) in parts.iter_mut() {
                let Some(pos) = entry.watermark.resume_position() else {
                    continue;
                };
                let due = match entry.committed {
                    None => true,
                    Some(c) => pos > c || (all && pos == c),
                };
                if due {
                    entry.committed = Some(pos);
                    out.push((topic.clone(), partition, pos));
                }
            }
        }
        out
    }

    /// The position the partition would be read again from if its current generation
    /// `generation` started over: its watermark's resume position (the lowest offset in flight).
    /// `Err(Stale)` when `generation` already ended; `Ok(None)` when nothing is tracked.
    pub fn rewind_position(
        &self,
        topic: &str,
        partition: i32,
        generation: Generation,
    ) -> Result<Option<i64>, Stale> {
        match self.topics.get(topic).and_then(|p| p.get(&partition)) {
            Some(entry) if entry.generation == generation => Ok(entry.watermark.resume_position()),
            _ => Err(Stale),
        }
    }

    /// Ends generation `generation` of the partition and starts a new one whose reading was
    /// moved back to `position` (the consumer was seeked there). Returns the new generation,
    /// or `Err(Stale)` when `generation` already ended.
    ///
    /// The new watermark starts with `position` in flight, so no completion of the new
    /// generation moves the commit position past `position` before the record there is read
    /// again and completed, even if a record fetched before the seek arrives first. Tokens of
    /// the old generation become stale: their acks are refused and their records are read
    /// again.
    pub fn rewind(
        &mut self,
        topic: &str,
        partition: i32,
        generation: Generation,
        position: i64,
    ) -> Result<Generation, Stale> {
        let committed = self.entry_mut(topic, partition, generation)?.committed;
        self.last_generation = self.last_generation.next();
        let generation = self.last_generation;
        let mut watermark = Watermark::new();
        watermark.track(position);
        self.topics.entry(topic.to_string()).or_default().insert(
            partition,
            Entry {
                generation,
                watermark,
                committed,
            },
        );
        Ok(generation)
    }

    /// How many partitions are assigned.
    pub fn len(&self) -> usize {
        self.topics.values().map(HashMap::len).sum()
    }

    /// Whether no partition is assigned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry_mut(
        &mut self,
        topic: &str,
        partition: i32,
        generation: Generation,
    ) -> Result<&mut Entry, Stale> {
        match self
            .topics
            .get_mut(topic)
            .and_then(|p| p.get_mut(&partition))
        {
            Some(entry) if entry.generation == generation => Ok(entry),
            _ => Err(Stale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One assigned partition `t`/0 and its generation.
    fn assigned() -> (Assignments, Generation) {
        let mut a = Assignments::new();
        let g = a.assign("t", 0);
        (a, g)
    }

    #[test]
    fn empty_has_nothing_to_commit() {
        let (a, _) = assigned();
        assert_eq!(a.committable("t", 0), None);
        assert_eq!(a.committable("t", 1), None, "not assigned");
    }

    #[test]
    fn in_order_completion_moves_one_past_the_last() {
        let (mut a, g) = assigned();
        for o in 0..5 {
            a.track("t", 0, o);
        }
        // Pinned at the first record before anything completed.
        assert_eq!(a.committable("t", 0), Some(0));
        for o in 0..5 {
            assert_eq!(a.complete("t", 0, o, g), Ok(()));
            assert_eq!(a.committable("t", 0), Some(o + 1));
        }
    }

    #[test]
    fn out_of_order_completion_never_passes_an_unfinished_offset() {
        let (mut a, g) = assigned();
        for o in 10..20 {
            a.track("t", 0, o);
        }
        // Complete everything except 13, in reverse order.
        for o in (10..20).rev().filter(|&o| o != 13) {
            a.complete("t", 0, o, g).unwrap();
            let pos = a.committable("t", 0).unwrap();
            assert!(pos <= 13, "position {pos} passed unfinished offset 13");
        }
        assert_eq!(a.committable("t", 0), Some(13));
        a.complete("t", 0, 13, g).unwrap();
        assert_eq!(a.committable("t", 0), Some(20));
    }

    #[test]
    fn gaps_are_tolerated() {
        let (mut a, g) = assigned();
        // Offsets 3, 4 and 8 do not exist (compaction, transaction markers).
        for o in [0, 1, 2, 5, 6, 7, 9] {
            a.track("t", 0, o);
        }
        for o in [9, 7, 6, 5, 2, 1] {
            a.complete("t", 0, o, g).unwrap();
        }
        assert_eq!(a.committable("t", 0), Some(0));
        a.complete("t", 0, 0, g).unwrap();
        assert_eq!(a.committable("t", 0), Some(10));
        // A gap right below the lowest offset in flight is passed.
        a.track("t", 0, 15);
        assert_eq!(a.committable("t", 0), Some(15));
    }

    #[test]
    fn duplicate_or_unknown_completion_changes_nothing() {
        let (mut a, g) = assigned();
        a.track("t", 0, 1);
        a.track("t", 0, 2);
        assert_eq!(a.complete("t", 0, 2, g), Ok(()));
        assert_eq!(
            a.complete("t", 0, 2, g),
            Ok(()),
            "accepted, changes nothing"
        );
        assert_eq!(
            a.complete("t", 0, 99, g),
            Ok(()),
            "accepted, changes nothing"
        );
        assert_eq!(a.committable("t", 0), Some(1));
        a.complete("t", 0, 1, g).unwrap();
        assert_eq!(a.committable("t", 0), Some(3), "99 was never in flight");
    }

    #[test]
    fn old_generation_cannot_move_the_new_position() {
        let mut a = Assignments::new();
        let g1 = a.assign("t", 0);
        a.track("t", 0, 0);
        a.track("t", 0, 1);
        assert_eq!(a.complete("t", 0, 0, g1), Ok(()));
        // Revoked with offset 1 still in flight: only 1 may be committed.
        assert_eq!(a.revoke("t", 0), Some(1));
        assert_eq!(a.complete("t", 0, 1, g1), Err(Stale));
        // Assigned again: the new generation starts where the broker resumes (offset 1).
        let g2 = a.assign("t", 0);
        assert_ne!(g1, g2);
        assert_eq!(a.track("t", 0, 1), Some(g2));
        a.track("t", 0, 2);
        // A late completion of offset 1 from the old generation is refused...
        assert_eq!(a.complete("t", 0, 1, g1), Err(Stale));
        assert_eq!(a.complete("t", 0, 2, g1), Err(Stale));
        assert_eq!(a.committable("t", 0), Some(1));
        // ...while the new generation's own completions count.
        assert_eq!(a.complete("t", 0, 2, g2), Ok(()));
        assert_eq!(a.committable("t", 0), Some(1));
        assert_eq!(a.complete("t", 0, 1, g2), Ok(()));
        assert_eq!(a.committable("t", 0), Some(3));
        assert!(a.is_current("t", 0, g2));
        assert!(!a.is_current("t", 0, g1));
    }

    #[test]
    fn take_commits_reports_only_progress() {
        let mut a = Assignments::new();
        let g = a.assign("t", 0);
        a.assign("t", 1);
        assert!(a.take_commits(false).is_empty());
        a.track("t", 0, 5);
        a.complete("t", 0, 5, g).unwrap();
        assert_eq!(a.take_commits(false), vec![("t".to_string(), 0, 6)]);
        assert!(a.take_commits(false).is_empty());
        assert_eq!(a.take_commits(true), vec![("t".to_string(), 0, 6)]);
        assert_eq!(a.revoke("t", 0), Some(6));
        assert_eq!(a.track("t", 0, 7), None, "no longer assigned");
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn take_commits_never_returns_a_position_below_the_last_taken() {
        let (mut a, g) = assigned();
        for o in 0..5 {
            a.track("t", 0, o);
            a.complete("t", 0, o, g).unwrap();
        }
        assert_eq!(a.take_commits(false), vec![("t".to_string(), 0, 5)]);
        // A lower offset turns up in flight (a record fetched again): its position is older
        // than what was committed, so it is not committed, not even by a full flush.
        a.track("t", 0, 3);
        assert_eq!(a.committable("t", 0), Some(3));
        assert!(a.take_commits(true).is_empty());
        assert!(a.take_commits(false).is_empty());
        a.complete("t", 0, 3, g).unwrap();
        assert_eq!(a.take_commits(true), vec![("t".to_string(), 0, 5)]);
    }

    #[test]
    fn rewind_starts_a_generation_that_holds_the_position_until_it_is_read_again() {
        let (mut a, g) = assigned();
        for o in 0..5 {
            a.track("t", 0, o);
        }
        a.complete("t", 0, 0, g).unwrap();
        a.complete("t", 0, 2, g).unwrap();
        // 1 is released: read again from it.
        assert_eq!(a.rewind_position("t", 0, g), Ok(Some(1)));
        let g2 = a.rewind("t", 0, g, 1).unwrap();
        assert_ne!(g, g2);
        assert!(!a.is_current("t", 0, g));
        assert_eq!(a.complete("t", 0, 3, g), Err(Stale), "old tokens are stale");
        assert_eq!(a.rewind("t", 0, g, 1), Err(Stale));
        assert_eq!(a.rewind_position("t", 0, g), Err(Stale));
        assert_eq!(a.committable("t", 0), Some(1));
        // A record fetched before the seek (offset 4) completes first: the position holds at 1.
        a.track("t", 0, 4);
        a.complete("t", 0, 4, g2).unwrap();
        assert_eq!(a.committable("t", 0), Some(1));
        for o in 1..4 {
            a.track("t", 0, o);
        }
        for o in 1..4 {
            a.complete("t", 0, o, g2).unwrap();
        }
        assert_eq!(a.committable("t", 0), Some(5));
    }
}
