//! The runner: receives, processes with bounded concurrency, settles, and shuts down cleanly.
//!
//! # A delivery's path through these files
//!
//! 1. **Receive** (`receive.rs`). [`Consumer::run_until`] builds the processing stack, starts
//!    the batch acker (`acker.rs`) and the lease keeper (`lease.rs`), then loops: it takes a
//!    concurrency permit, asks the source for at most as many deliveries as there are free
//!    permits, hands their leases to the keeper as one batch, enters each key in the per-key
//!    gate (`ordering.rs`) and spawns a task for each delivery (`tasks.rs`); when no permit is
//!    left, it runs the batch's last delivery itself until that delivery first waits, and
//!    spawns it only then. At shutdown it stops receiving, drains up to the deadline, stops
//!    what is left (unacked) and flushes the acker.
//! 2. **Decide** (`deliver.rs`, with the stack from `retry.rs`, `dedup/layer.rs` and `handler.rs`
//!    beside this folder). The delivery's task waits for its key's turn, leaves the delivery
//!    unsettled if its lease was lost or the deadline passed meanwhile, and runs the stack,
//!    which turns it into an [`Outcome`](crate::Outcome). At-most-once acks before the stack
//!    runs.
//! 3. **Settle** (`settle.rs`). An ack goes to the batch acker, its lease kept until the ack
//!    is sent; a retry or a release gives up the lease first; a dead-letter copy is written
//!    and, once confirmed, the original is acked (where a released delivery would not come
//!    back by itself, the write is tried again in place). A failed settlement releases the
//!    delivery after a pause, unless its lease is lost.
//!
//! Pausing and the kill switch act at the receive loop's gate (`control.rs`, with the circuit
//! breaker in `kill_switch.rs`); the backlog the broker reports is polled by `backlog.rs`.
//!
//! The settings are in `config.rs` ([`ConsumerConfig`], checked by
//! [`ConsumerConfig::validate`]), the builder in `builder.rs` ([`Consumer`], its setters and
//! [`Consumer::effective_config`]), and what a run reports in `status.rs` ([`Status`] while it
//! runs, [`Summary`] when it stops).

mod acker;
mod adaptive;
mod backlog;
mod builder;
mod config;
mod control;
mod deliver;
mod gate;
mod kill_switch;
mod lease;
mod ordering;
mod receive;
mod settle;
mod state;
mod status;
mod tasks;
#[cfg(test)]
mod test_settler;

pub use adaptive::AdaptiveConcurrency;
pub use builder::{Consumer, Inspector};
pub use config::{ConfigError, ConsumerConfig, DeliveryMode, HealthConfig, KeyOrdering, OnRefused};
pub use control::Control;
pub(crate) use gate::{AttemptGate, Seat};
pub use kill_switch::KillSwitchConfig;
pub use lease::LeaseConfig;
pub use state::ConsumerState;
pub(crate) use status::Condition;
pub use status::{ConsumerError, Health, HealthLevel, HealthReason, Problem, Status, Summary};
