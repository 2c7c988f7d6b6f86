//! [`RabbitToken`], the handle of one delivery.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use lapin::BasicProperties;

use crate::channel::Generation;

/// The handle of one RabbitMQ delivery: its delivery tag, the channel generation it came
/// from, and the original payload and AMQP properties (so a dead-letter copy keeps typed
/// header values byte for byte).
#[derive(Clone)]
pub struct RabbitToken {
    pub(crate) tag: u64,
    pub(crate) generation: Arc<Generation>,
    pub(crate) properties: Arc<BasicProperties>,
    pub(crate) payload: Bytes,
    /// The broker delivered it before without a settlement (`redelivered`).
    pub(crate) redelivered: bool,
    /// Got from the queue of suspects waiting to run alone, not from the work queue.
    pub(crate) alone: bool,
}

impl RabbitToken {
    /// The delivery tag on its channel.
    pub fn delivery_tag(&self) -> u64 {
        self.tag
    }

    /// The channel generation the delivery came from (1 for the first connection, counting
    /// up with each reconnect).
    pub fn generation(&self) -> u64 {
        self.generation.id.get()
    }

    /// The original AMQP properties, including the header table.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// Whether the broker had delivered this message before without a settlement (AMQP's
    /// `redelivered`): a consumer holding it stopped, or it was released.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Whether it was got from the queue of suspects waiting to run alone
    /// ([`RabbitConfig::alone_queue_name`](crate::RabbitConfig::alone_queue_name)).
    pub fn is_alone(&self) -> bool {
        self.alone
    }

    /// Whether the channel the delivery came from is still open (its delivery can be acked).
    pub fn is_live(&self) -> bool {
        self.generation.alive()
    }
}

impl fmt::Debug for RabbitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitToken")
            .field("tag", &self.tag)
            .field("generation", &self.generation.id.get())
            .finish()
    }
}

impl PartialEq for RabbitToken {
    fn eq(&self, other: &Self) -> bool {
        self.tag == other.tag && self.generation.id == other.generation.id
    }
}

impl Eq for RabbitToken {}
