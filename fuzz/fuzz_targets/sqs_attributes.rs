//! SQS message attributes: `DeadLetterRecord::from_attributes` and `restore` on arbitrary
//! attributes and dead-letter JSON, and `dead_letter_attributes` on top. Never a panic; an
//! original without our attribute and with at most 10 attributes restores exactly.
#![no_main]

use std::collections::HashMap;

use ackstack_core::{DeadLetter, Delivery, ErrorKind, Failure, Origin};
use ackstack_sqs::{
    DEAD_LETTER_ATTRIBUTE, DeadLetterRecord, MAX_ATTRIBUTES, dead_letter_attributes,
};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Records separated by 0xff: kind byte, then "name\0value".
    let mut attrs: HashMap<String, MessageAttributeValue> = HashMap::new();
    for record in data.split(|&b| b == 0xff) {
        let Some((&kind, rest)) = record.split_first() else {
            continue;
        };
        let mut parts = rest.splitn(2, |&b| b == 0);
        let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let value = parts.next().unwrap_or_default();
        let name = if kind % 5 == 0 {
            DEAD_LETTER_ATTRIBUTE.to_string()
        } else {
            name
        };
        let builder = MessageAttributeValue::builder();
        let built = match kind % 3 {
            0 => builder
                .data_type("String")
                .string_value(String::from_utf8_lossy(value)),
            1 => builder
                .data_type("Binary")
                .binary_value(Blob::new(value.to_vec())),
            _ => builder.data_type(String::from_utf8_lossy(value)),
        }
        .build();
        if let Ok(attr) = built {
            attrs.insert(name, attr);
        }
    }
    if let Some(record) = DeadLetterRecord::from_attributes(&attrs) {
        let _ = record.restore(&attrs);
    }
    let d = Delivery::new("x", Origin::new("sqs", "q", "c"));
    let meta = DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "bad")).metadata(&d);
    if let Ok(out) = dead_letter_attributes(&attrs, &meta) {
        assert!(out.len() <= MAX_ATTRIBUTES);
        let record = DeadLetterRecord::from_attributes(&out).expect("reads what it wrote");
        assert_eq!(record.metadata, meta);
        if !attrs.contains_key(DEAD_LETTER_ATTRIBUTE) && attrs.len() <= MAX_ATTRIBUTES {
            assert_eq!(record.restore(&out), attrs);
        }
    }
});
