//! Errors of the Redis dedup store.

use std::time::Duration;

use ackstack_core::dedup::DedupError;

/// What went wrong talking to Redis. Every store call that fails returns this inside a
/// [`DedupError`]; the dedup layer then applies its fail-closed (or fail-open) policy.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisDedupError {
    /// The configuration cannot work (bad URL, unsupported scheme, bad pipeline settings).
    #[error("invalid redis dedup config: {0}")]
    Config(String),
    /// Redis answered with an error, or the connection failed or dropped. The connection
    /// manager reconnects by itself; a later call can succeed.
    #[error("redis error: {0}")]
    Redis(#[source] redis::RedisError),
    /// The call did not finish within the configured timeout (Redis down, slow or unreachable).
    #[error("redis dedup call timed out after {0:?}")]
    Timeout(Duration),
    /// [`RedisDedupStore::connect`](crate::RedisDedupStore::connect) over `rediss://` got no
    /// answer within the timeout: Redis is down or slow, or the port speaks plaintext (a
    /// plaintext Redis never answers a TLS handshake, so this is how that mistake shows).
    #[error(
        "no answer over TLS from {url} within {after:?}: Redis is down or slow, or that port \
         does not speak TLS (a plaintext Redis never answers a TLS handshake: use redis:// or \
         the server's TLS port)"
    )]
    TlsTimeout {
        /// The URL, without its password.
        url: String,
        /// How long it waited.
        after: Duration,
    },
    /// Redis answered with something the store's scripts never return.
    #[error("unexpected reply from redis: {0}")]
    UnexpectedReply(String),
    /// The token is the store's own done marker, which would be mistaken for a done key.
    #[error("the dedup token must not equal the done marker")]
    ReservedToken,
    /// The store's background task is gone (the runtime is shutting down).
    #[error("redis dedup store is shut down")]
    Closed,
}

impl From<RedisDedupError> for DedupError {
    fn from(err: RedisDedupError) -> Self {
        DedupError(Box::new(err))
    }
}

impl From<redis::RedisError> for RedisDedupError {
    fn from(err: redis::RedisError) -> Self {
        RedisDedupError::Redis(err)
    }
}
