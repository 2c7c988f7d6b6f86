//! Low-level helpers shared by the source, the settler and the publisher: connecting,
//! declaring topology and confirmed publishing.

use std::future::Future;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::config::{QueueType, RabbitConfig, Topology};
use crate::error::RabbitError;

/// AMQP delivery mode 2: persistent.
pub(crate) const PERSISTENT: u8 = 2;

/// Runs one broker round trip, failing it with [`RabbitError::Timeout`] naming `what` when it
/// takes longer than `timeout`.
pub(crate) async fn bounded<T, E>(
    what: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, RabbitError>
where
    RabbitError: From<E>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RabbitError::Timeout(what)),
    }
}

/// Opens a connection named after the config, within [`RabbitConfig::operation_timeout`].
pub(crate) async fn connect(config: &RabbitConfig, role: &str) -> Result<Connection, RabbitError> {
    config.validate()?;
    let name = format!("{}-{role}", config.connection_name());
    let props = ConnectionProperties::default().with_connection_name(name.into());
    bounded(
        "connection open",
        config.operation_timeout,
        Connection::connect(&config.uri, props),
    )
    .await
}

/// Opens a channel in publisher-confirm mode; each step within `timeout`.
pub(crate) async fn confirm_channel(
    connection: &Connection,
    timeout: Duration,
) -> Result<Channel, RabbitError> {
    let channel = bounded("channel open", timeout, connection.create_channel()).await?;
    bounded(
        "confirm.select",
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(channel)
}

/// A valid AMQP short string, or a typed error.
pub(crate) fn short(name: &str) -> Result<ShortString, RabbitError> {
    ShortString::try_new(name).map_err(|_| RabbitError::InvalidName(name.to_string()))
}

/// Declares the topology on a channel of its own on `connection` (see [`Topology`]): the
/// work queue, the delay queues and the dead-letter queue. Under [`Topology::Auto`] a work or
/// dead-letter queue that exists with other arguments is adopted as it is (a passive declare
/// on a fresh channel, the broker having closed the first), and a stream queue is refused;
/// under [`Topology::Never`] nothing is declared and a missing work queue is refused, naming
/// it.
pub(crate) async fn declare_topology(
    connection: &Connection,
    config: &RabbitConfig,
) -> Result<(), RabbitError> {
    let timeout = config.operation_timeout;
    let mut channel = bounded("channel open", timeout, connection.create_channel()).await?;
    let result = declare_all(connection, &mut channel, config).await;
    let _ = tokio::time::timeout(timeout, channel.close(200, "declared".into())).await;
    result
}

async fn declare_all(
    connection: &Connection,
    channel: &mut Channel,
    config: &RabbitConfig,
) -> Result<(), RabbitError> {
    let timeout = config.operation_timeout;
    if config.declare_topology == Topology::Never {
        return match declare_passive(channel, &config.queue, timeout).await {
            Err(e) if e.is_not_found() => Err(RabbitError::Topology {
                queue: config.queue.clone(),
                reason: "does not exist, and declare_topology is never: declare it, or set \
                         declare_topology to auto"
                    .into(),
            }),
            other => other.map(drop),
        };
    }
    let dlq = config.dlq_name();
    let mut work_args = queue_type_args(config.queue_type);
    if config.queue_type == QueueType::Quorum {
        // A message the broker gives up on (past `delivery_limit`, or RabbitMQ 4's default
        // limit of 20 when none is set) goes to the DLQ rather than being dropped. No limit
        // is set from max attempts: crashes raise the count of every prefetched message.
        insert_str(&mut work_args, "x-dead-letter-exchange", "");
        insert_str(&mut work_args, "x-dead-letter-routing-key", &dlq);
        if let Some(max) = config.delivery_limit {
            work_args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(max).unwrap_or(i32::MAX)),
            );
        }
    }
    expire(&mut work_args, config.queue_expires);
    declare_or_adopt(connection, channel, config, &config.queue, work_args).await?;
    for bucket in &config.delay_buckets {
        let mut args = queue_type_args(config.queue_type);
        expire(&mut args, config.queue_expires);
        let ttl = i32::try_from(bucket.as_millis()).unwrap_or(i32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        insert_str(&mut args, "x-dead-letter-exchange", "");
        insert_str(&mut args, "x-dead-letter-routing-key", &config.queue);
        declare(channel, &config.delay_queue_name(*bucket), args, timeout).await?;
    }
    let mut dlq_args = queue_type_args(config.queue_type);
    expire(&mut dlq_args, config.queue_expires);
    declare_or_adopt(connection, channel, config, &dlq, dlq_args).await
}

/// Declares `queue` with `args`; under [`Topology::Auto`], adopts it as it is when it exists
/// with other arguments (`channel` is replaced by a fresh one: the broker closed it), unless
/// it is a stream queue.
async fn declare_or_adopt(
    connection: &Connection,
    channel: &mut Channel,
    config: &RabbitConfig,
    queue: &str,
    args: FieldTable,
) -> Result<(), RabbitError> {
    let timeout = config.operation_timeout;
    let refused = match declare(channel, queue, args, timeout).await {
        Ok(()) => return Ok(()),
        Err(e) => match e.precondition_failed() {
            Some(why) if config.declare_topology == Topology::Auto => why,
            _ => return Err(e),
        },
    };
    if refused.contains("'x-queue-type'") && refused.contains("'stream'") {
        return Err(RabbitError::Topology {
            queue: queue.to_string(),
            reason: "has x-queue-type 'stream': a stream queue, which ackstack does not \
                     consume (it needs per-message acks and redelivery): use a classic or \
                     quorum queue"
                .into(),
        });
    }
    *channel = bounded("channel open", timeout, connection.create_channel()).await?;
    declare_passive(channel, queue, timeout).await?;
    adopted(queue, &refused);
    Ok(())
}

