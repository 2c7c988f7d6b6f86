use ackstack_core::Headers;
use lapin::types::LongString;

use super::*;
use crate::headers::*;

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}

#[test]
fn attempt_from_headers_never_panics() {
    assert_eq!(attempt_of(None), 1);
    let t = table(vec![(ATTEMPT_HEADER, long_string("3"))]);
    assert_eq!(attempt_of(Some(&t)), 3);
    let t = table(vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(4))]);
    assert_eq!(attempt_of(Some(&t)), 4);
    for junk in [
        long_string("three"),
        long_string("-2"),
        long_string("0"),
        AMQPValue::LongInt(-5),
        AMQPValue::Double(2.5),
        AMQPValue::FieldTable(FieldTable::default()),
        AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
        long_string("99999999999999999999999"),
    ] {
        let t = table(vec![(ATTEMPT_HEADER, junk)]);
        assert_eq!(attempt_of(Some(&t)), 1);
    }
    let t = table(vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::MAX))]);
    assert_eq!(attempt_of(Some(&t)), u32::MAX);
}

#[test]
fn the_broker_delivery_count_is_not_an_attempt() {
    // Every crash raises x-delivery-count on every prefetched message: not handler attempts.
    let t = table(vec![(DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(2))]);
    assert_eq!(attempt_of(Some(&t)), 1);
    let t = table(vec![
        (ATTEMPT_HEADER, long_string("4")),
        (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(1)),
    ]);
    assert_eq!(attempt_of(Some(&t)), 4);
}

mod properties {
    use super::*;
    use ackstack_core::{DeadLetterReason, ErrorKind};
    use lapin::types::{ByteArray, DecimalValue, FieldArray};
    use proptest::prelude::*;

    /// Header names: ours, the broker's, and arbitrary short strings.
    fn name() -> impl Strategy<Value = ShortString> {
        prop_oneof![
            2 => Just(ATTEMPT_HEADER.to_string()),
            2 => Just(DELIVERY_COUNT_HEADER.to_string()),
            1 => Just(FIRST_FAILURE_HEADER.to_string()),
            1 => Just(format!("{METADATA_PREFIX}attempts")),
            2 => "[a-z\\-]{0,12}",
            1 => any::<String>(),
        ]
        .prop_filter_map("AMQP short string", |n| ShortString::try_new(n).ok())
    }

