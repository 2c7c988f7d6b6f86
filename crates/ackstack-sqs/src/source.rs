//! [`SqsSource`]: receives with long polling.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::adapter::parse_attempt;
use ackstack_core::deadletter::ATTEMPT_HEADER;
use ackstack_core::{
    Backoff, BrokerLimit, Capabilities, Delivery, Headers, Origin, Received, Source, SourceError,
};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use bytes::Bytes;

use crate::config::{
    DEFAULT_VISIBILITY, MAX_VISIBILITY, Redrive, SqsConfig, duration_secs_ceil, is_url,
    name_from_url,
};
use crate::error::{ErrorClass, SqsError, classify_sdk, describe, is_missing_queue};
use crate::headers::{MESSAGE_ID_ATTRIBUTE, SYSTEM_ATTRIBUTE_PREFIX, append_attributes};
use crate::queue::{
    QueueInfo, build_client, max_message_size, owned_queue_url, queue_attributes,
    resolve_queue_url_within,
};
use crate::settler::SqsSettler;
use crate::stats::{Counters, SqsStats};
use crate::token::{SqsToken, TokenInner};

/// An SQS queue as an ackstack [`Source`].
///
/// Each [`receive`](Source::receive) is one `ReceiveMessage` call with long polling (up to
/// [`SqsConfig::wait_time_seconds`]), at most 10 messages, all message and system attributes,
/// and the configured visibility timeout as the lease. A delivery's `attempt` is SQS's
/// `ApproximateReceiveCount` (1 when missing or malformed), counted from the
/// `x-ackstack-attempt` attribute of a deferred copy (see [`SqsSettler`]), its `key` the FIFO
/// `MessageGroupId`, its `message_id` the [`MESSAGE_ID_ATTRIBUTE`](crate::MESSAGE_ID_ATTRIBUTE)
/// its publisher set (as [`SqsPublisher`](crate::SqsPublisher) does), else the SQS `MessageId`.
pub struct SqsSource {
    client: Client,
    queue: Arc<QueueInfo>,
    settler: SqsSettler,
    stats: Arc<Counters>,
    closed: bool,
}

impl fmt::Debug for SqsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsSource")
            .field("queue", &self.queue.name)
            .field("closed", &self.closed)
            .finish()
    }
}

impl SqsSource {
    /// Validates `config`, builds a client with [`build_client`], and resolves the queue and
    /// its dead-letter queue. A missing dead-letter queue is an error here (unless
    /// `create_queues`), not at the first dead-lettering.
    pub async fn connect(config: SqsConfig) -> Result<Self, SqsError> {
        config.validate()?;
        let client = build_client(&config).await;
        SqsSource::from_client(client, config).await
    }

