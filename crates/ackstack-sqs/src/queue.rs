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
    /// The queue's redrive limit (`maxReceiveCount`), and whether to trust it.
    pub(crate) broker_limit: Option<ackstack_core::BrokerLimit>,
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

/// A queue's native redrive policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RedrivePolicy {
    /// Receives after which SQS moves a message away.
    pub(crate) max_receive_count: u32,
    /// The dead-letter queue's name and owning account, from its ARN.
    pub(crate) dlq_name: String,
    pub(crate) dlq_account: Option<String>,
}

impl RedrivePolicy {
    /// Reads the `RedrivePolicy` attribute's JSON
    /// (`{"deadLetterTargetArn":"arn:aws:sqs:REGION:ACCOUNT:NAME","maxReceiveCount":5}`, the
    /// count as a number or a string).
    pub(crate) fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let count = match value.get("maxReceiveCount") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let max_receive_count = count
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("no maxReceiveCount")?;
        let arn = value
            .get("deadLetterTargetArn")
            .and_then(serde_json::Value::as_str)
            .ok_or("no deadLetterTargetArn")?;
        let parts: Vec<&str> = arn.split(':').collect();
        let [_, _, _, _, account, name] = parts[..] else {
            return Err(format!(
                "deadLetterTargetArn {arn:?} is not an SQS queue ARN"
            ));
        };
        if name.is_empty() {
            return Err(format!("deadLetterTargetArn {arn:?} names no queue"));
        }
        Ok(RedrivePolicy {
            max_receive_count,
            dlq_name: name.to_string(),
            dlq_account: (!account.is_empty()).then(|| account.to_string()),
        })
    }
}

/// What ackstack reads from the work queue's own attributes at start.
#[derive(Debug, Default)]
pub(crate) struct QueueAttributes {
    /// Its `RedrivePolicy`, when asked for and set.
    pub(crate) redrive: Option<RedrivePolicy>,
    /// Its `VisibilityTimeout`, when asked for and readable.
    pub(crate) visibility: Option<Duration>,
}

/// Reads the queue's redrive policy (when `redrive`) and its visibility timeout (when
/// `visibility`) in one `GetQueueAttributes` call. A refusal to read them (no
/// `sqs:GetQueueAttributes` permission) is logged and read as neither; other errors are
/// returned.
pub(crate) async fn queue_attributes(
    client: &Client,
    url: &str,
    redrive: bool,
    visibility: bool,
    timeout: Duration,
) -> Result<QueueAttributes, SqsError> {
    if !redrive && !visibility {
        return Ok(QueueAttributes::default());
    }
    let mut request = client.get_queue_attributes().queue_url(url);
    if redrive {
        request = request.attribute_names(QueueAttributeName::RedrivePolicy);
    }
    if visibility {
        request = request.attribute_names(QueueAttributeName::VisibilityTimeout);
    }
    let answer = match bounded("GetQueueAttributes", timeout, request.send()).await {
        Ok(answer) => answer,
        Err(e) => {
            let e = e.into_sqs_error();
            if e.is_permanent() {
                tracing::warn!(
                    error = %e, queue = url,
                    "cannot read the queue's attributes; if it has a redrive policy, SQS may \
                     move messages away before ackstack's retries are done"
                );
                return Ok(QueueAttributes::default());
            }
            return Err(e);
        }
    };
    let attributes = answer.attributes();
    let read = |name: &QueueAttributeName| {
        attributes
            .and_then(|a| a.get(name))
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    };
    let redrive = match read(&QueueAttributeName::RedrivePolicy) {
        Some(json) => Some(RedrivePolicy::parse(json).map_err(|why| {
            SqsError::Config(format!("the queue's RedrivePolicy {json:?}: {why}"))
        })?),
        None => None,
    };
    let visibility = read(&QueueAttributeName::VisibilityTimeout)
        .and_then(|secs| secs.parse::<u64>().ok())
        .map(Duration::from_secs)
        .filter(|d| !d.is_zero());
    Ok(QueueAttributes {
        redrive,
        visibility,
    })
}

/// The URL of the queue named `name` owned by `account` (another account's queue, by its
/// ARN), never created.
pub(crate) async fn owned_queue_url(
    client: &Client,
    name: &str,
    account: Option<&str>,
    timeout: Duration,
) -> Result<String, SqsError> {
    lookup_queue_url(client, name, account, timeout)
        .await?
        .ok_or_else(|| SqsError::QueueNotFound(name.to_string()))
}

/// `GetQueueUrl` for `name` (owned by `account`, if given): `None` when it does not exist.
async fn lookup_queue_url(
    client: &Client,
    name: &str,
    account: Option<&str>,
    timeout: Duration,
) -> Result<Option<String>, SqsError> {
    let mut request = client.get_queue_url().queue_name(name);
    if let Some(account) = account {
        request = request.queue_owner_aws_account_id(account);
    }
    match bounded("GetQueueUrl", timeout, request.send()).await {
        Ok(out) => out
            .queue_url()
            .map(|url| Some(url.to_string()))
            .ok_or_else(|| {
                SqsError::Sdk(format!("GetQueueUrl for {name:?} returned no URL").into())
            }),
        Err(CallError::Sdk(e)) if is_missing_queue(&e) => Ok(None),
        Err(e) => Err(e.into_sqs_error()),
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
    if let Some(url) = lookup_queue_url(client, name, None, timeout).await? {
        return Ok(url);
    }
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
    out.queue_url()
        .map(str::to_string)
        .ok_or_else(|| SqsError::Sdk(format!("CreateQueue for {name:?} returned no URL").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redrive_policy_reads_as_sqs_writes_it() {
        let policy = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:123456789012:team-dlq","maxReceiveCount":"5"}"#,
        )
        .unwrap();
        assert_eq!(policy.max_receive_count, 5);
        assert_eq!(policy.dlq_name, "team-dlq");
        assert_eq!(policy.dlq_account.as_deref(), Some("123456789012"));
        let numeric = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:1:d.fifo","maxReceiveCount":3}"#,
        )
        .unwrap();
        assert_eq!(numeric.max_receive_count, 3);
        for bad in [
            "",
            "{}",
            r#"{"maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"team-dlq","maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"arn:aws:sqs:r:1:d","maxReceiveCount":-1}"#,
        ] {
            assert!(RedrivePolicy::parse(bad).is_err(), "{bad}");
        }
    }
}
