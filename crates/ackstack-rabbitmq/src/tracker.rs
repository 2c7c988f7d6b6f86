//! Delivery-tag bookkeeping for one channel: which `basic.ack` frames to send.
//!
//! A channel's delivery tags count up from 1. `basic.ack multiple=true` with tag `T` acks every
//! still-unacked delivery with a tag `<= T`, so it may only be sent when no delivery `<= T` is
//! still in flight (invariant 8 in docs/CONTRACT.md). The tracker keeps, for the tags above the last cumulative
//! ack: those in flight (returned by `receive`, not yet settled), those completed (the runner
//! asked to ack them: the handler succeeded, or a retry / dead-letter copy was confirmed) and
//! those already settled one by one (individual acks, or rejects from `release`).
//!
//! The contiguous part is the core [`Watermark`] (invariant 8 in docs/CONTRACT.md: one tracker serves Kafka and
//! RabbitMQ): every delivered tag is tracked in it, and a tag leaves it in flight when it is
//! completed *or* settled individually, since either way it no longer holds a cumulative ack
//! back. What is AMQP-specific stays here: which finished tags still need an ack frame (a
//! released tag never does), the tags settled one by one (acking any of them again is a
//! channel error), and when to ack above a gap.
//!
//! The plan for an ack call:
//! * **Cumulative ack.** The watermark `W` is [`Watermark::completed_through`]: the tag below
//!   the lowest in-flight tag (or the highest finished tag when nothing is in flight). If
//!   completed tags `<= W` exist, one `basic.ack multiple=true` with the highest of them acks
//!   them all. (The highest *completed* tag, not `W` itself: acking a tag already settled
//!   individually is a channel error, and every unacked tag below it is completed, so this is
//!   exact.)
//! * **Individual acks above a gap, late or under pressure.** Completed tags above `W` are
//!   held back for a while: the straggler usually finishes soon, and one cumulative ack then
//!   covers them all, where acking each on its own would cost a frame per delivery behind
//!   it. The wait is bounded in time: the settler asks for the held tags of an ack call by
//!   [`AckTracker::take`] once the call's `held_ack_delay` has passed, and acks them one by
//!   one. And held tags stay unacked at the broker and count against the prefetch window;
//!   when the held ones reach half the window the broker is about to stop delivering and the
//!   consumer would starve behind the straggler. So held tags never reach `starve_threshold`
//!   (prefetch / 2): the lowest of them are acked individually, as many as it takes to stay
//!   below it. (Not all of them: on a busy two-core machine a handler's thread can be
//!   descheduled for a few milliseconds while the other thread finishes a hundred
//!   deliveries; acking all hundred one by one cost a frame each, where the straggler's
//!   cumulative ack a moment later covers what is still held.) `flush` acks every held tag
//!   individually.
//!
//! A tag the watermark does not hold (never delivered, or above `i64::MAX`) never moves it, so
//! a cumulative ack never reaches past the highest tag seen delivered: such a tag above it
//! waits with the held tags and is acked on its own.

use std::collections::BTreeSet;

use ackstack_core::Watermark;

/// What to send to the broker.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AckPlan {
    /// `basic.ack multiple=true` with this tag.
    pub(crate) multiple: Option<u64>,
    /// How many completed tags the `multiple` frame acks.
    pub(crate) multiple_covers: usize,
    /// `basic.ack multiple=false` for each of these tags.
    pub(crate) singles: Vec<u64>,
    /// Why `singles` go one by one.
    pub(crate) why: Singles,
}

/// Why held tags are acked one by one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Singles {
    /// They would reach half the prefetch window.
    #[default]
    Pressure,
    /// They waited `held_ack_delay` for their straggler.
    Late,
    /// A flush.
    Flush,
}

/// The state of one channel's delivery tags.
#[derive(Debug)]
pub(crate) struct AckTracker {
    /// Every tag `<= acked_upto` is settled at the broker.
    acked_upto: u64,
    /// Received tags above `acked_upto`; completed and released tags alike are complete in it.
    tags: Watermark,
    /// Completed, not yet acked at the broker.
    completed: BTreeSet<u64>,
    /// Above `acked_upto`, settled individually (single ack or reject).
    settled: BTreeSet<u64>,
    /// Held completed tags are kept below this many (at least 1) by individual acks.
    starve_threshold: usize,
    /// The highest tag delivered or got so far.
    highest: u64,
}

