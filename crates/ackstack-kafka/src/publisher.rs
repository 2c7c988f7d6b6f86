//! [`KafkaPublisher`]: the core [`Publish`] over a `FutureProducer`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{Headers, Message, Publish, PublishError};
use bytes::Bytes;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

use crate::config::{KafkaConfig, producer_config};
use crate::error::KafkaError;
use crate::headers as record_headers;
use crate::headers::MESSAGE_ID_HEADER;
use crate::oauth::{Producer, ProducerContext, Tokens};

/// Why a produce failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProduceError {
    /// librdkafka or the broker refused or failed the record.
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// No delivery report within the timeout.
    #[error("no delivery report from Kafka within {0:?}")]
    Timeout(Duration),
}

impl ProduceError {
    /// Whether the record was refused for its size (by librdkafka against the producer's
    /// `message.max.bytes`, or by the broker against the topic's `max.message.bytes`): sending
    /// the same record again can never succeed.
    pub(crate) fn is_too_large(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        match self {
            ProduceError::Kafka(e) => matches!(
                e.rdkafka_error_code(),
                Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize)
            ),
            ProduceError::Timeout(_) => false,
        }
    }
}

/// The most bytes librdkafka adds to a record's key, value and headers when it checks the
/// record against `message.max.bytes` (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`).
const RECORD_OVERHEAD: usize = 36;

/// The size librdkafka checks against the producer's `message.max.bytes` for a record with
/// this key, payload and headers (`rd_kafka_msg_max_wire_size`).
pub(crate) fn record_size(key: Option<&Bytes>, payload: &Bytes, headers: &Headers) -> usize {
    let headers: usize = headers
        .iter()
        .map(|(name, value)| {
            varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len()
        })
        .sum();
    RECORD_OVERHEAD + key.map_or(0, Bytes::len) + payload.len() + headers
}

/// Bytes of a zig-zag varint of `n` (as Kafka record fields are encoded).
fn varint_len(n: usize) -> usize {
    let mut v = (n as u64).saturating_mul(2);
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

/// Produces one record and waits for its delivery report (at most `timeout`).
pub(crate) async fn produce(
    producer: &Producer,
    topic: &str,
    key: Option<&Bytes>,
    payload: &Bytes,
    headers: OwnedHeaders,
    timeout: Duration,
) -> Result<(), ProduceError> {
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .payload(payload.as_ref())
        .headers(headers);
    if let Some(k) = key {
        record = record.key(k.as_ref());
    }
    match tokio::time::timeout(timeout, producer.send(record, Timeout::After(timeout))).await {
        Ok(Ok(_delivered)) => Ok(()),
        Ok(Err((error, _record))) => Err(ProduceError::Kafka(error)),
        Err(_) => Err(ProduceError::Timeout(timeout)),
    }
}

/// Publishes to one topic and waits for each record's delivery report.
///
/// A message's [`message_id`](Message::message_id) travels in the
/// [`MESSAGE_ID_HEADER`] header (Kafka records have no id), and
/// its key is the record key (partitioning and ordering).
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: Producer,
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
        Self::create(brokers, topic, properties, timeout, Tokens::default())
    }

    /// A publisher to `topic` on the cluster of a consumer's `config`: its brokers, the
    /// properties that apply to producers (TLS, SASL), its
    /// [token provider](KafkaConfig::token_provider), and `produce_timeout` as the delivery
    /// timeout.
    pub fn from_config(config: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        Self::create(
            &config.brokers,
            topic,
            &config.properties,
            config.produce_timeout,
            config.tokens.clone(),
        )
    }

    fn create(
        brokers: &str,
        topic: &str,
        properties: &BTreeMap<String, String>,
        timeout: Duration,
        tokens: Tokens,
    ) -> Result<Self, KafkaError> {
        if topic.trim().is_empty() {
            return Err(KafkaError::Config("topic must not be empty".to_string()));
        }
        let producer: Producer = producer_config(brokers, properties, timeout)
            .create_with_context(ProducerContext { tokens })
            .map_err(KafkaError::from)?;
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
        .map_err(|e| {
            if e.is_too_large() {
                PublishError::refused(e)
            } else {
                PublishError::new(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn varints_are_zig_zag() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }

    #[test]
    fn record_size_counts_key_payload_and_headers() {
        let headers = Headers::new().with("ab", "xyz");
        let key = Bytes::from_static(b"k");
        let payload = Bytes::from(vec![0u8; 100]);
        // 36 + key 1 + payload 100 + header (1 + 2 + 1 + 3).
        assert_eq!(record_size(Some(&key), &payload, &headers), 144);
    }

    #[test]
    fn size_refusals_are_too_large_and_others_are_not() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidMessageSize,
        ] {
            assert!(ProduceError::Kafka(KafkaError::MessageProduction(code)).is_too_large());
        }
        let transient = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(!ProduceError::Kafka(transient).is_too_large());
        assert!(!ProduceError::Timeout(Duration::from_secs(1)).is_too_large());
    }
}
