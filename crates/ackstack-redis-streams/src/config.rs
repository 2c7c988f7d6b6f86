//! [`RedisStreamsConfig`]: the stream, the consumer group and where copies and dead letters
//! go, on Redis's own terms.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::RedisStreamsError;

/// The field that carries a message's payload, unless configured otherwise.
pub const PAYLOAD_FIELD: &str = "payload";
/// The field that carries a message's id (the deduplication key) when a producer gives one.
pub const MESSAGE_ID_FIELD: &str = "message-id";

/// Where a delivery's ordering key comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeySource {
    /// The value of this field (no key when the entry has none).
    Field(String),
    /// No key.
    None,
}

impl Default for KeySource {
    /// The field `key`.
    fn default() -> Self {
        KeySource::Field("key".into())
    }
}

/// Where a consumer group ackstack creates starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StartFrom {
    /// Every entry the stream holds (`0`), as a work queue's consumer expects.
    #[default]
    Beginning,
    /// Only entries added after the group was created (`$`).
    New,
}

/// A Redis stream read through a consumer group, and what ackstack may create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisStreamsConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// A PEM file with the CA that signed the server's certificate (`rediss://` only).
    pub tls_ca_file: Option<String>,
    /// The stream to read.
    pub stream: String,
    /// The consumer group (default `ackstack`).
    pub group: String,
    /// This consumer's name in the group (default: host name, process id and a random part,
    /// unique per process). Entries a crashed consumer held are claimed by the others (or by
    /// its successor) once idle for `lease`, whatever the names.
    pub consumer: Option<String>,
    /// Whether a missing group (and stream, `MKSTREAM`) is created. An existing group is
    /// used as it is.
    pub create: bool,
    /// Where a group ackstack creates starts.
    pub start_from: StartFrom,
    /// The lease: an entry pending this long without being renewed (`XCLAIM` to itself
    /// while its handler runs) is taken over by another consumer (`XAUTOCLAIM`).
    #[serde(with = "ackstack_core::config::duration")]
    pub lease: Duration,
    /// The stream dead letters are added to (default `<stream>-dlq`).
    pub dlq_stream: Option<String>,
    /// The sorted set that holds delayed copies until they are due (default
    /// `<stream>:delayed`); each copy's fields are a list under `<delayed>:<id>`.
    pub delayed_key: Option<String>,
    /// The field that carries the payload; every other field is a header.
    pub payload_field: String,
    /// Where a delivery's ordering key comes from.
    pub key: KeySource,
    /// How long one receive blocks (`XREADGROUP ... BLOCK`) when nothing comes.
    #[serde(with = "ackstack_core::config::duration")]
    pub block: Duration,
    /// The most entries one receive asks for.
    pub max_batch: usize,
    /// The bound on connecting and on each call (besides the block).
    #[serde(with = "ackstack_core::config::duration")]
    pub operation_timeout: Duration,
}

impl Default for RedisStreamsConfig {
    fn default() -> Self {
        RedisStreamsConfig {
            url: "redis://127.0.0.1:6379".into(),
            tls_ca_file: None,
            stream: String::new(),
            group: "ackstack".into(),
            consumer: None,
            create: true,
            start_from: StartFrom::Beginning,
            lease: Duration::from_secs(30),
            dlq_stream: None,
            delayed_key: None,
            payload_field: PAYLOAD_FIELD.into(),
            key: KeySource::default(),
            block: Duration::from_secs(2),
            max_batch: 256,
            operation_timeout: Duration::from_secs(10),
        }
    }
}

impl RedisStreamsConfig {
    /// A consumer of `stream` at `url`, with the defaults.
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        RedisStreamsConfig {
            url: url.into(),
            stream: stream.into(),
            ..RedisStreamsConfig::default()
        }
    }

    /// The stream dead letters go to.
    pub fn dlq_stream(&self) -> String {
        self.dlq_stream
            .clone()
            .unwrap_or_else(|| format!("{}-dlq", self.stream))
    }

    /// The sorted set of delayed copies.
    pub fn delayed_key(&self) -> String {
        self.delayed_key
            .clone()
            .unwrap_or_else(|| format!("{}:delayed", self.stream))
    }

    /// Checks the names and bounds.
    pub fn validate(&self) -> Result<(), RedisStreamsError> {
        let bad = |what: &str| Err(RedisStreamsError::Config(what.to_string()));
        if self.stream.is_empty() || self.group.is_empty() || self.payload_field.is_empty() {
            return bad("stream, group and payload_field must not be empty");
        }
        if self.consumer.as_deref() == Some("") {
            return bad("consumer must not be empty (leave it unset for a generated name)");
        }
        if self.dlq_stream() == self.stream
            || self.delayed_key() == self.stream
            || self.delayed_key() == self.dlq_stream()
        {
            return bad("the stream, dlq_stream and delayed_key must be three different keys");
        }
        if self.lease < Duration::from_secs(1) {
            return bad("lease must be at least 1s");
        }
        if self.block.is_zero() || self.max_batch == 0 || self.operation_timeout.is_zero() {
            return bad("block, max_batch and operation_timeout must be above zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_and_are_checked() {
        let c = RedisStreamsConfig::new("redis://127.0.0.1:6379", "orders");
        assert_eq!(c.dlq_stream(), "orders-dlq");
        assert_eq!(c.delayed_key(), "orders:delayed");
        assert!(c.validate().is_ok());
        assert!(RedisStreamsConfig::new("redis://x", "").validate().is_err());
        let mut c = RedisStreamsConfig::new("redis://x", "s");
        c.dlq_stream = Some("s".into());
        assert!(c.validate().is_err());
        let mut c = RedisStreamsConfig::new("redis://x", "s");
        c.delayed_key = Some("s-dlq".into());
        assert!(
            c.validate().is_err(),
            "delayed copies in the dead-letter stream"
        );
        let mut c = RedisStreamsConfig::new("redis://x", "s");
        c.lease = Duration::from_millis(200);
        assert!(matches!(c.validate(), Err(RedisStreamsError::Config(_))));
    }

    #[test]
    fn a_config_file_needs_units() {
        let c: RedisStreamsConfig = serde_json::from_str(
            r#"{"url":"redis://h:6379","stream":"orders","lease":"45s","key":{"field":"tenant"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.lease, Duration::from_secs(45));
        assert_eq!(c.key, KeySource::Field("tenant".into()));
        assert!(serde_json::from_str::<RedisStreamsConfig>(r#"{"lease":45}"#).is_err());
    }
}
