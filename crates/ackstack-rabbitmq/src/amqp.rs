//! Low-level helpers shared by the source, the settler and the publisher: connecting,
//! declaring topology, confirmed publishing, header conversion and the attempt count.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ackstack_core::deadletter::{ATTEMPT_HEADER, FIRST_FAILURE_HEADER, METADATA_PREFIX};
use ackstack_core::{DeadLetterMetadata, Headers};
use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::config::{QueueType, RabbitConfig};
use crate::error::RabbitError;

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
/// The dead-letter metadata header that lists, comma-separated, what was left out of a
/// dead-letter copy so that its content header fits the connection's negotiated `frame_max`;
/// absent when nothing was. Like every `x-ackstack-dl-*` header it is replaced on
/// re-dead-lettering.
pub const DROPPED_HEADER: &str = "x-ackstack-dl-dropped";
/// In [`DROPPED_HEADER`]: the error message in the metadata was cut shorter than usual.
pub const DROPPED_ERROR_TRUNCATED: &str = "error_message_truncated";
/// AMQP delivery mode 2: persistent.
pub(crate) const PERSISTENT: u8 = 2;

/// Runs one broker round trip, failing it with [`RabbitError::Timeout`] naming `what` when it
/// takes longer than `timeout`.
pub(crate) async fn bounded<T, E>(
    what: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, RabbitError>
where
    RabbitError: From<E>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RabbitError::Timeout(what)),
    }
}

/// Opens a connection named after the config, within [`RabbitConfig::operation_timeout`].
pub(crate) async fn connect(config: &RabbitConfig, role: &str) -> Result<Connection, RabbitError> {
    config.validate()?;
    let name = format!("{}-{role}", config.connection_name());
    let props = ConnectionProperties::default().with_connection_name(name.into());
    bounded(
        "connection open",
        config.operation_timeout,
        Connection::connect(&config.uri, props),
    )
    .await
}

/// Opens a channel in publisher-confirm mode; each step within `timeout`.
pub(crate) async fn confirm_channel(
    connection: &Connection,
    timeout: Duration,
) -> Result<Channel, RabbitError> {
    let channel = bounded("channel open", timeout, connection.create_channel()).await?;
    bounded(
        "confirm.select",
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// A valid AMQP short string, or a typed error.
pub(crate) fn short(name: &str) -> Result<ShortString, RabbitError> {
    ShortString::try_new(name).map_err(|_| RabbitError::InvalidName(name.to_string()))
}

/// Declares the work queue, one delay queue per bucket and the dead-letter queue.
pub(crate) async fn declare_topology(
    channel: &Channel,
    config: &RabbitConfig,
) -> Result<(), RabbitError> {
    let dlq = config.dlq_name();
    let mut work_args = queue_type_args(config.queue_type);
    if config.queue_type == QueueType::Quorum {
        // Safety net: a message the consumer never settles (it crashes on it) is dead-lettered
        // by the broker after `max_attempts` deliveries. Quorum queues always dead-letter to
        // the DLQ rather than drop (RabbitMQ 4 sets a default delivery limit of 20).
        insert_str(&mut work_args, "x-dead-letter-exchange", "");
        insert_str(&mut work_args, "x-dead-letter-routing-key", &dlq);
        if let Some(max) = config.max_attempts {
            work_args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(max).unwrap_or(i32::MAX)),
            );
        }
    }
    expire(&mut work_args, config.queue_expires);
    let timeout = config.operation_timeout;
    declare(channel, &config.queue, work_args, timeout).await?;
    for bucket in &config.delay_buckets {
        let mut args = queue_type_args(config.queue_type);
        expire(&mut args, config.queue_expires);
        let ttl = i32::try_from(bucket.as_millis()).unwrap_or(i32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        insert_str(&mut args, "x-dead-letter-exchange", "");
        insert_str(&mut args, "x-dead-letter-routing-key", &config.queue);
        declare(channel, &config.delay_queue_name(*bucket), args, timeout).await?;
    }
    let mut dlq_args = queue_type_args(config.queue_type);
    expire(&mut dlq_args, config.queue_expires);
    declare(channel, &dlq, dlq_args, timeout).await?;
    Ok(())
}

/// Adds `x-expires` (milliseconds, at least 1) when the config asks for it.
fn expire(args: &mut FieldTable, expires: Option<Duration>) {
    if let Some(expires) = expires {
        let ms = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .clamp(1, i64::from(i32::MAX));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
}

fn queue_type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        insert_str(&mut args, "x-queue-type", "quorum");
    }
    args
}

