//! [`KafkaError`]: errors creating the adapter's clients.

/// Errors creating the adapter's clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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

impl KafkaError {
    /// Whether repeating cannot help: an invalid configuration, or librdkafka refusing to
    /// create the client or subscribe (an unknown or invalid property, a security protocol
    /// this build lacks). A consumer waiting for its cluster at start-up stops on these.
    pub fn is_permanent(&self) -> bool {
        use rdkafka::error::KafkaError as E;
        match self {
            KafkaError::Config(_) => true,
            KafkaError::Client(E::ClientCreation(_) | E::ClientConfig(..) | E::Subscription(_)) => {
                true
            }
            KafkaError::Client(_) | KafkaError::CommitTimeout(_) => false,
        }
    }
}
