//! Serde helpers for configuration.

/// Durations in config as human strings with a unit: `"250ms"`, `"30s"`, `"5m"`, `"1h"`.
///
/// One rule for config files, environment overrides and the `duration` helpers: the unit is
/// required. A bare number (`30`, or `"30"`) is refused with an error that shows the fix, since
/// it would mean milliseconds to one reader and seconds to another; figment adds the key to
/// the message (`for key "default.consumer.shutdown_deadline"`), serde_json the line and
/// column.
pub mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Writes a duration as `"<n>ms"`. Parts below a millisecond are dropped; every other
    /// duration, up to [`Duration::MAX`], reads back unchanged.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    /// Reads `"250ms"`, `"30s"`, `"5m"` or `"1h"`; refuses a number without a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, such as \"250ms\", \"30s\" or \"5m\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse(text).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            Err(E::custom(no_unit(&n.to_string())))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(no_unit(&n.to_string())))
        }

        fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
            let ms = (n * 1000.0).round();
            Err(E::custom(format!(
                "the duration {n} has no unit, and fractions are not read: write \"{ms}ms\""
            )))
        }
    }

    /// The refusal of a number without a unit, with the fix.
    fn no_unit(number: &str) -> String {
        format!(
            "the duration {number} has no unit: write \"{number}s\" for seconds or \"{number}ms\" \
             for milliseconds (units: ms, s, m, h)"
        )
    }

    /// Parses `"250ms"`, `"30s"`, `"5m"` or `"1h"`. Anything up to [`Duration::MAX`] is
    /// accepted, so whatever [`serialize`] writes reads back; a number without a unit is
    /// refused.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "invalid duration {text:?}: expected e.g. \"250ms\", \"30s\""
            ));
        }
        let unit_ms: u128 = match unit.trim() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(no_unit(num)),
            other => return Err(format!("invalid duration unit {other:?} in {text:?}")),
        };
        let too_large = || format!("duration {text:?} is too large");
        // `num` is all ASCII digits, so the only possible parse error is overflow.
        let n: u128 = num.parse().map_err(|_| too_large())?;
        n.checked_mul(unit_ms)
            .and_then(from_millis)
            .ok_or_else(too_large)
    }

    /// `ms` milliseconds, when that fits a [`Duration`].
    fn from_millis(ms: u128) -> Option<Duration> {
        let secs = u64::try_from(ms / 1000).ok()?;
        // Below 1000, so the product is below 1e9 and fits.
        let nanos = u32::try_from(ms % 1000).ok()? * 1_000_000;
        Some(Duration::new(secs, nanos))
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some(d)` as `"<n>ms"`, `None` as null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads null or a duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_units_and_rejects_junk() {
            assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
            assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
            assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
            assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
            assert!(parse("5 parsecs").is_err());
            assert!(parse("").is_err());
            assert!(parse("99999999999999999999h").is_err());
            assert!(parse("999999999999999999999999999999999999999999s").is_err());
            assert_eq!(
                parse("18446744073709551615999ms"),
                Ok(Duration::new(u64::MAX, 999_000_000)),
                "Duration::MAX in whole milliseconds"
            );
            assert!(parse("18446744073709551616000ms").is_err());
        }

        #[test]
        fn a_number_without_a_unit_is_refused_with_the_fix() {
            let why = parse("30").unwrap_err();
            assert!(why.contains("\"30s\"") && why.contains("\"30ms\""), "{why}");
            // Fractions are not read; the fix is in milliseconds.
            #[derive(Debug, serde::Deserialize)]
            struct Config {
                #[serde(with = "super")]
                #[allow(dead_code)]
                shutdown_deadline: Duration,
            }
            let why = serde_json::from_str::<Config>(r#"{"shutdown_deadline": 1.5}"#)
                .unwrap_err()
                .to_string();
            assert!(why.contains("\"1500ms\""), "{why}");
        }
    }
}

/// `at + d`, saturating far in the future instead of overflowing on absurd configured
/// durations.
pub(crate) fn later(at: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(std::time::Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}
