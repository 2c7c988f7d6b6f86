//! Publishing: the one operation that examples, tests and replay tools need from every broker.

use std::future::Future;

use bytes::Bytes;

use crate::delivery::Headers;
use crate::error::BoxError;

/// A message to publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The body.
    pub payload: Bytes,
    /// Application headers.
    pub headers: Headers,
    /// The ordering key (Kafka key, SQS FIFO group, AMQP routing key).
    pub key: Option<Bytes>,
    /// A message id.
    pub message_id: Option<String>,
}

impl Message {
    /// A message with this body and nothing else.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// With this header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// With this ordering key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With this message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }
}

/// Publishing failed or was not confirmed.
#[derive(Debug, thiserror::Error)]
#[error("publish failed: {0}")]
pub struct PublishError(#[source] pub BoxError);

/// Publishes messages to one queue or topic, returning once the broker confirmed each.
pub trait Publish: Send + Sync + 'static {
    /// Publishes one message and waits for the broker's confirmation.
    fn publish(&self, message: Message) -> impl Future<Output = Result<(), PublishError>> + Send;
}