    /// Digits as text, with the odd sign, space or junk.
    fn number_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            " ?[+-]?[0-9]{0,25} ?",
            any::<String>(),
        ]
    }

    /// Any AMQP value, nested tables and arrays (like `x-death`) included.
    fn value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            number_text()
                .prop_filter_map("short", |t| ShortString::try_new(t).ok())
                .prop_map(AMQPValue::ShortString),
            number_text().prop_map(|t| long_string(&t)),
            prop::collection::vec(any::<u8>(), 0..32)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            prop::collection::vec(any::<u8>(), 0..32)
                .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                prop::collection::btree_map(name(), inner, 0..4)
                    .prop_map(|m| AMQPValue::FieldTable(FieldTable::from(m))),
            ]
        })
    }

    fn table() -> impl Strategy<Value = FieldTable> {
        prop::collection::btree_map(name(), value(), 0..12).prop_map(FieldTable::from)
    }

    fn metadata() -> impl Strategy<Value = DeadLetterMetadata> {
        (
            (any::<bool>(), any::<bool>(), any::<String>(), any::<u32>()),
            (any::<String>(), any::<Option<i32>>(), any::<Option<i64>>()),
            (any::<Option<String>>(), any::<Option<u64>>(), any::<u64>()),
        )
            .prop_map(
                |(
                    (permanent, kind, error_message, attempts),
                    (queue, partition, offset),
                    (message_id, first_failure_ms, last_failure_ms),
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
                        broker: "rabbitmq".into(),
                        queue,
                        partition,
                        offset,
                        message_id,
                        first_failure_ms,
                        last_failure_ms,
                        consumer: "c".into(),
                        fingerprint: String::new(),
                    }
                    .with_fingerprint()
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn attempt_of_any_table_never_panics(t in table()) {
            let attempt = attempt_of(Some(&t));
            prop_assert!(attempt >= 1);
            let ours = header_u64(Some(&t), ATTEMPT_HEADER).filter(|&a| a >= 1);
            prop_assert!(u64::from(attempt) >= ours.unwrap_or(1).min(u64::from(u32::MAX)));
        }

        #[test]
        fn header_u64_reads_every_integer_form(n in any::<u32>(), pad in " {0,2}") {
            let n64 = u64::from(n);
            for v in [
                AMQPValue::LongUInt(n),
                AMQPValue::LongLongInt(i64::from(n)),
                AMQPValue::Timestamp(n64),
                long_string(&format!("{pad}{n}{pad}")),
                AMQPValue::ShortString(ShortString::from(format!("{pad}{n}{pad}"))),
            ] {
                let t = FieldTable::from(BTreeMap::from([(ShortString::from("h"), v)]));
                prop_assert_eq!(header_u64(Some(&t), "h"), Some(n64));
            }
        }

        #[test]
        fn headers_from_any_table_never_panic_and_keep_bytes(t in table()) {
            let h = headers_from_table(Some(&t));
            prop_assert!(h.len() <= t.inner().len());
            for (name, value) in t.inner() {
                let got = h.get(name.as_str());
                match value {
                    AMQPValue::LongString(s) => prop_assert_eq!(got.map(|b| b.as_ref()), Some(s.as_bytes())),
                    AMQPValue::ByteArray(b) => prop_assert_eq!(got.map(|v| v.as_ref()), Some(b.as_slice())),
                    AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) | AMQPValue::DecimalValue(_) | AMQPValue::Void => {
                        prop_assert!(got.is_none())
                    }
                    _ => prop_assert!(got.is_some()),
                }
            }
        }

        #[test]
        fn headers_round_trip_through_a_table(pairs in prop::collection::btree_map(name(), prop::collection::vec(any::<u8>(), 0..32), 0..12)) {
            let h: Headers = pairs.iter().map(|(n, v)| (n.as_str().to_string(), v.clone())).collect();
            prop_assert_eq!(headers_from_table(Some(&table_from_headers(&h))), h);
        }

        #[test]
        fn retry_copy_counts_one_more(t in table(), first in any::<u64>()) {
            let attempt = attempt_of(Some(&t));
            let next = attempt.saturating_add(1);
            let copy = retry_table(&BasicProperties::default().with_headers(t.clone()), next, first);
            prop_assert_eq!(attempt_of(Some(&copy)), next);
            // Everything else is kept, typed.
            for (name, value) in t.inner() {
                if ![ATTEMPT_HEADER, DELIVERY_COUNT_HEADER, FIRST_FAILURE_HEADER].contains(&name.as_str()) {
                    prop_assert_eq!(copy.inner().get(name), Some(value));
                }
            }
        }

        #[test]
        fn dead_letter_metadata_round_trips_through_a_table(t in table(), meta in metadata()) {
            let copy = dead_letter_table(&BasicProperties::default().with_headers(t.clone()), &meta, &[]);
            prop_assert_eq!(
                DeadLetterMetadata::from_headers(&headers_from_table(Some(&copy))),
                Some(meta.clone())
            );
            // Dead-lettering the copy again replaces the metadata, never grows it.
            let again = dead_letter_table(&BasicProperties::default().with_headers(copy.clone()), &meta, &[]);
            prop_assert_eq!(again.inner().len(), copy.inner().len());
            for (name, value) in t.inner() {
                if !name.as_str().starts_with(METADATA_PREFIX) {
                    prop_assert_eq!(copy.inner().get(name), Some(value));
                }
            }
        }

        #[test]
        fn dead_letter_copy_fits_the_frame_or_is_refused(t in table(), meta in metadata(), frame_max in 0u32..3000) {
            let original = BasicProperties::default()
                .with_headers(t.clone())
                .with_message_id("m".into());
            match fit_dead_letter(&original, &meta, frame_max) {
                Ok(fitted) => {
                    prop_assert_eq!(content_header_frame_size(&fitted.properties), Ok(fitted.size));
                    if frame_max > 0 {
                        prop_assert!(fitted.size <= frame_max as usize);
                    }
                    let headers = fitted.properties.headers().clone().unwrap_or_default();
                    for (name, value) in t.inner() {
                        if !name.as_str().starts_with(METADATA_PREFIX) {
                            prop_assert_eq!(headers.inner().get(name), Some(value));
                        }
                    }
                    let read = DeadLetterMetadata::from_headers(&headers_from_table(Some(&headers)));
                    prop_assert!(read.is_some());
                    let mut read = read.unwrap_or_else(|| meta.clone());
                    if fitted.dropped.is_empty() {
                        prop_assert!(headers.inner().get(DROPPED_HEADER).is_none());
                    } else {
                        prop_assert_eq!(
                            headers.inner().get(DROPPED_HEADER),
                            Some(&long_string(DROPPED_ERROR_TRUNCATED))
                        );
                        prop_assert!(read.error_message.len() < meta.error_message.len());
                        read.error_message = meta.error_message.clone();
                    }
                    prop_assert_eq!(read, meta);
                }
                Err(_) => {
                    // Refused only when the smallest copy does not fit either.
                    prop_assert!(frame_max > 0);
                    let mut empty = meta.clone();
                    empty.error_message.clear();
                    let smallest = copy_properties(
                        &original,
                        dead_letter_table(&original, &empty, &[DROPPED_ERROR_TRUNCATED]),
                    );
                    let size = content_header_frame_size(&smallest);
                    prop_assert!(size.is_ok_and(|s| s > frame_max as usize));
                }
            }
        }

        #[test]
        fn tables_from_wire_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            // What lapin decodes from a frame, then what we read from it.
            if let Ok((_, t)) = lapin::types::parsing::parse_field_table(bytes.as_slice()) {
                let _ = headers_from_table(Some(&t));
                let _ = attempt_of(Some(&t));
            }
        }
    }
}