/// Logs, once per queue and process, that `queue` was adopted as it is.
fn adopted(queue: &str, refused: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.iter().any(|q| q == queue) {
        return;
    }
    seen.push(queue.to_string());
    tracing::info!(
        queue,
        broker_says = refused,
        "adopted an existing queue as it is (its arguments differ from ackstack's): its own \
         dead-letter exchange, TTL, length limit and type stay in force; ackstack's retries \
         still go through its delay queues and its dead letters to its dead-letter queue, \
         and a quorum queue adopted this way has no delivery limit from ackstack"
    );
}

/// A passive declare: whether `queue` exists (`NOT_FOUND` when not); its message count.
async fn declare_passive(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Result<u32, RabbitError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declare = channel.queue_declare(short(queue)?, options, FieldTable::default());
    Ok(bounded("queue.declare", timeout, declare)
        .await?
        .message_count())
}

/// Declares the queue of suspects waiting to run alone
/// ([`RabbitConfig::alone_queue_name`]), of the work queue's type; returns how many wait there.
pub(crate) async fn declare_alone(
    channel: &Channel,
    config: &RabbitConfig,
) -> Result<u32, RabbitError> {
    let name = short(&config.alone_queue_name())?;
    let declare = channel.queue_declare(name, QueueDeclareOptions::durable(), alone_args(config));
    let queue = bounded("queue.declare", config.operation_timeout, declare).await?;
    Ok(queue.message_count())
}

/// The arguments of the queue of runs alone: the work queue's type and expiry, and on quorum
/// queues the DLQ for whatever the broker gives up on (RabbitMQ 4's default delivery limit),
/// so that nothing is dropped.
fn alone_args(config: &RabbitConfig) -> FieldTable {
    let mut args = queue_type_args(config.queue_type);
    if config.queue_type == QueueType::Quorum {
        insert_str(&mut args, "x-dead-letter-exchange", "");
        insert_str(&mut args, "x-dead-letter-routing-key", &config.dlq_name());
    }
    expire(&mut args, config.queue_expires);
    args
}

/// How many suspects wait to run alone, from a passive declare: NOT_FOUND (which closes the
/// channel) when the queue does not exist.
pub(crate) async fn declare_alone_passive(
    channel: &Channel,
    config: &RabbitConfig,
) -> Result<u32, RabbitError> {
    declare_passive(
        channel,
        &config.alone_queue_name(),
        config.operation_timeout,
    )
    .await
}

/// Adds `x-expires` (milliseconds, at least 1) when the config asks for it.
fn expire(args: &mut FieldTable, expires: Option<Duration>) {
    if let Some(expires) = expires {
        let ms = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .clamp(1, i64::from(i32::MAX));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
}

fn queue_type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        insert_str(&mut args, "x-queue-type", "quorum");
    }
    args
}

fn insert_str(table: &mut FieldTable, key: &'static str, value: &str) {
    table.insert(
        key.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes())),
    );
}

async fn declare(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    timeout: Duration,
) -> Result<(), RabbitError> {
    let name = short(name)?;
    bounded(
        "queue.declare",
        timeout,
        channel.queue_declare(name, QueueDeclareOptions::durable(), args),
    )
    .await?;
    Ok(())
}

/// Publishes to `queue` through the default exchange (mandatory, so a missing queue is an
/// error instead of a silent drop) and waits for the broker's confirm.
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), RabbitError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let publish = async {
        channel
            .basic_publish("".into(), short(queue)?, options, payload, properties)
            .await?
            .await
            .map_err(RabbitError::from)
    };
    let confirmation = tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| RabbitError::Timeout("publisher confirm"))??;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(
            RabbitError::Unroutable(queue.to_string(), returned.reply_text.to_string()),
        ),
        Confirmation::Nack(None) => Err(RabbitError::Nacked(queue.to_string())),
        // The channel is always in confirm mode; treat a missing confirm as a failure rather
        // than assume durability.
        Confirmation::NotRequested => Err(RabbitError::Nacked(queue.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quorum_queue_of_runs_alone_dead_letters_what_the_broker_gives_up_on() {
        let mut config = RabbitConfig::new("amqp://127.0.0.1", "orders");
        config.queue_type = QueueType::Quorum;
        let args = alone_args(&config);
        let get = |name: &str| args.inner().get(name).cloned();
        assert_eq!(get("x-queue-type"), Some(long_str("quorum")));
        assert_eq!(get("x-dead-letter-exchange"), Some(long_str("")));
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(long_str("orders-dlq"))
        );
        config.queue_type = QueueType::Classic;
        assert!(alone_args(&config).inner().is_empty());
    }

    fn long_str(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text.as_bytes()))
    }
}
