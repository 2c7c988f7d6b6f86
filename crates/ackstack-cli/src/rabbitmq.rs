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
use crate::run::{self, CliError, DeadLetters, Found, Sent};

/// The broker, as errors name it.
const BROKER: &str = "RabbitMQ";

/// A scan of one RabbitMQ dead-letter queue.
pub struct RabbitDlq {
    connection: Connection,
    get: Channel,
    publish: Channel,
    queue: ShortString,
    /// Letters in the queue when the scan began (known after the first get).
    total: Option<u64>,
    seen: u64,
    /// The highest delivery tag kept (all kept tags are nacked with `multiple` at the end).
    kept: Option<u64>,
    /// Letters the queue has handed out [`OFTEN_RETURNED`] times or more.
    often_returned: u64,
    /// The most times a letter was handed out.
    most_returned: u64,
    timeout: Duration,
}

/// A quorum queue's `x-delivery-count` from which a scan warns: RabbitMQ 4 drops a
/// quorum-queue message handed out more often than the queue's delivery limit (20 unless set),
/// and every scan hands each letter out once more.
const OFTEN_RETURNED: u64 = 10;

/// A letter got from the queue, unacked.
pub struct Handle {
    tag: u64,
    payload: Bytes,
    properties: BasicProperties,
}

impl RabbitDlq {
    /// Connects to `uri` and prepares to scan `queue`.
    pub async fn open(uri: &str, queue: &str, timeout: Duration) -> Result<Self, CliError> {
        let queue = ShortString::try_new(queue).map_err(|_| {
            CliError::Usage(format!(
                "{queue:?} is no AMQP queue name: at most 255 bytes"
            ))
        })?;
        let props = ConnectionProperties::default().with_connection_name("ackstack-cli".into());
        let connection =
            run::bounded(BROKER, "connect", timeout, Connection::connect(uri, props)).await?;
        let get =
            run::bounded(BROKER, "channel open", timeout, connection.create_channel()).await?;
        let publish =
            run::bounded(BROKER, "channel open", timeout, connection.create_channel()).await?;
        run::bounded(
            BROKER,
            "confirm.select",
            timeout,
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(RabbitDlq {
            connection,
            get,
            publish,
            queue,
            total: None,
            seen: 0,
            kept: None,
            often_returned: 0,
            most_returned: 0,
            timeout,
        })
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
        .unwrap_or_else(|| {
            // Without the broker's per-delivery count: a quorum queue adds or raises it each
            // time a scan gives the letter back, and the id must not change with it.
            let mut stable = headers.clone();
            stable.remove(DELIVERY_COUNT_HEADER);
            content_id(payload, &stable)
        });
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

/// The properties a replay is published with: the dead letter's, with [`replay_table`]'s
/// headers and the message's own `expiration` back in place (dead-letter copies carry it in
/// [`ORIGINAL_EXPIRATION_HEADER`] instead, so that the broker does not expire the letter).
fn replay_properties(properties: &BasicProperties, replays: u32) -> BasicProperties {
    let headers = properties.headers().as_ref();
    let expiration = headers
        .and_then(|t| t.inner().get(ORIGINAL_EXPIRATION_HEADER))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        })
        .and_then(|text| ShortString::try_new(text).ok());
    let out = properties
        .clone()
        .with_headers(replay_table(headers, replays));
    match expiration {
        Some(expiration) => out.with_expiration(expiration),
        None => out,
    }
}

impl DeadLetters for RabbitDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        if self.total.is_some_and(|t| self.seen >= t) {
            return Ok(None);
        }
        let got = run::bounded(
            BROKER,
            "basic.get",
            self.timeout,
            self.get
                .basic_get(self.queue.clone(), BasicGetOptions { no_ack: false }),
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
        let returned = letter
            .headers
            .get_str(DELIVERY_COUNT_HEADER)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if returned >= OFTEN_RETURNED {
            self.often_returned += 1;
        }
        self.most_returned = self.most_returned.max(returned);
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
    ) -> Result<Sent, CliError> {
        let properties = replay_properties(&handle.properties, replays);
        let queue_name = ShortString::try_new(queue).map_err(|_| {
            CliError::Broker(format!(
                "cannot replay to {queue:?}: an AMQP queue name is at most 255 bytes"
            ))
        })?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            self.publish
                .basic_publish("".into(), queue_name, options, &handle.payload, properties)
                .await?
                .await
        };
        match run::bounded(BROKER, "publish", self.timeout, publish).await? {
            Confirmation::Ack(None) => Ok(Sent::Once),
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
        run::bounded(
            BROKER,
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
        if self.often_returned > 0 {
            eprintln!(
                "note: {} letter(s) in {} were handed out up to {} times (each scan \
                 hands a letter out once more): RabbitMQ 4 drops a quorum-queue message past the \
                 queue's delivery limit (20 unless set). Give the dead-letter queue none, e.g. \
                 rabbitmqctl set_policy dlq-keep '-dlq$' '{{\"delivery-limit\":-1}}' \
                 --apply-to quorum_queues",
                self.often_returned, self.queue, self.most_returned
            );
        }
        if let Some(tag) = self.kept {
            // Every kept letter at once: `multiple` nacks all unacked tags up to this one.
            run::bounded(
                BROKER,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn properties(headers: &[(&str, &str)]) -> BasicProperties {
        let map: BTreeMap<ShortString, AMQPValue> = headers
            .iter()
            .map(|(k, v)| {
                (
                    ShortString::from(*k),
                    AMQPValue::LongString(LongString::from(v.as_bytes())),
                )
            })
            .collect();
        BasicProperties::default().with_headers(FieldTable::from(map))
    }

    #[test]
    fn a_content_id_ignores_the_quorum_queues_delivery_count() {
        let payload = Bytes::from_static(b"order");
        let first = letter_of(&payload, &properties(&[("x-tenant", "acme")]));
        let given_back = letter_of(
            &payload,
            &properties(&[("x-tenant", "acme"), (DELIVERY_COUNT_HEADER, "3")]),
        );
        assert!(first.id.starts_with("h-"), "{}", first.id);
        assert_eq!(first.id, given_back.id);
        let other = letter_of(&payload, &properties(&[("x-tenant", "acne")]));
        assert_ne!(first.id, other.id);
    }

    #[test]
    fn a_replay_gets_the_messages_own_expiration_back() {
        let dead = properties(&[
            (ORIGINAL_EXPIRATION_HEADER, "60000"),
            ("x-ackstack-dl-error-message", "down"),
            ("x-ackstack-crashes", "2"),
            ("x-tenant", "acme"),
        ]);
        let replay = replay_properties(&dead, 1);
        assert_eq!(
            replay.expiration().as_ref().map(ShortString::as_str),
            Some("60000")
        );
        let headers = replay.headers().as_ref().unwrap().inner();
        assert!(!headers.contains_key(ORIGINAL_EXPIRATION_HEADER));
        assert!(!headers.contains_key("x-ackstack-dl-error-message"));
        assert!(
            !headers.contains_key("x-ackstack-crashes"),
            "a replay starts its crash count afresh"
        );
        assert!(headers.contains_key("x-tenant"));
        let without = replay_properties(&properties(&[("x-tenant", "acme")]), 1);
        assert_eq!(without.expiration(), &None);
    }
}
