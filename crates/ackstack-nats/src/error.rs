//! [`NatsError`]: why a NATS source could not start or a call failed.

/// Why a NATS source could not start, or a call to the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The configuration is invalid.
    #[error("invalid NATS configuration: {0}")]
    Config(String),
    /// The server could not be reached (or refused the connection).
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The stream, dead-letter stream or consumer is missing (and not ours to create) or was
    /// refused.
    #[error("JetStream topology: {0}")]
    Topology(String),
    /// A call to the server failed or timed out.
    #[error("NATS call failed: {0}")]
    Call(String),
}

impl NatsError {
    /// Whether trying again cannot help (a setting to fix).
    pub fn is_permanent(&self) -> bool {
        matches!(self, NatsError::Config(_) | NatsError::Topology(_))
    }
}

/// `fut`, bounded by `limit`; a timeout is a [`NatsError::Call`] naming `what`.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, NatsError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(NatsError::Call(format!("{what}: {e}"))),
        Err(_) => Err(NatsError::Call(format!("{what}: no answer in {limit:?}"))),
    }
}
