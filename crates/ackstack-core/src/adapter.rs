//! Mechanisms the broker adapters share: reading an attempt number from broker data,
//! fencing tokens by the [`Generation`] they were received in, the [`Counter`]s behind
//! their stats, and telling a retry this process delayed from a crash suspect
//! ([`Retried`]).
//!
//! Each adapter reads its broker's own fields; what those fields mean to ackstack is decided
//! here once, so every adapter gives the same answer for the same input.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::SettleError;

mod retried;
pub use retried::Retried;

/// A count written as decimal text (surrounding whitespace allowed), as a broker or one of
/// our copies writes it: `None` when the text is not UTF-8, not a number, or above
/// [`u64::MAX`].
pub fn parse_count(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// The attempt number written as text (SQS `ApproximateReceiveCount`, our
/// [`ATTEMPT_HEADER`](crate::deadletter::ATTEMPT_HEADER) on a copy): the count when it is a
/// number from 1 to [`u32::MAX`] (see [`parse_count`]), else 1. Missing, malformed, zero and
/// out-of-range values all mean a first attempt (invariant 2 of docs/CONTRACT.md never fails on bad data).
pub fn parse_attempt(text: Option<&[u8]>) -> u32 {
    text.and_then(parse_count)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// The attempt number a count read as a wider integer gives (a typed header value): the
/// count when at least 1, [`u32::MAX`] when above it, 1 when missing or zero.
pub fn attempt_from_count(count: Option<u64>) -> u32 {
    count
        .filter(|&n| n >= 1)
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// One epoch of the broker state a delivery token belongs to: a Kafka partition's
/// assignment, a RabbitMQ connection. A token carries the generation it was received in;
/// once that generation has ended (the partition was revoked, the channel closed) the token
/// is fenced off: settling it is [`SettleError::LeaseLost`] ([`Generation::lease_lost`]),
/// and nothing is sent for it.
///
/// Generations count up from 1 ([`Generation::next`] of the default, 0, which no token
/// carries); only equality matters for fencing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(u64);

impl Generation {
    /// The generation numbered `n`.
    pub const fn new(n: u64) -> Self {
        Generation(n)
    }

    /// Its number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The generation after this one.
    #[must_use]
    pub const fn next(self) -> Self {
        Generation(self.0.saturating_add(1))
    }

    /// The error for settling a token of this generation after it ended:
    /// [`SettleError::LeaseLost`], "`what` (generation N ended)".
    pub fn lease_lost(self, what: impl fmt::Display) -> SettleError {
        SettleError::LeaseLost(format!("{what} (generation {} ended)", self.0))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A statistics counter that any task may bump and an adapter's public stats snapshot read
/// (relaxed ordering: each count is exact, but counters read together are not one atomic
/// snapshot).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_attempt_never_panics(text in any::<String>(), near in " ?[+-]?[0-9]{0,12} ?") {
            for v in [text.as_str(), near.as_str()] {
                let got = parse_attempt(Some(v.as_bytes()));
                prop_assert!(got >= 1);
                let expected = v.trim().parse::<u32>().ok().filter(|&n| n >= 1).unwrap_or(1);
                prop_assert_eq!(got, expected);
            }
        }

        #[test]
        fn parse_attempt_reads_every_receive_count(n in 1u32..) {
            prop_assert_eq!(parse_attempt(Some(n.to_string().as_bytes())), n);
        }

        #[test]
        fn parse_count_reads_every_u64(n in any::<u64>(), pad in " {0,2}") {
            prop_assert_eq!(parse_count(format!("{pad}{n}{pad}").as_bytes()), Some(n));
        }

        #[test]
        fn parse_attempt_of_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..32)) {
            prop_assert!(parse_attempt(Some(&bytes)) >= 1);
        }
    }

    #[test]
    fn attempt_never_panics() {
        let attempt = |s: &str| parse_attempt(Some(s.as_bytes()));
        assert_eq!(attempt("3"), 3);
        assert_eq!(attempt(" 2 "), 2);
        assert_eq!(attempt("0"), 1);
        assert_eq!(attempt("-4"), 1);
        assert_eq!(attempt("lots"), 1);
        assert_eq!(attempt("99999999999999999999"), 1);
        assert_eq!(
            attempt("4294967296"),
            1,
            "above u32::MAX in text is malformed"
        );
        assert_eq!(parse_attempt(Some(&[0xff, 0xfe])), 1);
        assert_eq!(parse_attempt(None), 1);
    }

    #[test]
    fn generations_count_up_from_one_and_name_the_ended_one() {
        let first = Generation::default().next();
        assert_eq!(first, Generation::new(1));
        assert_eq!(first.next().get(), 2);
        assert_ne!(first, first.next());
        let e = Generation::new(3).lease_lost("partition t/0 was revoked");
        assert!(e.is_lease_lost());
        assert!(
            e.to_string()
                .contains("partition t/0 was revoked (generation 3 ended)"),
            "{e}"
        );
    }

    #[test]
    fn a_counter_adds_up() {
        let c = Counter::default();
        c.add(1);
        c.add(41);
        assert_eq!(c.get(), 42);
    }

    #[test]
    fn a_wide_count_saturates() {
        assert_eq!(attempt_from_count(None), 1);
        assert_eq!(attempt_from_count(Some(0)), 1);
        assert_eq!(attempt_from_count(Some(7)), 7);
        assert_eq!(attempt_from_count(Some(u64::MAX)), u32::MAX);
    }
}
