//! Kafka record headers -> ackstack headers, with header names of any bytes (as sarama,
//! kafka-go or librdkafka's C API can write them). Never a panic: a name that is not UTF-8 is
//! skipped and counted; every other header arrives in order with its bytes.
#![no_main]

use ackstack_kafka::fuzzing::{attempt_of, from_record};
use libfuzzer_sys::fuzz_target;
use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders};

/// Kafka headers whose names are `names` byte for byte. rdkafka's Rust API only takes `&str`
/// names, so each is inserted as a placeholder of the same length and its bytes are then
/// overwritten in librdkafka's own copy.
fn raw_headers(pairs: &[(&[u8], Option<&[u8]>)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (name, value) in pairs {
        let placeholder = "k".repeat(name.len());
        headers = headers.insert(Header {
            key: &placeholder,
            value: *value,
        });
    }
    let native = headers.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
    for (idx, (name, _)) in pairs.iter().enumerate() {
        let mut name_ptr = std::ptr::null();
        let mut value_ptr = std::ptr::null();
        let mut size = 0;
        // SAFETY: `native` is the live headers object owned by `headers`; librdkafka stores
        // each name in a writable buffer of at least `name.len() + 1` bytes (the placeholder
        // and its NUL), and nothing reads it while it is written.
        unsafe {
            let err =
                rd_kafka_header_get_all(native, idx, &mut name_ptr, &mut value_ptr, &mut size);
            assert_eq!(err as i32, 0, "header {idx} exists");
            std::ptr::copy_nonoverlapping(name.as_ptr(), name_ptr as *mut u8, name.len());
        }
    }
    headers
}

/// libFuzzer's panic hook aborts on every panic, caught or not. rdkafka's panic on a name
/// that is not UTF-8 is expected here and caught by `from_record`; any other still aborts.
fn let_rdkafka_name_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_rdkafka_headers = info
                .location()
                .is_some_and(|l| l.file().contains("rdkafka") && l.file().ends_with("message.rs"));
            if !in_rdkafka_headers {
                fuzzer_hook(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let_rdkafka_name_panics_unwind();
    // Records separated by 0xff: "name\0value", or just "name" for a null value.
    let pairs: Vec<(&[u8], Option<&[u8]>)> = data
        .split(|&b| b == 0xff)
        .map(|record| match record.iter().position(|&b| b == 0) {
            Some(at) => (&record[..at], Some(&record[at + 1..])),
            None => (record, None),
        })
        .collect();
    let kafka = raw_headers(&pairs);
    let converted = from_record(Some(&kafka));
    assert_eq!(converted.headers.len() + converted.skipped, kafka.count());
    let readable = pairs.iter().filter(|(n, _)| std::str::from_utf8(n).is_ok());
    for ((name, value), (got_name, got_value)) in readable.zip(converted.headers.iter()) {
        assert_eq!(name, &got_name.as_bytes());
        assert_eq!(value.unwrap_or_default(), got_value.as_ref());
    }
    assert!(attempt_of(&converted.headers) >= 1);
});
