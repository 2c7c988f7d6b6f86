//! [`NatsSource`]: connecting, finding (or creating) the stream, its dead-letter stream and
//! the durable pull consumer, and receiving in batches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::adapter::{Retried, attempt_from_count};
use ackstack_core::{
    Alone, BrokerLimit, Capabilities, Delivery, Origin, Received, Source, SourceError,
};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use crate::config::{KeySource, NatsConfig};
use crate::error::{NatsError, bounded};
use crate::headers::{self, MESSAGE_ID_HEADER};
use crate::settler::NatsSettler;
use crate::stats::{Counters, NatsStats};
use crate::token::{NatsToken, TokenInner};

/// What the source and its settler share about the resolved consumer.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) consumer: PullConsumer,
    /// The consumer's own `ack_wait`: the lease.
    pub(crate) ack_wait: Duration,
    /// The consumer's own `max_deliver`, when it has one.
    pub(crate) max_deliver: Option<u32>,
    /// Whether the consumer had acks pending at connect: deliveries of an earlier process,
    /// maybe crashed, may come back, so receives are careful from the start.
    pub(crate) pending_at_start: bool,
    pub(crate) dlq_subject: String,
    /// Stream sequences this process nak'ed, with the attempt they were on.
    pub(crate) retried: Retried<u64>,
    pub(crate) counters: Counters,
}

/// A JetStream durable pull consumer as an ackstack [`Source`].
///
/// Each [`receive`](Source::receive) is one fetch of at most the runner's free room (and
/// [`NatsConfig::max_batch`]), which returns after [`NatsConfig::fetch_wait`] when nothing
/// comes. A delivery's `attempt` is JetStream's delivery count (`num_delivered`), its
/// `message_id` the `Nats-Msg-Id` header or else `<stream>:<sequence>`, its key the subject
/// (or a header, [`NatsConfig::key`]), and its origin's offset the stream sequence. The
/// lease is the consumer's `ack_wait`.
#[derive(Debug)]
pub struct NatsSource {
    shared: Arc<Resolved>,
    settler: NatsSettler,
    closed: bool,
}

impl NatsSource {
    /// Connects and finds the stream, the dead-letter stream and the consumer, creating the
    /// missing ones where [`NatsConfig::create`] allows; existing ones are used as they are.
    pub async fn connect(config: NatsConfig) -> Result<NatsSource, NatsError> {
        config.validate()?;
        let limit = config.operation_timeout;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(limit)
            .connect(config.url.as_str())
            .await
            .map_err(|e| NatsError::Connect(e.to_string()))?;
        NatsSource::from_client(client, config).await
    }

    /// As [`NatsSource::connect`], on a client the application already has (its TLS,
    /// credentials and reconnect settings are kept).
    pub async fn from_client(
        client: async_nats::Client,
        config: NatsConfig,
    ) -> Result<NatsSource, NatsError> {
        config.validate()?;
        let limit = config.operation_timeout;
        let js = jetstream::new(client.clone());
        let stream = find_stream(&js, &config, &config.stream, &subjects(&config), limit).await?;
        let dlq_subject = config.dlq_subject();
        find_stream(
            &js,
            &config,
            &config.dlq_stream(),
            std::slice::from_ref(&dlq_subject),
            limit,
        )
        .await?;
        let consumer = find_consumer(&stream, &config, limit).await?;
        let info = bounded("consumer info", limit, consumer.get_info()).await?;
        let ack_wait = info.config.ack_wait;
        if info.config.ack_policy != AckPolicy::Explicit {
            return Err(NatsError::Topology(format!(
                "consumer {} acks with {:?}; ackstack needs AckPolicy::Explicit",
                config.consumer, info.config.ack_policy
            )));
        }
        let max_deliver = u32::try_from(info.config.max_deliver)
            .ok()
            .filter(|&n| n > 0);
        let pending_at_start = info.num_ack_pending > 0;
        let shared = Arc::new(Resolved {
            config,
            client,
            js,
            consumer,
            ack_wait,
            max_deliver,
            pending_at_start,
            dlq_subject,
            retried: Retried::default(),
            counters: Counters::default(),
        });
        Ok(NatsSource {
            settler: NatsSettler::new(shared.clone()),
            shared,
            closed: false,
        })
    }

