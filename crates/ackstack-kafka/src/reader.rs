//! [`read_topic`], a helper for tests (feature `test-util`) that reads a topic, typically the
//! dead-letter topic, from the beginning.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ackstack_core::{Delivery, Origin};
use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;

use crate::error::KafkaError;
use crate::headers as record_headers;
use crate::headers::MESSAGE_ID_HEADER;

/// Reads `topic` from the beginning with a throw-away consumer group until `expected` records
/// arrived or `timeout` passed, and returns what it read (converted like a
/// [`KafkaSource`](crate::KafkaSource) converts records; `attempt` is always 1). Meant for tests
/// and tools that inspect the dead-letter topic; nothing is committed.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Delivery>, KafkaError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("ackstack-reader-{nanos}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000");
    let consumer: BaseConsumer = config.create().map_err(KafkaError::from)?;
    consumer.subscribe(&[topic]).map_err(KafkaError::from)?;
    let topic: Arc<str> = Arc::from(topic);
    let task = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expected && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let headers = record_headers::from_record(m.headers()).headers;
                    let mut origin = Origin::new("kafka", topic.clone(), "ackstack-reader");
                    origin.partition = Some(m.partition());
                    origin.offset = Some(m.offset());
                    let mut d = Delivery::new(
                        m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                        origin,
                    );
                    d.message_id = headers.get_str(MESSAGE_ID_HEADER).map(str::to_string);
                    d.headers = headers;
                    d.key = m.key().map(Bytes::copy_from_slice);
                    out.push(d);
                }
                Some(Err(error)) => tracing::debug!(%error, "reader: consumer error"),
                None => {}
            }
        }
        out
    });
    task.await
        .map_err(|e| KafkaError::Config(format!("reader task failed: {e}")))
}
