//! [`SqsConfig`]: which queue to consume, how to reach SQS, and how to poll.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::SqsError;

/// The environment variable read for an endpoint override when [`SqsConfig::endpoint`] is unset.
pub const ENDPOINT_ENV: &str = "SQS_ENDPOINT";
/// The longest visibility timeout (and so retry delay) SQS allows: 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// The longest long-poll wait SQS allows, in seconds.
pub const MAX_WAIT_TIME_SECONDS: u32 = 20;
/// The most messages one `ReceiveMessage` (or batch) call handles.
pub const MAX_BATCH: u32 = 10;
/// The lease when neither [`SqsConfig::visibility_timeout`] nor the queue's own
/// `VisibilityTimeout` is known (the queue's attributes could not be read).
pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);
/// The default [`SqsConfig::operation_timeout`].
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of an [`SqsSource`](crate::SqsSource).
///
/// Exactly one of [`queue_url`](SqsConfig::queue_url) and [`queue_name`](SqsConfig::queue_name)
/// must be set. A name is resolved with `GetQueueUrl` (and the queue created when
/// [`create_queues`](SqsConfig::create_queues) is set). A name ending in `.fifo` is a FIFO queue.
///
/// Durations take a unit: `"30s"`, `"250ms"`, `"5m"` (a bare number is refused).
///
/// ```
/// let config: ackstack_sqs::SqsConfig = serde_json::from_str(
///     r#"{"queue_name": "orders", "wait_time_seconds": 10, "visibility_timeout": "1m"}"#,
/// ).unwrap();
/// assert_eq!(config.dead_letter_queue_name().unwrap(), "orders-dlq");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SqsConfig {
    /// The queue's URL. Its last path segment is taken as the queue name.
    pub queue_url: Option<String>,
    /// The queue's name, resolved with `GetQueueUrl`.
    pub queue_name: Option<String>,
    /// Create the queue and its dead-letter queue when they do not exist (default `false`).
    pub create_queues: bool,
    /// An endpoint override (an emulator such as moto, or a VPC endpoint). When unset, the
    /// `SQS_ENDPOINT` environment variable is used if present, else the SDK's own resolution.
    pub endpoint: Option<String>,
    /// The AWS region. When unset, aws-config's default chain decides (`AWS_REGION`, profile…).
    pub region: Option<String>,
    /// Long-poll wait of each `ReceiveMessage` call, 0 to 20 seconds (default 20).
    /// [`Source::receive`](ackstack_core::Source::receive) returns within about this long.
    pub wait_time_seconds: u32,
    /// Most messages per `ReceiveMessage` call, 1 to 10 (default 10).
    pub max_messages: u32,
    /// The lease: visibility timeout requested on every receive, whole seconds from 1 s to 12 h.
    /// Sub-second parts are rounded up. Default: the queue's own `VisibilityTimeout`, read at
    /// start (30 s when it cannot be read, or is 0).
    #[serde(with = "ackstack_core::config::duration::option")]
    pub visibility_timeout: Option<Duration>,
    /// The dead-letter queue: a name or an `http(s)://` URL. Default: the queue's own
    /// redrive target when it has a redrive policy (see [`Redrive`]), else `<queue>-dlq`
    /// (`<base>-dlq.fifo` for a FIFO queue `<base>.fifo`).
    pub dead_letter_queue: Option<String>,
    /// The consumer name recorded in origins and dead-letter metadata (default `"ackstack"`).
    pub consumer_name: String,
    /// How many `DeleteMessageBatch` calls may run at once (default 4).
    pub parallel_acks: usize,
    /// Also expose SQS system attributes (`ApproximateReceiveCount`, `SentTimestamp`,
    /// `MessageGroupId`, …) as headers named `x-sqs-<Attribute>` (default `true`). They are never
    /// copied to dead-letter messages.
    pub system_attribute_headers: bool,
    /// The longest one SQS call may take, the SDK's own retries included, before it fails
    /// with a timeout (default 10 s): `ChangeMessageVisibility` (retry delays, lease
    /// extensions, releases), `DeleteMessageBatch` (each try), `SendMessage` (dead letters,
    /// [`SqsPublisher`](crate::SqsPublisher)), `GetQueueUrl` and `CreateQueue`. The SDK sets
    /// no such limit, so without it a stalled connection would hang the call forever.
    /// `ReceiveMessage` may take its long-poll wait plus this long.
    #[serde(with = "ackstack_core::config::duration")]
    pub operation_timeout: Duration,
    /// What to do with the queue's own redrive policy (see [`Redrive`]). Default `check`.
    pub redrive: Redrive,
}

