//! Errors of the RabbitMQ adapter and how broker errors map onto ackstack's.

use ackstack_core::{SettleError, SourceError};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// The configuration is invalid.
#[derive(Debug, thiserror::Error)]
#[error("invalid RabbitMQ config: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }
}

/// An operation of the adapter's own API (connecting, publishing, queue helpers) failed.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
}

impl RabbitError {
    /// Whether retrying cannot help: bad config, missing queue, wrong credentials or queue
    /// arguments that differ from the declared ones.
    pub fn is_fatal(&self) -> bool {
        match self {
            RabbitError::Config(_) | RabbitError::InvalidName(_) => true,
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

    pub(crate) fn into_settle_error(self) -> SettleError {
        match self {
            RabbitError::Unroutable(..) | RabbitError::InvalidName(_) | RabbitError::Config(_) => {
                SettleError::Rejected(self.to_string())
            }
            other => SettleError::Broker(Box::new(other)),
        }
    }
}

fn is_fatal_amqp(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => matches!(
                soft,
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
            ),
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
