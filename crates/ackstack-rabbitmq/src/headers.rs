//! AMQP header tables to and from ackstack [`Headers`], the headers the adapter reads and
//! writes, and the attempt number they carry.

use ackstack_core::Headers;
use ackstack_core::adapter::{attempt_from_count, parse_count};
use ackstack_core::deadletter::ATTEMPT_HEADER;
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The header the publisher writes a message's ordering key to, and the source reads
/// [`ackstack_core::Delivery::key`] from.
pub const KEY_HEADER: &str = "x-ackstack-key";
/// The quorum-queue header that counts earlier (unsettled) deliveries of a message.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// The header in which retry and dead-letter copies carry the `expiration` property (the
/// per-message TTL, milliseconds as text) the message was first published with. The copies
/// themselves are published without an `expiration`: in a delay queue it would cut the retry
/// delay short, and in the dead-letter queue it would silently delete the dead letter.
pub const ORIGINAL_EXPIRATION_HEADER: &str = "x-ackstack-original-expiration";

/// Converts AMQP headers to ackstack's byte-string headers.
///
/// Strings and byte arrays pass through as bytes; booleans, integers, floats and timestamps
/// become their decimal text. Nested tables and arrays (such as `x-death`), decimals and
/// voids have no byte form and are left out here; they survive untouched in the original
/// [`FieldTable`] that the token keeps for dead-lettering.
pub fn headers_from_table(table: Option<&FieldTable>) -> Headers {
    let mut headers = Headers::new();
    let Some(table) = table else {
        return headers;
    };
    for (name, value) in table {
        if let Some(bytes) = value_bytes(value) {
            headers.append(name.as_str(), bytes);
        }
    }
    headers
}

fn value_bytes(value: &AMQPValue) -> Option<Bytes> {
    let text = match value {
        AMQPValue::LongString(s) => return Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ShortString(s) => return Some(Bytes::copy_from_slice(s.as_str().as_bytes())),
        AMQPValue::ByteArray(b) => return Some(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::Void => return None,
    };
    Some(Bytes::from(text))
}

/// Converts ackstack headers to an AMQP table of long strings. Names longer than an AMQP
/// short string are skipped.
pub(crate) fn table_from_headers(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in headers.iter() {
        if let Ok(name) = ShortString::try_new(name) {
            table.insert(
                name,
                AMQPValue::LongString(LongString::from(value.to_vec())),
            );
        }
    }
    table
}

/// Reads a non-negative integer header value: any AMQP integer type, or a string of digits
/// (core's [`parse_count`]). Anything else (negative, fractional, garbage, nested) is `None`.
pub(crate) fn header_u64(table: Option<&FieldTable>, name: &str) -> Option<u64> {
    let value = table?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => parse_count(s.as_bytes()),
        AMQPValue::ShortString(s) => parse_count(s.as_str().as_bytes()),
        _ => None,
    }
}

/// The attempt number of a delivery (invariant 2 in docs/CONTRACT.md): our [`ATTEMPT_HEADER`],
/// written when we republish for a retry (1 when absent or malformed). The quorum queue's
/// `x-delivery-count` is not added: every crash raises it on every message the consumer had
/// prefetched, so it counts deliveries, not handler attempts. Crashes are counted by running
/// suspects alone ([`CRASHES_HEADER`](ackstack_core::deadletter::CRASHES_HEADER)).
pub fn attempt_of(table: Option<&FieldTable>) -> u32 {
    attempt_from_count(header_u64(table, ATTEMPT_HEADER))
}

/// An AMQP long-string value.
pub(crate) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes()))
}
