//! Amazon SQS (aws-sdk-sqs) adapter for ackstack.
//!
//! [`SqsSource`] receives from one queue with long polling and implements
//! [`ackstack_core::Source`]; its [`SqsSettler`] acks with `DeleteMessageBatch`, delays retries
//! and extends leases with `ChangeMessageVisibility`, and forwards dead letters with
//! `SendMessage` to a dead-letter queue (default `<queue>-dlq`). [`SqsPublisher`] implements
//! [`ackstack_core::Publish`].
//!
//! ```no_run
//! use std::time::Duration;
//! use ackstack_core::{Message, Publish, Settle, Source};
//! use ackstack_sqs::{SqsConfig, SqsPublisher, SqsSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Credentials and region come from aws-config's default chain; `endpoint` (or the
//! // SQS_ENDPOINT environment variable) points at an emulator such as moto.
//! let config = SqsConfig::queue("orders")
//!     .with_region("us-east-1")
//!     .with_endpoint("http://127.0.0.1:4566")
//!     .with_visibility_timeout(Duration::from_secs(30))
//!     .with_create_queues(true);
//! let mut source = SqsSource::connect(config).await?;
//!
//! SqsPublisher::for_source(&source)
//!     .publish(Message::new(r#"{"order":1}"#).header("tenant", "acme"))
//!     .await?;
//!
//! // Normally ackstack_core's Consumer drives these calls; by hand:
//! let settler = source.settler();
//! let batch = source.receive(10).await?;
//! let tokens = batch.into_iter().map(|r| r.token).collect();
//! let report = settler.ack(tokens).await;
//! assert!(report.failed.is_empty());
//! println!("{:?}", source.stats());
//! # Ok(())
//! # }
//! ```
//!
//! # Mapping
//!
//! | ackstack | SQS |
//! |---|---|
//! | `Delivery::attempt` | `ApproximateReceiveCount` (1 when missing or malformed) |
//! | `Delivery::key` | `MessageGroupId` (FIFO) |
//! | `Delivery::message_id` | the `x-ackstack-message-id` attribute [`SqsPublisher`] sets from `Message::message_id` (one of the ten attributes; left out when there is no room), else `MessageId` |
//! | `Delivery::headers` | message attributes (String/Number as text, Binary as bytes), then system attributes as `x-sqs-<Name>` (optional) |
//! | lease | the visibility timeout requested on every receive: the configured one, else the queue's own `VisibilityTimeout` |
//! | ack | `DeleteMessageBatch` (10 per call, 4 calls in parallel by default) |
//! | retry | `ChangeMessageVisibility(delay)`, at most 12 h |
//! | dead letter | `SendMessage` to the DLQ, then delete of the original |
//!
//! # Dead-letter copies
//!
//! The copy has the original body and the original message attributes byte for byte (types
//! included), plus one attribute, [`DEAD_LETTER_ATTRIBUTE`], whose String value is
//! [`DeadLetterMetadata::to_json`](ackstack_core::DeadLetterMetadata::to_json). An earlier
//! one is replaced. SQS allows 10 attributes: when the original has 10 of its own, the one
//! whose name sorts last is moved, with its type and bytes, into the metadata JSON under
//! [`DISPLACED_KEY`]; [`DeadLetterRecord`] reads the record and restores the attributes.
//!
//! SQS refuses a message larger than the queue's `MaximumMessageSize` (read from the
//! dead-letter queue when the source starts; 256 KiB when it cannot be read), counting the
//! body and every attribute's name, type and value ([`message_size`]). A copy that would
//! exceed it only because of what we add is shrunk first ([`fit_dead_letter`]): the
//! displaced attributes are left out, then the error message in the metadata is cut, and
//! the JSON lists what was left out under [`DROPPED_KEY`]. The body and the attributes kept
//! on the copy never change. A copy too large even then is refused with
//! [`SettleError::Rejected`](ackstack_core::SettleError::Rejected) without a call to SQS,
//! and the original stays in its queue.
//!
//! # Timeouts
//!
//! The SDK puts no limit on a call's duration, so a stalled connection would hang it (and
//! with it the lease keeper, or shutdown) forever. Every call is bounded by
//! [`SqsConfig::operation_timeout`] (default 10 s; `ReceiveMessage` gets its long-poll wait on
//! top); a call that runs out fails as a transient broker error, and setup calls with
//! [`SqsError::Timeout`].
//!
//! # Errors and leases
//!
//! `ReceiptHandleIsInvalid`, `MessageNotInflight` and an `InvalidParameterValue` about the
//! receipt handle (what real SQS answers for an expired or superseded handle) are
//! [`SettleError::LeaseLost`](ackstack_core::SettleError::LeaseLost); see [`error`] for the
//! whole table.
//!
//! # moto differences
//!
//! The tests run against the moto server. Where it differs from SQS:
//!
//! - moto accepts *any* receipt handle a message ever had, for `ChangeMessageVisibility` and
//!   `DeleteMessage(Batch)`, while the message exists. Real SQS rejects an old handle for
//!   `ChangeMessageVisibility` after the message was received again (`InvalidParameterValue`,
//!   "Message does not exist or is not available for visibility timeout change") and, for a
//!   delete with an old handle, answers success without deleting. On moto a stale handle is
//!   only reported lost once the message is deleted (`ReceiptHandleIsInvalid`).
//! - moto counts the 12-hour visibility limit from the *send*, SQS from the receive.
//! - moto answers success for deleting an already deleted message, as SQS does.

#![cfg_attr(docsrs, feature(doc_cfg))]
pub mod attrs;
pub mod config;
pub mod error;
mod headers;
mod metadata;
mod publisher;
mod queue;
mod settler;
mod source;
mod stats;
#[cfg(feature = "test-util")]
pub mod testing;
mod token;

pub use attrs::{
    DEAD_LETTER_ATTRIBUTE, DEFAULT_MAX_MESSAGE_SIZE, DISPLACED_KEY, DROPPED_DISPLACED,
    DROPPED_ERROR_TRUNCATED, DROPPED_KEY, DeadLetterRecord, FittedDeadLetter, MAX_ATTRIBUTES,
    MESSAGE_ID_ATTRIBUTE, SYSTEM_ATTRIBUTE_PREFIX, dead_letter_attributes, fit_dead_letter,
    message_size,
};
pub use config::{Redrive, SqsConfig};
pub use error::SqsError;
pub use publisher::{DEFAULT_GROUP, SqsPublisher};
pub use queue::{build_client, resolve_queue_url};
pub use settler::SqsSettler;
pub use source::SqsSource;
pub use stats::SqsStats;
pub use token::SqsToken;

/// Internal parsers reachable by the fuzz targets in `fuzz/` (feature `fuzzing`); not part
/// of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use ackstack_core::adapter::parse_attempt;
}

/// The SDK client type, re-exported for convenience.
pub use aws_sdk_sqs::Client;
