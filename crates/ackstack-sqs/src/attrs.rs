//! Message attributes: reading them as headers, writing headers as attributes, and packing
//! dead-letter metadata into one attribute.

use std::collections::HashMap;

use ackstack_core::{DeadLetterMetadata, Headers};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use bytes::Bytes;
use serde_json::{Map, Value};

/// The one message attribute that carries ackstack's dead-letter metadata, as the JSON of
/// [`DeadLetterMetadata::to_json`].
pub const DEAD_LETTER_ATTRIBUTE: &str = "ackstack-dead-letter";
/// The most message attributes SQS accepts on one message.
pub const MAX_ATTRIBUTES: usize = 10;
/// The prefix of headers that carry SQS system attributes (`x-sqs-ApproximateReceiveCount`…).
pub const SYSTEM_ATTRIBUTE_PREFIX: &str = "x-sqs-";
/// The key in the dead-letter JSON under which attributes displaced by the 10-attribute limit
/// are kept (see [`DeadLetterRecord`]).
pub const DISPLACED_KEY: &str = "displaced_attributes";

/// A message attribute's value as header bytes: the binary value for `Binary*` types, the
/// string value otherwise (String and Number).
pub fn attribute_bytes(value: &MessageAttributeValue) -> Bytes {
    if value.data_type().starts_with("Binary") {
        value
            .binary_value()
            .map(|b| Bytes::copy_from_slice(b.as_ref()))
            .unwrap_or_default()
    } else {
        value
            .string_value()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .unwrap_or_default()
    }
}

/// Appends `attributes` to `headers`, sorted by name so the order is stable.
pub(crate) fn append_attributes(
    attributes: &HashMap<String, MessageAttributeValue>,
    headers: &mut Headers,
) {
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    for name in names {
        if let Some(value) = attributes.get(name) {
            headers.append(name.clone(), attribute_bytes(value));
        }
    }
}

/// Headers as message attributes: `String` where the value is UTF-8, `Binary` otherwise.
pub fn headers_to_attributes(
    headers: &Headers,
) -> Result<HashMap<String, MessageAttributeValue>, String> {
    let mut out = HashMap::with_capacity(headers.len());
    for (name, value) in headers.iter() {
        let attr = match std::str::from_utf8(value) {
            Ok(text) => MessageAttributeValue::builder()
                .data_type("String")
                .string_value(text),
            Err(_) => MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(value.to_vec())),
        }
        .build()
        .map_err(|e| format!("attribute {name:?}: {e}"))?;
        out.insert(name.to_string(), attr);
    }
    if out.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "{} headers, but SQS allows at most {MAX_ATTRIBUTES} message attributes",
            out.len()
        ));
    }
    Ok(out)
}

/// The attributes of a dead-letter copy: the original ones unchanged, any earlier
/// [`DEAD_LETTER_ATTRIBUTE`] replaced by `metadata`.
///
/// SQS allows 10 attributes. When the original already has 10 of its own, the one whose name
/// sorts last is *displaced*: removed from the attributes and stored, type and bytes intact,
/// in the metadata JSON under [`DISPLACED_KEY`] (binary values hex-encoded), so nothing is lost
/// and [`DeadLetterRecord::restore`] can put it back. Displaced attributes recorded by an
/// earlier dead-lettering are carried forward.
///
/// This does not check SQS's message size limit; [`fit_dead_letter`] does.
pub fn dead_letter_attributes(
    original: &HashMap<String, MessageAttributeValue>,
    metadata: &DeadLetterMetadata,
) -> Result<HashMap<String, MessageAttributeValue>, String> {
    build_dead_letter(original, metadata, true, &[]).map(|(attrs, _)| attrs)
}

/// The key in the dead-letter JSON that lists what was left out of the copy to fit SQS's
/// message size limit (see [`fit_dead_letter`]); absent when nothing was.
pub const DROPPED_KEY: &str = "dropped";
/// In [`DROPPED_KEY`]: the displaced attributes (see [`DISPLACED_KEY`]) were not stored.
pub const DROPPED_DISPLACED: &str = "displaced_attributes";
/// In [`DROPPED_KEY`]: the error message in the metadata was cut shorter than usual.
pub const DROPPED_ERROR_TRUNCATED: &str = "error_message_truncated";
/// SQS's message size limit when a queue's `MaximumMessageSize` cannot be read: 256 KiB, the
/// long-standing default (and the lowest maximum SQS has had).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 262_144;

/// A dead-letter copy's attributes that fit SQS's size limit, and what was left out for it.
#[derive(Clone, Debug, PartialEq)]
pub struct FittedDeadLetter {
    /// The attributes to send.
    pub attributes: HashMap<String, MessageAttributeValue>,
    /// What was left out ([`DROPPED_DISPLACED`], [`DROPPED_ERROR_TRUNCATED`]); also recorded in
    /// the metadata JSON under [`DROPPED_KEY`]. Empty when the copy fit as it was.
    pub dropped: Vec<&'static str>,
    /// The copy's size as SQS counts it ([`message_size`]).
    pub size: usize,
}

