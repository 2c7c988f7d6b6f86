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
///
/// Most failures are worth repeating (the broker is unreachable, did not confirm in time);
/// [`PublishError::refused`] marks the ones that are not: the broker (or the adapter, before
/// sending) refused *this message* for good, because it is too large, its body or headers
/// cannot be carried, or the broker says it is invalid. The outbox relay parks a refused
/// message instead of trying it again.
#[derive(Debug, thiserror::Error)]
#[error("publish failed: {source}")]
pub struct PublishError {
    #[source]
    source: BoxError,
    refused: bool,
}

impl PublishError {
    /// A failure that may pass when the publish is repeated (an outage, a timeout, a missing
    /// confirmation).
    pub fn new(source: impl Into<BoxError>) -> Self {
        PublishError {
            source: source.into(),
            refused: false,
        }
    }

    /// The message was refused for good: publishing it again cannot succeed.
    pub fn refused(source: impl Into<BoxError>) -> Self {
        PublishError {
            source: source.into(),
            refused: true,
        }
    }

    /// Whether the message was refused for good (see [`PublishError::refused`]).
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    /// The underlying error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

/// Publishes messages to one queue or topic, returning once the broker confirmed each.
pub trait Publish: Send + Sync + 'static {
    /// Publishes one message and waits for the broker's confirmation.
    fn publish(&self, message: Message) -> impl Future<Output = Result<(), PublishError>> + Send;
}
