//! Property tests: the core's parsers of broker and user data never panic (invariant 10), and
//! what they write they read back.
//!
//! * config durations: [`ackstack_core::config::duration`] and the config structs that use it;
//! * dead-letter metadata: [`DeadLetterMetadata`] as headers and as JSON, and the truncation
//!   of failure messages that it carries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, UNIX_EPOCH};

use ackstack_core::config::duration;
use ackstack_core::deadletter::{ATTEMPT_HEADER, FIRST_FAILURE_HEADER, METADATA_PREFIX};
use ackstack_core::error::{MAX_FAILURE_MESSAGE, truncate};
use ackstack_core::{
    Backoff, ConsumerConfig, DeadLetter, DeadLetterMetadata, DeadLetterReason, DedupConfig,
    Delivery, ErrorKind, Failure, Headers, LeaseConfig, Origin, RetryConfig,
};
use bytes::Bytes;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A duration field as it appears in a config struct.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Timed {
    #[serde(with = "duration")]
    d: Duration,
}

/// An optional duration field.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct MaybeTimed {
    #[serde(with = "duration::option")]
    d: Option<Duration>,
}

/// Text shaped like a duration: digits, an optional unit or near miss, stray spaces and signs.
fn duration_like() -> impl Strategy<Value = String> {
    "[ +\\-]{0,1}[0-9]{0,25}[ .]{0,1}[0-9]{0,3}[ ]{0,2}(ms|s|m|h|us|ns|d|S|MS|µs|)[ ]{0,2}"
}

/// Any JSON value, with strings that look like durations and keys that are config field names
/// often enough to get past the first field.
fn json() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "concurrency",
        "receive_batch",
        "ack_batch",
        "ack_delay",
        "shutdown_deadline",
        "mode",
        "ordering",
        "retry",
        "lease",
        "dedup",
        "correlation_header",
        "base",
        "factor",
        "cap",
        "jitter",
        "max_attempts",
        "immediate",
        "immediate_delay",
        "extend_at",
        "max_total",
        "claim_lease",
        "done_ttl",
        "on_store_error",
        "store_retry_after",
        "busy_retry_after",
        "d",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        duration_like().prop_map(Value::String),
        prop::sample::select(vec![
            "full",
            "equal",
            "none",
            "fail_open",
            "per-key",
            "at-most-once",
            "effectively-once",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => any::<String>(),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..10)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Tries every config struct of the core on `text`; only errors are allowed, never a panic.
fn parse_all(text: &str) {
    let _ = serde_json::from_str::<Timed>(text);
    let _ = serde_json::from_str::<MaybeTimed>(text);
    let _ = serde_json::from_str::<ConsumerConfig>(text);
    let _ = serde_json::from_str::<RetryConfig>(text);
    let _ = serde_json::from_str::<Backoff>(text);
    let _ = serde_json::from_str::<LeaseConfig>(text);
    let _ = serde_json::from_str::<DedupConfig>(text);
    let _ = serde_json::from_str::<DeadLetterMetadata>(text);
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Durations with a millisecond resolution, small ones and huge ones.
fn whole_millis() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..100_000_000).prop_map(millis),
        any::<u64>().prop_map(millis),
        // Beyond u64::MAX milliseconds, up to Duration::MAX.
        (any::<u64>(), 0u32..1000).prop_map(|(s, ms)| Duration::new(s, ms * 1_000_000)),
    ]
}

/// A number as people write it in a config file (`1.5`, `0.7`, `2`).
///
/// Not any `f64`: without its `float_roundtrip` feature serde_json reads some extreme values
/// (such as `-2.0706144617839033e-253`) one unit in the last place off, which no config value
/// is near.
fn decimal() -> impl Strategy<Value = f64> {
    (0u32..1_000_000).prop_map(|n| f64::from(n) / 1000.0)
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![Just(ErrorKind::Permanent), Just(ErrorKind::Transient)]
}

fn metadata() -> impl Strategy<Value = DeadLetterMetadata> {
    let reason = prop_oneof![
        Just(DeadLetterReason::Permanent),
        Just(DeadLetterReason::MaxAttempts)
    ];
    (
        (reason, error_kind(), any::<String>(), any::<u32>()),
        (any::<String>(), any::<String>(), any::<String>()),
        (
            any::<Option<i32>>(),
            any::<Option<i64>>(),
            any::<Option<String>>(),
        ),
        (any::<Option<u64>>(), any::<u64>()),
    )
        .prop_map(
            |(
                (reason, error_kind, error_message, attempts),
                (broker, queue, consumer),
                (partition, offset, message_id),
                (first_failure_ms, last_failure_ms),
            )| {
                DeadLetterMetadata {
                    reason,
                    error_kind,
                    error_message,
                    attempts,
                    broker,
                    queue,
                    partition,
                    offset,
                    message_id,
                    first_failure_ms,
                    last_failure_ms,
                    consumer,
                    fingerprint: String::new(),
                }
                .with_fingerprint()
            },
        )
}

