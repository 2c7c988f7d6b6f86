//! Message attributes: reading them as headers, writing headers as attributes, and packing
//! dead-letter metadata into one attribute.

pub use crate::headers::{
    MAX_ATTRIBUTES, MESSAGE_ID_ATTRIBUTE, SYSTEM_ATTRIBUTE_PREFIX, attribute_bytes,
    headers_to_attributes,
};
pub use crate::metadata::{
    DEAD_LETTER_ATTRIBUTE, DEFAULT_MAX_MESSAGE_SIZE, DISPLACED_KEY, DROPPED_DISPLACED,
    DROPPED_ERROR_TRUNCATED, DROPPED_KEY, DeadLetterRecord, FittedDeadLetter,
    dead_letter_attributes, fit_dead_letter, message_size,
};
