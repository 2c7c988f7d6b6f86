//! [`RedisStreamsError`]: why a Redis Streams source could not start or a call failed.

/// Why a Redis Streams source could not start, or a call to Redis failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStreamsError {
    /// The configuration is invalid.
    #[error("invalid Redis Streams configuration: {0}")]
    Config(String),
    /// The stream or group is missing (and not ours to create), or is not a stream.
    #[error("Redis Streams topology: {0}")]
    Topology(String),
    /// A call to Redis failed or timed out.
    #[error("Redis call failed: {0}")]
    Call(String),
}

impl RedisStreamsError {
    /// Whether trying again cannot help (a setting to fix).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RedisStreamsError::Config(_) | RedisStreamsError::Topology(_)
        )
    }
}

/// `fut`, bounded by `limit`; a timeout is a [`RedisStreamsError::Call`] naming `what`.
pub(crate) async fn bounded<T>(
    what: &str,
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisStreamsError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        // Credentials or permissions no retry can fix.
        Ok(Err(e))
            if e.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM")) =>
        {
            Err(RedisStreamsError::Config(format!("{what}: {e}")))
        }
        Ok(Err(e)) => Err(RedisStreamsError::Call(format!("{what}: {e}"))),
        Err(_) => Err(RedisStreamsError::Call(format!(
            "{what}: no answer in {limit:?}"
        ))),
    }
}