/// Header names: ours (metadata, attempt), near misses and arbitrary ones.
fn header_name() -> impl Strategy<Value = String> {
    const FIELDS: &[&str] = &[
        "reason",
        "error-kind",
        "error-message",
        "attempts",
        "broker",
        "queue",
        "partition",
        "offset",
        "message-id",
        "first-failure-ms",
        "last-failure-ms",
        "consumer",
    ];
    prop_oneof![
        4 => prop::sample::select(FIELDS).prop_map(|f| format!("{METADATA_PREFIX}{f}")),
        1 => Just(ATTEMPT_HEADER.to_string()),
        1 => Just(FIRST_FAILURE_HEADER.to_string()),
        1 => any::<String>().prop_map(|s| format!("{METADATA_PREFIX}{s}")),
        1 => any::<String>(),
    ]
}

/// Header values: arbitrary bytes, or text that our fields might hold.
fn header_value() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from),
        prop::sample::select(vec![
            "permanent",
            "transient",
            "max_attempts",
            "0",
            "-1",
            "18446744073709551615",
            "18446744073709551616",
            "2147483648",
            " 7 ",
        ])
        .prop_map(|s: &str| Bytes::from(s.to_string())),
        any::<u64>().prop_map(|n| Bytes::from(n.to_string())),
        any::<String>().prop_map(Bytes::from),
    ]
}

