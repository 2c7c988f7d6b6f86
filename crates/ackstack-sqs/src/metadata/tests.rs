use ackstack_core::{DeadLetter, Delivery, ErrorKind, Failure, Headers, Origin};
use bytes::Bytes;

use super::*;
use crate::headers::*;

fn string(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

fn metadata() -> DeadLetterMetadata {
    let d = Delivery::new("x", Origin::new("sqs", "q", "c"));
    DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "bad")).metadata(&d)
}

mod properties {
    use super::*;
    use ackstack_core::{DeadLetterReason, ErrorKind};
    use proptest::prelude::*;

    /// An attribute as SQS returns it: String or Number with text, Binary with bytes; custom
    /// type suffixes (`String.json`, `Binary.gz`) included.
    fn attribute() -> impl Strategy<Value = MessageAttributeValue> {
        let suffix = prop_oneof![Just(String::new()), "\\.[a-z]{1,6}"];
        prop_oneof![
            (
                prop_oneof![Just("String"), Just("Number")],
                suffix.clone(),
                any::<String>()
            )
                .prop_map(|(t, s, v)| (format!("{t}{s}"), Some(v), None)),
            (suffix, prop::collection::vec(any::<u8>(), 0..48)).prop_map(|(s, b)| (
                format!("Binary{s}"),
                None,
                Some(b)
            )),
        ]
        .prop_map(
            |(data_type, text, bytes): (String, Option<String>, Option<Vec<u8>>)| {
                let mut b = MessageAttributeValue::builder().data_type(data_type);
                if let Some(t) = text {
                    b = b.string_value(t);
                }
                if let Some(bytes) = bytes {
                    b = b.binary_value(Blob::new(bytes));
                }
                b.build().unwrap()
            },
        )
    }

    /// Anything in an attribute, including types SQS would refuse and missing values.
    fn odd_attribute() -> impl Strategy<Value = MessageAttributeValue> {
        (
            any::<String>(),
            any::<Option<String>>(),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        )
            .prop_map(|(t, text, bytes)| {
                let mut b = MessageAttributeValue::builder().data_type(t);
                if let Some(text) = text {
                    b = b.string_value(text);
                }
                if let Some(bytes) = bytes {
                    b = b.binary_value(Blob::new(bytes));
                }
                b.build().unwrap()
            })
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![4 => "[a-zA-Z0-9_.\\-]{1,16}", 1 => any::<String>()]
            .prop_filter("not ours", |n| n != DEAD_LETTER_ATTRIBUTE)
    }

    /// Up to 10 attributes, as SQS allows.
    fn attributes() -> impl Strategy<Value = HashMap<String, MessageAttributeValue>> {
        prop::collection::hash_map(name(), attribute(), 0..=MAX_ATTRIBUTES)
    }

