//! Kafka record headers to and from ackstack [`Headers`], and the attempt number they carry.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ackstack_core::Headers;
use ackstack_core::adapter::parse_attempt;
use ackstack_core::deadletter::ATTEMPT_HEADER;
use bytes::Bytes;
use rdkafka::message::{Header, Headers as KafkaHeaders, OwnedHeaders};

/// The header that carries a message id (Kafka records have none).
pub const MESSAGE_ID_HEADER: &str = "x-ackstack-message-id";

/// Headers read from a record, and how many could not be read.
#[derive(Debug, Default)]
pub struct Converted {
    /// The readable headers, in order, repeated names kept.
    pub headers: Headers,
    /// Headers left out because their name is not UTF-8.
    pub skipped: usize,
}

/// Converts a record's headers, in order, repeated names kept. A null value becomes an empty
/// one (core headers hold bytes only).
///
/// A header whose name is not UTF-8 (Kafka does not check, and clients that take names as
/// bytes can write any) is left out and counted in [`Converted::skipped`]: core header names
/// are strings, and rdkafka's accessor panics on such a name rather than return an error, so
/// each header is read under [`catch_unwind`]. (With `panic = "abort"` that cannot help; such
/// a record then aborts the process.)
pub fn from_record<H: KafkaHeaders>(headers: Option<&H>) -> Converted {
    let mut out = Converted::default();
    let Some(headers) = headers else {
        return out;
    };
    for idx in 0..headers.count() {
        let read = catch_unwind(AssertUnwindSafe(|| {
            headers.try_get(idx).map(|h| {
                let value = h.value.map(Bytes::copy_from_slice).unwrap_or_default();
                (h.key.to_string(), value)
            })
        }));
        match read {
            Ok(Some((name, value))) => out.headers.append(name, value),
            Ok(None) => {}
            Err(_) => out.skipped += 1,
        }
    }
    out
}

/// Converts core headers to Kafka headers, in order (repeated names kept).
///
/// librdkafka keeps names as C strings: a name with a NUL byte reads back cut at the NUL.
pub(crate) fn to_record(headers: &Headers) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers.iter() {
        out = out.insert(Header {
            key: name,
            value: Some(value.as_ref()),
        });
    }
    out
}

/// The attempt number a record carries: our [`ATTEMPT_HEADER`] read by core's
/// [`parse_attempt`] (decimal, surrounding spaces allowed, at least 1), else 1.
pub fn attempt_of(headers: &Headers) -> u32 {
    parse_attempt(headers.get(ATTEMPT_HEADER).map(|v| v.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Header names: ours, arbitrary text, and text with NUL bytes.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(ATTEMPT_HEADER.to_string()),
            Just(MESSAGE_ID_HEADER.to_string()),
            any::<String>(),
            "[a-z\\x00é]{0,8}",
        ]
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            any::<u32>().prop_map(|n| n.to_string().into_bytes()),
            " ?[+-]?[0-9]{0,12} ?".prop_map(String::into_bytes),
        ]
    }

    fn pairs() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        prop::collection::vec((name(), value()), 0..16)
    }

    /// librdkafka's view of a name: up to the first NUL.
    fn c_name(name: &str) -> &str {
        name.split('\0').next().unwrap_or_default()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn kafka_headers_round_trip(pairs in pairs()) {
            let core: Headers = pairs.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
            let back = from_record(Some(&to_record(&core)));
            prop_assert_eq!(back.skipped, 0);
            let expected: Vec<(String, Bytes)> = pairs
                .iter()
                .map(|(n, v)| (c_name(n).to_string(), Bytes::from(v.clone())))
                .collect();
            let got: Vec<(String, Bytes)> =
                back.headers.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn null_values_become_empty(pairs in prop::collection::vec((name(), prop::option::of(value())), 0..16)) {
            let mut kafka = OwnedHeaders::new();
            for (n, v) in &pairs {
                kafka = kafka.insert(Header { key: n, value: v.as_deref() });
            }
            let back = from_record(Some(&kafka));
            prop_assert_eq!(back.headers.len(), pairs.len());
            for ((n, v), (got_n, got_v)) in pairs.iter().zip(back.headers.iter()) {
                prop_assert_eq!(c_name(n), got_n);
                prop_assert_eq!(v.as_deref().unwrap_or_default(), got_v.as_ref());
            }
        }

        #[test]
        fn attempt_of_any_headers_never_panics(pairs in pairs()) {
            let core: Headers = pairs.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
            let attempt = attempt_of(&core);
            prop_assert!(attempt >= 1);
            let first = pairs.iter().find(|(n, _)| n == ATTEMPT_HEADER);
            let parsed = first
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .and_then(|t| t.trim().parse::<u32>().ok())
                .filter(|&n| n >= 1);
            prop_assert_eq!(attempt, parsed.unwrap_or(1));
        }

        #[test]
        fn attempt_reads_what_a_retry_copy_writes(n in 1u32.., pad in " {0,2}") {
            let h = Headers::new().with(ATTEMPT_HEADER, format!("{pad}{n}{pad}"));
            prop_assert_eq!(attempt_of(&from_record(Some(&to_record(&h))).headers), n);
        }
    }

    #[test]
    fn no_headers_is_empty_and_attempt_one() {
        let none: Option<&OwnedHeaders> = None;
        let c = from_record(none);
        assert!(c.headers.is_empty());
        assert_eq!(c.skipped, 0);
        assert_eq!(attempt_of(&c.headers), 1);
    }
}
