//! Message attributes as ackstack [`Headers`] and headers as message attributes.

use std::collections::HashMap;

use ackstack_core::Headers;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use bytes::Bytes;

/// The most message attributes SQS accepts on one message.
pub const MAX_ATTRIBUTES: usize = 10;
/// The message attribute that carries the id a publisher gave a message
/// ([`Message::message_id`](ackstack_core::Message::message_id)), which SQS's own `MessageId`
/// (new for every send) cannot: a consumer's [`Delivery::message_id`](ackstack_core::Delivery)
/// is this attribute when present, so that two sends of one message (an outbox relay's
/// resend) carry one id.
pub const MESSAGE_ID_ATTRIBUTE: &str = "x-ackstack-message-id";
/// The prefix of headers that carry SQS system attributes (`x-sqs-ApproximateReceiveCount`…).
pub const SYSTEM_ATTRIBUTE_PREFIX: &str = "x-sqs-";

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
