//! Stream entries between Redis (an id and a list of field-value pairs) and ackstack: the
//! payload field, the other fields as headers, the message id, the key and the attempt.

use ackstack_core::adapter::parse_attempt;
use ackstack_core::deadletter::ATTEMPT_HEADER;
use ackstack_core::{Headers, Message};
use bytes::Bytes;
use redis::Value;

use crate::config::{KeySource, MESSAGE_ID_FIELD};

/// One entry as read from a stream: its id, its fields in order, and how often the group
/// has handed it out (1 for a first read).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(Bytes, Bytes)>,
    pub(crate) delivered: u64,
}

/// What a delivery is made of, read from an entry's fields.
#[derive(Debug, PartialEq)]
pub(crate) struct Parts {
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
    pub(crate) key: Option<Bytes>,
    pub(crate) message_id: Option<String>,
    /// The attempt a copy was written for (its `x-ackstack-attempt`), 1 for an original.
    pub(crate) copy_attempt: u32,
}

impl Entry {
    /// The payload (the first `payload_field`; empty when the entry has none), every other
    /// field as a header, in order (a field name that is not UTF-8 is read lossily).
    pub(crate) fn parts(&self, payload_field: &str, key: &KeySource) -> Parts {
        let mut payload = None;
        let mut headers = Headers::new();
        for (name, value) in &self.fields {
            if payload.is_none() && name.as_ref() == payload_field.as_bytes() {
                payload = Some(value.clone());
            } else {
                headers.append(String::from_utf8_lossy(name).into_owned(), value.clone());
            }
        }
        let key = match key {
            KeySource::Field(name) => headers.get(name).cloned(),
            KeySource::None => None,
        };
        Parts {
            payload: payload.unwrap_or_default(),
            key,
            message_id: headers.get_str(MESSAGE_ID_FIELD).map(str::to_string),
            copy_attempt: parse_attempt(headers.get(ATTEMPT_HEADER).map(|v| v.as_ref())),
            headers,
        }
    }
}

/// The fields of an entry for `payload` and `headers` (the payload first).
pub(crate) fn fields(payload_field: &str, payload: &Bytes, headers: &Headers) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(2 + headers.len() * 2);
    out.push(Bytes::copy_from_slice(payload_field.as_bytes()));
    out.push(payload.clone());
    for (name, value) in headers.iter() {
        out.push(Bytes::copy_from_slice(name.as_bytes()));
        out.push(value.clone());
    }
    out
}

/// The fields of an entry for a published message: its payload, headers, message id and
/// key (as the key field, where the key comes from a field).
pub(crate) fn message_fields(
    payload_field: &str,
    key: &KeySource,
    message: &Message,
) -> Vec<Bytes> {
    let mut headers = message.headers.clone();
    if let Some(id) = &message.message_id {
        headers.insert(MESSAGE_ID_FIELD, id.clone());
    }
    if let (Some(k), KeySource::Field(name)) = (&message.key, key) {
        headers.insert(name.clone(), k.clone());
    }
    fields(payload_field, &message.payload, &headers)
}

/// Bytes of a bulk or simple string.
pub(crate) fn bytes(value: &Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::VerbatimString { text, .. } => Some(Bytes::copy_from_slice(text.as_bytes())),
        _ => None,
    }
}

/// Text of a bulk or simple string.
pub(crate) fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

/// An integer, also when Redis sent it as text.
pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// The items of an array, set or map (a map's keys and values in turn).
pub(crate) fn items(value: &Value) -> Option<Vec<&Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items.iter().collect()),
        Value::Map(pairs) => Some(pairs.iter().flat_map(|(k, v)| [k, v]).collect()),
        _ => None,
    }
}

/// The value of `name` in a flat `[name, value, ...]` reply (an `XINFO` record).
pub(crate) fn info_field<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    let fields = items(record)?;
    fields.chunks(2).find_map(|pair| match pair {
        [k, v] if text(k).as_deref() == Some(name) => Some(*v),
        _ => None,
    })
}

