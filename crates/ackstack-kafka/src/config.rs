//! Configuration of the Kafka adapter.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::error::KafkaError;
use crate::oauth::{TokenProvider, Tokens};

/// Configuration of a [`KafkaSource`](crate::KafkaSource) (and its dead-letter producer).
///
/// Deserializable with serde; durations need a unit: `"250ms"`, `"30s"`, `"5m"`. The
/// [token provider](Self::token_provider) is set in code only.
///
/// The adapter always sets `enable.auto.commit=false` and `enable.auto.offset.store=false`
/// (progress is committed only from the watermark), whatever `properties` say.
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// The consumer group.
    pub group_id: String,
    /// The topic to consume.
    pub topic: String,
    /// Extra librdkafka properties for the consumer and the dead-letter producer (security,
    /// fetch sizes, `partition.assignment.strategy`, ...). Values whose name suggests a secret
    /// are redacted in `Debug`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Commit the watermark at least this often while acks arrive (default 1s).
    #[serde(
        default = "default_commit_interval",
        with = "ackstack_core::config::duration"
    )]
    pub commit_interval: Duration,
    /// Commit after this many acks even before `commit_interval` (default 1000).
    #[serde(default = "default_commit_max_count")]
    pub commit_max_count: usize,
    /// The dead-letter topic (default `<topic>-dlq`).
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// `session.timeout.ms` (default 10s; a real broker's minimum is usually 6s).
    #[serde(
        default = "default_session_timeout",
        with = "ackstack_core::config::duration"
    )]
    pub session_timeout: Duration,
    /// `auto.offset.reset` for partitions without a committed offset (default `earliest`).
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: String,
    /// How long a dead-letter produce may take before it counts as failed (default 30s).
    #[serde(
        default = "default_produce_timeout",
        with = "ackstack_core::config::duration"
    )]
    pub produce_timeout: Duration,
    /// How many received records may wait for the runner (default 1024). Beyond it, records
    /// stay in librdkafka's prefetch queue of their partition, which librdkafka fills up to
    /// `queued.min.messages` records or `queued.max.messages.kbytes`, **per partition** here
    /// (each partition's queue is read on its own). ackstack sets `queued.max.messages.kbytes`
    /// to 8192 (8 MiB per partition) unless [`properties`](Self::properties) set it: lower it
    /// for consumers of many partitions.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// The consumer name recorded in deliveries' origin and dead-letter metadata (default: the
    /// group id).
    #[serde(default)]
    pub consumer_name: Option<String>,
    /// How often the runner confirms that a running handler's partition is still ours
    /// (default 10s). Kafka has no per-record lease; the adapter reports this as its lease
    /// ([`Capabilities::lease`](ackstack_core::Capabilities)), so the runner's lease keeper
    /// calls [`extend`](ackstack_core::Settle::extend) at 70% of it, and `extend` fails with
    /// [`SettleError::LeaseLost`](ackstack_core::SettleError) once the partition was revoked:
    /// the handler's cancellation token fires within about 0.7 × this after a revoke. The
    /// runner's `lease.max_total` then also bounds how long one record may be worked on.
    #[serde(
        default = "default_ownership_check",
        with = "ackstack_core::config::duration"
    )]
    pub ownership_check: Duration,
    /// How long a synchronous commit ([`KafkaSettler::commit_now`](crate::KafkaSettler),
    /// the final flush) waits for the broker's answer before it gives up with
    /// [`KafkaError::CommitTimeout`] (default 10s). The commit itself stays queued in
    /// librdkafka; giving up only stops waiting for it. (A commit on revoke runs inside the
    /// rebalance callback and is bounded by librdkafka's `socket.timeout.ms` only.)
    #[serde(
        default = "default_commit_timeout",
        with = "ackstack_core::config::duration"
    )]
    pub commit_timeout: Duration,
    /// SASL/OAUTHBEARER tokens (see [`KafkaConfig::token_provider`]); never read from files.
    #[serde(skip)]
    pub(crate) tokens: Tokens,
}

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_commit_max_count() -> usize {
    1000
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_offset_reset() -> String {
    "earliest".to_string()
}
fn default_produce_timeout() -> Duration {
    Duration::from_secs(30)
}
/// The `queued.max.messages.kbytes` ackstack sets unless the properties do: the prefetch
/// bound of each partition's queue.
const DEFAULT_QUEUED_MAX_KBYTES: u32 = 8192;

fn default_buffer() -> usize {
    1024
}
fn default_ownership_check() -> Duration {
    Duration::from_secs(10)
}
fn default_commit_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Property names whose values are never printed (nor any `sasl.*` property's).
const SECRET_MARKERS: [&str; 6] = ["password", "secret", "token", "pem", "jaas", "credential"];

pub(crate) fn is_secret(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("sasl.") || SECRET_MARKERS.iter().any(|m| lower.contains(m))
}

impl KafkaConfig {
    /// A configuration with every default for `brokers`, `group_id` and `topic`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topic: impl Into<String>,
    ) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topic: topic.into(),
            properties: BTreeMap::new(),
            commit_interval: default_commit_interval(),
            commit_max_count: default_commit_max_count(),
            dlq_topic: None,
            session_timeout: default_session_timeout(),
            auto_offset_reset: default_offset_reset(),
            produce_timeout: default_produce_timeout(),
            buffer: default_buffer(),
            consumer_name: None,
            ownership_check: default_ownership_check(),
            commit_timeout: default_commit_timeout(),
            tokens: Tokens::default(),
        }
    }

    /// With this provider of SASL/OAUTHBEARER tokens, for `sasl.mechanism=OAUTHBEARER`
    /// (Amazon MSK with IAM, a token service of your own): the consumer, its dead-letter
    /// producer and [`KafkaPublisher::from_config`](crate::KafkaPublisher::from_config) ask it
    /// for a token at start and before each one expires (see [`crate::oauth`]).
    pub fn token_provider(mut self, provider: impl TokenProvider) -> Self {
        self.tokens = Tokens::new(provider);
        self
    }

    /// With this librdkafka property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// The dead-letter topic: [`KafkaConfig::dlq_topic`] or `<topic>-dlq`.
    pub fn dlq_topic(&self) -> String {
        match &self.dlq_topic {
            Some(t) => t.clone(),
            None => format!("{}-dlq", self.topic),
        }
    }

    /// The consumer name: [`KafkaConfig::consumer_name`] or the group id.
    pub fn consumer_name(&self) -> &str {
        self.consumer_name.as_deref().unwrap_or(&self.group_id)
    }

    /// Checks the fields that librdkafka would only reject later, or never.
    pub fn validate(&self) -> Result<(), KafkaError> {
        for (name, value) in [
            ("brokers", &self.brokers),
            ("group_id", &self.group_id),
            ("topic", &self.topic),
        ] {
            if value.trim().is_empty() {
                return Err(KafkaError::Config(format!("{name} must not be empty")));
            }
        }
        if self.dlq_topic() == self.topic {
            return Err(KafkaError::Config(
                "dlq_topic must differ from topic".to_string(),
            ));
        }
        if self.commit_max_count == 0 {
            return Err(KafkaError::Config(
                "commit_max_count must be at least 1".to_string(),
            ));
        }
        if self.commit_timeout.is_zero() {
            return Err(KafkaError::Config(
                "commit_timeout must be longer than 0".to_string(),
            ));
        }
        if self.ownership_check < Duration::from_millis(100) {
            return Err(KafkaError::Config(
                "ownership_check must be at least 100ms".to_string(),
            ));
        }
        Ok(())
    }

    /// The consumer's librdkafka configuration.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("auto.offset.reset", &self.auto_offset_reset)
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            );
        // Each partition's queue is read on its own (see `queues.rs`), so librdkafka's prefetch
        // bound applies per partition: keep it well below its 64 MiB default.
        c.set(
            "queued.max.messages.kbytes",
            DEFAULT_QUEUED_MAX_KBYTES.to_string(),
        );
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        c
    }

    /// The largest record the dead-letter producer sends: the `message.max.bytes` property,
    /// or librdkafka's default of 1,000,000 bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// The dead-letter producer's librdkafka configuration (consumer-only properties are
    /// left out).
    pub fn producer_config(&self) -> ClientConfig {
        producer_config(&self.brokers, &self.properties, self.produce_timeout)
    }
}

