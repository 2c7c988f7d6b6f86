//! Retry and dead-letter copies: their header tables (attempt, first failure, dead-letter
//! metadata, original expiration), their properties, and fitting a dead-letter copy's
//! content header into the connection's `frame_max`.

use std::collections::BTreeMap;

use ackstack_core::DeadLetterMetadata;
use ackstack_core::deadletter::{
    ATTEMPT_HEADER, CRASHES_HEADER, DEFERRED_SINCE_HEADER, DROPPED_ERROR_TRUNCATED, DROPPED_HEADER,
    FIRST_FAILURE_HEADER, METADATA_PREFIX,
};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::amqp::PERSISTENT;
use crate::headers::{DELIVERY_COUNT_HEADER, ORIGINAL_EXPIRATION_HEADER, header_u64, long_string};

/// The runs alone of a message that ended with the process dead, from its [`CRASHES_HEADER`]
/// (0 when absent or malformed).
pub(crate) fn crashes_of(properties: &BasicProperties) -> u32 {
    header_u64(properties.headers().as_ref(), CRASHES_HEADER)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The headers of a suspect's copy moved to run alone: `original`'s with [`CRASHES_HEADER`]
/// set to `crashes` and the broker's [`DELIVERY_COUNT_HEADER`] removed; every other value
/// unchanged, the expiration recorded (see [`copy_properties`]).
pub(crate) fn alone_table(original: &BasicProperties, crashes: u32) -> FieldTable {
    edit_table(original.headers().as_ref(), |map| {
        map.remove(DELIVERY_COUNT_HEADER);
        map.insert(CRASHES_HEADER.into(), long_string(&crashes.to_string()));
        record_expiration(map, original);
    })
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

/// The headers of a deferred copy: `table` with [`ATTEMPT_HEADER`] kept at `attempt` (a
/// deferral uses none), [`DEFERRED_SINCE_HEADER`] set to `since_ms` and the broker's
/// [`DELIVERY_COUNT_HEADER`] removed. Every other value is unchanged.
pub(crate) fn defer_table(original: &BasicProperties, attempt: u32, since_ms: u64) -> FieldTable {
    edit_table(original.headers().as_ref(), |map| {
        map.remove(DELIVERY_COUNT_HEADER);
        map.insert(ATTEMPT_HEADER.into(), long_string(&attempt.to_string()));
        map.insert(
            DEFERRED_SINCE_HEADER.into(),
            long_string(&since_ms.to_string()),
        );
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
        shorter.cut_error_message(size - limit);
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

#[cfg(test)]
mod tests;
