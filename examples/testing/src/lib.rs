//! How to test code built on ackstack, without a broker.
//!
//! ```text
//! cargo test -p example-testing
//! ```
//!
//! Two kinds of test, each in its own file under `tests/`:
//!
//! - `tests/handler.rs` unit-tests a handler ([`charge`], below) the way it runs in
//!   production, with `ackstack::testing::HandlerTest` (feature `test-util`): each message
//!   goes through the real processing stack and runner over the in-memory broker, under
//!   tokio's paused clock, so the production retry schedule passes in virtual time. Assert on
//!   each message's attempts (ack, retry after a delay, dead letter), its fate (with the
//!   dead letter's metadata) and on the handler's effects. Retries and dead-lettering are the
//!   real ones, not mocks.
//! - `tests/conformance.rs` runs ackstack's conformance suite (`ackstack-testkit`) on an
//!   adapter of your own: [`toy`] here, a toy adapter over the in-memory broker. An adapter for
//!   a real broker implements the same two traits, and its test looks the same.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use ackstack::{Delivery, HandlerError};
use serde::Deserialize;

pub mod toy;

/// An order, as published.
#[derive(Debug, Deserialize)]
pub struct Order {
    /// The order's id.
    pub order_id: String,
    /// What to charge.
    pub amount_cents: i64,
}

/// The charges made, by order id: the effect the tests assert on.
#[derive(Clone, Debug, Default)]
pub struct Ledger(Arc<Mutex<BTreeMap<String, i64>>>);

impl Ledger {
    /// The charges so far.
    pub fn charges(&self) -> BTreeMap<String, i64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn add(&self, order: &Order) {
        let mut charges = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *charges.entry(order.order_id.clone()).or_default() += order.amount_cents;
    }
}

/// The handler under test: charges a valid order once. A body that is not an order, or a
/// non-positive amount, is a permanent failure (dead-lettered at once); the header
/// `x-fail-attempts: N` makes the first N attempts fail transiently, standing in for a
/// payment provider that is down for a while.
pub async fn charge(delivery: Delivery, ledger: Ledger) -> Result<(), HandlerError> {
    let order: Order = ackstack::decode::json(&delivery)?;
    if order.amount_cents <= 0 {
        return Err(HandlerError::permanent(format!(
            "order {}: the amount must be positive",
            order.order_id
        )));
    }
    let fail_attempts: u32 = delivery
        .headers
        .get_str("x-fail-attempts")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if delivery.attempt <= fail_attempts {
        return Err(HandlerError::transient("payment provider unavailable"));
    }
    ledger.add(&order);
    Ok(())
}
