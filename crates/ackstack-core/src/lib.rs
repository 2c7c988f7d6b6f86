//! The core of ackstack: the broker-independent consumer contract, the runner, the reliability
//! layers and an in-memory broker.
//!
//! (Crate documentation is completed with the runner.)

pub mod acker;
pub mod backoff;
pub mod config;
pub mod deadletter;
pub mod decode;
pub mod dedup;
pub mod delivery;
pub mod error;
pub mod handler;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod ordering;
pub mod outcome;
pub mod publish;
pub mod retry;
pub mod runner;
pub mod source;
pub mod watermark;

pub use backoff::{Backoff, Jitter};
pub use deadletter::{DeadLetter, DeadLetterMetadata, DeadLetterReason};
pub use dedup::{
    DedupConfig, DedupKey, DedupLayer, DedupStore, KeyFn, MemoryDedupStore, OnStoreError,
};
pub use delivery::{Delivery, Headers, Origin};
pub use error::{BoxError, ErrorKind, Failure, HandlerError, SettleError, SourceError};
pub use handler::{
    Classifier, Context, Either, Handler, HandlerFn, Identity, Layer, Process, Stack, Terminal,
    handler_fn,
};
pub use lease::LeaseConfig;
pub use memory::MemoryBroker;
pub use outcome::Outcome;
pub use publish::{Message, Publish, PublishError};
pub use retry::{RetryConfig, RetryLayer};
pub use runner::{
    ConfigError, Consumer, ConsumerConfig, ConsumerError, DeliveryMode, Inspector, KeyOrdering,
    OnRefused, Status, Summary,
};
pub use source::{AckReport, Capabilities, Received, Settle, SettleFailure, Settled, Source};
pub use watermark::Watermark;