/// How ackstack treats a queue's native redrive policy (`RedrivePolicy`: SQS moves a message
/// to its dead-letter queue after `maxReceiveCount` receives, unprocessed and without
/// ackstack's metadata). Either way, ackstack's own dead letters go to the policy's queue
/// unless [`SqsConfig::dead_letter_queue`] names another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Redrive {
    /// A `maxReceiveCount` not above `max_attempts` stops the start with an error naming
    /// both numbers and both fixes.
    #[default]
    Check,
    /// ackstack lowers its own `max_attempts` to `maxReceiveCount - 1` instead (logged).
    Trust,
    /// The policy is not read (no `sqs:GetQueueAttributes` call at start): no check, and
    /// dead letters go to [`SqsConfig::dead_letter_queue`] or `<queue>-dlq`.
    Ignore,
}

impl Default for SqsConfig {
    fn default() -> Self {
        SqsConfig {
            queue_url: None,
            queue_name: None,
            create_queues: false,
            endpoint: None,
            region: None,
            wait_time_seconds: MAX_WAIT_TIME_SECONDS,
            max_messages: MAX_BATCH,
            visibility_timeout: None,
            dead_letter_queue: None,
            consumer_name: "ackstack".to_string(),
            parallel_acks: 4,
            system_attribute_headers: true,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            redrive: Redrive::Check,
        }
    }
}

impl SqsConfig {
    /// A configuration for the queue named `name`, other fields at their defaults.
    pub fn queue(name: impl Into<String>) -> Self {
        SqsConfig {
            queue_name: Some(name.into()),
            ..SqsConfig::default()
        }
    }

    /// A configuration for the queue at `url`, other fields at their defaults.
    pub fn queue_url(url: impl Into<String>) -> Self {
        SqsConfig {
            queue_url: Some(url.into()),
            ..SqsConfig::default()
        }
    }

    /// With this endpoint override.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// With this region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// With this long-poll wait in seconds.
    pub fn with_wait_time_seconds(mut self, secs: u32) -> Self {
        self.wait_time_seconds = secs;
        self
    }

    /// With this many messages per receive call at most.
    pub fn with_max_messages(mut self, n: u32) -> Self {
        self.max_messages = n;
        self
    }

    /// With this visibility timeout (lease).
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }

    /// With this dead-letter queue (name or URL).
    pub fn with_dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(queue.into());
        self
    }

    /// With this timeout for each SQS call (see [`SqsConfig::operation_timeout`]).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Creating missing queues or not.
    pub fn with_create_queues(mut self, create: bool) -> Self {
        self.create_queues = create;
        self
    }

    /// With this consumer name.
    pub fn with_consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = name.into();
        self
    }

    /// Checks the fields against SQS's limits.
    pub fn validate(&self) -> Result<(), SqsError> {
        match (&self.queue_url, &self.queue_name) {
            (Some(_), Some(_)) => {
                return Err(SqsError::Config(
                    "set either queue_url or queue_name, not both".into(),
                ));
            }
            (None, None) => {
                return Err(SqsError::Config(
                    "one of queue_url or queue_name is required".into(),
                ));
            }
            _ => {}
        }
        let name = self.queue_name()?;
        if name.is_empty() {
            return Err(SqsError::Config("the queue name is empty".into()));
        }
        if self.wait_time_seconds > MAX_WAIT_TIME_SECONDS {
            return Err(SqsError::Config(format!(
                "wait_time_seconds {} exceeds SQS's maximum of {MAX_WAIT_TIME_SECONDS}",
                self.wait_time_seconds
            )));
        }
        if self.max_messages == 0 || self.max_messages > MAX_BATCH {
            return Err(SqsError::Config(format!(
                "max_messages {} must be between 1 and {MAX_BATCH}",
                self.max_messages
            )));
        }
        if self.operation_timeout.is_zero() {
            return Err(SqsError::Config(
                "operation_timeout must be longer than 0".into(),
            ));
        }
        if let Some(timeout) = self.visibility_timeout
            && (timeout.is_zero() || timeout > MAX_VISIBILITY)
        {
            return Err(SqsError::Config(format!(
                "visibility_timeout {timeout:?} must be between 1s and 12h"
            )));
        }
        Ok(())
    }

    /// The queue's name: [`queue_name`](SqsConfig::queue_name), or the last path segment of
    /// [`queue_url`](SqsConfig::queue_url).
    pub fn queue_name(&self) -> Result<String, SqsError> {
        if let Some(name) = &self.queue_name {
            return Ok(name.clone());
        }
        match &self.queue_url {
            Some(url) => name_from_url(url)
                .map(str::to_string)
                .ok_or_else(|| SqsError::Config(format!("no queue name in URL {:?}", redact(url)))),
            None => Err(SqsError::Config(
                "one of queue_url or queue_name is required".into(),
            )),
        }
    }

    /// Whether the queue is FIFO (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.queue_name()
            .map(|n| n.ends_with(".fifo"))
            .unwrap_or(false)
    }

    /// The dead-letter queue's name: the configured one, or the default derived from the queue.
    pub fn dead_letter_queue_name(&self) -> Result<String, SqsError> {
        if let Some(dlq) = &self.dead_letter_queue {
            if is_url(dlq) {
                return name_from_url(dlq).map(str::to_string).ok_or_else(|| {
                    SqsError::Config(format!("no queue name in URL {:?}", redact(dlq)))
                });
            }
            return Ok(dlq.clone());
        }
        Ok(default_dead_letter_name(&self.queue_name()?))
    }

    /// The endpoint override in effect: [`endpoint`](SqsConfig::endpoint), else the
    /// `SQS_ENDPOINT` environment variable when set and non-empty.
    pub fn effective_endpoint(&self) -> Option<String> {
        self.endpoint.clone().or_else(|| {
            std::env::var(ENDPOINT_ENV)
                .ok()
                .filter(|e| !e.trim().is_empty())
        })
    }
}