fn insert_str(table: &mut FieldTable, key: &'static str, value: &str) {
    table.insert(
        key.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes())),
    );
}

async fn declare(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    timeout: Duration,
) -> Result<(), RabbitError> {
    let name = short(name)?;
    bounded(
        "queue.declare",
        timeout,
        channel.queue_declare(name, QueueDeclareOptions::durable(), args),
    )
    .await?;
    Ok(())
}

/// Publishes to `queue` through the default exchange (mandatory, so a missing queue is an
/// error instead of a silent drop) and waits for the broker's confirm.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), RabbitError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let publish = async {
        channel
            .basic_publish("".into(), short(queue)?, options, payload, properties)
            .await?
            .await
            .map_err(RabbitError::from)
    };
    let confirmation = tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| RabbitError::Timeout("publisher confirm"))??;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(
            RabbitError::Unroutable(queue.to_string(), returned.reply_text.to_string()),
        ),
        Confirmation::Nack(None) => Err(RabbitError::Nacked(queue.to_string())),
        // The channel is always in confirm mode; treat a missing confirm as a failure rather
        // than assume durability.
        Confirmation::NotRequested => Err(RabbitError::Nacked(queue.to_string())),
    }
}

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

/// Reads a non-negative integer header value: any AMQP integer type, or a string of digits.
/// Anything else (negative, fractional, garbage, nested) is `None`.
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
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// The attempt number of a delivery (invariant 2): our [`ATTEMPT_HEADER`] (written when we
/// republish for a retry; 1 when absent or malformed) plus, on quorum queues, the broker's
/// `x-delivery-count` of earlier unsettled deliveries of this copy (absent on the first
/// delivery). A crash loop on one copy therefore still counts up; classic queues have no
/// such count, so there a crash-redelivery repeats the attempt number.
pub fn attempt_of(table: Option<&FieldTable>, queue_type: QueueType) -> u32 {
    let ours = header_u64(table, ATTEMPT_HEADER)
        .filter(|&a| a >= 1)
        .map(|a| u32::try_from(a).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let redeliveries = match queue_type {
        QueueType::Quorum => header_u64(table, DELIVERY_COUNT_HEADER)
            .map(|c| u32::try_from(c).unwrap_or(u32::MAX))
            .unwrap_or(0),
        QueueType::Classic => 0,
    };
    ours.saturating_add(redeliveries)
}

/// The headers of a retry copy: `table` with [`ATTEMPT_HEADER`] set to `next_attempt`,
/// [`FIRST_FAILURE_HEADER`] kept (or set to `first_failure_ms`) and the broker's
/// [`DELIVERY_COUNT_HEADER`] removed (the copy is a new message to the broker). Every other
/// value is unchanged.
pub(crate) fn retry_table(
    original: &BasicProperties,
    next_attempt: u32,
    first_failure_ms: u64,
) -> FieldTable {
    edit_table(original.headers().as_ref(), |map| {
        map.remove(DELIVERY_COUNT_HEADER);
        map.insert(
            ATTEMPT_HEADER.into(),
            long_string(&next_attempt.to_string()),
        );
        map.entry(FIRST_FAILURE_HEADER.into())
            .or_insert_with(|| long_string(&first_failure_ms.to_string()));
        record_expiration(map, original);
    })
}

/// The headers of a dead-letter copy: every value of `table` unchanged (typed), except that
/// earlier `x-ackstack-dl-*` metadata is replaced by `metadata`, plus [`DROPPED_HEADER`]
/// listing `dropped` when it is not empty.
pub(crate) fn dead_letter_table(
    original: &BasicProperties,
    metadata: &DeadLetterMetadata,
    dropped: &[&str],
) -> FieldTable {
    edit_table(original.headers().as_ref(), |map| {
        map.retain(|name, _| !name.as_str().starts_with(METADATA_PREFIX));
        for (name, value) in metadata.header_pairs() {
            if let Ok(name) = ShortString::try_new(name) {
                map.insert(name, long_string(&value));
            }
        }
        if !dropped.is_empty() {
            map.insert(DROPPED_HEADER.into(), long_string(&dropped.join(",")));
        }
        record_expiration(map, original);
    })
}

/// The bytes of a content-header frame besides its properties: frame type (1), channel (2)
/// and payload size (4), then class id (2), weight (2) and body size (8), and the frame-end
/// octet (1). RabbitMQ refuses a frame larger than the negotiated `frame_max` by closing the
/// whole connection (`FRAME_ERROR`, `frame_too_large`).
const CONTENT_HEADER_OVERHEAD: usize = 20;

/// The size of the content-header frame that carries `properties` (the header table
/// included), encoded by lapin's own serializer, so exactly what would be sent. Unlike the
/// body, which lapin splits into frames, the content header must fit one frame.
pub(crate) fn content_header_frame_size(properties: &BasicProperties) -> Result<usize, String> {
    let written = lapin::protocol::basic::gen_properties(properties)(Vec::new().into())
        .map_err(|e| format!("the message properties cannot be encoded: {e}"))?;
    Ok(written.write.len() + CONTENT_HEADER_OVERHEAD)
}

/// The properties of a dead-letter copy whose content header fits `frame_max`, and what was
/// left out of our metadata for it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FittedCopy {
    /// The properties to publish (see [`copy_properties`]).
    pub(crate) properties: BasicProperties,
    /// What was left out ([`DROPPED_ERROR_TRUNCATED`]); also in [`DROPPED_HEADER`]. Empty
    /// when the copy fit as it was.
    pub(crate) dropped: Vec<&'static str>,
    /// The copy's content-header frame size ([`content_header_frame_size`]).
    pub(crate) size: usize,
}

