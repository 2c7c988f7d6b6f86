//! The watermark tracker: the contiguous completion point of a sequence of deliveries that
//! finish out of order (invariant 8 in docs/CONTRACT.md).
//!
//! Brokers that acknowledge cumulatively (a Kafka offset commit, a RabbitMQ `multiple=true`
//! ack) may only acknowledge up to the first delivery still in flight. Track every position
//! when it is received, complete it when it is settled, and ask for the
//! [`Watermark::committable`] position: every tracked position below it is complete. Gaps in
//! the positions (compacted Kafka offsets, transaction markers) need no special care: only
//! tracked positions hold the watermark back.
//!
//! Three views of the same state serve the brokers' different ways of saying "done up to":
//!
//! * [`Watermark::committable`]: exclusive, and only once something completed;
//! * [`Watermark::resume_position`]: exclusive, defined as soon as anything is tracked (the
//!   lowest position in flight); a Kafka consumer commits this as the next offset to read;
//! * [`Watermark::completed_through`]: inclusive, one below `committable`; a RabbitMQ channel
//!   may ack `multiple=true` up to it.
//!
//! None of them ever passes a position that is still in flight.
//!
//! ```
//! use ackstack_core::Watermark;
//!
//! let mut w = Watermark::new();
//! for offset in [10, 11, 12] {
//!     w.track(offset);
//! }
//! assert_eq!(w.resume_position(), Some(10));
//! w.complete(12);
//! assert_eq!(w.committable(), Some(10)); // 10 and 11 are still in flight
//! w.complete(10);
//! assert_eq!(w.committable(), Some(11));
//! assert_eq!(w.completed_through(), Some(10));
//! ```

use std::collections::BTreeSet;

/// Tracks in-flight positions of one partition or channel.
#[derive(Clone, Debug, Default)]
pub struct Watermark {
    in_flight: BTreeSet<i64>,
    highest_done: Option<i64>,
}

impl Watermark {
    /// An empty tracker.
    pub fn new() -> Self {
        Watermark::default()
    }

    /// Records a received position as in flight.
    pub fn track(&mut self, position: i64) {
        self.in_flight.insert(position);
    }

    /// Records a position as complete. Returns `false` if it was not in flight (completed
    /// already, or never tracked): such a completion changes nothing.
    pub fn complete(&mut self, position: i64) -> bool {
        if !self.in_flight.remove(&position) {
            return false;
        }
        self.highest_done = Some(self.highest_done.map_or(position, |h| h.max(position)));
        true
    }

    /// The lowest position still in flight.
    pub fn lowest_in_flight(&self) -> Option<i64> {
        self.in_flight.first().copied()
    }

    /// The exclusive upper bound of the contiguous completed prefix: every tracked position
    /// below it is complete and none at or above it is known complete-and-contiguous. `None`
    /// before anything completed.
    ///
    /// A completed `i64::MAX` cannot be passed: the bound then stays at `i64::MAX` (one
    /// position short, never one too far).
    pub fn committable(&self) -> Option<i64> {
        let done = self.highest_done?;
        Some(match self.lowest_in_flight() {
            Some(low) if low <= done => low,
            _ => done.saturating_add(1),
        })
    }

    /// Where a reader that starts over resumes without skipping unfinished work: the lowest
    /// position in flight, or one past the highest completed one when nothing is in flight.
    /// `None` when nothing is in flight and nothing completed.
    ///
    /// Like [`committable`](Watermark::committable) it never passes a position in flight, but
    /// it is defined as soon as a position is tracked and it passes an untracked gap below the
    /// lowest one in flight. This is Kafka's commit offset (the next record to read): committing
    /// it before anything completed keeps the next owner of a partition from resetting past
    /// records still being handled.
    pub fn resume_position(&self) -> Option<i64> {
        match self.lowest_in_flight() {
            Some(low) => Some(low),
            None => self.committable(),
        }
    }

    /// The inclusive end of the contiguous completed prefix: one below
    /// [`committable`](Watermark::committable), so every tracked position at or below it is
    /// complete. This is how far a RabbitMQ `basic.ack multiple=true` may reach. `None` before
    /// anything completed.
    pub fn completed_through(&self) -> Option<i64> {
        self.committable()?.checked_sub(1)
    }