/// `<queue>-dlq`, or `<base>-dlq.fifo` for `<base>.fifo`.
pub fn default_dead_letter_name(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// Whole seconds, rounded up, capped at 12 hours.
pub(crate) fn duration_secs_ceil(d: Duration) -> i32 {
    let d = d.min(MAX_VISIBILITY);
    let mut secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs += 1;
    }
    i32::try_from(secs.min(MAX_VISIBILITY.as_secs())).unwrap_or(43_200)
}

pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The last non-empty path segment of a queue URL.
pub(crate) fn name_from_url(url: &str) -> Option<&str> {
    let path = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let (_, path) = path.split_once('/')?;
    path.rsplit('/').find(|s| !s.is_empty())
}

/// Replaces the user-info part of a URL (`user:password@`) with `***@`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

fn redact_opt(url: &Option<String>) -> Option<String> {
    url.as_deref().map(redact)
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConfig")
            .field("queue_url", &redact_opt(&self.queue_url))
            .field("queue_name", &self.queue_name)
            .field("create_queues", &self.create_queues)
            .field("endpoint", &redact_opt(&self.endpoint))
            .field("region", &self.region)
            .field("wait_time_seconds", &self.wait_time_seconds)
            .field("max_messages", &self.max_messages)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("dead_letter_queue", &redact_opt(&self.dead_letter_queue))
            .field("consumer_name", &self.consumer_name)
            .field("parallel_acks", &self.parallel_acks)
            .field("system_attribute_headers", &self.system_attribute_headers)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_urls_and_defaults() {
        let c = SqsConfig::queue_url("http://127.0.0.1:4566/123456789012/jobs.fifo");
        assert_eq!(c.queue_name().unwrap(), "jobs.fifo");
        assert!(c.is_fifo());
        assert_eq!(c.dead_letter_queue_name().unwrap(), "jobs-dlq.fifo");
        let c = SqsConfig::queue("jobs");
        assert!(!c.is_fifo());
        assert_eq!(c.dead_letter_queue_name().unwrap(), "jobs-dlq");
        let c = SqsConfig::queue("jobs").with_dead_letter_queue("https://sqs.x/1/other");
        assert_eq!(c.dead_letter_queue_name().unwrap(), "other");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validation_rejects_out_of_range() {
        assert!(SqsConfig::default().validate().is_err());
        assert!(
            SqsConfig::queue("q")
                .with_max_messages(11)
                .validate()
                .is_err()
        );
        assert!(
            SqsConfig::queue("q")
                .with_max_messages(0)
                .validate()
                .is_err()
        );
        assert!(
            SqsConfig::queue("q")
                .with_wait_time_seconds(21)
                .validate()
                .is_err()
        );
        assert!(
            SqsConfig::queue("q")
                .with_visibility_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        let both = SqsConfig {
            queue_url: Some("http://h/1/q".into()),
            ..SqsConfig::queue("q")
        };
        assert!(both.validate().is_err());
    }

    #[test]
    fn deserializes_and_redacts() {
        let c: SqsConfig = serde_json::from_str(
            r#"{"queue_url":"https://user:secret@h/1/q","visibility_timeout":"1m","wait_time_seconds":1}"#,
        )
        .unwrap();
        assert_eq!(c.visibility_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.wait_time_seconds, 1);
        assert_eq!(c.operation_timeout, DEFAULT_OPERATION_TIMEOUT);
        let c: SqsConfig =
            serde_json::from_str(r#"{"queue_name":"q","operation_timeout":"2500ms"}"#).unwrap();
        assert_eq!(c.operation_timeout, Duration::from_millis(2500));
        assert!(
            SqsConfig::queue("q")
                .with_operation_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(serde_json::from_str::<SqsConfig>(r#"{"nope":1}"#).is_err());
    }

    #[test]
    fn seconds_round_up_and_cap() {
        assert_eq!(duration_secs_ceil(Duration::from_millis(1)), 1);
        assert_eq!(duration_secs_ceil(Duration::from_millis(1000)), 1);
        assert_eq!(duration_secs_ceil(Duration::from_millis(1001)), 2);
        assert_eq!(duration_secs_ceil(Duration::ZERO), 0);
        assert_eq!(duration_secs_ceil(Duration::from_secs(u64::MAX)), 43_200);
    }
}
