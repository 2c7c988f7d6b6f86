//! NATS JetStream (async-nats) adapter for ackstack.
//!
//! [`NatsSource`] reads a stream through a durable pull consumer (created with
//! `AckPolicy::Explicit`, or adopted as it exists) and implements [`ackstack_core::Source`];
//! its [`NatsSettler`] acks (`+ACK`), delays retries at the server (`-NAK` with a delay),
//! extends leases (`+WPI`, the consumer's `ack_wait` being the lease) and forwards dead
//! letters, confirmed by the dead-letter stream, before `+TERM` on the original.
//! [`NatsPublisher`] implements [`ackstack_core::Publish`].
//!
//! ```no_run
//! use std::time::Duration;
//! use ackstack_core::{Consumer, HandlerError, Message, Publish, handler_fn};
//! use ackstack_nats::{NatsConfig, NatsPublisher, NatsSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // The stream `orders` (subject `orders`), its dead-letter stream `orders-dlq` (subject
//! // `orders.dlq`) and the durable consumer `ackstack` are created when missing.
//! let mut config = NatsConfig::new("nats://127.0.0.1:4222", "orders");
//! config.ack_wait = Duration::from_secs(30);
//! let source = NatsSource::connect(config).await?;
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! NatsPublisher::new(client, "orders")
//!     .publish(Message::new(r#"{"order":1}"#).message_id("order-1"))
//!     .await?;
//!
//! Consumer::new(source)
//!     .run_until(
//!         handler_fn(|delivery, _cx| async move {
//!             println!("order {:?}, attempt {}", delivery.payload, delivery.attempt);
//!             Ok::<(), HandlerError>(())
//!         }),
//!         ackstack_core::shutdown_signal(),
//!     )
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Mapping
//!
//! | ackstack | JetStream |
//! |---|---|
//! | attempt | the delivery count (`num_delivered`), which counts every delivery, crashes too; a delivery this process nak'ed comes back at least one attempt later (nats-server 2.9 was seen to redeliver a delayed nak with the count unchanged) |
//! | lease | the consumer's `ack_wait`, renewed with `+WPI` |
//! | retry after `d` | `-NAK {"delay": d}` |
//! | dead letter | a copy on `<stream>.dlq` (stream `<stream>-dlq`), `x-ackstack-dl-*` headers and the original subject, the original's `Nats-*` headers kept as `x-ackstack-orig-Nats-*`, then `+TERM` |
//! | message id | `Nats-Msg-Id`, else `<stream>:<stream sequence>` |
//! | key | the subject (or a header, [`NatsConfig::key`]) |
//! | broker limit | the consumer's `max_deliver`, which must exceed `max_attempts` |
//!
//! Deferrals (`HandlerError::defer`) are retries here: JetStream has no delayed publish for a
//! copy that would keep the attempt number.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod headers;
mod publisher;
mod settler;
mod source;
mod stats;
mod token;

pub use config::{KeySource, NatsConfig};
pub use error::NatsError;
pub use headers::{MESSAGE_ID_HEADER, ORIGINAL_PREFIX, SUBJECT_HEADER};
pub use publisher::NatsPublisher;
pub use settler::NatsSettler;
pub use source::NatsSource;
pub use stats::NatsStats;
pub use token::NatsToken;

/// The async-nats client this crate is built on, for connecting with options of your own
/// ([`NatsSource::from_client`]).
pub use async_nats;
