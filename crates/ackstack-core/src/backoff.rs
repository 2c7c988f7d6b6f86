//! Exponential backoff with explicit jitter, as a pure function of the attempt number.
//!
//! `delay(n) = min(cap, base * factor^(n-1))`, then jitter:
//!
//! | jitter | delay returned | bounds |
//! |---|---|---|
//! | [`Jitter::None`] | `d` | exactly `d` |
//! | [`Jitter::Equal`] | `d/2 + rand(0..=d/2)` | `[d/2, d]` |
//! | [`Jitter::Full`] | `rand(0..=d)` | `[0, d]` |
//!
//! The attempt number comes from the broker, so the same policy gives the same bounds after a
//! restart. The random part takes a caller-supplied number in `[0, 1]`
//! ([`Backoff::delay_with`]) so it can be tested exactly; [`Backoff::delay`] draws one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the computed delay is randomised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness.
    None,
    /// Half fixed, half random: `[d/2, d]`.
    Equal,
    /// Fully random: `[0, d]` (spreads a thundering herd best).
    #[default]
    Full,
}

/// An exponential delay schedule with a cap: a pure function of the attempt number. The
/// attempt limit is the retry policy's ([`RetryConfig::max_attempts`](crate::RetryConfig)).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The delay after the first failure, before jitter.
    #[serde(with = "crate::config::duration")]
    pub base: Duration,
    /// The growth factor per attempt (at least 1).
    pub factor: f64,
    /// The longest delay.
    #[serde(with = "crate::config::duration")]
    pub cap: Duration,
    /// The jitter.
    pub jitter: Jitter,
}

impl Default for Backoff {
    /// 1 s doubling to 5 min, full jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(300),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// Doubling from `base` up to `cap`, full jitter.
    pub fn exponential(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            ..Backoff::default()
        }
    }

    /// With this growth factor.
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// With no jitter.
    pub fn no_jitter(mut self) -> Self {
        self.jitter = Jitter::None;
        self
    }

    /// With equal jitter.
    pub fn equal_jitter(mut self) -> Self {
        self.jitter = Jitter::Equal;
        self
    }

    /// With full jitter.
    pub fn full_jitter(mut self) -> Self {
        self.jitter = Jitter::Full;
        self
    }

    /// The delay before jitter after attempt `attempt` (1-based) failed.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1023) as i32;
        let factor = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            1.0
        };
        let secs = self.base.as_secs_f64() * factor.powi(exp);
        let cap = self.cap.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.cap
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    /// The delay after attempt `attempt` failed, with jitter drawn from `unit` in `[0, 1]`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let d = self.ceiling(attempt);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self.jitter {
            Jitter::None => d,
            Jitter::Equal => d / 2 + (d / 2).mul_f64(unit),
            Jitter::Full => d.mul_f64(unit),
        }
    }

    /// The delay after attempt `attempt` failed, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let b = Backoff::exponential(100 * MS, 1000 * MS).no_jitter();
        let got: Vec<_> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), 1000 * MS);
        assert_eq!(b.delay(0), 100 * MS, "attempt 0 is treated as the first");
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let equal = Backoff::exponential(100 * MS, 10_000 * MS).equal_jitter();
        let full = Backoff::exponential(100 * MS, 10_000 * MS).full_jitter();
        for n in 1..=12 {
            let d = equal.ceiling(n);
            assert_eq!(equal.delay_with(n, 0.0), d / 2);
            assert_eq!(equal.delay_with(n, 1.0), d);
            assert_eq!(full.delay_with(n, 0.0), Duration::ZERO);
            assert_eq!(full.delay_with(n, 1.0), d);
            for _ in 0..200 {
                let e = equal.delay(n);
                assert!(
                    e >= d / 2 && e <= d,
                    "equal {e:?} outside [{:?}, {d:?}]",
                    d / 2
                );
                let f = full.delay(n);
                assert!(f <= d, "full {f:?} above {d:?}");
                assert!(d <= 10_000 * MS);
            }
        }
    }

    #[test]
    fn odd_inputs_do_not_panic_or_exceed_the_cap() {
        let b = Backoff {
            factor: f64::NAN,
            ..Backoff::exponential(MS, 5 * MS)
        };
        assert_eq!(b.ceiling(50), MS);
        let huge = Backoff::exponential(Duration::from_secs(u64::MAX / 4), 5 * MS).factor(1e300);
        assert_eq!(huge.ceiling(3), 5 * MS);
        assert!(huge.delay_with(3, f64::INFINITY) <= 5 * MS);
    }

    #[test]
    fn deserializes_from_human_durations() {
        let b: Backoff =
            serde_json::from_str(r#"{"base":"250ms","cap":"2m","jitter":"equal"}"#).unwrap();
        assert_eq!(b.base, 250 * MS);
        assert_eq!(b.cap, Duration::from_secs(120));
        assert_eq!(b.jitter, Jitter::Equal);
        assert_eq!(b.factor, 2.0);
    }
}