fn headers() -> impl Strategy<Value = Headers> {
    prop::collection::vec((header_name(), header_value()), 0..24)
        .prop_map(|pairs| pairs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn duration_parse_never_panics(text in any::<String>()) {
        let _ = duration::parse(&text);
    }

    #[test]
    fn duration_parse_never_panics_on_near_misses(text in duration_like()) {
        let _ = duration::parse(&text);
    }

    #[test]
    fn duration_parse_reads_every_unit(n in any::<u64>(), unit in "(ms|s|m|h)", pad in " {0,2}") {
        let factor: u64 = match unit.as_str() {
            "ms" => 1,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => 1000,
        };
        let text = format!("{pad}{n}{pad}{unit}{pad}");
        let expected = u128::from(n) * u128::from(factor);
        match duration::parse(&text) {
            Ok(d) => prop_assert_eq!(d.as_millis(), expected),
            Err(e) => prop_assert!(
                Duration::new(u64::MAX, 999_999_999).as_millis() < expected,
                "{text:?} rejected: {e}"
            ),
        }
    }

    #[test]
    fn duration_serde_round_trips(d in whole_millis()) {
        let json = serde_json::to_string(&Timed { d }).unwrap();
        let back: Timed = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.d, d);
        let json = serde_json::to_string(&MaybeTimed { d: Some(d) }).unwrap();
        let back: MaybeTimed = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.d, Some(d));
    }

    #[test]
    fn duration_serde_drops_only_sub_millisecond_parts(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
        let d = Duration::new(secs, nanos);
        let json = serde_json::to_string(&Timed { d }).unwrap();
        let back: Timed = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back.d, Duration::new(secs, nanos / 1_000_000 * 1_000_000));
    }

    #[test]
    fn a_duration_without_a_unit_is_refused_with_the_fix(n in any::<u64>(), pad in " {0,2}") {
        let why = duration::parse(&format!("{pad}{n}{pad}")).unwrap_err();
        prop_assert!(why.contains(&format!("\"{n}s\"")), "{}", why);
        let number = serde_json::from_str::<Timed>(&format!("{{\"d\":{n}}}"));
        prop_assert!(number.unwrap_err().to_string().contains("has no unit"));
        let text = serde_json::from_str::<Timed>(&format!("{{\"d\":\"{n}\"}}"));
        prop_assert!(text.unwrap_err().to_string().contains("has no unit"));
    }

    #[test]
    fn config_structs_never_panic_on_arbitrary_json(value in json()) {
        parse_all(&value.to_string());
    }

    #[test]
    fn config_structs_never_panic_on_arbitrary_text(text in any::<String>()) {
        parse_all(&text);
    }

    #[test]
    fn consumer_config_round_trips(
        (concurrency, receive_batch, ack_batch) in (any::<usize>(), any::<usize>(), any::<Option<usize>>()),
        (ack_delay, shutdown_deadline, immediate_delay, max_total) in (whole_millis(), whole_millis(), whole_millis(), whole_millis()),
        (base, cap, claim_lease, done_ttl) in (whole_millis(), whole_millis(), whole_millis(), whole_millis()),
        (factor, extend_at, max_attempts, immediate) in (decimal(), decimal(), any::<u32>(), any::<u32>()),
        correlation_header in any::<Option<String>>(),
    ) {
        let mut c = ConsumerConfig::default();
        c.concurrency = concurrency;
        c.receive_batch = receive_batch;
        c.ack_batch = ack_batch;
        c.ack_delay = ack_delay;
        c.shutdown_deadline = shutdown_deadline;
        c.correlation_header = correlation_header;
        c.retry.backoff.factor = factor;
        c.retry.backoff.base = base;
        c.retry.backoff.cap = cap;
        c.retry.max_attempts = max_attempts;
        c.retry.immediate = immediate;
        c.retry.immediate_delay = immediate_delay;
        c.lease.extend_at = extend_at;
        c.lease.max_total = max_total;
        c.dedup.claim_lease = claim_lease;
        c.dedup.done_ttl = done_ttl;
        let json = serde_json::to_string(&c).unwrap();
        let back: ConsumerConfig = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, c);
    }

    #[test]
    fn metadata_round_trips_through_headers(meta in metadata(), before in headers()) {
        let mut h = before.clone();
        meta.apply_to(&mut h);
        prop_assert_eq!(DeadLetterMetadata::from_headers(&h), Some(meta.clone()));
        // Dead-lettering again replaces, never grows.
        let len = h.len();
        meta.apply_to(&mut h);
        prop_assert_eq!(h.len(), len);
        // Every header that was not ours is still there, in order.
        let others = |h: &Headers| -> Vec<(String, Bytes)> {
            h.iter()
                .filter(|(n, _)| !n.starts_with(METADATA_PREFIX))
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect()
        };
        prop_assert_eq!(others(&h), others(&before));
    }

    #[test]
    fn metadata_round_trips_through_json(meta in metadata()) {
        let back: DeadLetterMetadata = serde_json::from_str(&meta.to_json()).unwrap();
        prop_assert_eq!(back, meta);
    }

    #[test]
    fn metadata_from_arbitrary_headers_never_panics(h in headers()) {
        if let Some(meta) = DeadLetterMetadata::from_headers(&h) {
            // What was read is what a fresh write reads back.
            let mut again = Headers::new();
            meta.apply_to(&mut again);
            prop_assert_eq!(DeadLetterMetadata::from_headers(&again), Some(meta));
        }
    }

    #[test]
    fn metadata_from_arbitrary_json_never_panics(value in json(), text in any::<String>()) {
        let _ = serde_json::from_str::<DeadLetterMetadata>(&value.to_string());
        let _ = serde_json::from_str::<DeadLetterMetadata>(&text);
    }

    #[test]
    fn failure_messages_are_truncated_on_char_boundaries(
        text in prop::collection::vec(
            prop_oneof![3 => prop::sample::select(vec!['a', 'é', '€', '😀']), 1 => any::<char>()],
            0..1100,
        )
        .prop_map(String::from_iter),
        max in 0usize..64,
    ) {
        let out = truncate(text.clone(), max);
        prop_assert!(out.len() <= max, "{} bytes for a bound of {max}", out.len());
        let kept = out.strip_suffix('…').unwrap_or(&out);
        prop_assert!(text.starts_with(kept));
        let failure = Failure::new(ErrorKind::Transient, text.clone());
        prop_assert!(failure.message.len() <= MAX_FAILURE_MESSAGE);
        prop_assert!(text.starts_with(failure.message.strip_suffix('…').unwrap_or(&failure.message)));
    }

    #[test]
    fn dead_letter_of_any_delivery_never_panics(
        h in headers(),
        attempt in any::<u32>(),
        kind in error_kind(),
        message in any::<String>(),
        at_ms in any::<u64>(),
    ) {
        let mut d = Delivery::new("payload", Origin::new("memory", "q", "c"));
        d.headers = h;
        d.attempt = attempt;
        let mut failure = Failure::new(kind, message);
        failure.at = UNIX_EPOCH
            .checked_add(Duration::from_millis(at_ms))
            .unwrap_or(UNIX_EPOCH);
        let letter = DeadLetter::new(&d, failure);
        let meta = letter.metadata(&d);
        prop_assert_eq!(meta.attempts, attempt);
        if let Some(first) = meta.first_failure_ms {
            prop_assert!(first <= meta.last_failure_ms);
        }
        let mut out = d.headers.clone();
        meta.apply_to(&mut out);
        prop_assert_eq!(DeadLetterMetadata::from_headers(&out), Some(meta));
    }
}