    /// The same with an existing client; the config's endpoint and region are ignored.
    pub async fn from_client(client: Client, config: SqsConfig) -> Result<Self, SqsError> {
        config.validate()?;
        let name = config.queue_name()?;
        let url = match &config.queue_url {
            Some(url) => url.clone(),
            None => {
                resolve_queue_url_within(
                    &client,
                    &name,
                    config.create_queues,
                    config.operation_timeout,
                )
                .await?
            }
        };
        let attributes = queue_attributes(
            &client,
            &url,
            config.redrive != Redrive::Ignore,
            config.visibility_timeout.is_none(),
            config.operation_timeout,
        )
        .await?;
        let redrive = attributes.redrive;
        let visibility = lease(&config, attributes.visibility, &name);
        let mut dlq_name = config.dead_letter_queue_name()?;
        let dlq_url = match (&config.dead_letter_queue, &redrive) {
            (Some(dlq), _) if is_url(dlq) => dlq.clone(),
            // The queue's own dead-letter queue, unless the config names another.
            (None, Some(policy)) => {
                dlq_name = policy.dlq_name.clone();
                owned_queue_url(
                    &client,
                    &policy.dlq_name,
                    policy.dlq_account.as_deref(),
                    config.operation_timeout,
                )
                .await?
            }
            _ => {
                resolve_queue_url_within(
                    &client,
                    &dlq_name,
                    config.create_queues,
                    config.operation_timeout,
                )
                .await?
            }
        };
        let dlq_fifo = name_from_url(&dlq_url)
            .unwrap_or(&dlq_name)
            .ends_with(".fifo");
        let dlq_max_size = max_message_size(&client, &dlq_url, config.operation_timeout).await;
        let queue = Arc::new(QueueInfo {
            url,
            name: name.into(),
            dlq_url,
            dlq_fifo,
            consumer: config.consumer_name.clone().into(),
            visibility,
            visibility_secs: duration_secs_ceil(visibility),
            wait_secs: i32::try_from(config.wait_time_seconds).unwrap_or(20),
            max_messages: usize::try_from(config.max_messages).unwrap_or(10),
            parallel_acks: config.parallel_acks.max(1),
            system_headers: config.system_attribute_headers,
            timeout: config.operation_timeout,
            dlq_max_size,
            broker_limit: redrive.map(|policy| {
                BrokerLimit::new(policy.max_receive_count, config.redrive == Redrive::Trust)
            }),
        });
        let stats = Arc::new(Counters::default());
        let settler = SqsSettler::new(
            client.clone(),
            queue.clone(),
            stats.clone(),
            Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2)).equal_jitter(),
        );
        Ok(SqsSource {
            client,
            queue,
            settler,
            stats,
            closed: false,
        })
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue.url
    }

    /// The dead-letter queue's URL.
    pub fn dead_letter_queue_url(&self) -> &str {
        &self.queue.dlq_url
    }

    /// The limit of each SQS call ([`SqsConfig::operation_timeout`]).
    pub fn operation_timeout(&self) -> Duration {
        self.queue.timeout
    }

    /// The adapter's counters so far.
    pub fn stats(&self) -> SqsStats {
        self.stats.snapshot()
    }

    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.stats.clone()
    }

    fn convert(&self, m: aws_sdk_sqs::types::Message) -> Option<Received<SqsToken>> {
        let Some(receipt_handle) = m.receipt_handle else {
            tracing::warn!(message_id = ?m.message_id, "SQS message without a receipt handle skipped");
            return None;
        };
        let system = m.attributes.unwrap_or_default();
        let attributes = m.message_attributes.unwrap_or_default();
        // `ApproximateReceiveCount`: 1 when missing, malformed or zero.
        let receives = parse_attempt(
            system
                .get(&MessageSystemAttributeName::ApproximateReceiveCount)
                .map(String::as_bytes),
        );
        // A deferred copy starts its count at the attempt its original was on.
        let base = parse_attempt(
            attributes
                .get(ATTEMPT_HEADER)
                .and_then(|v| v.string_value())
                .map(str::as_bytes),
        );
        let attempt = base.saturating_add(receives - 1);
        let group_id = system
            .get(&MessageSystemAttributeName::MessageGroupId)
            .cloned();
        let mut headers = Headers::new();
        append_attributes(&attributes, &mut headers);
        if self.queue.system_headers {
            let mut names: Vec<(&str, &String)> =
                system.iter().map(|(k, v)| (k.as_str(), v)).collect();
            names.sort();
            for (name, value) in names {
                headers.append(
                    format!("{SYSTEM_ATTRIBUTE_PREFIX}{name}"),
                    Bytes::copy_from_slice(value.as_bytes()),
                );
            }
        }
        // The publisher's id when it gave one, else SQS's.
        let message_id = headers
            .get_str(MESSAGE_ID_ATTRIBUTE)
            .map(str::to_string)
            .or_else(|| m.message_id.clone());
        let delivery = Delivery {
            payload: Bytes::from(m.body.unwrap_or_default()),
            headers,
            key: group_id.clone().map(Bytes::from),
            message_id,
            attempt,
            origin: Origin::new("sqs", self.queue.name.clone(), self.queue.consumer.clone()),
            produced_at: system
                .get(&MessageSystemAttributeName::SentTimestamp)
                .and_then(|ms| ms.parse::<u64>().ok())
                .and_then(|ms| {
                    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
                }),
        };
        let token = SqsToken(Arc::new(TokenInner {
            receipt_handle,
            message_id: m.message_id,
            group_id,
            attributes,
            received_at: Instant::now(),
        }));
        // Received before and never settled (deleted, or delayed here for a retry): it may
        // have been in flight when a consumer died, so it runs alone.
        let suspect = receives > 1
            && !token
                .message_id()
                .is_some_and(|id| self.settler.retried.came_back(id, delivery.attempt));
        // (A retry whose ChangeMessageVisibility failed is released and comes back one
        // receive later too: taken for this process's own retry, it runs as usual.)
        Some(Received::new(delivery, token).suspect(suspect))
    }
}

