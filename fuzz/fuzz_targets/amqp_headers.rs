//! AMQP headers from the wire: lapin's field-table parser on arbitrary bytes, then
//! `headers_from_table` and `attempt_of` on whatever it decodes. Never a panic.
#![no_main]

use ackstack_rabbitmq::lapin::types::parsing::parse_field_table;
use ackstack_rabbitmq::{QueueType, attempt_of, headers_from_table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, table)) = parse_field_table(data) {
        let headers = headers_from_table(Some(&table));
        assert!(headers.len() <= table.inner().len());
        assert!(attempt_of(Some(&table), QueueType::Classic) >= 1);
        assert!(attempt_of(Some(&table), QueueType::Quorum) >= 1);
    }
});