    fn metadata() -> impl Strategy<Value = DeadLetterMetadata> {
        (
            (any::<bool>(), any::<bool>(), any::<String>(), any::<u32>()),
            (any::<String>(), any::<Option<String>>()),
            (any::<Option<u64>>(), any::<u64>(), any::<String>()),
        )
            .prop_map(
                |(
                    (permanent, kind, error_message, attempts),
                    (queue, message_id),
                    (first_failure_ms, last_failure_ms, consumer),
                )| {
                    DeadLetterMetadata {
                        reason: if permanent {
                            DeadLetterReason::Permanent
                        } else {
                            DeadLetterReason::MaxAttempts
                        },
                        error_kind: if kind {
                            ErrorKind::Permanent
                        } else {
                            ErrorKind::Transient
                        },
                        error_message,
                        attempts,
                        broker: "sqs".into(),
                        queue,
                        partition: None,
                        offset: None,
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

    /// Text for the dead-letter attribute: arbitrary, JSON-ish, or a real record with its
    /// displaced list mangled.
    fn dead_letter_text() -> impl Strategy<Value = String> {
        let item = prop_oneof![
            Just(serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "zz"})),
            Just(
                serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "abc"})
            ),
            Just(serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "éé"})),
            Just(serde_json::json!({"name": 1, "data_type": "String"})),
            Just(serde_json::json!({"name": "a"})),
            Just(serde_json::json!({"name": "a", "data_type": "String", "string_value": 5})),
            Just(serde_json::json!(null)),
            any::<String>().prop_map(
                |h| serde_json::json!({"name": "b", "data_type": "Binary", "binary_value_hex": h})
            ),
        ];
        prop_oneof![
            any::<String>(),
            (metadata(), prop::collection::vec(item, 0..4)).prop_map(|(m, items)| {
                let mut v: Value = serde_json::from_str(&m.to_json()).unwrap();
                v[DISPLACED_KEY] = Value::Array(items);
                v.to_string()
            }),
            metadata().prop_map(|m| {
                let mut v: Value = serde_json::from_str(&m.to_json()).unwrap();
                v[DISPLACED_KEY] = serde_json::json!("not a list");
                v.to_string()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn dead_letter_attributes_round_trip(original in attributes(), meta in metadata()) {
            let out = dead_letter_attributes(&original, &meta).unwrap();
            prop_assert!(out.len() <= MAX_ATTRIBUTES);
            let record = DeadLetterRecord::from_attributes(&out).unwrap();
            prop_assert_eq!(&record.metadata, &meta);
            prop_assert_eq!(record.restore(&out), original.clone());
            // Again (a replayed message dead-lettered once more): nothing grows or is lost.
            let again = dead_letter_attributes(&out, &meta).unwrap();
            prop_assert_eq!(again.len(), out.len());
            let record = DeadLetterRecord::from_attributes(&again).unwrap();
            prop_assert_eq!(record.restore(&again), original);
        }

        #[test]
        fn dead_letter_record_from_any_attribute_never_panics(
            text in dead_letter_text(),
            others in prop::collection::hash_map(name(), odd_attribute(), 0..12),
            meta in metadata(),
        ) {
            let mut attrs = others;
            let ours = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(text)
                .build()
                .unwrap();
            attrs.insert(DEAD_LETTER_ATTRIBUTE.to_string(), ours);
            if let Some(record) = DeadLetterRecord::from_attributes(&attrs) {
                let _ = record.restore(&attrs);
            }
            if let Ok(out) = dead_letter_attributes(&attrs, &meta) {
                prop_assert!(out.len() <= MAX_ATTRIBUTES);
                prop_assert_eq!(
                    DeadLetterRecord::from_attributes(&out).map(|r| r.metadata),
                    Some(meta)
                );
            }
        }

        #[test]
        fn odd_attributes_never_panic(attrs in prop::collection::hash_map(name(), odd_attribute(), 0..14)) {
            let mut headers = Headers::new();
            append_attributes(&attrs, &mut headers);
            prop_assert_eq!(headers.len(), attrs.len());
            for value in attrs.values() {
                let _ = attribute_bytes(value);
            }
            let _ = DeadLetterRecord::from_attributes(&attrs);
        }

        #[test]
        fn headers_round_trip_through_attributes(
            pairs in prop::collection::btree_map(name(), prop::collection::vec(any::<u8>(), 0..32), 0..=MAX_ATTRIBUTES),
        ) {
            let headers: Headers = pairs.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
            let attrs = headers_to_attributes(&headers).unwrap();
            let mut back = Headers::new();
            append_attributes(&attrs, &mut back);
            // Sorted by name on the way back, as the source does.
            prop_assert_eq!(back, headers);
        }

        #[test]
        fn unhex_never_panics_and_inverts_hex(text in any::<String>(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = unhex(&text);
            prop_assert_eq!(unhex(&hex(&bytes)), Some(bytes.clone()));
            prop_assert_eq!(unhex(&hex(&bytes).to_uppercase()), Some(bytes));
        }
    }
}

#[test]
fn hex_round_trips() {
    let data: Vec<u8> = (0..=255).collect();
    assert_eq!(unhex(&hex(&data)).unwrap(), data);
    assert_eq!(unhex("abc"), None);
    assert_eq!(unhex("zz"), None);
}

#[test]
fn metadata_replaces_earlier_and_displaces_the_eleventh() {
    let mut original: HashMap<String, MessageAttributeValue> =
        (0..10).map(|i| (format!("a{i}"), string("v"))).collect();
    original.insert(
        "a9".into(),
        MessageAttributeValue::builder()
            .data_type("Binary.raw")
            .binary_value(Blob::new(vec![0xff, 0x00, 0x01]))
            .build()
            .unwrap(),
    );
    let meta = metadata();
    let out = dead_letter_attributes(&original, &meta).unwrap();
    assert_eq!(out.len(), MAX_ATTRIBUTES);
    assert!(!out.contains_key("a9"));
    let record = DeadLetterRecord::from_attributes(&out).unwrap();
    assert_eq!(record.metadata, meta);
    assert_eq!(record.restore(&out), original);
    // Dead-lettering the copy again keeps the displaced attribute and adds no new one.
    let again = dead_letter_attributes(&out, &meta).unwrap();
    assert_eq!(again.len(), MAX_ATTRIBUTES);
    let record = DeadLetterRecord::from_attributes(&again).unwrap();
    assert_eq!(record.displaced.len(), 1);
    assert_eq!(record.restore(&again), original);
}

#[test]
fn a_copy_that_fits_is_unchanged_and_records_nothing_dropped() {
    let original: HashMap<String, MessageAttributeValue> =
        (0..10).map(|i| (format!("a{i}"), string("v"))).collect();
    let meta = metadata();
    let fitted = fit_dead_letter(&original, &meta, "body", 262_144).unwrap();
    assert!(fitted.dropped.is_empty());
    assert_eq!(
        fitted.attributes,
        dead_letter_attributes(&original, &meta).unwrap()
    );
    let record = DeadLetterRecord::from_attributes(&fitted.attributes).unwrap();
    assert!(record.dropped.is_empty());
    assert_eq!(record.displaced.len(), 1);
}

#[test]
fn a_copy_over_the_limit_drops_displaced_then_truncates_the_error_message() {
    let mut original: HashMap<String, MessageAttributeValue> =
        (0..9).map(|i| (format!("a{i}"), string("v"))).collect();
    original.insert("zz".into(), string(&"d".repeat(300)));
    let mut meta = metadata();
    meta.error_message = "e\"".repeat(250);
    let body = "b".repeat(400);
    let limit = 1024;
    assert!(message_size(&body, &original) <= limit);
    let full = dead_letter_attributes(&original, &meta).unwrap();
    assert!(message_size(&body, &full) > limit);
    let fitted = fit_dead_letter(&original, &meta, &body, limit).unwrap();
    assert!(fitted.size <= limit, "{}", fitted.size);
    assert_eq!(fitted.size, message_size(&body, &fitted.attributes));
    assert_eq!(
        fitted.dropped,
        vec![DROPPED_DISPLACED, DROPPED_ERROR_TRUNCATED]
    );
    for i in 0..9 {
        let name = format!("a{i}");
        assert_eq!(fitted.attributes[&name], original[&name]);
    }
    assert!(!fitted.attributes.contains_key("zz"));
    let record = DeadLetterRecord::from_attributes(&fitted.attributes).unwrap();
    assert!(record.displaced.is_empty());
    assert_eq!(
        record.dropped,
        vec![
            DROPPED_DISPLACED.to_string(),
            DROPPED_ERROR_TRUNCATED.to_string()
        ]
    );
    let kept = record.metadata.error_message.trim_end_matches('…');
    assert!(meta.error_message.starts_with(kept));
    assert!(kept.len() < meta.error_message.len());
    // Dead-lettering the copy again still says the displaced attribute was dropped.
    let again = fit_dead_letter(&fitted.attributes, &metadata(), &body, limit).unwrap();
    let record = DeadLetterRecord::from_attributes(&again.attributes).unwrap();
    assert_eq!(record.dropped, vec![DROPPED_DISPLACED.to_string()]);
}

#[test]
fn a_copy_that_cannot_fit_even_shrunk_is_an_error() {
    let original = HashMap::new();
    let body = "b".repeat(1000);
    let mut meta = metadata();
    meta.error_message = "e".repeat(200);
    assert!(fit_dead_letter(&original, &meta, &body, 1024).is_err());
    // Exactly the limit with a 0-byte error message fits; one byte less does not.
    let mut empty = metadata();
    empty.error_message.clear();
    let (attrs, _) =
        build_dead_letter(&original, &empty, false, &[DROPPED_ERROR_TRUNCATED]).unwrap();
    let smallest = message_size("", &attrs);
    let exact = "b".repeat(1024 - smallest);
    let fitted = fit_dead_letter(&original, &meta, &exact, 1024).unwrap();
    assert_eq!(fitted.size, 1024);
    let over = "b".repeat(1025 - smallest);
    assert!(fit_dead_letter(&original, &meta, &over, 1024).is_err());
}

#[test]
fn headers_become_string_or_binary() {
    let h = Headers::new()
        .with("text", "hello")
        .with("bin", Bytes::from_static(&[0xff]));
    let a = headers_to_attributes(&h).unwrap();
    assert_eq!(a["text"].data_type(), "String");
    assert_eq!(a["bin"].data_type(), "Binary");
    let mut back = Headers::new();
    append_attributes(&a, &mut back);
    assert_eq!(back.get("bin").unwrap().as_ref(), &[0xff]);
    assert_eq!(back.get_str("text"), Some("hello"));
    let many: Headers = (0..11).map(|i| (format!("h{i}"), "v")).collect();
    assert!(headers_to_attributes(&many).is_err());
}

mod deferred {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn delivery(attempt: u32) -> Delivery {
        let mut d = Delivery::new("body", Origin::new("sqs", "q", "c"));
        d.attempt = attempt;
        d
    }

    #[test]
    fn a_copy_carries_the_attempt_and_the_first_deferral() {
        let mut attributes = HashMap::new();
        attributes.insert("tenant".to_string(), string("acme"));
        let since = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let (body, copy) = deferred_copy(false, &attributes, &delivery(3), since).unwrap();
        assert_eq!(body, "body");
        assert_eq!(copy["tenant"].string_value(), Some("acme"));
        assert_eq!(copy[ATTEMPT_HEADER].string_value(), Some("3"));
        assert_eq!(
            copy[DEFERRED_SINCE_HEADER].string_value(),
            Some("1700000000000")
        );
    }

    #[test]
    fn no_copy_on_a_fifo_queue_or_past_ten_attributes() {
        let since = UNIX_EPOCH;
        assert!(deferred_copy(true, &HashMap::new(), &delivery(1), since).is_err());
        let nine: HashMap<String, MessageAttributeValue> =
            (0..9).map(|i| (format!("a{i}"), string("v"))).collect();
        assert!(deferred_copy(false, &nine, &delivery(1), since).is_err());
        let eight: HashMap<String, MessageAttributeValue> =
            (0..8).map(|i| (format!("a{i}"), string("v"))).collect();
        assert!(deferred_copy(false, &eight, &delivery(1), since).is_ok());
    }
}
