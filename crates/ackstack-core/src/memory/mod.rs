//! An in-memory broker with real at-least-once behaviour, for examples and users' tests.
//!
//! It behaves like SQS: a received message is invisible for the visibility timeout and comes
//! back with its receive count (the delivery's `attempt`) one higher if it is not acked in time;
//! [`Settle::retry`] hides it for the retry delay; dead letters go to the queue `<queue>-dlq`,
//! which is an ordinary queue (consume it to replay). Acks are batched. Nothing is persisted:
//! the broker lives as long as the process.
//!
//! ```
//! use ackstack_core::memory::MemoryBroker;
//! use ackstack_core::Message;
//!
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"order_id":"A-1"}"#));
//! assert_eq!(broker.len("orders"), 1);
//! let source = broker.source("orders");
//! # drop(source);
//! ```

mod broker;
mod settler;
mod source;

pub use broker::{DLQ_SUFFIX, MemoryBroker, MemoryPublisher, MemoryToken, QueueStats};
pub use settler::MemorySettler;
pub use source::MemorySource;
