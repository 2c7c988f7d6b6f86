//! [`SqsPublisher`]: `SendMessage` as ackstack's [`Publish`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ackstack_core::{Message, Publish, PublishError};
use aws_sdk_sqs::Client;

use crate::config::{DEFAULT_OPERATION_TIMEOUT, name_from_url};
use crate::error::bounded;
use crate::headers::{MAX_ATTRIBUTES, MESSAGE_ID_ATTRIBUTE, headers_to_attributes};
use crate::source::SqsSource;
use crate::stats::{Counters, SqsStats};

/// The group used on a FIFO queue for a message without a key.
pub const DEFAULT_GROUP: &str = "default";

/// Publishes to one SQS queue with `SendMessage`, returning once SQS accepted the message, or
/// failing when it did not answer within the publisher's timeout.
///
/// - The payload becomes the body; it must be UTF-8 (SQS bodies are text) and non-empty.
/// - Headers become message attributes: `String` where the value is UTF-8, `Binary` otherwise;
///   at most 10.
/// - On a FIFO queue (URL ending in `.fifo`) the key becomes the `MessageGroupId` (UTF-8;
///   [`DEFAULT_GROUP`] when absent) and the message id, or a generated unique id, the
///   `MessageDeduplicationId`. On a standard queue the key and message id are not sent.
#[derive(Clone, Debug)]
pub struct SqsPublisher {
    client: Client,
    queue_url: Arc<str>,
    fifo: bool,
    stats: Arc<Counters>,
    timeout: Duration,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl SqsPublisher {
    /// A publisher to the queue at `queue_url`.
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        let queue_url: String = queue_url.into();
        let fifo = name_from_url(&queue_url)
            .map(|n| n.ends_with(".fifo"))
            .unwrap_or(false);
        SqsPublisher {
            client,
            queue_url: queue_url.into(),
            fifo,
            stats: Arc::new(Counters::default()),
            timeout: DEFAULT_OPERATION_TIMEOUT,
        }
    }

    /// A publisher to `source`'s queue, with its client and
    /// [`operation_timeout`](crate::SqsConfig::operation_timeout), counting into the source's
    /// stats.
    pub fn for_source(source: &SqsSource) -> Self {
        SqsPublisher {
            stats: source.counters(),
            timeout: source.operation_timeout(),
            ..SqsPublisher::new(source.client().clone(), source.queue_url())
        }
    }

    /// With this limit for each `SendMessage` call (default
    /// [`DEFAULT_OPERATION_TIMEOUT`](crate::config::DEFAULT_OPERATION_TIMEOUT)).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// Whether the queue is FIFO.
    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    /// The counters (`send_calls`) so far.
    pub fn stats(&self) -> SqsStats {
        self.stats.snapshot()
    }
}

fn unique_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{n:x}", std::process::id())
}

impl Publish for SqsPublisher {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let body = String::from_utf8(message.payload.to_vec()).map_err(|_| {
            PublishError::refused("SQS message bodies are text; the payload is not UTF-8")
        })?;
        let mut headers = message.headers;
        // The message's own id, over any copied from another message; it takes one of SQS's
        // ten attributes, so a message that has no room keeps SQS's MessageId instead.
        if let Some(id) = message.message_id.as_deref().filter(|id| !id.is_empty()) {
            if headers.get(MESSAGE_ID_ATTRIBUTE).is_some() || headers.len() < MAX_ATTRIBUTES {
                headers.insert(MESSAGE_ID_ATTRIBUTE, id.to_string());
            } else {
                tracing::debug!(
                    "{MAX_ATTRIBUTES} message attributes already: the message id is not sent, \
                     consumers see SQS's MessageId"
                );
            }
        }
        let attributes = headers_to_attributes(&headers).map_err(PublishError::refused)?;
        let mut request = self
            .client
            .send_message()
            .queue_url(self.queue_url.as_ref())
            .message_body(body);
        if !attributes.is_empty() {
            request = request.set_message_attributes(Some(attributes));
        }
        if self.fifo {
            let group = match &message.key {
                Some(key) => std::str::from_utf8(key)
                    .map_err(|_| PublishError::refused("a FIFO MessageGroupId must be UTF-8"))?
                    .to_string(),
                None => DEFAULT_GROUP.to_string(),
            };
            let dedup = message.message_id.clone().unwrap_or_else(unique_id);
            request = request
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        self.stats.send_calls.add(1);
        bounded("SendMessage", self.timeout, request.send())
            .await
            .map(|_| ())
            .map_err(|e| {
                if e.refuses_message() {
                    PublishError::refused(e.describe())
                } else {
                    PublishError::new(e.describe())
                }
            })
    }
}
