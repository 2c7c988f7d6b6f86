//! [`RabbitPublisher`]: confirmed, persistent publishing to the work queue, plus queue
//! helpers for tests and tools (read the DLQ, count and purge queues).

use ackstack_core::{Headers, Message, Publish, PublishError};
use bytes::Bytes;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use crate::amqp::{self, PERSISTENT, bounded};
use crate::config::RabbitConfig;
use crate::error::RabbitError;
use crate::headers::{KEY_HEADER, headers_from_table, long_string, table_from_headers};

/// Publishes to the configured work queue through the default exchange, persistent, and
/// waits for the broker's publisher confirm. Reconnects on the next call after a failure;
/// each step of a reconnect, like every other broker call here, is bounded by
/// [`RabbitConfig::operation_timeout`] (the confirm by `confirm_timeout`).
pub struct RabbitPublisher {
    config: RabbitConfig,
    link: tokio::sync::Mutex<Option<Link>>,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

/// A message read from a queue with [`RabbitPublisher::get`].
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The body.
    pub payload: Bytes,
    /// The AMQP properties, with the typed header table.
    pub properties: BasicProperties,
    /// The headers in ackstack's byte form (see [`crate::headers_from_table`]).
    pub headers: Headers,
}

impl Fetched {
    /// The typed AMQP header table (empty when the message had none).
    pub fn table(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// One typed header value.
    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get(name).cloned())
    }
}

impl RabbitPublisher {
    /// Connects and, when the config says so, declares the topology.
    pub async fn connect(config: RabbitConfig) -> Result<Self, RabbitError> {
        config.validate()?;
        let publisher = RabbitPublisher {
            config,
            link: tokio::sync::Mutex::new(None),
        };
        publisher.channel().await?;
        if publisher.config.declare_topology.declares() {
            let link = publisher.link.lock().await;
            if let Some(link) = link.as_ref() {
                amqp::declare_topology(&link.connection, &publisher.config).await?;
            }
        }
        Ok(publisher)
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// A confirm-mode channel, reconnecting if the previous one is gone.
    async fn channel(&self) -> Result<Channel, RabbitError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.channel.status().connected()
            && l.connection.status().connected()
        {
            return Ok(l.channel.clone());
        }
        let connection = amqp::connect(&self.config, "publisher").await?;
        let channel = amqp::confirm_channel(&connection, self.config.operation_timeout).await?;
        *link = Some(Link {
            connection,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Publishes `message` to `queue` (any queue, through the default exchange) with
    /// confirms.
    pub async fn publish_to(&self, queue: &str, message: Message) -> Result<(), RabbitError> {
        let mut table = table_from_headers(&message.headers);
        if let Some(key) = &message.key {
            table.insert(
                KEY_HEADER.into(),
                AMQPValue::LongString(key.to_vec().into()),
            );
        }
        self.publish_raw(queue, message.payload, table, message.message_id)
            .await
    }

    /// Publishes with a typed AMQP header table (for tests of typed values and tools).
    pub async fn publish_raw(
        &self,
        queue: &str,
        payload: Bytes,
        headers: FieldTable,
        message_id: Option<String>,
    ) -> Result<(), RabbitError> {
        // The produce time consumers measure queue time from (AMQP timestamps are seconds).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers)
            .with_timestamp(now);
        if let Some(id) = message_id {
            let id = ShortString::try_new(id.clone()).map_err(|_| RabbitError::InvalidName(id))?;
            properties = properties.with_message_id(id);
        }
        let channel = self.channel().await?;
        amqp::publish_confirmed(
            &channel,
            queue,
            &payload,
            properties,
            self.config.confirm_timeout,
        )
        .await
    }

    /// Takes one message from `queue` (`basic.get` with auto-ack), or `None` when empty.
    pub async fn get(&self, queue: &str) -> Result<Option<Fetched>, RabbitError> {
        let channel = self.channel().await?;
        let got = bounded(
            "basic.get",
            self.config.operation_timeout,
            channel.basic_get(amqp::short(queue)?, BasicGetOptions { no_ack: true }),
        )
        .await?;
        Ok(got.map(|m| {
            let d = m.delivery;
            Fetched {
                headers: headers_from_table(d.properties.headers().as_ref()),
                payload: Bytes::from(d.data),
                properties: d.properties,
            }
        }))
    }

    /// Takes one message from the dead-letter queue.
    pub async fn get_dead_letter(&self) -> Result<Option<Fetched>, RabbitError> {
        self.get(&self.config.dlq_name()).await
    }

    /// How many ready messages `queue` holds (not counting unacked deliveries).
    pub async fn queue_len(&self, queue: &str) -> Result<u32, RabbitError> {
        // A passive declare of a missing queue closes the channel: use a throwaway one.
        let connection = {
            self.channel().await?;
            let link = self.link.lock().await;
            match link.as_ref() {
                Some(l) => {
                    let open = l.connection.create_channel();
                    bounded("channel open", self.config.operation_timeout, open).await?
                }
                None => return Err(RabbitError::Timeout("publisher connection")),
            }
        };
        let declare = connection.queue_declare(
            amqp::short(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        );
        let queue = bounded("queue.declare", self.config.operation_timeout, declare).await?;
        let _ = connection.close(200, "ok".into()).await;
        Ok(queue.message_count())
    }

    /// Removes every ready message from `queue`; returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u32, RabbitError> {
        let channel = self.channel().await?;
        let purge = channel.queue_purge(amqp::short(queue)?, QueuePurgeOptions::default());
        bounded("queue.purge", self.config.operation_timeout, purge).await
    }
}

impl Publish for RabbitPublisher {
    /// Publishes to the work queue; the ordering key travels in the `x-ackstack-key` header.
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        self.publish_to(&self.config.queue, message)
            .await
            .map_err(|e| {
                if refuses_message(&e) {
                    PublishError::refused(e)
                } else {
                    PublishError::new(e)
                }
            })
    }
}

/// Whether the broker (or the client, before sending) refused this message itself: a
/// message id or header name that is not an AMQP short string, or a body over the broker's
/// `max_message_size` (the channel is closed with "larger than configured max size").
fn refuses_message(error: &RabbitError) -> bool {
    match error {
        RabbitError::InvalidName(_) => true,
        RabbitError::Amqp(e) => e.to_string().contains("larger than configured max size"),
        _ => false,
    }
}

/// A header value as an AMQP long string (for [`RabbitPublisher::publish_raw`]).
pub fn text_value(text: &str) -> AMQPValue {
    long_string(text)
}
