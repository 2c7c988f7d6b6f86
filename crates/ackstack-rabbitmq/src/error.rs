//! Errors of the RabbitMQ adapter and how broker errors map onto ackstack's.

use ackstack_core::{SettleError, SourceError};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// An operation of the adapter's own API (connecting, publishing, queue helpers) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// The configuration is invalid ([`RabbitConfig::validate`](crate::RabbitConfig::validate)).
    #[error("invalid RabbitMQ config: {0}")]
    Config(String),
    /// The broker or the connection failed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The broker refused a published message (publisher nack).
    #[error("the broker nacked the publish to {0}")]
    Nacked(String),
    /// The message could not be routed to the queue (it does not exist).
    #[error("message to {0} was returned unroutable: {1}")]
    Unroutable(String, String),
    /// A name is not a valid AMQP short string.
    #[error("invalid AMQP name: {0}")]
    InvalidName(String),
    /// A queue exists in a form ackstack cannot consume (a stream queue), or is missing where
    /// nothing may be declared ([`Topology::Never`](crate::Topology::Never)).
    #[error("queue {queue}: {reason}")]
    Topology {
        /// The queue.
        queue: String,
        /// Why it cannot be used, and what to do.
        reason: String,
    },
}

impl RabbitError {
    /// Whether retrying cannot help: bad config, missing queue, wrong credentials or queue
    /// arguments that differ from the declared ones.
    pub fn is_fatal(&self) -> bool {
        match self {
            RabbitError::Config(_) | RabbitError::InvalidName(_) => true,
            RabbitError::Topology { .. } => true,
            RabbitError::Amqp(e) => is_fatal_amqp(e),
            RabbitError::Unroutable(..) => true,
            RabbitError::Timeout(_) | RabbitError::Nacked(_) => false,
        }
    }

    pub(crate) fn into_source_error(self) -> SourceError {
        if self.is_fatal() {
            SourceError::Fatal(Box::new(self))
        } else {
            SourceError::Disconnected(Box::new(self))
        }
    }

    /// The broker's text when it refused this operation with `PRECONDITION_FAILED` (for a
    /// declare: the argument that differs, and its current value).
    pub(crate) fn precondition_failed(&self) -> Option<String> {
        match self {
            RabbitError::Amqp(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(
                        amqp.kind(),
                        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                    ) =>
                {
                    Some(amqp.get_message().to_string())
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the broker refused this operation with `NOT_FOUND`.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, RabbitError::Amqp(e) if matches!(
            e.kind(),
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
        ))
    }

    /// Whether the broker closed the channel over this operation with an error that repeats
    /// however often it is retried: `PRECONDITION_FAILED` (for a publish, for instance a
    /// `user_id` property that is not the connection's user), `ACCESS_REFUSED` or `NOT_FOUND`.
    pub(crate) fn is_permanent_channel_error(&self) -> bool {
        match self {
            RabbitError::Amqp(e) => is_permanent_soft(e),
            _ => false,
        }
    }

    /// The settlement error for a failed republish (retry or dead-letter copy).
    ///
    /// [`SettleError::Rejected`] (the broker refuses this copy for good; the runner counts it
    /// and never acks the original) for an unroutable copy, a bad name or config, and a
    /// permanent channel error ([`is_permanent_channel_error`](Self::is_permanent_channel_error)).
    /// Everything else is [`SettleError::Broker`], transient: timeouts, connection losses and
    /// a publisher-confirm nack (a queue with `x-overflow = reject-publish` nacks while it is
    /// full and accepts again once it drains).
    pub(crate) fn into_settle_error(self) -> SettleError {
        if self.is_permanent_channel_error() {
            return SettleError::Rejected(self.to_string());
        }
        match self {
            RabbitError::Unroutable(..) | RabbitError::InvalidName(_) | RabbitError::Config(_) => {
                SettleError::Rejected(self.to_string())
            }
            other => SettleError::Broker(Box::new(other)),
        }
    }
}

fn is_permanent_soft(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
            )
        ),
        _ => false,
    }
}

fn is_fatal_amqp(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(_) => is_permanent_soft(e),
            AMQPErrorKind::Hard(hard) => {
                matches!(hard, AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
            }
        },
        lapin::ErrorKind::AuthProviderError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
            true
        }
        _ => false,
    }
}