    /// What this source and its settler sent so far.
    pub fn stats(&self) -> NatsStats {
        self.shared.counters.snapshot()
    }

    /// The client this source reads through (for a publisher on the same connection).
    pub fn client(&self) -> async_nats::Client {
        self.shared.client.clone()
    }

    fn convert(&self, message: jetstream::Message) -> Option<Received<NatsToken>> {
        let (stream_seq, delivered, published) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                info.delivered,
                u64::try_from(info.published.unix_timestamp_nanos()).ok(),
            ),
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "JetStream message without ack metadata skipped");
                return None;
            }
        };
        let reply = message.reply.clone()?;
        let config = &self.shared.config;
        let headers = headers::from_nats(message.headers.as_ref());
        let key = match &config.key {
            KeySource::Subject => Some(Bytes::copy_from_slice(message.subject.as_bytes())),
            KeySource::Header(name) => headers.get(name).cloned(),
            KeySource::None => None,
        };
        let message_id = headers
            .get_str(MESSAGE_ID_HEADER)
            .map(str::to_string)
            .or_else(|| Some(format!("{}:{stream_seq}", config.stream)));
        let counted = attempt_from_count(u64::try_from(delivered).ok());
        // A delivery this process nak'ed comes back at least one attempt later. (nats-server
        // 2.9 was seen to redeliver a message nak'ed with a delay with its count still 1.)
        let delayed = self.shared.retried.take(&stream_seq);
        let attempt = delayed.map_or(counted, |then| counted.max(then.saturating_add(1)));
        let mut origin = Origin::new("nats", config.stream.as_str(), config.consumer.as_str());
        origin.offset = i64::try_from(stream_seq).ok();
        let delivery = Delivery {
            payload: message.payload.clone(),
            headers,
            key,
            message_id,
            attempt,
            origin,
            produced_at: published.and_then(|ns| {
                std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_nanos(ns))
            }),
        };
        let token = NatsToken(Arc::new(TokenInner {
            reply,
            subject: message.subject.clone(),
            stream_seq,
            delivered: attempt,
            renewed: Mutex::new(Instant::now()),
        }));
        // Delivered before and never settled by this process: it may have been in flight when
        // a consumer died, so it runs alone.
        let suspect = attempt > 1 && delayed.is_none_or(|then| then.saturating_add(1) != attempt);
        Some(Received::new(delivery, token).suspect(suspect))
    }
}