/// A producer configuration: `brokers`, the properties that apply to producers, and
/// `message.timeout.ms` from `timeout`.
pub(crate) fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    timeout: Duration,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        if !is_consumer_only(k) {
            c.set(k, v);
        }
    }
    c.set("message.timeout.ms", timeout.as_millis().max(1).to_string());
    c
}

fn is_consumer_only(name: &str) -> bool {
    matches!(
        name,
        "group.id"
            | "group.instance.id"
            | "auto.offset.reset"
            | "session.timeout.ms"
            | "heartbeat.interval.ms"
            | "max.poll.interval.ms"
            | "partition.assignment.strategy"
            | "enable.auto.commit"
            | "enable.auto.offset.store"
            | "auto.commit.interval.ms"
            | "isolation.level"
            | "fetch.min.bytes"
            | "fetch.max.bytes"
            | "fetch.wait.max.ms"
            | "max.partition.fetch.bytes"
            | "queued.min.messages"
            | "queued.max.messages.kbytes"
            | "enable.partition.eof"
            | "check.crcs"
    )
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topic", &self.topic)
            .field("properties", &properties)
            .field("commit_interval", &self.commit_interval)
            .field("commit_max_count", &self.commit_max_count)
            .field("dlq_topic", &self.dlq_topic())
            .field("session_timeout", &self.session_timeout)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("produce_timeout", &self.produce_timeout)
            .field("buffer", &self.buffer)
            .field("consumer_name", &self.consumer_name())
            .field("ownership_check", &self.ownership_check)
            .field("commit_timeout", &self.commit_timeout)
            .field("token_provider", &self.tokens)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_with_defaults_and_forces_manual_commit() {
        let c: KafkaConfig = serde_json::from_str(
            r#"{"brokers":"b:9092","group_id":"g","topic":"orders",
                "properties":{"enable.auto.commit":"true","sasl.password":"hunter2"},
                "commit_interval":"250ms"}"#,
        )
        .unwrap();
        assert_eq!(c.dlq_topic(), "orders-dlq");
        assert_eq!(c.commit_interval, Duration::from_millis(250));
        assert_eq!(c.commit_max_count, 1000);
        assert_eq!(c.consumer_name(), "g");
        assert_eq!(c.ownership_check, Duration::from_secs(10));
        assert_eq!(c.commit_timeout, Duration::from_secs(10));
        let cc = c.consumer_config();
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("auto.offset.reset"), Some("earliest"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(c.validate().is_ok());
        assert_eq!(c.producer_config().get("group.id"), None);
    }

    #[test]
    fn rejects_empty_names() {
        let c = KafkaConfig::new("b:9092", "", "t");
        assert!(c.validate().is_err());
        let mut c = KafkaConfig::new("b:9092", "g", "t");
        c.dlq_topic = Some("t".into());
        assert!(c.validate().is_err());
        let mut c = KafkaConfig::new("b:9092", "g", "t");
        c.ownership_check = Duration::ZERO;
        assert!(c.validate().is_err());
    }
}
