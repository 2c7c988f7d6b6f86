//! The core of ackstack: the broker-independent consumer contract, the runner, the reliability
//! layers and an in-memory broker. Applications usually depend on the `ackstack` facade, which
//! re-exports this crate; adapter authors depend on this one.
//!
//! # The life of a delivery
//!
//! ```text
//!  Source::receive ──► runner/receive.rs: the receive loop, one task per delivery
//!                         │   holds a concurrency permit and a lease (runner/lease.rs)
//!                         ▼
//!  runner/deliver.rs ──► [per-key gate] (runner/ordering.rs)
//!                         ▼
//!   retry (retry.rs) ─► dedup (dedup/layer.rs) ─► your layers ─► Terminal ─► your Handler (handler.rs)
//!        │ the one place a failure becomes Retry or DeadLetter; panics are attempts
//!        ▼
//!   Outcome (outcome.rs) ──► runner/settle.rs, through the adapter's Settle (source.rs):
//!        Ack ───────────► batch acker (runner/acker.rs) ─► Settle::ack (batched, lease kept until sent)
//!        Retry{after} ──► Settle::retry (the broker delays it; lease released first)
//!        Defer{after} ──► Settle::defer (delayed like a retry, its attempt number kept)
//!        DeadLetter ────► Settle::dead_letter (confirmed copy) ─► ack of the original
//!        Release ───────► Settle::release (not an attempt: given back at once)
//! ```
//!
//! 1. **Receive.** The runner asks the [`Source`] for at most as many deliveries as it has free
//!    concurrency permits. Each [`Delivery`] carries its payload, headers, key, message id, the
//!    attempt number *as the broker counts it* and its [`Origin`].
//! 2. **Decide.** The processing stack turns the delivery into an [`Outcome`]. Its order is
//!    fixed: the retry layer outermost (schedule from [`Backoff`], limit from
//!    [`RetryConfig::max_attempts`]), then deduplication ([`DedupKey`], a [`DedupStore`]), then
//!    the [`Layer`]s you add, then your [`Handler`]. A [`HandlerError`] says whether a failure
//!    is transient (retried) or permanent (dead-lettered at once).
//! 3. **Settle.** The runner settles the outcome through the adapter's [`Settle`]
//!    implementation, which consumes the token so that a delivery cannot be settled twice. A
//!    failed settlement hands the token back ([`SettleFailure`]) and the delivery is released,
//!    never acked. A lost lease cancels the handler's [`Context`] and nothing is settled.
//!
//! # The adapter contract
//!
//! An adapter implements [`Source`] (receive, report [`Capabilities`]) and [`Settle`] (ack,
//! retry, dead-letter, extend, release). The fourteen invariants every adapter keeps, and the
//! tests that prove each, are listed in the repository's `docs/CONTRACT.md`; the
//! `ackstack-testkit` crate runs the same conformance checks on any adapter. What every
//! adapter needs besides the contract is in [`adapter`] (reading attempt numbers, fencing
//! tokens by [`Generation`](adapter::Generation), stats [`Counter`](adapter::Counter)s) and
//! [`deadletter`] (the dead-letter format, and shrinking a copy's error message to fit).
//!
//! # Example
//!
//! A handler that fails once and then succeeds, on the in-memory broker:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use ackstack_core::{Backoff, Consumer, HandlerError, MemoryBroker, Message, handler_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let broker = MemoryBroker::new();
//! broker.publish("q", Message::new("hello"));
//! let calls = Arc::new(AtomicU32::new(0));
//! let c = calls.clone();
//! let consumer = Consumer::new(broker.source("q"))
//!     .backoff(Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1)).no_jitter())
//!     .max_attempts(3);
//! let status = consumer.status();
//! let summary = consumer
//!     .run_until(
//!         handler_fn(move |delivery, _cx| {
//!             let first = c.fetch_add(1, Ordering::SeqCst) == 0;
//!             async move {
//!                 if first {
//!                     return Err(HandlerError::transient("not yet"));
//!                 }
//!                 assert_eq!(delivery.attempt, 2, "the broker counted the retry");
//!                 Ok(())
//!             }
//!         }),
//!         async move { status.idle(Duration::from_millis(300)).await },
//!     )
//!     .await
//!     .unwrap();
//! assert_eq!((summary.retried, summary.acked), (1, 1));
//! assert!(broker.is_empty("q"));
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
pub mod adapter;
pub mod backoff;
pub mod batch;
mod cancel;
mod clock;
pub mod config;
mod context;
pub mod deadletter;
pub mod decode;
pub mod dedup;
pub mod delivery;
pub mod error;
pub mod fingerprint;
pub mod handler;
mod id_hash;
pub mod memory;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
pub mod outcome;
pub mod publish;
pub mod retry;
pub mod runner;
pub mod signal;
pub mod source;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
#[cfg(feature = "tower")]
pub mod tower;
pub mod watermark;

pub use backoff::{Backoff, Jitter};
pub use batch::{Batch, BatchConfig, BatchHandler, BatchResults, batch_handler_fn};
pub use deadletter::{DeadLetter, DeadLetterMetadata, DeadLetterReason};
pub use dedup::{
    DedupConfig, DedupKey, DedupLayer, DedupStore, KeyFn, MemoryDedupStore, OnStoreError,
};
pub use delivery::{Delivery, Headers, Origin};
pub use error::{BoxError, ErrorKind, Failure, HandlerError, ResultExt, SettleError, SourceError};
pub use handler::{
    Classifier, Context, Either, Handler, HandlerFn, Identity, Layer, Process, Stack, Terminal,
    handler_fn,
};
pub use memory::MemoryBroker;
pub use outcome::Outcome;
pub use publish::{Message, Publish, PublishError};
pub use retry::{RetryConfig, RetryLayer};
pub use runner::LeaseConfig;
pub use runner::{
    AdaptiveConcurrency, ConfigError, Consumer, ConsumerConfig, ConsumerError, ConsumerState,
    Control, DeliveryMode, Health, HealthConfig, HealthLevel, HealthReason, Inspector, KeyOrdering,
    KillSwitchConfig, OnRefused, Problem, Status, Summary,
};
pub use signal::shutdown_signal;
pub use source::{
    AckReport, Alone, Armed, Backlog, BrokerLimit, Capabilities, Received, Settle, SettleFailure,
    Settled, Source,
};
pub use watermark::Watermark;