impl Source for NatsSource {
    type Token = NatsToken;
    type Settler = NatsSettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<NatsToken>>, SourceError> {
        if self.closed {
            return Ok(Vec::new());
        }
        let config = &self.shared.config;
        let n = max.clamp(1, config.max_batch);
        let wait = config.fetch_wait;
        self.shared.counters.fetches.add(1);
        let limit = wait + config.operation_timeout;
        let mut out = Vec::new();
        let fetch = async {
            let mut batch = self
                .shared
                .consumer
                .fetch()
                .max_messages(n)
                .expires(wait)
                .messages()
                .await
                .map_err(|e| SourceError::Broker(Box::new(e)))?;
            while let Some(item) = batch.next().await {
                match item {
                    Ok(message) => out.extend(self.convert(message)),
                    // What came before the error is kept: it was handed to us.
                    Err(e) if out.is_empty() => return Err(SourceError::Broker(e)),
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch ended early");
                        break;
                    }
                }
            }
            Ok(())
        };
        // A fetch whose request the server lost (a reconnect) would wait for ever. What it
        // handed out before the bound is kept: dropped, it would come back after ack_wait,
        // one delivery higher.
        let ended = tokio::time::timeout(limit, fetch).await;
        self.shared.counters.received.add(out.len() as u64);
        match ended {
            Ok(Ok(())) => Ok(out),
            Ok(Err(e)) => Err(e),
            Err(_) if !out.is_empty() => Ok(out),
            Err(_) => Err(SourceError::Disconnected(
                format!("no answer to a fetch in {limit:?}").into(),
            )),
        }
    }

    fn settler(&self) -> NatsSettler {
        self.settler.clone()
    }

    /// Acks in batches (4 calls at once), a lease of the consumer's `ack_wait`, retries
    /// delayed by the server (`-NAK` with a delay). JetStream's delivery count rises with every
    /// delivery, so, as on SQS, suspects run with nothing else in flight and receives are
    /// careful (one at a time) for one and a half leases after each suspect, and after the
    /// start when the consumer had acks pending then (an earlier process's deliveries may
    /// come back). A consumer's own `max_deliver` is the broker's limit.
    fn capabilities(&self) -> Capabilities {
        let lease = self.shared.ack_wait;
        let caps = Capabilities::new(self.shared.config.max_batch)
            .with_lease(lease)
            .with_max_retry_delay(Duration::from_secs(12 * 3600))
            .with_parallel_acks(4)
            .with_alone(Alone::InFlight)
            .with_careful_receives(lease + lease / 2);
        let caps = if self.shared.pending_at_start {
            caps
        } else {
            caps.without_careful_start()
        };
        match self.shared.max_deliver {
            Some(n) => caps.with_broker_limit(BrokerLimit::new(n, false)),
            None => caps,
        }
    }

    fn origin(&self) -> Origin {
        let config = &self.shared.config;
        Origin::new("nats", config.stream.as_str(), config.consumer.as_str())
    }

    async fn close(&mut self) {
        self.closed = true;
    }
}

/// The subjects of a stream ackstack creates: the configured ones, or the stream's name.
fn subjects(config: &NatsConfig) -> Vec<String> {
    if config.subjects.is_empty() {
        vec![config.stream.clone()]
    } else {
        config.subjects.clone()
    }
}

/// The stream `name`, created with `subjects` when it is missing and creating is allowed.
async fn find_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    name: &str,
    subjects: &[String],
    limit: Duration,
) -> Result<stream::Stream, NatsError> {
    match tokio::time::timeout(limit, js.get_stream(name)).await {
        Err(_) => Err(NatsError::Call(format!(
            "looking up stream {name}: no answer in {limit:?}"
        ))),
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            let missing = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !missing {
                return Err(NatsError::Call(format!("looking up stream {name}: {e}")));
            }
            if !config.create {
                return Err(NatsError::Topology(format!(
                    "stream {name} does not exist and create is off"
                )));
            }
            let stream_config = stream::Config {
                name: name.to_string(),
                subjects: subjects.to_vec(),
                ..Default::default()
            };
            bounded("creating a stream", limit, js.create_stream(stream_config))
                .await
                .map_err(|e| NatsError::Topology(e.to_string()))
        }
    }
}

/// The durable consumer: adopted as it is when it exists, else created.
async fn find_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
    limit: Duration,
) -> Result<PullConsumer, NatsError> {
    let name = config.consumer.as_str();
    if let Ok(Ok(consumer)) =
        tokio::time::timeout(limit, stream.get_consumer::<pull::Config>(name)).await
    {
        return Ok(consumer);
    }
    if !config.create {
        return Err(NatsError::Topology(format!(
            "consumer {name} does not exist (or cannot be read) and create is off"
        )));
    }
    let consumer_config = pull::Config {
        durable_name: Some(name.to_string()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver.map_or(-1, i64::from),
        ..Default::default()
    };
    bounded(
        "creating the consumer",
        limit,
        stream.get_or_create_consumer(name, consumer_config),
    )
    .await
    .map_err(|e| NatsError::Topology(e.to_string()))
}
