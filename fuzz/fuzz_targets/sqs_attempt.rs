//! SQS `ApproximateReceiveCount` parsing on any text: never a panic, always at least 1.
#![no_main]

use ackstack_sqs::fuzzing::parse_attempt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let attempt = parse_attempt(Some(text.as_bytes()));
    assert!(attempt >= 1);
    if let Ok(n) = text.trim().parse::<u32>()
        && n >= 1
    {
        assert_eq!(attempt, n);
    }
});