/// The properties of the dead-letter copy of a message received with `original` (see
/// [`dead_letter_table`] and [`copy_properties`]), shrunk when needed so that its content
/// header fits `frame_max` (the connection's negotiated frame size; 0 means no limit).
///
/// RabbitMQ's `max_message_size` counts only the body, which the copy keeps byte for byte,
/// so the metadata can only push the content header over the frame size. Then the error
/// message in the metadata is cut as short as needed, down to nothing
/// ([`DROPPED_ERROR_TRUNCATED`], recorded in [`DROPPED_HEADER`]). The payload, the original
/// headers and the other properties never change. `Err` when even the copy without an error
/// message does not fit (the original headers nearly fill the frame on their own): the
/// broker would close the connection over it however often it is sent.
pub(crate) fn fit_dead_letter(
    original: &BasicProperties,
    metadata: &DeadLetterMetadata,
    frame_max: u32,
) -> Result<FittedCopy, String> {
    let limit = match usize::try_from(frame_max) {
        Ok(0) | Err(_) => usize::MAX,
        Ok(limit) => limit,
    };
    let build = |metadata: &DeadLetterMetadata, dropped: &[&str]| {
        let properties = copy_properties(original, dead_letter_table(original, metadata, dropped));
        content_header_frame_size(&properties).map(|size| (properties, size))
    };
    let (properties, size) = build(metadata, &[])?;
    if size <= limit {
        return Ok(FittedCopy {
            properties,
            dropped: Vec::new(),
            size,
        });
    }
    let dropped = vec![DROPPED_ERROR_TRUNCATED];
    let mut shorter = metadata.clone();
    loop {
        let (properties, size) = build(&shorter, &dropped)?;
        if size <= limit {
            return Ok(FittedCopy {
                properties,
                dropped,
                size,
            });
        }
        if shorter.error_message.is_empty() {
            return Err(format!(
                "the dead-letter copy's content header is {size} bytes even without an error \
                 message; the connection's frame_max is {limit}"
            ));
        }
        // The error message is a long string: each byte cut shortens the frame by one.
        let keep = shorter.error_message.len().saturating_sub(size - limit);
        shorter.error_message = if keep <= '…'.len_utf8() {
            String::new()
        } else {
            ackstack_core::error::truncate(std::mem::take(&mut shorter.error_message), keep)
        };
    }
}

