//! # ackstack
//!
//! Reliable message consumption for Rust services: one consumer contract over RabbitMQ, Amazon
//! SQS, Apache Kafka and an in-memory broker, and one set of reliability layers that give every
//! broker the same guarantees.
//!
//! - **Ack only after success.** A message is acknowledged once your handler returned `Ok`, or
//!   once its dead-letter copy was confirmed by the broker. A crash anywhere leaves it unacked,
//!   so the broker delivers it again.
//! - **Retry with exponential backoff and jitter**, delayed at the broker (not by sleeping on a
//!   held message), with the attempt number counted by the broker so that it survives restarts.
//! - **Dead letters with metadata**: payload and headers byte for byte, plus why, when, how many
//!   attempts and from where.
//! - **Deduplication** that marks a key done only after success (in memory, or in Redis with the
//!   `redis` feature).
//! - **Leases** (visibility timeouts) extended while a handler runs; a lost lease cancels the
//!   handler and the delivery is never acked.
//! - **Batch acks** and cumulative commits that never pass a delivery still in flight.
//! - **Graceful shutdown** that drains in-flight work up to a deadline and never acks work it
//!   abandons.
//!
//! ## A consumer in twenty lines
//!
//! The in-memory broker needs no server, so this example runs as it is:
//!
//! ```
//! use std::time::Duration;
//! use ackstack::{Backoff, Consumer, HandlerError, Message, MemoryBroker, handler_fn};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { order_id: String, amount_cents: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"order_id":"A-1","amount_cents":1250}"#));
//! broker.publish("orders", Message::new("not an order"));
//!
//! let consumer = Consumer::new(broker.source("orders"))
//!     .concurrency(8)
//!     .backoff(Backoff::exponential(Duration::from_millis(100), Duration::from_secs(60)))
//!     .max_attempts(5);
//! let idle = consumer.status();
//! let summary = consumer
//!     .run_until(
//!         handler_fn(|delivery, _cx| async move {
//!             // A payload that does not decode is a permanent failure: dead-lettered at once.
//!             let order: Order = ackstack::decode::json(&delivery)?;
//!             if order.amount_cents < 0 {
//!                 return Err(HandlerError::permanent("negative amount"));
//!             }
//!             Ok(())
//!         }),
//!         async move { idle.idle(Duration::from_millis(200)).await },
//!     )
//!     .await?;
//!
//! assert_eq!(summary.acked, 2); // the order, and the bad payload once its dead letter was stored
//! assert_eq!(summary.dead_lettered, 1);
//! assert_eq!(broker.dead_letters("orders").len(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Brokers
//!
//! Each adapter is its own crate behind a feature of this one, so a service that needs only SQS
//! never builds librdkafka:
//!
//! | feature | module | broker |
//! |---|---|---|
//! | (always) | [`memory`] | in-process, for tests and examples |
//! | `rabbitmq` | `rabbitmq` | RabbitMQ through lapin |
//! | `sqs` | `sqs` | Amazon SQS through aws-sdk-sqs |
//! | `kafka` | `kafka` | Apache Kafka through rdkafka |
//! | `nats` | `nats` | NATS JetStream through async-nats |
//! | `redis-streams` | `redis_streams` | Redis Streams through redis-rs (a consumer group) |
//! | `redis` | `redis` | the Redis deduplication store |
//! | `postgres` | `postgres` | the PostgreSQL transactional inbox (exactly-once effects) |
//!
//! Security, off by default: `kafka-ssl` (TLS and SASL PLAIN/SCRAM/OAUTHBEARER in librdkafka,
//! through the system's OpenSSL), `kafka-gssapi` (Kerberos too), `redis-tls` (`rediss://`
//! URLs, rustls), `postgres-tls` (`sslmode` and `sslrootcert` in the database URL, as libpq
//! reads them; rustls). `full` has all of the above but `kafka-gssapi`.
//!
//! The feature `test-util` adds the broker crates' helpers for tests (`sqs::testing`: queues
//! on an SQS endpoint such as moto; `kafka::read_topic`: reading a topic such as the
//! dead-letter topic) to whichever of `sqs` and `kafka` is on.
//!
//! ## How the pieces fit
//!
//! A [`Source`](adapter::Source) receives [`Delivery`]s from a broker; its
//! [`Settle`](adapter::Settle) handle acks, retries, dead-letters and extends them. A
//! [`Consumer`] runs a [`Handler`] over a source with bounded concurrency, through a fixed
//! stack of layers: retry outermost (the one place a failure, or a panic, becomes a retry or a
//! dead letter), then deduplication, then any [`Layer`]s of your own, then your handler. What
//! the handler's result becomes is an [`Outcome`]; the consumer settles it with the broker
//! (acks in batches, only after success) while a lease keeper extends the leases of deliveries
//! still running.
//!
//! The root of this crate is what a consumer is written with. Three modules serve the people
//! who extend it: [`adapter`] (a new broker; check it with the conformance suite in
//! `ackstack-testkit`), [`layer`] (a layer of your own) and [`dedup`] (a store of your own).

