//! [`KafkaPublisher`] (the core [`Publish`] over a `FutureProducer`) and [`read_topic`], a
//! helper that reads a topic (typically the dead-letter topic) from the beginning.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ackstack_core::{BoxError, Delivery, Message, Origin, Publish, PublishError};
use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::producer_config;
use crate::headers as record_headers;
use crate::{KafkaError, MESSAGE_ID_HEADER};

/// Produces one record and waits for its delivery report (at most `timeout`).
pub(crate) async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&Bytes>,
    payload: &Bytes,
    headers: OwnedHeaders,
    timeout: Duration,
) -> Result<(), BoxError> {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .payload(payload.as_ref())
        .headers(headers);
    if let Some(k) = key {
        record = record.key(k.as_ref());
    }
    match tokio::time::timeout(timeout, producer.send(record, Timeout::After(timeout))).await {
        Ok(Ok(_delivered)) => Ok(()),
        Ok(Err((error, _record))) => Err(Box::new(error)),
        Err(_) => Err(format!("no delivery report from Kafka within {timeout:?}").into()),
    }
}

/// Publishes to one topic and waits for each record's delivery report.
///
/// A message's [`message_id`](Message::message_id) travels in the
/// [`MESSAGE_ID_HEADER`](crate::MESSAGE_ID_HEADER) header (Kafka records have no id), and
/// its key is the record key (partitioning and ordering).
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: Arc<str>,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("topic", &self.topic)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher to `topic` on `brokers` with a 30 s delivery timeout.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        KafkaPublisher::with_properties(brokers, topic, &BTreeMap::new(), Duration::from_secs(30))
    }

    /// A publisher with extra librdkafka producer `properties` and a delivery `timeout`.
    pub fn with_properties(
        brokers: &str,
        topic: &str,
        properties: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        if topic.trim().is_empty() {
            return Err(KafkaError::Config("topic must not be empty".to_string()));
        }
        let producer: FutureProducer = producer_config(brokers, properties, timeout)
            .create()
            .map_err(KafkaError::Client)?;
        Ok(KafkaPublisher {
            producer,
            topic: Arc::from(topic),
            timeout,
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Publish for KafkaPublisher {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let mut headers = message.headers;
        if let Some(id) = message.message_id {
            headers.insert(MESSAGE_ID_HEADER, id);
        }
        produce(
            &self.producer,
            &self.topic,
            message.key.as_ref(),
            &message.payload,
            record_headers::to_record(&headers),
            self.timeout,
        )
        .await
        .map_err(PublishError)
    }
}

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
    let consumer: BaseConsumer = config.create().map_err(KafkaError::Client)?;
    consumer.subscribe(&[topic]).map_err(KafkaError::Client)?;
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