/// A copy of `table` with `edit` applied to its entries.
pub(crate) fn edit_table(
    table: Option<&FieldTable>,
    edit: impl FnOnce(&mut BTreeMap<ShortString, AMQPValue>),
) -> FieldTable {
    let mut map = table.map(|t| t.inner().clone()).unwrap_or_default();
    edit(&mut map);
    FieldTable::from(map)
}

/// The properties of a retry or dead-letter copy of a message received with `original`:
/// persistent, with `headers`, every other property kept except `expiration`. A publisher's
/// per-message TTL would otherwise run again in the queue the copy goes to: in a delay queue
/// the lower of the two TTLs wins and cuts the delay short, and in the dead-letter queue the
/// dead letter would be deleted. [`record_expiration`] keeps the value in a header instead.
pub(crate) fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.user_id() {
        p = p.with_user_id(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

/// Records the `expiration` property of `original` in [`ORIGINAL_EXPIRATION_HEADER`] of a
/// copy's headers. Without one (a copy of a copy), the header already there is kept.
pub(crate) fn record_expiration(
    map: &mut BTreeMap<ShortString, AMQPValue>,
    original: &BasicProperties,
) {
    if let Some(expiration) = original.expiration() {
        map.insert(
            ORIGINAL_EXPIRATION_HEADER.into(),
            long_string(expiration.as_str()),
        );
    }
}

/// An AMQP long-string value.
pub(crate) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        t
    }

    #[test]
    fn attempt_from_headers_never_panics() {
        assert_eq!(attempt_of(None, QueueType::Classic), 1);
        let t = table(vec![(ATTEMPT_HEADER, long_string("3"))]);
        assert_eq!(attempt_of(Some(&t), QueueType::Classic), 3);
        let t = table(vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(4))]);
        assert_eq!(attempt_of(Some(&t), QueueType::Classic), 4);
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
            assert_eq!(attempt_of(Some(&t), QueueType::Classic), 1);
        }
        let t = table(vec![(ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::MAX))]);
        assert_eq!(attempt_of(Some(&t), QueueType::Classic), u32::MAX);
    }

    #[test]
    fn quorum_adds_delivery_count() {
        let t = table(vec![(DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(2))]);
        assert_eq!(attempt_of(Some(&t), QueueType::Quorum), 3);
        assert_eq!(attempt_of(Some(&t), QueueType::Classic), 1);
        let t = table(vec![
            (ATTEMPT_HEADER, long_string("4")),
            (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(attempt_of(Some(&t), QueueType::Quorum), 5);
        let t = table(vec![(DELIVERY_COUNT_HEADER, long_string("x"))]);
        assert_eq!(attempt_of(Some(&t), QueueType::Quorum), 1);
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
                (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| AMQPValue::DecimalValue(
                    DecimalValue { scale, value }
                )),
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

        fn queue_type() -> impl Strategy<Value = QueueType> {
            prop_oneof![Just(QueueType::Classic), Just(QueueType::Quorum)]
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
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn attempt_of_any_table_never_panics(t in table(), q in queue_type()) {
                let attempt = attempt_of(Some(&t), q);
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
            fn retry_copy_counts_one_more(t in table(), q in queue_type(), first in any::<u64>()) {
                let attempt = attempt_of(Some(&t), q);
                let next = attempt.saturating_add(1);
                let copy = retry_table(&BasicProperties::default().with_headers(t.clone()), next, first);
                prop_assert_eq!(attempt_of(Some(&copy), q), next);
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
            fn tables_from_wire_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), q in queue_type()) {
                // What lapin decodes from a frame, then what we read from it.
                if let Ok((_, t)) = lapin::types::parsing::parse_field_table(bytes.as_slice()) {
                    let _ = headers_from_table(Some(&t));
                    let _ = attempt_of(Some(&t), q);
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
}
