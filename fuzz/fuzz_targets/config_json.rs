//! Every config struct from arbitrary bytes as JSON: errors only, never a panic; what is
//! accepted validates and prints (redacted) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ackstack_core::ConsumerConfig>(data);
    let _ = serde_json::from_slice::<ackstack_core::RetryConfig>(data);
    let _ = serde_json::from_slice::<ackstack_core::Backoff>(data);
    let _ = serde_json::from_slice::<ackstack_core::LeaseConfig>(data);
    let _ = serde_json::from_slice::<ackstack_core::DedupConfig>(data);
    if let Ok(c) = serde_json::from_slice::<ackstack_rabbitmq::RabbitConfig>(data) {
        let _ = (c.validate(), format!("{c:?}"), c.dlq_name(), c.max_delay());
    }
    if let Ok(c) = serde_json::from_slice::<ackstack_sqs::SqsConfig>(data) {
        let _ = (c.validate(), format!("{c:?}"), c.dead_letter_queue_name());
    }
    if let Ok(c) = serde_json::from_slice::<ackstack_kafka::KafkaConfig>(data) {
        let _ = (c.validate(), format!("{c:?}"), c.dlq_topic());
        let _ = (c.consumer_config(), c.producer_config());
    }
    if let Ok(c) = serde_json::from_slice::<ackstack_redis::RedisDedupConfig>(data) {
        let _ = (format!("{c:?}"), c.redacted_url());
    }
});