/// A message's size as SQS counts it against `MaximumMessageSize`: the body's bytes plus, for
/// each message attribute, its name, its data type and its value.
pub fn message_size(body: &str, attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    body.len()
        + attributes
            .iter()
            .map(|(name, value)| {
                name.len()
                    + value.data_type().len()
                    + value.string_value().map_or(0, str::len)
                    + value.binary_value().map_or(0, |b| b.as_ref().len())
            })
            .sum::<usize>()
}

/// The attributes of the dead-letter copy of a message with `body` (see
/// [`dead_letter_attributes`]), shrunk to fit `max_size` bytes ([`message_size`]) when they
/// do not as they are. The body and the attributes that stay on the copy are never changed:
///
/// 1. as [`dead_letter_attributes`] builds them;
/// 2. without the displaced attributes (the original had 10 of its own; the eleventh, and any
///    recorded by an earlier dead-lettering, are dropped: [`DROPPED_DISPLACED`]);
/// 3. with the error message in the metadata cut as short as needed, down to nothing
///    ([`DROPPED_ERROR_TRUNCATED`]).
///
/// What was left out is listed in the metadata JSON under [`DROPPED_KEY`]. `Err` when even the
/// smallest copy is larger than `max_size` (or an attribute cannot be built): SQS would refuse
/// it however often it is sent.
pub fn fit_dead_letter(
    original: &HashMap<String, MessageAttributeValue>,
    metadata: &DeadLetterMetadata,
    body: &str,
    max_size: usize,
) -> Result<FittedDeadLetter, String> {
    let (attributes, displaced) = build_dead_letter(original, metadata, true, &[])?;
    let size = message_size(body, &attributes);
    if size <= max_size {
        return Ok(FittedDeadLetter {
            attributes,
            dropped: Vec::new(),
            size,
        });
    }
    let mut dropped: Vec<&'static str> = Vec::new();
    if displaced > 0 {
        dropped.push(DROPPED_DISPLACED);
        let (attributes, _) = build_dead_letter(original, metadata, false, &dropped)?;
        let size = message_size(body, &attributes);
        if size <= max_size {
            return Ok(FittedDeadLetter {
                attributes,
                dropped,
                size,
            });
        }
    }
    dropped.push(DROPPED_ERROR_TRUNCATED);
    let mut shorter = metadata.clone();
    loop {
        let (attributes, _) = build_dead_letter(original, &shorter, false, &dropped)?;
        let size = message_size(body, &attributes);
        if size <= max_size {
            return Ok(FittedDeadLetter {
                attributes,
                dropped,
                size,
            });
        }
        if shorter.error_message.is_empty() {
            return Err(format!(
                "the dead-letter copy is {size} bytes even without displaced attributes and \
                 error message; the dead-letter queue accepts at most {max_size}"
            ));
        }
        // Each byte cut from the message shortens its JSON by at least one byte.
        let keep = shorter.error_message.len().saturating_sub(size - max_size);
        shorter.error_message = if keep <= '…'.len_utf8() {
            String::new()
        } else {
            ackstack_core::error::truncate(std::mem::take(&mut shorter.error_message), keep)
        };
    }
}

/// Builds the copy's attributes; returns them and how many displaced attributes there are
/// (stored in the JSON when `keep_displaced`, else left out). `dropped` is recorded under
/// [`DROPPED_KEY`], together with a [`DROPPED_DISPLACED`] recorded by an earlier
/// dead-lettering (the attributes it dropped stay lost).
fn build_dead_letter(
    original: &HashMap<String, MessageAttributeValue>,
    metadata: &DeadLetterMetadata,
    keep_displaced: bool,
    dropped: &[&'static str],
) -> Result<(HashMap<String, MessageAttributeValue>, usize), String> {
    let mut attrs = original.clone();
    let mut displaced: Vec<Value> = Vec::new();
    let mut dropped: Vec<&'static str> = dropped.to_vec();
    if let Some(earlier) = attrs.remove(DEAD_LETTER_ATTRIBUTE)
        && let Some(text) = earlier.string_value()
        && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text)
    {
        if let Some(Value::Array(items)) = map.get(DISPLACED_KEY) {
            displaced.extend(items.iter().cloned());
        }
        if let Some(Value::Array(items)) = map.get(DROPPED_KEY)
            && items.iter().any(|v| v.as_str() == Some(DROPPED_DISPLACED))
            && !dropped.contains(&DROPPED_DISPLACED)
        {
            dropped.insert(0, DROPPED_DISPLACED);
        }
    }
    while attrs.len() >= MAX_ATTRIBUTES {
        let Some(last) = attrs.keys().max().cloned() else {
            break;
        };
        if let Some(value) = attrs.remove(&last) {
            displaced.push(encode_displaced(&last, &value));
        }
    }
    let mut json = match serde_json::from_str::<Value>(&metadata.to_json()) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let count = displaced.len();
    if keep_displaced && !displaced.is_empty() {
        json.insert(DISPLACED_KEY.to_string(), Value::Array(displaced));
    }
    if !dropped.is_empty() {
        let list = dropped.iter().map(|d| Value::String((*d).to_string()));
        json.insert(DROPPED_KEY.to_string(), Value::Array(list.collect()));
    }
    let value = MessageAttributeValue::builder()
        .data_type("String")
        .string_value(Value::Object(json).to_string())
        .build()
        .map_err(|e| e.to_string())?;
    attrs.insert(DEAD_LETTER_ATTRIBUTE.to_string(), value);
    Ok((attrs, count))
}

