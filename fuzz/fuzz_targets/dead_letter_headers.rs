//! `DeadLetterMetadata::from_headers` on arbitrary headers (names drawn mostly from ours) and
//! `DeadLetterMetadata` from arbitrary JSON: never a panic; what is read writes and reads back
//! equal.
#![no_main]

use ackstack_core::deadletter::{FIRST_FAILURE_HEADER, METADATA_PREFIX};
use ackstack_core::{DeadLetterMetadata, Headers};
use libfuzzer_sys::fuzz_target;

const FIELDS: &[&str] = &[
    "reason",
    "error-kind",
    "error-message",
    "attempts",
    "broker",
    "queue",
    "partition",
    "offset",
    "message-id",
    "first-failure-ms",
    "last-failure-ms",
    "consumer",
];

fuzz_target!(|data: &[u8]| {
    // Records separated by 0xff: one selector byte (which name), then the value bytes.
    let mut headers = Headers::new();
    for record in data.split(|&b| b == 0xff) {
        let Some((&selector, value)) = record.split_first() else {
            continue;
        };
        let name = match usize::from(selector) {
            i if i < FIELDS.len() => format!("{METADATA_PREFIX}{}", FIELDS[i]),
            i if i < 2 * FIELDS.len() => FIRST_FAILURE_HEADER.to_string(),
            _ => String::from_utf8_lossy(value).into_owned(),
        };
        headers.append(name, value.to_vec());
    }
    if let Some(meta) = DeadLetterMetadata::from_headers(&headers) {
        let mut again = headers.clone();
        meta.apply_to(&mut again);
        assert_eq!(
            DeadLetterMetadata::from_headers(&again).as_ref(),
            Some(&meta)
        );
        let json: DeadLetterMetadata =
            serde_json::from_str(&meta.to_json()).expect("reads back its JSON");
        assert_eq!(json, meta);
    }
    if let Ok(meta) = serde_json::from_slice::<DeadLetterMetadata>(data) {
        let mut h = Headers::new();
        meta.apply_to(&mut h);
        assert_eq!(DeadLetterMetadata::from_headers(&h), Some(meta));
    }
});