/// One `[id, [field, value, ...]]` entry with `delivered` deliveries; `None` for an entry
/// the stream no longer holds (its fields are nil) or a malformed reply.
pub(crate) fn parse_entry(value: &Value, delivered: u64) -> Option<Entry> {
    let parts = items(value)?;
    let id = text(parts.first()?)?;
    let flat = items(parts.get(1)?)?;
    let fields = flat
        .chunks(2)
        .filter_map(|pair| match pair {
            [name, value] => Some((bytes(name)?, bytes(value)?)),
            _ => None,
        })
        .collect();
    Some(Entry {
        id,
        fields,
        delivered,
    })
}

/// The entries of an `XREADGROUP` reply for one stream (nil when the block timed out):
/// `[[stream, [entry, ...]]]`, or in RESP3 `{stream: [entry, ...]}`.
pub(crate) fn parse_read(value: &Value) -> Vec<Entry> {
    let Some(streams) = items(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push_entries = |entries: &Value| {
        for entry in items(entries).unwrap_or_default() {
            out.extend(parse_entry(entry, 1));
        }
    };
    if matches!(value, Value::Map(_)) {
        for pair in streams.chunks(2) {
            if let [_, entries] = pair {
                push_entries(entries);
            }
        }
    } else {
        for stream in streams {
            if let Some([_, entries]) = items(stream).as_deref() {
                push_entries(entries);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn an_entry_is_payload_headers_id_key_and_attempt() {
        let entry = Entry {
            id: "1-0".into(),
            fields: [
                ("tenant", "acme"),
                ("payload", "{}"),
                ("message-id", "m-1"),
                ("key", "k"),
                ("x-ackstack-attempt", "3"),
            ]
            .iter()
            .map(|(n, v)| (Bytes::from(*n), Bytes::from(*v)))
            .collect(),
            delivered: 1,
        };
        let parts = entry.parts("payload", &KeySource::default());
        assert_eq!(parts.payload, Bytes::from("{}"));
        assert_eq!(parts.message_id.as_deref(), Some("m-1"));
        assert_eq!(parts.key, Some(Bytes::from("k")));
        assert_eq!(parts.copy_attempt, 3);
        assert_eq!(parts.headers.get_str("tenant"), Some("acme"));
        assert_eq!(parts.headers.get_str("payload"), None);
        // Written back, the same parts come out.
        let written = fields("payload", &parts.payload, &parts.headers);
        let again = Entry {
            id: "2-0".into(),
            fields: written
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect(),
            delivered: 1,
        };
        assert_eq!(again.parts("payload", &KeySource::default()), parts);
    }

    #[test]
    fn an_entry_of_another_producer_keeps_every_field() {
        let entry = Entry {
            id: "1-0".into(),
            fields: vec![
                (Bytes::from("order"), Bytes::from("7")),
                (Bytes::from(vec![0xff]), Bytes::from(vec![0, 1])),
            ],
            delivered: 2,
        };
        let parts = entry.parts("payload", &KeySource::None);
        assert!(parts.payload.is_empty());
        assert_eq!(parts.headers.len(), 2);
        assert_eq!(parts.copy_attempt, 1);
        assert_eq!(parts.key, None);
    }

    #[test]
    fn replies_are_parsed_and_bad_ones_skipped() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-1"),
                    Value::Array(vec![bulk("payload"), bulk("a")]),
                ]),
                Value::Array(vec![bulk("1-2"), Value::Nil]),
                Value::Int(3),
            ]),
        ])]);
        let entries = parse_read(&reply);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-1");
        assert!(parse_read(&Value::Nil).is_empty());
        let resp3 = Value::Map(vec![(
            bulk("orders"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-3"),
                Value::Array(vec![bulk("payload"), bulk("b")]),
            ])]),
        )]);
        assert_eq!(parse_read(&resp3)[0].id, "1-3");
    }
}
