//! [`RedisStreamsPublisher`]: adding messages to a stream.

use std::time::Duration;

use ackstack_core::{Message, Publish, PublishError};
use redis::aio::ConnectionManager;

use crate::config::{KeySource, PAYLOAD_FIELD};
use crate::entry::message_fields;
use crate::error::bounded;

/// Adds each message to one stream with `XADD` (the payload field, then a field per header,
/// the message id as `message-id` and the key as the `key` field). Redis answers once the
/// entry is in the stream; its durability is the server's persistence setting (AOF with
/// `appendfsync always` for no loss on a crash of Redis).
#[derive(Clone)]
pub struct RedisStreamsPublisher {
    conn: ConnectionManager,
    stream: String,
    payload_field: String,
    key: KeySource,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStreamsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPublisher")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl RedisStreamsPublisher {
    /// A publisher to `stream` through `conn`.
    pub fn new(conn: ConnectionManager, stream: impl Into<String>) -> Self {
        RedisStreamsPublisher {
            conn,
            stream: stream.into(),
            payload_field: PAYLOAD_FIELD.into(),
            key: KeySource::default(),
            timeout: Duration::from_secs(10),
        }
    }

    /// A publisher to `stream` at `url`, connecting on first use.
    pub fn connect(url: &str, stream: impl Into<String>) -> Result<Self, PublishError> {
        let conn = ackstack_redis::connection::connection_manager(
            &ackstack_redis::connection::ConnectionSettings {
                url,
                tls_ca_file: None,
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(10),
            },
        )
        .map_err(PublishError::new)?;
        Ok(RedisStreamsPublisher::new(conn, stream))
    }

    /// With the payload in this field and the key in this one (as the consumer reads them).
    pub fn fields(mut self, payload_field: impl Into<String>, key: KeySource) -> Self {
        self.payload_field = payload_field.into();
        self.key = key;
        self
    }

    /// With this bound on each publish (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Publish for RedisStreamsPublisher {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream).arg("*");
        for field in message_fields(&self.payload_field, &self.key, &message) {
            cmd.arg(field.as_ref());
        }
        let mut conn = self.conn.clone();
        bounded("XADD", self.timeout, cmd.query_async::<String>(&mut conn))
            .await
            .map(drop)
            .map_err(PublishError::new)
    }
}
