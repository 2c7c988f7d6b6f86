//! Serde helpers for configuration.

/// Durations in config as human strings: `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a number of
/// milliseconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Writes a duration as `"<n>ms"`. Parts below a millisecond are dropped; every other
    /// duration, up to [`Duration::MAX`], reads back unchanged.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    /// Reads `"250ms"`, `"30s"`, `"5m"`, `"1h"` or a number of milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(t) => parse(&t).map_err(D::Error::custom),
        }
    }

    /// Parses `"250ms"`, `"30s"`, `"5m"` or `"1h"` (a bare number is seconds). Anything up to
    /// [`Duration::MAX`] is accepted, so whatever [`serialize`] writes reads back.
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
            "s" | "" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
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
    }
}

/// `at + d`, saturating far in the future instead of overflowing on absurd configured
/// durations.
pub(crate) fn later(at: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(std::time::Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}
