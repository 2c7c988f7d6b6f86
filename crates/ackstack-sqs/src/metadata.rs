//! Dead-letter metadata packed into one message attribute: building a dead-letter copy's
//! attributes, fitting them into the queue's size limit, and reading them back; and the
//! attributes of a deferred copy.

use std::collections::HashMap;
use std::time::Duration;

use ackstack_core::deadletter::{ATTEMPT_HEADER, DEFERRED_SINCE_HEADER, millis};
use ackstack_core::{DeadLetterMetadata, Delivery};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use serde_json::{Map, Value};

use crate::headers::MAX_ATTRIBUTES;

/// The one message attribute that carries ackstack's dead-letter metadata, as the JSON of
/// [`DeadLetterMetadata::to_json`].
pub const DEAD_LETTER_ATTRIBUTE: &str = "ackstack-dead-letter";
/// The key in the dead-letter JSON under which attributes displaced by the 10-attribute limit
/// are kept (see [`DeadLetterRecord`]).
pub const DISPLACED_KEY: &str = "displaced_attributes";

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
/// In [`DROPPED_KEY`]: the error message in the metadata was cut shorter than usual (core's
/// dead-letter format).
pub use ackstack_core::deadletter::DROPPED_ERROR_TRUNCATED;
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
        shorter.cut_error_message(size - max_size);
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
        let mut metadata: DeadLetterMetadata = serde_json::from_str(text).ok()?;
        metadata.fill_fingerprint();
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

/// The longest `DelaySeconds` SQS takes on `SendMessage`.
pub(crate) const MAX_SEND_DELAY: Duration = Duration::from_secs(900);

/// The body and attributes of a deferred copy of `delivery`, received with `attributes`
/// (see [`SqsSettler`](crate::SqsSettler)'s `defer`), or why there is none.
pub(crate) fn deferred_copy(
    fifo: bool,
    attributes: &HashMap<String, MessageAttributeValue>,
    delivery: &Delivery,
    since: std::time::SystemTime,
) -> Result<(String, HashMap<String, MessageAttributeValue>), &'static str> {
    if fifo {
        return Err("a FIFO queue has no per-message delay");
    }
    let body = std::str::from_utf8(&delivery.payload).map_err(|_| "the body is not text")?;
    let mut attributes = attributes.clone();
    let text = |value: String| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .map_err(|_| "an attribute could not be built")
    };
    attributes.insert(
        ATTEMPT_HEADER.to_string(),
        text(delivery.attempt.max(1).to_string())?,
    );
    attributes.insert(
        DEFERRED_SINCE_HEADER.to_string(),
        text(millis(since).to_string())?,
    );
    if attributes.len() > MAX_ATTRIBUTES {
        return Err("the copy would carry more than 10 attributes");
    }
    Ok((body.to_string(), attributes))
}

#[cfg(test)]
mod tests;
