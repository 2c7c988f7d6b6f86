//! The core of ackstack: the broker-independent consumer contract, the runner, the reliability
//! layers and an in-memory broker.
//!
//! (Crate documentation is completed with the runner.)

pub mod backoff;
pub mod config;
pub mod deadletter;
pub mod dedup;
pub mod delivery;
pub mod error;
pub mod handler;
pub mod metrics;
pub mod outcome;
pub mod publish;
pub mod source;

pub use backoff::{Backoff, Jitter};
pub use deadletter::{DeadLetter, DeadLetterMetadata, DeadLetterReason};
pub use delivery::{Delivery, Headers, Origin};
pub use error::{BoxError, ErrorKind, Failure, HandlerError, SettleError, SourceError};
pub use handler::{
    Context, Handler, HandlerFn, Identity, Layer, Process, Stack, Terminal, handler_fn,
};
pub use outcome::Outcome;
pub use publish::{Message, Publish, PublishError};
pub use source::{AckReport, Capabilities, Received, Settle, SettleFailure, Settled, Source};
