//! Names for what a test creates on a shared broker or database (queues, topics, consumer
//! groups, tables, key prefixes), so that tests, processes and repeated runs never collide and
//! need no clean-up first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A name no other call returns: `<prefix>-<process id>-<nanoseconds since 1970>-<counter>`,
/// the three numbers in lower-case hex.
///
/// The counter makes names unique within the process, the process id and the clock across
/// processes and runs.
///
/// The suffix is made of lower-case hex digits and `-` only, and adds at most 43 characters
/// (about 28 in practice). With a prefix of ASCII letters, digits, `-` and `_`, the name is
/// therefore a valid RabbitMQ queue name, SQS queue name (80 characters at most; append `.fifo`
/// for a FIFO queue), Kafka topic or consumer group name, Redis key part and file name. For a
/// PostgreSQL table, use [`unique_identifier`].
///
/// ```
/// let a = ackstack_testkit::unique_name("orders");
/// let b = ackstack_testkit::unique_name("orders");
/// assert!(a.starts_with("orders-"));
/// assert_ne!(a, b);
/// ```
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}-{nanos:x}-{n:x}", std::process::id())
}

/// [`unique_name`] as a PostgreSQL identifier that needs no quoting: lower-cased, with every
/// character other than ASCII letters, digits and `_` replaced by `_`
/// (`t_dups_1f3a_17c2d0e8a1b2c3d4_0`).
///
/// Start `prefix` with a letter or `_`, and keep it short: the name is about 28 characters
/// longer than the prefix (43 at the most), and PostgreSQL truncates identifiers to 63 bytes,
/// which could cut off the unique part (a table of `ackstack-postgres` may have 47).
///
/// ```
/// let table = ackstack_testkit::unique_identifier("t-Inbox");
/// assert!(table.starts_with("t_inbox_"));
/// assert!(table.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
/// ```
pub fn unique_identifier(prefix: &str) -> String {
    unique_name(prefix)
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_keep_the_prefix() {
        let names: std::collections::HashSet<String> =
            (0..1000).map(|_| unique_name("q")).collect();
        assert_eq!(names.len(), 1000);
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("q-") && n.len() <= 1 + 43)
        );
    }

    #[test]
    fn identifiers_are_plain_postgres_identifiers() {
        let id = unique_identifier("t_Race-1");
        assert!(id.starts_with("t_race_1_"), "{id}");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{id}"
        );
    }
}
