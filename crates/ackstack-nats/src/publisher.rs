//! [`NatsPublisher`]: publishing to a JetStream subject, confirmed by the stream.

use std::time::Duration;

use ackstack_core::{Message, Publish, PublishError};
use async_nats::jetstream;

use crate::error::bounded;
use crate::headers::{self, MESSAGE_ID_HEADER};

/// Publishes to one subject and waits for the stream's acknowledgement. A message id becomes
/// `Nats-Msg-Id`, so that the stream drops a repeat within its duplicate window.
#[derive(Clone, Debug)]
pub struct NatsPublisher {
    js: jetstream::Context,
    subject: String,
    timeout: Duration,
}

impl NatsPublisher {
    /// A publisher to `subject` through `client`.
    pub fn new(client: async_nats::Client, subject: impl Into<String>) -> Self {
        NatsPublisher {
            js: jetstream::new(client),
            subject: subject.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// With this bound on each publish and its confirmation (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Publish for NatsPublisher {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let mut map = headers::to_nats(&message.headers).map_err(PublishError::refused)?;
        if let Some(id) = &message.message_id {
            headers::append(&mut map, MESSAGE_ID_HEADER, id.as_bytes())
                .map_err(PublishError::refused)?;
        }
        let confirmed = async {
            let ack = self
                .js
                .publish_with_headers(self.subject.clone(), map, message.payload)
                .await?;
            ack.await
        };
        bounded("publish", self.timeout, confirmed)
            .await
            .map(|_| ())
            .map_err(|e| PublishError::new(e.to_string()))
    }
}
