//! [`NatsConfig`]: the stream, the durable consumer and the dead-letter subject, on NATS's
//! own terms.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::NatsError;

/// Where a delivery's ordering key comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeySource {
    /// The message's subject (the default).
    #[default]
    Subject,
    /// The value of this header (no key when it is missing).
    Header(String),
    /// No key.
    None,
}

/// A JetStream durable pull consumer, and what ackstack may create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server URL(s), comma-separated (`nats://127.0.0.1:4222`, `tls://...`).
    pub url: String,
    /// The stream to read.
    pub stream: String,
    /// The subjects of the stream when ackstack creates it (default: the stream's name).
    pub subjects: Vec<String>,
    /// The durable consumer's name (default: `ackstack`).
    pub consumer: String,
    /// Whether a missing stream, dead-letter stream or consumer is created. An existing one
    /// is always used as it is, whatever its settings.
    pub create: bool,
    /// The consumer's `ack_wait` when ackstack creates it: the lease, extended with
    /// `+WPI` while a handler runs. An adopted consumer's own `ack_wait` is used.
    #[serde(with = "ackstack_core::config::duration")]
    pub ack_wait: Duration,
    /// `max_deliver` of a consumer ackstack creates (`None`: unlimited). A safety net beyond
    /// ackstack's own `max_attempts`, which it must exceed.
    pub max_deliver: Option<u32>,
    /// The subject dead letters are published to (default `<stream>.dlq`).
    pub dlq_subject: Option<String>,
    /// The stream that keeps the dead letters when ackstack creates it (default
    /// `<stream>-dlq`).
    pub dlq_stream: Option<String>,
    /// Where a delivery's ordering key comes from.
    pub key: KeySource,
    /// How long one receive waits for messages when there are none.
    #[serde(with = "ackstack_core::config::duration")]
    pub fetch_wait: Duration,
    /// The most messages one receive asks for.
    pub max_batch: usize,
    /// The bound on each call to the server (connect, stream and consumer lookups, publish
    /// confirms).
    #[serde(with = "ackstack_core::config::duration")]
    pub operation_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: String::new(),
            subjects: Vec::new(),
            consumer: "ackstack".into(),
            create: true,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            dlq_subject: None,
            dlq_stream: None,
            key: KeySource::Subject,
            fetch_wait: Duration::from_secs(2),
            max_batch: 256,
            operation_timeout: Duration::from_secs(10),
        }
    }
}

impl NatsConfig {
    /// A consumer of `stream` at `url`, with the defaults.
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            stream: stream.into(),
            ..NatsConfig::default()
        }
    }

    /// The subject dead letters go to.
    pub fn dlq_subject(&self) -> String {
        self.dlq_subject
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.stream))
    }

    /// The stream that keeps the dead letters.
    pub fn dlq_stream(&self) -> String {
        self.dlq_stream
            .clone()
            .unwrap_or_else(|| format!("{}-dlq", self.stream))
    }

    /// Checks the names and bounds.
    pub fn validate(&self) -> Result<(), NatsError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && !n
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        };
        if !name_ok(&self.stream) {
            return Err(NatsError::Config(format!(
                "stream {:?} is not a valid JetStream stream name",
                self.stream
            )));
        }
        if !name_ok(&self.consumer) {
            return Err(NatsError::Config(format!(
                "consumer {:?} is not a valid durable name",
                self.consumer
            )));
        }
        if !name_ok(&self.dlq_stream()) {
            return Err(NatsError::Config(format!(
                "dlq_stream {:?} is not a valid JetStream stream name",
                self.dlq_stream()
            )));
        }
        if self.ack_wait < Duration::from_secs(1) || self.fetch_wait.is_zero() {
            return Err(NatsError::Config(
                "ack_wait must be at least 1s and fetch_wait above zero".into(),
            ));
        }
        if self.max_batch == 0 || self.operation_timeout.is_zero() {
            return Err(NatsError::Config(
                "max_batch and operation_timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_and_are_checked() {
        let c = NatsConfig::new("nats://127.0.0.1:4222", "orders");
        assert_eq!(c.dlq_subject(), "orders.dlq");
        assert_eq!(c.dlq_stream(), "orders-dlq");
        assert!(c.validate().is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>"] {
            let c = NatsConfig::new("nats://x", bad);
            assert!(matches!(c.validate(), Err(NatsError::Config(_))), "{bad:?}");
        }
        let mut c = NatsConfig::new("nats://x", "s");
        c.ack_wait = Duration::from_millis(500);
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_config_file_needs_units() {
        let c: NatsConfig = serde_json::from_str(
            r#"{"url":"nats://h:4222","stream":"orders","ack_wait":"45s","key":{"header":"k"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.ack_wait, Duration::from_secs(45));
        assert_eq!(c.key, KeySource::Header("k".into()));
        assert!(serde_json::from_str::<NatsConfig>(r#"{"ack_wait":45}"#).is_err());
    }
}
