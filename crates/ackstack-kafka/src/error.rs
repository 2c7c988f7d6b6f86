//! [`KafkaError`]: errors creating the adapter's clients.

/// Errors creating the adapter's clients.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The configuration is invalid.
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    /// librdkafka refused to create or set up a client, or a commit failed.
    #[error("Kafka client error: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    /// A synchronous commit had no answer within [`KafkaConfig::commit_timeout`]. It stays
    /// queued in librdkafka and may still land.
    ///
    /// [`KafkaConfig::commit_timeout`]: crate::KafkaConfig::commit_timeout
    #[error("offset commit got no answer within {0:?}")]
    CommitTimeout(std::time::Duration),
}
