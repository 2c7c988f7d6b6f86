//! What processing decided for one delivery.

use std::time::Duration;

use crate::error::Failure;

/// The decision the handler stack made for a delivery; the runner settles the delivery from it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Processed: acknowledge (remove from the broker).
    Ack,
    /// Not processed: the broker should deliver it again after `after`.
    Retry {
        /// How long the broker should hold it back.
        after: Duration,
        /// Why the attempt failed.
        failure: Failure,
    },
    /// Not processable yet, and not a failed attempt ([`HandlerError::defer`]): the broker
    /// should deliver it again after `after` with the same attempt number.
    ///
    /// [`HandlerError::defer`]: crate::HandlerError::defer
    Defer {
        /// How long the broker should hold it back.
        after: Duration,
        /// The deferral, as a failure with [`Failure::deferred_since`] set: when the message
        /// was first deferred (this time, or an earlier deferral's, carried in
        /// [`DEFERRED_SINCE_HEADER`](crate::deadletter::DEFERRED_SINCE_HEADER)).
        failure: Failure,
    },
    /// Never processable: forward to the dead-letter destination, then acknowledge.
    DeadLetter(Failure),
    /// Not processed, and not a failed attempt (the consumer is stopping while the delivery
    /// waited for its dedup store): give it back for redelivery as soon as possible.
    Release,
}

impl Outcome {
    /// The outcome's name in spans, metrics and summaries: `ack`, `retry`, `defer`,
    /// `dead_letter` or `release`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::Defer { .. } => "defer",
            Outcome::DeadLetter(_) => "dead_letter",
            Outcome::Release => "release",
        }
    }
}