#![cfg_attr(docsrs, feature(doc_cfg))]
// What a consumer is written with. The list is short on purpose: items for adapter and layer
// authors are in `adapter`, `layer` and `dedup`; the runner's machinery stays inside
// ackstack-core.
pub use ackstack_core::{
    AdaptiveConcurrency, Backoff, Batch, BatchConfig, BatchHandler, BatchResults, ConfigError,
    Consumer, ConsumerConfig, ConsumerError, ConsumerState, Context, Control, DeadLetterMetadata,
    DeadLetterReason, DedupConfig, DedupKey, DedupStore, Delivery, DeliveryMode, ErrorKind,
    Failure, Handler, HandlerError, HandlerFn, Headers, Health, HealthConfig, HealthLevel,
    HealthReason, Inspector, Jitter, KeyOrdering, KillSwitchConfig, Layer, LeaseConfig,
    MemoryBroker, MemoryDedupStore, Message, OnRefused, OnStoreError, Origin, Outcome, Problem,
    Publish, PublishError, ResultExt, RetryConfig, Status, Summary, batch_handler_fn, handler_fn,
    shutdown_signal,
};

/// Batch handlers (`Consumer::run_batches_until`): one call for many deliveries, with an
/// outcome for each delivery.
pub use ackstack_core::batch;

/// Failure fingerprints: the cause a dead letter's metadata names
/// (`DeadLetterMetadata::fingerprint`), by which `ackstack dlq groups` groups them.
pub use ackstack_core::fingerprint;

/// Decoding helpers for handlers (`decode::json`: a payload that does not parse is a
/// permanent failure, dead-lettered at once).
pub use ackstack_core::decode;

/// The names of the metrics ackstack records (through the `metrics` crate).
pub use ackstack_core::metrics;

/// The in-memory broker: its source, settler and publisher, for tests and examples.
pub use ackstack_core::memory;

/// Testing a handler without a broker or waits: `testing::HandlerTest` runs messages through
/// the processing stack under tokio's paused clock and reports each one's attempts and fate.
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use ackstack_core::testing;

/// Writing your own [`DedupStore`]: the claim protocol's types.
pub mod dedup {
    pub use ackstack_core::dedup::{BoxFuture, Claim, DedupError, KeyFn, StoreHooks};
}

/// Writing your own layer: the types a [`Layer`] wraps, and the built-in
/// layers for use outside a [`Consumer`].
pub mod layer {
    pub use ackstack_core::dedup::Dedup;
    pub use ackstack_core::retry::Retry;
    pub use ackstack_core::{
        Classifier, DedupLayer, Either, Identity, Process, RetryLayer, Stack, Terminal,
    };
}

/// tower interoperability (feature `tower`): a `tower::Service<Delivery>` as the handler.
#[cfg(feature = "tower")]
pub use ackstack_core::tower;

/// Trace context from the producer (feature `otel`): `traceparent`/`tracestate` headers as the
/// OpenTelemetry parent of each `delivery` span.
#[cfg(feature = "otel")]
pub use ackstack_core::otel;

/// Writing an adapter for another broker: the contract (`Source`, `Settle` and what they
/// return), the helpers the adapters share, and the dead-letter format. Check an adapter
/// against the contract with the `ackstack-testkit` crate; the invariants are listed in
/// `docs/CONTRACT.md`.
pub mod adapter {
    // The mechanisms the adapters share (`ackstack_core::adapter`).
    pub use ackstack_core::adapter::{
        Counter, Generation, attempt_from_count, parse_attempt, parse_count,
    };
    /// Serde helpers for durations in configuration: `"30s"`, `"250ms"`, `"5m"`; a number
    /// without a unit is refused.
    pub use ackstack_core::config::duration;
    pub use ackstack_core::deadletter;
    pub use ackstack_core::error::{MAX_FAILURE_MESSAGE, truncate};
    pub use ackstack_core::{
        AckReport, Alone, Armed, BoxError, BrokerLimit, Capabilities, DeadLetter, Received, Settle,
        SettleError, SettleFailure, Settled, Source, SourceError, Watermark,
    };
}

#[cfg(feature = "rabbitmq")]
pub use ackstack_rabbitmq as rabbitmq;

#[cfg(feature = "sqs")]
pub use ackstack_sqs as sqs;

#[cfg(feature = "kafka")]
pub use ackstack_kafka as kafka;

#[cfg(feature = "nats")]
pub use ackstack_nats as nats;

#[cfg(feature = "redis-streams")]
pub use ackstack_redis_streams as redis_streams;

#[cfg(feature = "redis")]
pub use ackstack_redis as redis;

#[cfg(feature = "postgres")]
pub use ackstack_postgres as postgres;
