//! The queue: building a client, resolving (or creating) queue URLs, and [`QueueInfo`], what
//! the source and its settler know about the resolved queues.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Region;
use aws_sdk_sqs::types::QueueAttributeName;

use crate::config::{DEFAULT_OPERATION_TIMEOUT, SqsConfig};
use crate::error::{CallError, SqsError, bounded, is_missing_queue};
use crate::metadata::DEFAULT_MAX_MESSAGE_SIZE;

/// The resolved queue and everything settling needs to know about it.
#[derive(Debug)]
pub(crate) struct QueueInfo {
    pub(crate) url: String,
    pub(crate) name: Arc<str>,
    pub(crate) dlq_url: String,
    pub(crate) dlq_fifo: bool,
    pub(crate) consumer: Arc<str>,
    pub(crate) visibility: Duration,
    pub(crate) visibility_secs: i32,
    pub(crate) wait_secs: i32,
    pub(crate) max_messages: usize,
    pub(crate) parallel_acks: usize,
    pub(crate) system_headers: bool,
    /// [`SqsConfig::operation_timeout`].
    pub(crate) timeout: Duration,
    /// The dead-letter queue's `MaximumMessageSize`, in bytes.
    pub(crate) dlq_max_size: usize,
}

/// The `MaximumMessageSize` of the queue at `url`, or [`DEFAULT_MAX_MESSAGE_SIZE`] (logged)
/// when it cannot be read.
pub(crate) async fn max_message_size(client: &Client, url: &str, timeout: Duration) -> usize {
    let request = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::MaximumMessageSize);
    let answer = bounded("GetQueueAttributes", timeout, request.send()).await;
    let read = match answer {
        Ok(out) => out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| "no MaximumMessageSize in the answer".to_string()),
        Err(e) => Err(e.describe()),
    };
    match read {
        Ok(size) => size,
        Err(error) => {
            tracing::warn!(
                %error, queue = url,
                "cannot read the dead-letter queue's MaximumMessageSize; assuming {DEFAULT_MAX_MESSAGE_SIZE} bytes"
            );
            DEFAULT_MAX_MESSAGE_SIZE
        }
    }
}

/// Builds an SQS client through aws-config's default chain (credentials, region, retries),
/// with the config's region and endpoint override ([`SqsConfig::effective_endpoint`]).
pub async fn build_client(config: &SqsConfig) -> Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = config.effective_endpoint() {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

/// Looks up the URL of the queue named `name`, creating it (FIFO when the name ends in
/// `.fifo`) when `create` is set. Each call is bounded by [`DEFAULT_OPERATION_TIMEOUT`].
pub async fn resolve_queue_url(
    client: &Client,
    name: &str,
    create: bool,
) -> Result<String, SqsError> {
    resolve_queue_url_within(client, name, create, DEFAULT_OPERATION_TIMEOUT).await
}

/// [`resolve_queue_url`] with each call bounded by `timeout`.
pub(crate) async fn resolve_queue_url_within(
    client: &Client,
    name: &str,
    create: bool,
    timeout: Duration,
) -> Result<String, SqsError> {
    let found = bounded(
        "GetQueueUrl",
        timeout,
        client.get_queue_url().queue_name(name).send(),
    )
    .await;
    match found {
        Ok(out) => out.queue_url().map(str::to_string).ok_or_else(|| {
            SqsError::Sdk(format!("GetQueueUrl for {name:?} returned no URL").into())
        }),
        Err(CallError::Sdk(e)) if is_missing_queue(&e) => {
            if !create {
                return Err(SqsError::QueueNotFound(name.to_string()));
            }
            let mut req = client.create_queue().queue_name(name);
            if name.ends_with(".fifo") {
                req = req.attributes(QueueAttributeName::FifoQueue, "true");
            }
            let out = bounded("CreateQueue", timeout, req.send())
                .await
                .map_err(CallError::into_sqs_error)?;
            out.queue_url().map(str::to_string).ok_or_else(|| {
                SqsError::Sdk(format!("CreateQueue for {name:?} returned no URL").into())
            })
        }
        Err(e) => Err(e.into_sqs_error()),
    }
}
