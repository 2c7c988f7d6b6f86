//! RabbitMQ: the dead-letter queue read with `basic.get` (manual ack) and held unacked for the
//! length of the scan, so no other reader gets a letter twice and none is reordered: what is
//! kept is given back with `basic.nack(requeue)` in one go at the end (or by the broker, to
//! its place in the queue, if the command dies). A replay publishes with publisher confirms
//! and acks the dead letter only after the confirm.

use std::time::Duration;

use ackstack_core::DeadLetterMetadata;
use ackstack_core::deadletter::METADATA_PREFIX;
use ackstack_rabbitmq::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use ackstack_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use ackstack_rabbitmq::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use ackstack_rabbitmq::{DELIVERY_COUNT_HEADER, ORIGINAL_EXPIRATION_HEADER, headers_from_table};
use bytes::Bytes;

use crate::letter::{Letter, REPLAYS_HEADER, RESET_HEADERS, content_id, replays_of};
use crate::run::{CliError, DeadLetters, Found};

/// A scan of one RabbitMQ dead-letter queue.
pub struct RabbitDlq {
    connection: Connection,
    get: Channel,
    publish: Channel,
    queue: String,
    /// Letters in the queue when the scan began (known after the first get).
    total: Option<u64>,
    seen: u64,
    /// The highest delivery tag kept (all kept tags are nacked with `multiple` at the end).
    kept: Option<u64>,
    timeout: Duration,
}

/// A letter got from the queue, unacked.
pub struct Handle {
    tag: u64,
    payload: Bytes,
    properties: BasicProperties,
}

impl RabbitDlq {
    /// Connects to `uri` and prepares to scan `queue`.
    pub async fn open(uri: &str, queue: &str, timeout: Duration) -> Result<Self, CliError> {
        let props = ConnectionProperties::default().with_connection_name("ackstack-cli".into());
        let connection = bounded("connect", timeout, Connection::connect(uri, props)).await?;
        let get = bounded("channel open", timeout, connection.create_channel()).await?;
        let publish = bounded("channel open", timeout, connection.create_channel()).await?;
        bounded(
            "confirm.select",
            timeout,
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(RabbitDlq {
            connection,
            get,
            publish,
            queue: queue.to_string(),
            total: None,
            seen: 0,
            kept: None,
            timeout,
        })
    }
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CliError::broker(&format!("RabbitMQ {what}"), e)),
        Err(_) => Err(CliError::Broker(format!(
            "RabbitMQ {what}: timed out after {timeout:?}"
        ))),
    }
}

/// The letter's id: its AMQP message id, else the one in its metadata, else a
/// [`content_id`], which stays the same from scan to scan.
fn letter_of(payload: &Bytes, properties: &BasicProperties) -> Letter {
    let mut headers = headers_from_table(properties.headers().as_ref());
    let metadata = DeadLetterMetadata::from_headers(&headers);
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .or_else(|| metadata.as_ref().and_then(|m| m.message_id.clone()))
        .unwrap_or_else(|| content_id(payload, &headers));
    ackstack_core::deadletter::strip_metadata(&mut headers);
    let replays = replays_of(&headers);
    Letter {
        id,
        payload: payload.clone(),
        headers,
        metadata,
        replays,
    }
}

/// The dead letter's header table as the original message had it: every value untouched,
/// except ackstack's dead-letter metadata and retry bookkeeping, which go, and the replay
/// count, which is set.
fn replay_table(table: Option<&FieldTable>, replays: u32) -> FieldTable {
    let mut map = table.map(|t| t.inner().clone()).unwrap_or_default();
    map.retain(|name, _| {
        let name = name.as_str();
        !name.starts_with(METADATA_PREFIX)
            && !RESET_HEADERS.contains(&name)
            && name != DELIVERY_COUNT_HEADER
            && name != ORIGINAL_EXPIRATION_HEADER
    });
    map.insert(
        ShortString::from(REPLAYS_HEADER),
        AMQPValue::LongString(LongString::from(replays.to_string())),
    );
    FieldTable::from(map)
}

impl DeadLetters for RabbitDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        if self.total.is_some_and(|t| self.seen >= t) {
            return Ok(None);
        }
        let queue = ShortString::from(self.queue.as_str());
        let got = bounded(
            "basic.get",
            self.timeout,
            self.get.basic_get(queue, BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(got) = got else {
            return Ok(None);
        };
        if self.total.is_none() {
            self.total = Some(u64::from(got.message_count) + 1);
        }
        self.seen += 1;
        let delivery = got.delivery;
        let payload = Bytes::from(delivery.data);
        let letter = letter_of(&payload, &delivery.properties);
        Ok(Some(Found {
            letter,
            handle: Handle {
                tag: delivery.delivery_tag,
                payload,
                properties: delivery.properties,
            },
        }))
    }

    async fn republish(
        &mut self,
        handle: &Handle,
        queue: &str,
        replays: u32,
    ) -> Result<(), CliError> {
        let table = replay_table(handle.properties.headers().as_ref(), replays);
        let properties = handle.properties.clone().with_headers(table);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            self.publish
                .basic_publish(
                    "".into(),
                    ShortString::from(queue),
                    options,
                    &handle.payload,
                    properties,
                )
                .await?
                .await
        };
        match bounded("publish", self.timeout, publish).await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(CliError::Broker(format!(
                    "RabbitMQ could not route the replay to queue {queue}: {}",
                    returned.reply_text
                )))
            }
            Confirmation::Nack(None) | Confirmation::NotRequested => Err(CliError::Broker(
                format!("RabbitMQ did not confirm the replay to queue {queue}"),
            )),
        }
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), CliError> {
        bounded(
            "basic.ack",
            self.timeout,
            self.get.basic_ack(handle.tag, BasicAckOptions::default()),
        )
        .await
    }

    async fn keep(&mut self, handle: Handle) -> Result<(), CliError> {
        self.kept = Some(self.kept.map_or(handle.tag, |k| k.max(handle.tag)));
        Ok(())
    }

    async fn finish(self) -> Result<(), CliError> {
        if let Some(tag) = self.kept {
            // Every kept letter at once: `multiple` nacks all unacked tags up to this one.
            bounded(
                "basic.nack",
                self.timeout,
                self.get.basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                ),
            )
            .await?;
        }
        let _ = tokio::time::timeout(self.timeout, self.connection.close(200, "bye".into())).await;
        Ok(())
    }
}
