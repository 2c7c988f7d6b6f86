//! Integration and conformance tests against real brokers; see tests/.
//!
//! The README's Rust blocks are compiled here as doc tests (the struct below exists only when
//! rustdoc collects doc tests), so that the front door cannot drift from the API.

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/MIGRATING.md")]
pub struct MigratingDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/KAFKA_SECURITY.md")]
pub struct KafkaSecurityDoctests;

use std::time::Duration;

use ackstack::rabbitmq::{QueueType, RabbitConfig};

/// The RabbitMQ config of the poison suite's consumer (`src/bin/poison_consumer.rs`) and of
/// the test that publishes to it: both declare the same queues, so they must agree. Default
/// prefetch and delay buckets; every queue deleted 300 s after its last use.
pub fn rabbitmq_config(url: &str, queue: &str, queue_type: QueueType) -> RabbitConfig {
    let mut config = RabbitConfig::new(url.to_string(), queue.to_string());
    config.queue_type = queue_type;
    config.queue_expires = Some(Duration::from_secs(300));
    config.poll_interval = Duration::from_millis(200);
    config
}

/// The body of each fenced block tagged `lang` in `markdown` (for the tests that compile or
/// parse what the documentation shows).
pub fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    markdown
        .split(fence.as_str())
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .collect()
}
