//! `ackstack_core::config::duration`: `parse` on any text never panics, and what it accepts
//! serializes and reads back equal (to the millisecond).
#![no_main]

use std::time::Duration;

use ackstack_core::config::duration;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Timed {
    #[serde(with = "duration")]
    d: Duration,
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = duration::parse(&text) {
        let json = serde_json::to_string(&Timed { d }).expect("serializes");
        let back: Timed = serde_json::from_str(&json).expect("reads back what it wrote");
        assert_eq!(back.d, d);
    }
    // The same text as a JSON value of a duration field (string, number, anything).
    let _ = serde_json::from_slice::<Timed>(data);
});
