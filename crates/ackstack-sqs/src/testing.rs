//! Helpers for tests against an SQS endpoint (the moto server by default): a client with fake
//! credentials, unique queues with their dead-letter queues, and reading a queue directly.
//!
//! The endpoint is `SQS_ENDPOINT`, default [`DEFAULT_TEST_ENDPOINT`]; region `us-east-1`;
//! credentials `test`/`test`.
//!
//! Behind the feature `test-util`: these are for tests and benchmarks, not for services.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Region;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};

use crate::config::{ENDPOINT_ENV, SqsConfig, default_dead_letter_name};
use crate::error::{SqsError, describe};
use crate::queue::resolve_queue_url;

/// The endpoint used when `SQS_ENDPOINT` is unset.
pub const DEFAULT_TEST_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The test endpoint: `SQS_ENDPOINT` or [`DEFAULT_TEST_ENDPOINT`].
pub fn endpoint() -> String {
    std::env::var(ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_ENDPOINT.to_string())
}

/// A client for the test endpoint with fake credentials and region `us-east-1`.
pub async fn client() -> Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .test_credentials()
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint())
        .load()
        .await;
    Client::new(&config)
}

/// `prefix-<nanos>-<n>`: unique per process and call.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A freshly created queue and its dead-letter queue.
#[derive(Clone, Debug)]
pub struct TestQueue {
    /// The queue's name.
    pub name: String,
    /// The queue's URL.
    pub url: String,
    /// The dead-letter queue's name.
    pub dlq_name: String,
    /// The dead-letter queue's URL.
    pub dlq_url: String,
}

impl TestQueue {
    /// Creates a uniquely named queue (FIFO when `fifo`) and its dead-letter queue.
    pub async fn create(client: &Client, prefix: &str, fifo: bool) -> Result<Self, SqsError> {
        let base = unique_name(prefix);
        let name = if fifo { format!("{base}.fifo") } else { base };
        let dlq_name = default_dead_letter_name(&name);
        let url = resolve_queue_url(client, &name, true).await?;
        let dlq_url = resolve_queue_url(client, &dlq_name, true).await?;
        Ok(TestQueue {
            name,
            url,
            dlq_name,
            dlq_url,
        })
    }

    /// Creates the queue `name` as a team's own service would, with a native redrive policy
    /// that moves a message after `max_receive_count` receives to a dead-letter queue of the
    /// team's naming (`<name>-team-dead`): no ackstack settings on either.
    pub async fn with_redrive_policy(
        client: &Client,
        name: &str,
        max_receive_count: u32,
    ) -> Result<Self, SqsError> {
        let dlq_name = format!("{name}-team-dead");
        let dlq_url = resolve_queue_url(client, &dlq_name, true).await?;
        let arn = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| SqsError::Sdk(describe(&e).into()))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| SqsError::Sdk("no QueueArn for the dead-letter queue".into()))?;
        let policy =
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max_receive_count}"}}"#);
        let url = client
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::RedrivePolicy, policy)
            .send()
            .await
            .map_err(|e| SqsError::Sdk(describe(&e).into()))?
            .queue_url
            .ok_or_else(|| SqsError::Sdk("CreateQueue returned no URL".into()))?;
        Ok(TestQueue {
            name: name.to_string(),
            url,
            dlq_name,
            dlq_url,
        })
    }

    /// A source config for this queue: 1 s long polls, the given visibility timeout.
    pub fn config(&self, visibility: Duration) -> SqsConfig {
        SqsConfig::queue_url(self.url.clone())
            .with_dead_letter_queue(self.dlq_url.clone())
            .with_wait_time_seconds(1)
            .with_visibility_timeout(visibility)
            .with_consumer_name("ackstack-test")
    }

    /// Receives and deletes up to `expected` messages from the dead-letter queue, polling for
    /// at most `deadline`.
    pub async fn read_dead_letters(
        &self,
        client: &Client,
        expected: usize,
        deadline: Duration,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>, SqsError> {
        drain(client, &self.dlq_url, expected, deadline).await
    }

    /// How many messages the queue holds (visible plus in flight), per its attributes.
    pub async fn approximate_count(&self, client: &Client) -> Result<u64, SqsError> {
        let out = client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| SqsError::Sdk(describe(&e).into()))?;
        let attrs: HashMap<QueueAttributeName, String> = out.attributes.unwrap_or_default();
        let get = |k: &QueueAttributeName| {
            attrs
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(get(&QueueAttributeName::ApproximateNumberOfMessages)
            + get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible))
    }

    /// Deletes both queues (errors ignored).
    pub async fn delete(&self, client: &Client) {
        let _ = client.delete_queue().queue_url(&self.url).send().await;
        let _ = client.delete_queue().queue_url(&self.dlq_url).send().await;
    }
}

/// Receives (with all attributes) and deletes up to `expected` messages from `queue_url`,
/// polling with 1 s waits for at most `deadline`.
pub async fn drain(
    client: &Client,
    queue_url: &str,
    expected: usize,
    deadline: Duration,
) -> Result<Vec<aws_sdk_sqs::types::Message>, SqsError> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < expected && start.elapsed() < deadline {
        let want = (expected - out.len()).min(10);
        let got = client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(i32::try_from(want).unwrap_or(10))
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| SqsError::Sdk(describe(&e).into()))?;
        let got = got.messages.unwrap_or_default();
        // One DeleteMessageBatch per receive: a drain of a thousand messages is two hundred
        // requests rather than eleven hundred, which matters on a busy emulator.
        let entries = got
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let handle = m.receipt_handle()?;
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(handle)
                    .build()
                    .ok()
            })
            .collect::<Vec<_>>();
        if !entries.is_empty() {
            let deleted = client
                .delete_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| SqsError::Sdk(describe(&e).into()))?;
            if let Some(failed) = deleted.failed.first() {
                return Err(SqsError::Sdk(
                    format!("drain: delete of a message failed: {failed:?}").into(),
                ));
            }
        }
        out.extend(got);
    }
    Ok(out)
}