    /// Positions in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_passes_an_unfinished_position() {
        let mut w = Watermark::new();
        for p in [10, 11, 12, 13] {
            w.track(p);
        }
        assert_eq!(w.committable(), None);
        assert!(w.complete(12));
        assert_eq!(w.committable(), Some(10), "10 and 11 are still in flight");
        assert!(w.complete(10));
        assert_eq!(w.committable(), Some(11));
        assert!(w.complete(11));
        assert_eq!(w.committable(), Some(13));
        assert!(w.complete(13));
        assert_eq!(w.committable(), Some(14));
        assert!(!w.complete(13), "completing twice is a no-op");
        assert_eq!(w.committable(), Some(14));
    }

    #[test]
    fn tolerates_gaps_and_exhaustive_orders() {
        // Every completion order of a gapped sequence keeps the invariant.
        let positions = [3i64, 4, 7, 8, 20];
        let mut order: Vec<usize> = (0..positions.len()).collect();
        let mut perms = 0;
        permute(&mut order, 0, &mut |ord| {
            perms += 1;
            let mut w = Watermark::new();
            positions.iter().for_each(|p| w.track(*p));
            let mut done = std::collections::BTreeSet::new();
            for &i in ord {
                w.complete(positions[i]);
                done.insert(positions[i]);
                let bounds = [
                    ("committable", w.committable()),
                    ("resume_position", w.resume_position()),
                    (
                        "completed_through + 1",
                        w.completed_through().map(|t| t + 1),
                    ),
                ];
                for (name, bound) in bounds {
                    if let Some(c) = bound {
                        for p in positions.iter().filter(|p| **p < c) {
                            assert!(done.contains(p), "{name} {c} passes unfinished {p}");
                        }
                    }
                }
                assert_eq!(
                    w.lowest_in_flight(),
                    positions.iter().find(|p| !done.contains(p)).copied()
                );
            }
            assert_eq!(w.committable(), Some(21));
            assert_eq!(w.resume_position(), Some(21));
            assert_eq!(w.completed_through(), Some(20));
        });
        assert_eq!(perms, 120);
    }

    #[test]
    fn resume_position_is_defined_before_anything_completes() {
        let mut w = Watermark::new();
        assert_eq!(w.resume_position(), None);
        for p in 0..5 {
            w.track(p);
        }
        assert_eq!(w.committable(), None);
        assert_eq!(w.resume_position(), Some(0));
        for p in 0..5 {
            assert!(w.complete(p));
            assert_eq!(w.resume_position(), Some(p + 1));
            assert_eq!(w.committable(), Some(p + 1));
        }
    }

    #[test]
    fn resume_position_passes_an_untracked_gap() {
        let mut w = Watermark::new();
        // 3..=7 were never received (compaction, transaction markers).
        w.track(2);
        w.track(8);
        w.track(9);
        assert!(w.complete(2));
        assert_eq!(
            w.committable(),
            Some(3),
            "conservative: one past the last completed"
        );
        assert_eq!(w.resume_position(), Some(8), "the lowest in flight");
        assert!(w.complete(9));
        assert_eq!(w.resume_position(), Some(8));
        assert_eq!(w.committable(), Some(8));
        assert!(w.complete(8));
        assert_eq!(w.resume_position(), Some(10));
    }

    #[test]
    fn completed_through_is_inclusive_and_stops_below_in_flight() {
        let mut w = Watermark::new();
        for tag in 1..=5 {
            w.track(tag);
        }
        assert_eq!(w.completed_through(), None);
        for tag in [1, 2, 4, 5] {
            assert!(w.complete(tag));
        }
        assert_eq!(w.completed_through(), Some(2), "3 is in flight");
        assert!(!w.complete(4), "completing twice is a no-op");
        assert_eq!(w.completed_through(), Some(2));
        assert!(w.complete(3));
        assert_eq!(w.completed_through(), Some(5));
    }

    #[test]
    fn extreme_positions_do_not_overflow() {
        let mut w = Watermark::new();
        w.track(i64::MAX);
        assert!(w.complete(i64::MAX));
        assert_eq!(w.committable(), Some(i64::MAX), "saturates one short");
        assert_eq!(w.resume_position(), Some(i64::MAX));
        let mut w = Watermark::new();
        w.track(i64::MIN);
        w.track(i64::MIN + 1);
        assert!(w.complete(i64::MIN + 1));
        assert_eq!(w.committable(), Some(i64::MIN));
        assert_eq!(w.completed_through(), None, "nothing below i64::MIN");
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }
}