fn encode_displaced(name: &str, value: &MessageAttributeValue) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), Value::String(name.to_string()));
    m.insert(
        "data_type".into(),
        Value::String(value.data_type().to_string()),
    );
    if let Some(s) = value.string_value() {
        m.insert("string_value".into(), Value::String(s.to_string()));
    }
    if let Some(b) = value.binary_value() {
        m.insert("binary_value_hex".into(), Value::String(hex(b.as_ref())));
    }
    Value::Object(m)
}

/// What a dead-letter copy says about itself: our metadata and any displaced attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterRecord {
    /// The dead-letter metadata.
    pub metadata: DeadLetterMetadata,
    /// Original attributes that did not fit SQS's 10-attribute limit, type and bytes intact.
    pub displaced: Vec<(String, MessageAttributeValue)>,
    /// What was left out of the copy to fit SQS's size limit ([`DROPPED_KEY`]).
    pub dropped: Vec<String>,
}

impl DeadLetterRecord {
    /// Reads the [`DEAD_LETTER_ATTRIBUTE`] of a dead-letter copy; `None` when it is missing or
    /// malformed.
    pub fn from_attributes(attrs: &HashMap<String, MessageAttributeValue>) -> Option<Self> {
        let text = attrs.get(DEAD_LETTER_ATTRIBUTE)?.string_value()?;
        let metadata: DeadLetterMetadata = serde_json::from_str(text).ok()?;
        let mut displaced = Vec::new();
        let mut dropped = Vec::new();
        if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) {
            if let Some(Value::Array(items)) = map.get(DISPLACED_KEY) {
                for item in items {
                    if let Some(pair) = decode_displaced(item) {
                        displaced.push(pair);
                    }
                }
            }
            if let Some(Value::Array(items)) = map.get(DROPPED_KEY) {
                dropped.extend(items.iter().filter_map(Value::as_str).map(str::to_string));
            }
        }
        Some(DeadLetterRecord {
            metadata,
            displaced,
            dropped,
        })
    }

    /// The original attributes: `attrs` without [`DEAD_LETTER_ATTRIBUTE`], plus the displaced
    /// ones (which may again exceed 10; a replay tool decides what to do with them).
    pub fn restore(
        &self,
        attrs: &HashMap<String, MessageAttributeValue>,
    ) -> HashMap<String, MessageAttributeValue> {
        let mut out = attrs.clone();
        out.remove(DEAD_LETTER_ATTRIBUTE);
        for (name, value) in &self.displaced {
            out.insert(name.clone(), value.clone());
        }
        out
    }
}

fn decode_displaced(item: &Value) -> Option<(String, MessageAttributeValue)> {
    let name = item.get("name")?.as_str()?.to_string();
    let mut builder = MessageAttributeValue::builder().data_type(item.get("data_type")?.as_str()?);
    if let Some(s) = item.get("string_value").and_then(Value::as_str) {
        builder = builder.string_value(s);
    }
    if let Some(h) = item.get("binary_value_hex").and_then(Value::as_str) {
        builder = builder.binary_value(Blob::new(unhex(h)?));
    }
    Some((name, builder.build().ok()?))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    s.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ackstack_core::{DeadLetter, Delivery, ErrorKind, Failure, Origin};

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
                    )| DeadLetterMetadata {
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
                    },
                )
        }

        /// Text for the dead-letter attribute: arbitrary, JSON-ish, or a real record with its
        /// displaced list mangled.
        fn dead_letter_text() -> impl Strategy<Value = String> {
            let item = prop_oneof![
                Just(serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "zz"})),
                Just(serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "abc"})),
                Just(serde_json::json!({"name": "a", "data_type": "Binary", "binary_value_hex": "éé"})),
                Just(serde_json::json!({"name": 1, "data_type": "String"})),
                Just(serde_json::json!({"name": "a"})),
                Just(serde_json::json!({"name": "a", "data_type": "String", "string_value": 5})),
                Just(serde_json::json!(null)),
                any::<String>().prop_map(|h| serde_json::json!({"name": "b", "data_type": "Binary", "binary_value_hex": h})),
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
}