/// What `complete` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Recorded; will be acked by the next plan.
    Recorded,
    /// Already acked or released: nothing to do.
    AlreadySettled,
}

impl AckTracker {
    /// A tracker for a channel with this prefetch window (0: unlimited).
    pub(crate) fn new(prefetch: u16) -> Self {
        let threshold = if prefetch == 0 {
            100
        } else {
            usize::from(prefetch / 2).max(1)
        };
        AckTracker {
            acked_upto: 0,
            tags: Watermark::new(),
            completed: BTreeSet::new(),
            settled: BTreeSet::new(),
            starve_threshold: threshold,
            highest: 0,
        }
    }

    /// A tag was received.
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.highest = self.highest.max(tag);
        if tag > self.acked_upto
            && let Some(position) = position(tag)
        {
            self.tags.track(position);
        }
    }

    /// A tag got by `basic.get`. The broker numbers consumer deliveries and gets in one
    /// sequence, so every tag below it not seen yet (a delivery still on its way to the
    /// consumer stream) is tracked as in flight too: a cumulative ack for this one never
    /// covers them. Returns false, tracking nothing, when more than [`MAX_UNSEEN`] tags would
    /// be missing (no broker has that many deliveries in transit: the channel is not sane).
    pub(crate) fn got(&mut self, tag: u64) -> bool {
        let unseen = self.highest.max(self.acked_upto).saturating_add(1)..tag;
        if unseen.end.saturating_sub(unseen.start) > MAX_UNSEEN {
            return false;
        }
        for missing in unseen {
            self.delivered(missing);
        }
        self.delivered(tag);
        true
    }

    /// Tags delivered or got and not yet completed or settled.
    pub(crate) fn in_flight(&self) -> usize {
        self.tags.in_flight()
    }

    /// A tag is done and should be acked.
    pub(crate) fn complete(&mut self, tag: u64) -> Completion {
        if tag <= self.acked_upto || self.settled.contains(&tag) {
            return Completion::AlreadySettled;
        }
        // A tag that was not in flight (completed before, or never delivered) does not move
        // the watermark.
        self.finish(tag);
        if self.completed.insert(tag) {
            Completion::Recorded
        } else {
            Completion::AlreadySettled
        }
    }

    /// A tag was settled individually at the broker (nack / reject). Returns false when it
    /// was already settled.
    pub(crate) fn settle_individually(&mut self, tag: u64) -> bool {
        if tag <= self.acked_upto || self.settled.contains(&tag) {
            return false;
        }
        self.finish(tag);
        self.completed.remove(&tag);
        self.settled.insert(tag);
        true
    }

    /// The frames to send now, recorded as sent. With `flush`, every held tag is included.
    pub(crate) fn plan(&mut self, flush: bool) -> AckPlan {
        let mut plan = AckPlan::default();
        if flush {
            plan.why = Singles::Flush;
        }
        if let Some(watermark) = self.watermark()
            && watermark > self.acked_upto
        {
            let above = self.completed.split_off(&(watermark + 1));
            let below = std::mem::replace(&mut self.completed, above);
            plan.multiple = below.last().copied();
            plan.multiple_covers = below.len();
            self.settled = self.settled.split_off(&(watermark + 1));
            self.acked_upto = watermark;
        }
        // Held tags kept: every one at a flush; else fewer than the threshold (the lowest go).
        let keep = if flush { 0 } else { self.starve_threshold - 1 };
        let excess = self.completed.len().saturating_sub(keep);
        if excess > 0 {
            let kept = match self.completed.iter().nth(excess).copied() {
                Some(first_kept) => self.completed.split_off(&first_kept),
                None => BTreeSet::new(),
            };
            let gone = std::mem::replace(&mut self.completed, kept);
            plan.singles = gone.iter().copied().collect();
            self.settled.extend(gone);
        }
        plan
    }

    /// Of `tags`, the ones still held (completed, not acked), as individual acks recorded as
    /// sent.
    pub(crate) fn take(&mut self, tags: &[u64]) -> AckPlan {
        let mut plan = AckPlan {
            why: Singles::Late,
            ..AckPlan::default()
        };
        for &tag in tags {
            if self.completed.remove(&tag) {
                self.settled.insert(tag);
                plan.singles.push(tag);
            }
        }
        plan
    }

    /// Whether `tag` is settled at the broker as far as this tracker knows: covered by a
    /// planned cumulative ack, or settled individually (the frames of a plan are sent before
    /// the tracker is unlocked, so a planned frame is a sent frame unless the channel broke).
    pub(crate) fn is_settled(&self, tag: u64) -> bool {
        tag <= self.acked_upto || self.settled.contains(&tag)
    }

    /// The highest tag at or below which every delivered tag is completed or settled.
    fn watermark(&self) -> Option<u64> {
        let through = self.tags.completed_through()?;
        u64::try_from(through).ok()
    }

    /// `tag` no longer holds the cumulative ack back.
    fn finish(&mut self, tag: u64) {
        if let Some(position) = position(tag) {
            self.tags.complete(position);
        }
    }

    /// How many completed tags wait for an ack.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.completed.len()
    }
}

