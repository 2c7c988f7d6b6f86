//! Copies of a delivery published with the broker's confirm: retry and deferral copies to a
//! delay queue, a suspect's move to the queue of runs alone, and the check that a copy's
//! content header fits the connection's `frame_max`.

use ackstack_core::SettleError;
use lapin::BasicProperties;

use crate::amqp;
use crate::channel::{CLOSE_TIMEOUT, Shared};
use crate::error::RabbitError;
use crate::metadata::{self, copy_properties};
use crate::token::RabbitToken;

/// Counts a lost lease and says why: `token`'s channel is closed.
pub(crate) fn lease_lost(shared: &Shared, token: &RabbitToken) -> SettleError {
    shared.counters.lease_lost.add(1);
    token.generation.id.lease_lost(format_args!(
        "delivery tag {} belongs to a closed channel",
        token.tag
    ))
}

/// Publishes a copy of the token's message (its payload with `properties`) to `queue` on
/// the generation's publish channel and waits for its confirm.
///
/// When the broker closes the channel with a permanent error
/// ([`RabbitError::is_permanent_channel_error`]), the cause may be another copy in flight
/// on the same shared channel: this copy is published once more, alone on a channel of
/// its own, and only a refusal there is final (see [`RabbitError::into_settle_error`]).
pub(crate) async fn publish_copy(
    shared: &Shared,
    token: &RabbitToken,
    queue: &str,
    properties: BasicProperties,
) -> Result<(), RabbitError> {
    let generation = &token.generation;
    let confirm_timeout = shared.config.confirm_timeout;
    let channel = generation.publish_channel().await?;
    let shared = amqp::publish_confirmed(
        &channel,
        queue,
        &token.payload,
        properties.clone(),
        confirm_timeout,
    )
    .await;
    match shared {
        Ok(()) => return Ok(()),
        Err(e) if e.is_permanent_channel_error() => {
            tracing::debug!(error = %e, "publish channel closed by the broker; publishing the copy again alone");
        }
        Err(e) => return Err(e),
    }
    let alone = amqp::confirm_channel(&generation.connection, generation.timeout).await?;
    let result =
        amqp::publish_confirmed(&alone, queue, &token.payload, properties, confirm_timeout).await;
    if alone.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, alone.close(200, "done".into())).await;
    }
    result
}

/// Why a suspect could not be moved to the queue of runs alone.
pub(crate) enum Moving {
    /// The queue does not exist (and is not ours to declare, or its declare was refused).
    Missing,
    /// The broker refuses this copy for good.
    Refused(String),
    /// Try again later (the broker or the connection failed).
    Failed(SettleError),
}

/// Publishes a copy of the token's message to the queue of runs alone with `crashes` in
/// its [`CRASHES_HEADER`](ackstack_core::deadletter::CRASHES_HEADER), declared first when
/// the topology is ours, and waits for the broker's confirm. The original is not touched.
pub(crate) async fn move_alone(
    shared: &Shared,
    token: &RabbitToken,
    crashes: u32,
) -> Result<(), Moving> {
    if !token.generation.alive() {
        return Err(Moving::Failed(lease_lost(shared, token)));
    }
    let headers = metadata::alone_table(&token.properties, crashes);
    let properties = copy_properties(&token.properties, headers);
    if let Err(err) = fits_frame(token, &properties, "run-alone") {
        return Err(Moving::Refused(err.to_string()));
    }
    let config = &shared.config;
    if config.declare_topology.declares() {
        let declared = match token.generation.publish_channel().await {
            Ok(channel) => amqp::declare_alone(&channel, config).await.map(drop),
            Err(e) => Err(e),
        };
        match declared {
            Ok(()) => {}
            Err(e) if e.is_fatal() => {
                tracing::debug!(error = %e, "declaring the queue of runs alone was refused");
                return Err(Moving::Missing);
            }
            Err(e) => return Err(Moving::Failed(e.into_settle_error())),
        }
    }
    match publish_copy(shared, token, &config.alone_queue_name(), properties).await {
        Ok(()) => {
            shared.set_alone_pending(true);
            Ok(())
        }
        Err(RabbitError::Unroutable(..)) => Err(Moving::Missing),
        Err(e) if e.is_fatal() => Err(Moving::Refused(e.to_string())),
        Err(e) => Err(Moving::Failed(e.into_settle_error())),
    }
}

/// Refuses a copy whose content header would not fit the connection's `frame_max`: the broker
/// would close the whole connection, and with it every other unacked delivery of this
/// generation.
pub(crate) fn fits_frame(
    token: &RabbitToken,
    properties: &BasicProperties,
    copy: &str,
) -> Result<(), SettleError> {
    let frame_max = token.generation.frame_max();
    match metadata::content_header_frame_size(properties) {
        Ok(size) if frame_max == 0 || size <= frame_max as usize => Ok(()),
        Ok(size) => Err(SettleError::Rejected(format!(
            "the {copy} copy's content header is {size} bytes; the connection's frame_max is \
             {frame_max}"
        ))),
        Err(why) => Err(SettleError::Rejected(why)),
    }
}
