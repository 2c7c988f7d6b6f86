//! Redis Streams adapter for ackstack.
//!
//! [`RedisStreamsSource`] reads a stream through a consumer group (created with `MKSTREAM`
//! when missing, or adopted as it exists) and implements [`ackstack_core::Source`]; its
//! [`RedisStreamsSettler`] acks with `XACK`, delays retries as copies kept in Redis until
//! they are due, renews leases by claiming the entry to itself, and adds dead letters to a
//! dead-letter stream, each of these one atomic script. [`RedisStreamsPublisher`]
//! implements [`ackstack_core::Publish`].
//!
//! ```no_run
//! use ackstack_core::{Consumer, HandlerError, Message, Publish, handler_fn};
//! use ackstack_redis_streams::{RedisStreamsConfig, RedisStreamsPublisher, RedisStreamsSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // The group `ackstack` of the stream `orders` is created (with the stream) when missing.
//! let source =
//!     RedisStreamsSource::connect(RedisStreamsConfig::new("redis://127.0.0.1:6379", "orders"))
//!         .await?;
//!
//! RedisStreamsPublisher::connect("redis://127.0.0.1:6379", "orders")?
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
//! | ackstack | Redis Streams |
//! |---|---|
//! | payload | the `payload` field ([`RedisStreamsConfig::payload_field`]); every other field is a header |
//! | attempt | the group's delivery count of the entry (`XPENDING`), which counts every hand-out, crashes too; on a copy, plus the attempt it was written for (`x-ackstack-attempt`) |
//! | lease | [`RedisStreamsConfig::lease`]: an entry idle that long is taken over by `XAUTOCLAIM`; renewed with `XCLAIM ... JUSTID` |
//! | retry after `d` | a copy in the sorted set `<stream>:delayed` (fields in a list beside it), due at Redis's time + `d`, and `XACK` of the original, in one script; receives move due copies back with `XADD` |
//! | deferral | the same, with the attempt kept |
//! | dead letter | `XADD <stream>-dlq` with `x-ackstack-dl-*` fields, and `XACK` of the original, in one script |
//! | message id | the `message-id` field, else `<stream>:<entry id>` |
//! | key | the `key` field ([`RedisStreamsConfig::key`]) |
//! | crash recovery | `XAUTOCLAIM` of entries idle longer than the lease, by any consumer of the group |
//!
//! # What is left to you
//!
//! - **Retention.** Acked entries stay in the stream: trim it (`XADD ... MAXLEN ~ n` in
//!   the producer, or `XTRIM` on a schedule) past what every group has read. An entry trimmed
//!   while pending is gone; the next `XAUTOCLAIM` reports it (logged as a warning).
//! - **Durability.** A retry copy or dead letter is as durable as Redis's persistence: with
//!   AOF and `appendfsync always` a Redis crash loses nothing acknowledged; with the default
//!   `everysec`, up to a second.
//! - **Eviction.** A Redis that evicts keys under memory pressure (`maxmemory-policy` other
//!   than `noeviction`) may drop a stream, a delayed copy or the dead letters; the source
//!   warns at connect.
//! - **Redis Cluster.** The stream, its delayed set and its dead-letter stream are used in
//!   one script, so they must live on one node: not supported on a cluster yet.
//! - **One group per stream.** Retry copies go back into the stream, where every group
//!   would read them, so a stream that other groups read is refused at connect
//!   ([`RedisStreamsError::Topology`]). Give ackstack a stream of its own.
//! - **Stopping mid-read.** A receive dropped while its `XREADGROUP` blocks (the consumer
//!   stopping, a timeout) may leave entries Redis handed out in that moment pending: they
//!   come back after a lease, as suspects, one attempt higher. Keep
//!   [`RedisStreamsConfig::block`] short (2 s by default).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod entry;
mod error;
mod publisher;
mod scripts;
mod settler;
mod source;
mod stats;
mod token;

pub use config::{KeySource, MESSAGE_ID_FIELD, PAYLOAD_FIELD, RedisStreamsConfig, StartFrom};
pub use error::RedisStreamsError;
pub use publisher::RedisStreamsPublisher;
pub use settler::RedisStreamsSettler;
pub use source::RedisStreamsSource;
pub use stats::RedisStreamsStats;
pub use token::RedisStreamsToken;

/// The redis-rs client this crate is built on.
pub use redis;