/// The most tags [`AckTracker::got`] tracks below a got tag without having seen them: far
/// above any prefetch window (65,535 at most).
const MAX_UNSEEN: u64 = 1 << 17;

/// A delivery tag as a watermark position; `None` above `i64::MAX` (2^63 deliveries on one
/// channel: never in practice, but a tag comes from the broker).
fn position(tag: u64) -> Option<i64> {
    i64::try_from(tag).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_got_tag_never_acks_deliveries_not_seen_yet() {
        let mut t = AckTracker::new(200);
        t.delivered(1);
        t.complete(1);
        assert_eq!(t.plan(false).multiple, Some(1));
        // Tags 2 and 3 are on their way to the consumer stream when the get returns tag 4.
        assert!(t.got(4));
        assert_eq!(t.in_flight(), 3);
        t.complete(4);
        assert_eq!(t.plan(false).multiple, None, "2 and 3 were never handled");
        t.delivered(2);
        t.delivered(3);
        t.complete(2);
        t.complete(3);
        assert_eq!(t.plan(false).multiple, Some(4));
        assert_eq!(t.in_flight(), 0);
        assert!(!t.got(u64::MAX), "an absurd gap is refused");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn cumulative_ack_stops_below_in_flight() {
        let mut t = AckTracker::new(200);
        for tag in 1..=5 {
            t.delivered(tag);
        }
        for tag in [1, 2, 4, 5] {
            assert_eq!(t.complete(tag), Completion::Recorded);
        }
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(2), "3 is in flight");
        assert!(plan.singles.is_empty());
        assert_eq!(t.held(), 2);
        t.complete(3);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(5));
        assert_eq!(t.plan(false), AckPlan::default());
    }

    #[test]
    fn released_tags_count_as_done_but_are_never_acked() {
        let mut t = AckTracker::new(200);
        for tag in 1..=4 {
            t.delivered(tag);
        }
        t.complete(1);
        assert!(t.settle_individually(2));
        t.complete(3);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(3));
        t.complete(4);
        assert_eq!(t.plan(false).multiple, Some(4));
        // Only 2 released and 4 in flight: ack 1, nack 2 → watermark passes 2 without a frame.
        let mut t = AckTracker::new(200);
        t.delivered(1);
        t.delivered(2);
        t.complete(1);
        t.settle_individually(2);
        assert_eq!(t.plan(false).multiple, Some(1));
        let mut t = AckTracker::new(200);
        t.delivered(1);
        t.settle_individually(1);
        assert_eq!(t.plan(false), AckPlan::default());
    }

    #[test]
    fn straggler_triggers_individual_acks_and_no_double_ack() {
        let mut t = AckTracker::new(8); // threshold 4
        for tag in 1..=10 {
            t.delivered(tag);
        }
        for tag in 2..=4 {
            t.complete(tag);
        }
        assert_eq!(t.plan(false), AckPlan::default(), "3 held < threshold");
        t.complete(5);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![2], "the lowest goes, three stay held");
        t.complete(7);
        t.complete(8);
        let plan = t.plan(false);
        assert_eq!(plan.singles, vec![3, 4], "held stays below the threshold");
        t.complete(1);
        t.complete(6);
        let plan = t.plan(false);
        // The watermark is 8 (9 is in flight): one cumulative ack up to the highest
        // completed tag covers 1, 5, 6, 7 and 8; 2, 3 and 4 were acked on their own.
        assert_eq!(plan.multiple, Some(8));
        assert_eq!(plan.multiple_covers, 5);
        assert!(plan.singles.is_empty());
        assert_eq!(t.complete(3), Completion::AlreadySettled);
        t.complete(10);
        let plan = t.plan(true);
        assert_eq!(plan.multiple, None, "9 is in flight");
        assert_eq!(plan.singles, vec![10], "a flush acks every held tag");
    }

    #[test]
    fn take_acks_only_the_held_tags_asked_for() {
        let mut t = AckTracker::new(200);
        for tag in 1..=6 {
            t.delivered(tag);
        }
        for tag in [2, 3, 5] {
            t.complete(tag);
        }
        assert_eq!(t.plan(false), AckPlan::default(), "1 is in flight");
        assert!(!t.is_settled(2));
        // 4 is in flight, 6 was never completed, 5 is another call's: none of them is taken.
        let plan = t.take(&[2, 3, 4, 6]);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![2, 3]);
        assert!(t.is_settled(2) && t.is_settled(3));
        assert!(!t.is_settled(5) && !t.is_settled(4));
        assert!(t.take(&[2, 3]).singles.is_empty(), "no double ack");
        assert_eq!(t.complete(2), Completion::AlreadySettled);
        // The straggler completes: one multiple ack covers 1 and 4..5 is still held behind 4.
        t.complete(1);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(1));
        assert_eq!(plan.multiple_covers, 1);
        t.complete(4);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(5));
        assert_eq!(
            plan.multiple_covers, 2,
            "4 and 5; 2 and 3 were acked before"
        );
        assert!(t.is_settled(5));
    }

    #[test]
    fn undelivered_or_huge_tags_never_widen_a_multiple_ack() {
        let mut t = AckTracker::new(200);
        t.delivered(1);
        t.delivered(2);
        t.complete(1);
        // 7 was never seen delivered (3..=6 may still be on their way): no multiple past 2.
        assert_eq!(t.complete(7), Completion::Recorded);
        t.complete(2);
        let plan = t.plan(false);
        assert_eq!(plan.multiple, Some(2));
        assert!(plan.singles.is_empty());
        let plan = t.plan(true);
        assert_eq!(plan.singles, vec![7]);
        assert_eq!(t.complete(7), Completion::AlreadySettled);
        // A tag beyond i64::MAX is tracked outside the watermark, acked on its own.
        let huge = u64::MAX;
        t.delivered(huge);
        assert_eq!(t.complete(huge), Completion::Recorded);
        let plan = t.plan(true);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![huge]);
        assert_eq!(t.complete(huge), Completion::AlreadySettled);
    }

    #[test]
    fn multiple_never_passes_in_flight_random() {
        // Model check: random completion order; no multiple ack covers an in-flight tag, every
        // tag is acked exactly once after a flush.
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _round in 0..200 {
            let mut t = AckTracker::new(16);
            let n = 40u64;
            for tag in 1..=n {
                t.delivered(tag);
            }
            let mut order: Vec<u64> = (1..=n).collect();
            for i in (1..order.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                order.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            let mut acked = BTreeSet::new();
            let mut in_flight: BTreeSet<u64> = (1..=n).collect();
            let mut apply = |plan: AckPlan, in_flight: &BTreeSet<u64>| {
                if let Some(m) = plan.multiple {
                    assert!(in_flight.first().is_none_or(|&f| f > m));
                    assert!(!acked.contains(&m), "multiple ack of an acked tag");
                    for tag in 1..=m {
                        acked.insert(tag);
                    }
                }
                for s in plan.singles {
                    assert!(!in_flight.contains(&s));
                    assert!(!acked.contains(&s), "double ack");
                    acked.insert(s);
                }
            };
            // Completed in groups of 1-5 per plan, so that more than one held tag can go.
            let mut rest = order.as_slice();
            while !rest.is_empty() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let (group, after) = rest.split_at(((seed % 5) as usize + 1).min(rest.len()));
                rest = after;
                for &tag in group {
                    in_flight.remove(&tag);
                    t.complete(tag);
                }
                let plan = t.plan(false);
                assert!(t.held() < 8, "held tags reached half the window");
                let lowest_held = t.completed.first().copied().unwrap_or(u64::MAX);
                assert!(
                    plan.singles.iter().all(|s| *s < lowest_held),
                    "the oldest held tags go first"
                );
                apply(plan, &in_flight);
            }
            let plan = t.plan(true);
            apply(plan, &in_flight);
            assert_eq!(acked.len() as u64, n);
        }
    }
}
