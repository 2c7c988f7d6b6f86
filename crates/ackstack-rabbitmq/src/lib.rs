//! RabbitMQ adapter for ackstack, built on [lapin](https://docs.rs/lapin) 4.
//!
//! [`RabbitSource`] consumes one work queue in manual-ack mode and [`RabbitSettler`] settles
//! its deliveries; [`RabbitPublisher`] publishes to the work queue with publisher confirms.
//!
//! # Topology
//!
//! With [`RabbitConfig::declare_topology`] at [`Topology::Auto`] (the default) or
//! [`Topology::Always`] the adapter declares, all durable:
//!
//! * the work queue `<queue>` (classic or quorum; a quorum queue gets
//!   `x-dead-letter-routing-key = <dlq>`, and `x-delivery-limit` only when
//!   [`RabbitConfig::delivery_limit`] asks for one);
//! * one delay queue per bucket, `<queue>.delay.<millis>`, with `x-message-ttl = millis`,
//!   `x-dead-letter-exchange = ""` and `x-dead-letter-routing-key = <queue>`: a message
//!   published there comes back to the work queue after the bucket's delay;
//! * the dead-letter queue, `<queue>-dlq` by default;
//! * by the consuming source (not by publishers), `<queue>.ackstack-alone`, where
//!   redelivered messages wait to run alone ([`RabbitConfig::alone_queue_name`]).
//!
//! Under `Auto`, a work queue or dead-letter queue that already exists with other arguments
//! (a team's own dead-letter exchange, TTL, length limit, or another queue type) is adopted
//! as it is: the broker refuses the declare with `PRECONDITION_FAILED` (lapin logs that
//! refusal at error level as it closes the channel, target `lapin::channel`), and a passive
//! declare on a fresh channel confirms the queue is there; ackstack logs once, at info, what
//! it adopted. Its own arguments stay in force; ackstack's retries still go through its
//! delay queues, and its dead letters to its dead-letter queue. A stream queue is refused
//! ([`RabbitError::Topology`], permanent). Under `Always` such a queue is refused with the
//! broker's error; under [`Topology::Never`] nothing is declared, and a missing work queue is
//! refused naming it.
//!
//! # Retries and attempts
//!
//! A retry republishes the original payload and properties to a delay queue and waits for
//! the publisher confirm before the original is acked (invariants 1 and 3 in docs/CONTRACT.md). Delays are
//! **bucketed**: the smallest bucket at least as long as the requested delay is used, or the
//! largest bucket when the request is longer than all of them (so
//! [`Capabilities::max_retry_delay`](ackstack_core::Capabilities) is the largest bucket).
//! One queue per bucket avoids the head-of-line blocking of per-message TTLs.
//!
//! Retry and dead-letter copies are published **without** the message's own `expiration`
//! property (a publisher's per-message TTL): in a delay queue the lower of the two TTLs would
//! win and cut the delay short, and in the dead-letter queue it would delete the dead letter.
//! The original value travels in the [`ORIGINAL_EXPIRATION_HEADER`] header instead.
//!
//! The attempt number is read from the message (invariant 2 in docs/CONTRACT.md): the
//! [`ATTEMPT_HEADER`](ackstack_core::deadletter::ATTEMPT_HEADER) we write on each retry copy
//! (see [`attempt_of`]). A handler that takes the process down is counted apart: a redelivered
//! message is a suspect, moved to `<queue>.ackstack-alone` and run there alone, with its
//! crashes in [`CRASHES_HEADER`](ackstack_core::deadletter::CRASHES_HEADER)
//! (docs/DESIGN.md, "Crashes count as attempts").
//!
//! # Dead letters
//!
//! A dead-letter copy keeps the payload, the AMQP properties (but `expiration`) and every
//! original header value byte for byte and type for type, and adds `x-ackstack-dl-*`
//! metadata. Its content header must fit the connection's negotiated `frame_max` (the broker
//! closes the connection over a larger frame): when the metadata would push it over, the
//! error message in the metadata is cut to fit and [`DROPPED_HEADER`] says so
//! ([`DROPPED_ERROR_TRUNCATED`]); when even the copy without an error message does not fit,
//! nothing is published and
//! [`dead_letter`](ackstack_core::Settle::dead_letter) fails with
//! [`SettleError::Rejected`](ackstack_core::SettleError::Rejected), as it does when the broker
//! closes the channel over the copy with `PRECONDITION_FAILED` (or `ACCESS_REFUSED`,
//! `NOT_FOUND`). A publisher-confirm nack is
//! [`SettleError::Broker`](ackstack_core::SettleError::Broker): transient. The original is
//! acked only after the copy was confirmed.
//!
//! # Acks
//!
//! Acks are `basic.ack multiple=true` up to the highest completed tag below the lowest
//! delivery still in flight, never past it (invariant 8 in docs/CONTRACT.md). Completed deliveries above a
//! straggler are held back for the straggler's cumulative ack, at most
//! [`RabbitConfig::held_ack_delay`] (default 50 ms), then acked individually; the oldest of
//! them at once, as many as keep the held ones below half the prefetch window (so the broker
//! never stops delivering behind a straggler); all of them at
//! [`flush`](ackstack_core::Settle::flush). An [`ack`](ackstack_core::Settle::ack) call
//! returns once every one of its deliveries was acked by a frame that was sent, so its report
//! (and [`RabbitStats::acked_tokens`]) counts sent acks, never queued ones; several ack calls
//! may run at once ([`Capabilities::parallel_acks`](ackstack_core::Capabilities) is 4), the
//! tracker orders their frames. [`RabbitSettler::stats`] counts the frames.
//!
//! [`release`](ackstack_core::Settle::release) gives a delivery back with
//! `basic.reject requeue=true` (not `basic.nack`: RabbitMQ 4.3 and later count only a reject
//! in a quorum queue's `x-delivery-count`, so only a reject is seen by a configured
//! `x-delivery-limit`), then sends the acks the released tag was holding back. The released
//! message comes back redelivered: a suspect, run alone once.
//!
//! # Reconnects
//!
//! After a connection or channel loss, [`receive`](ackstack_core::Source::receive) returns
//! [`SourceError::Disconnected`](ackstack_core::SourceError) once, then reconnects and
//! re-consumes on a new channel *generation*. Tokens carry their generation; settling a token
//! of a closed generation returns
//! [`SettleError::LeaseLost`](ackstack_core::SettleError) without sending anything, and the
//! broker redelivers that message.
//!
//! # Example
//!
//! ```no_run
//! use ackstack_core::{Message, Publish, Settle, Source};
//! use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "orders");
//! let publisher = RabbitPublisher::connect(config.clone()).await?;
//! publisher.publish(Message::new("order #1").key("customer-7")).await?;
//!
//! let mut source = RabbitSource::connect(config).await?;
//! let settler = source.settler();
//! for received in source.receive(32).await? {
//!     println!("attempt {}: {:?}", received.delivery.attempt, received.delivery.payload);
//!     let report = settler.ack(vec![received.token]).await;
//!     assert!(report.failed.is_empty());
//! }
//! settler.flush().await;
//! # Ok(())
//! # }
//! ```
//!
//! In a service, hand the source to `ackstack_core`'s consumer runner instead of calling
//! `receive` yourself.

#![cfg_attr(docsrs, feature(doc_cfg))]
mod amqp;
mod channel;
pub mod config;
mod copies;
pub mod error;
mod headers;
mod metadata;
mod publisher;
mod settler;
mod source;
mod stats;
mod token;
mod tracker;

/// What a dead-letter copy's [`DROPPED_HEADER`] lists when its content header had to be
/// shrunk to fit the connection's negotiated `frame_max` (core's dead-letter format).
pub use ackstack_core::deadletter::{CRASHES_HEADER, DROPPED_ERROR_TRUNCATED, DROPPED_HEADER};
pub use config::{QueueType, RabbitConfig, Topology};
pub use error::RabbitError;
pub use headers::{
    DELIVERY_COUNT_HEADER, KEY_HEADER, ORIGINAL_EXPIRATION_HEADER, attempt_of, headers_from_table,
};
pub use publisher::{Fetched, RabbitPublisher, text_value};
pub use settler::RabbitSettler;
pub use source::RabbitSource;
pub use stats::RabbitStats;
pub use token::RabbitToken;

/// lapin, re-exported for typed AMQP values ([`lapin::types::FieldTable`], `AMQPValue`).
pub use lapin;
