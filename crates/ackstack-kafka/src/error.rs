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

impl From<rdkafka::error::KafkaError> for KafkaError {
    /// librdkafka's error, except that a refused secret property (a name starting with `sasl.`
    /// or holding `password`, `secret`, `token`, ...) becomes [`KafkaError::Config`] without
    /// its value: rdkafka's own message would print it.
    fn from(error: rdkafka::error::KafkaError) -> Self {
        use rdkafka::error::KafkaError as E;
        match error {
            E::ClientConfig(_, description, name, value) if crate::config::is_secret(&name) => {
                let description = if value.is_empty() {
                    description
                } else {
                    description.replace(&value, "<redacted>")
                };
                KafkaError::Config(format!("property {name}: {description}"))
            }
            other => KafkaError::Client(other),
        }
    }
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

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaConfRes;

    use super::*;

    #[test]
    fn a_refused_secret_property_is_named_without_its_value() {
        let refused = rdkafka::error::KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value \"s3cret\" for configuration property \"sasl.password\"".into(),
            "sasl.password".into(),
            "s3cret".into(),
        );
        let error = KafkaError::from(refused);
        let text = error.to_string();
        assert!(
            text.contains("sasl.password") && !text.contains("s3cret"),
            "{text}"
        );
        assert!(error.is_permanent());
        let plain = rdkafka::error::KafkaError::ClientConfig(
            RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
            "No such configuration property".into(),
            "no.such".into(),
            "1".into(),
        );
        assert!(matches!(KafkaError::from(plain), KafkaError::Client(_)));
    }
}
