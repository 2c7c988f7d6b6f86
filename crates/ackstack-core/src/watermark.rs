//! The watermark tracker: the contiguous completion point of a sequence of deliveries that
//! finish out of order (invariant 8).
//!
//! Brokers that acknowledge cumulatively (a Kafka offset commit, a RabbitMQ `multiple=true`
//! ack) may only acknowledge up to the first delivery still in flight. Track every position
//! when it is received, complete it when it is settled, and ask for the
//! [`Watermark::committable`] position: every tracked position below it is complete. Gaps in
//! the positions (compacted Kafka offsets, transaction markers) need no special care: only
//! tracked positions hold the watermark back.

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
    /// below it is complete and none at or above it is known complete-and-contiguous. This is
    /// Kafka's commit offset (the next record to read). `None` before anything completed.
    pub fn committable(&self) -> Option<i64> {
        let done = self.highest_done?;
        Some(match self.lowest_in_flight() {
            Some(low) if low <= done => low,
            _ => done + 1,
        })
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
                if let Some(c) = w.committable() {
                    for p in positions.iter().filter(|p| **p < c) {
                        assert!(done.contains(p), "committable {c} passes unfinished {p}");
                    }
                }
            }
            assert_eq!(w.committable(), Some(21));
        });
        assert_eq!(perms, 120);
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