impl Source for SqsSource {
    type Token = SqsToken;
    type Settler = SqsSettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<SqsToken>>, SourceError> {
        if self.closed {
            return Ok(Vec::new());
        }
        let n = max.clamp(1, self.queue.max_messages);
        self.stats.receive_calls.add(1);
        let call = self
            .client
            .receive_message()
            .queue_url(&self.queue.url)
            .max_number_of_messages(i32::try_from(n).unwrap_or(10))
            .wait_time_seconds(self.queue.wait_secs)
            .visibility_timeout(self.queue.visibility_secs)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        let limit = Duration::from_secs(u64::try_from(self.queue.wait_secs).unwrap_or(20))
            + self.queue.timeout;
        let out = match tokio::time::timeout(limit, call).await {
            Err(_) => {
                return Err(SourceError::Disconnected(
                    format!("ReceiveMessage did not answer within {limit:?}").into(),
                ));
            }
            Ok(Err(e)) => {
                let text = describe(&e);
                let missing = is_missing_queue(&e);
                return Err(match classify_sdk(&e) {
                    _ if missing => SourceError::Fatal(text.into()),
                    ErrorClass::Transient => match e {
                        aws_sdk_sqs::error::SdkError::ServiceError(_) => {
                            SourceError::Broker(text.into())
                        }
                        _ => SourceError::Disconnected(text.into()),
                    },
                    _ if is_auth_error(&e) => SourceError::Fatal(text.into()),
                    _ => SourceError::Broker(text.into()),
                });
            }
            Ok(Ok(out)) => out,
        };
        let messages = out.messages.unwrap_or_default();
        let mut received = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(r) = self.convert(m) {
                received.push(r);
            }
        }
        self.stats.received.add(received.len() as u64);
        Ok(received)
    }

    fn settler(&self) -> SqsSettler {
        self.settler.clone()
    }

    /// Deletes in batches of 10; the visibility timeout as the lease; retries delayed up to
    /// 12 hours. SQS counts every receive, so for one and a half visibility timeouts after the
    /// start and after each suspect the runner receives one message at a time: the messages
    /// a crashed consumer held come back within one visibility timeout of the crash, and each
    /// then runs alone without others waiting beside it (see `Capabilities::careful_for`).
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(10)
            .with_lease(self.queue.visibility)
            .with_max_retry_delay(MAX_VISIBILITY)
            .with_parallel_acks(self.queue.parallel_acks)
            .with_careful_receives(self.queue.visibility + self.queue.visibility / 2);
        // A FIFO queue has no per-message delay: a deferral there is a retry.
        if !self.queue.name.ends_with(".fifo") {
            caps = caps.with_deferrals();
        }
        match self.queue.broker_limit {
            Some(limit) => caps.with_broker_limit(limit),
            None => caps,
        }
    }

    fn origin(&self) -> Origin {
        Origin::new("sqs", self.queue.name.clone(), self.queue.consumer.clone())
    }

    async fn close(&mut self) {
        self.closed = true;
    }
}

/// The lease: the configured visibility timeout, else the queue's own (`read`), else
/// [`DEFAULT_VISIBILITY`] when the queue's could not be read. Logged at info when it comes
/// from the queue.
fn lease(config: &SqsConfig, read: Option<Duration>, queue: &str) -> Duration {
    if let Some(configured) = config.visibility_timeout {
        return configured;
    }
    match read {
        Some(own) => {
            let lease = own.min(MAX_VISIBILITY);
            tracing::info!(
                queue,
                lease_secs = lease.as_secs(),
                "no visibility_timeout configured; the queue's own VisibilityTimeout is the lease"
            );
            lease
        }
        None => DEFAULT_VISIBILITY,
    }
}

fn is_auth_error<E: aws_sdk_sqs::error::ProvideErrorMetadata>(
    e: &aws_sdk_sqs::error::SdkError<E>,
) -> bool {
    use aws_sdk_sqs::error::ProvideErrorMetadata as _;
    let code = e.code().unwrap_or("");
    matches!(
        code,
        "AccessDenied"
            | "AccessDeniedException"
            | "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "InvalidSecurity"
            | "MissingAuthenticationToken"
    )
}