#[test]
fn copies_keep_every_property_but_the_expiration() {
    let mut headers = FieldTable::default();
    headers.insert("h".into(), long_string("v"));
    let original = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_delivery_mode(1)
        .with_priority(7)
        .with_correlation_id("c".into())
        .with_reply_to("r".into())
        .with_expiration("1000".into())
        .with_message_id("m".into())
        .with_timestamp(42)
        .with_type("k".into())
        .with_user_id("guest".into())
        .with_app_id("a".into())
        .with_cluster_id("x".into())
        .with_headers(FieldTable::default());
    let copy = copy_properties(&original, headers.clone());
    assert_eq!(copy.expiration(), &None);
    assert_eq!(copy.delivery_mode(), &Some(PERSISTENT));
    assert_eq!(copy.headers(), &Some(headers));
    let expected = original
        .clone()
        .with_delivery_mode(PERSISTENT)
        .with_headers(copy.headers().clone().unwrap_or_default());
    // Equal to the original in every other property.
    assert_eq!(copy.with_expiration("1000".into()), expected);

    let mut map = BTreeMap::new();
    record_expiration(&mut map, &original);
    assert_eq!(
        map.get(ORIGINAL_EXPIRATION_HEADER),
        Some(&long_string("1000"))
    );
    // A copy of a copy has no expiration of its own: the recorded one stays.
    record_expiration(&mut map, &BasicProperties::default());
    assert_eq!(
        map.get(ORIGINAL_EXPIRATION_HEADER),
        Some(&long_string("1000"))
    );
}

#[test]
fn content_header_frame_size_counts_the_frame_around_the_properties() {
    // No properties: the 2-byte property flags, plus 20 bytes of frame.
    assert_eq!(
        content_header_frame_size(&BasicProperties::default()),
        Ok(22)
    );
    // A table of one long string: 4 (table length) + 1 + 1 (name) + 1 (type) + 4 + 3.
    let headers = table(vec![("h", long_string("abc"))]);
    let props = BasicProperties::default().with_headers(headers);
    assert_eq!(content_header_frame_size(&props), Ok(22 + 14));
}

#[test]
fn header_conversion() {
    let t = table(vec![
        ("s", long_string("v")),
        ("n", AMQPValue::LongInt(-7)),
        ("b", AMQPValue::Boolean(true)),
        ("nested", AMQPValue::FieldTable(FieldTable::default())),
    ]);
    let h = headers_from_table(Some(&t));
    assert_eq!(h.get_str("s"), Some("v"));
    assert_eq!(h.get_str("n"), Some("-7"));
    assert_eq!(h.get_str("b"), Some("true"));
    assert!(h.get("nested").is_none());
}
