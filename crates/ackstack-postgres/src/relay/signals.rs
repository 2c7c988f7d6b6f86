//! The relay's metric names, and how a round's counts are recorded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::outbox::OutboxStatus;

/// Outbox rows published, by `destination`.
pub const OUTBOX_SENT: &str = "ackstack_outbox_sent_total";
/// Publishes that failed and will be tried again, by `destination`.
pub const OUTBOX_SEND_FAILURES: &str = "ackstack_outbox_send_failures_total";
/// Rows parked (refused for good, or past the attempt limit), by `destination`.
pub const OUTBOX_PARKED_TOTAL: &str = "ackstack_outbox_parked_total";
/// Rows waiting to be sent (parked rows not included), as of the last status query.
pub const OUTBOX_PENDING: &str = "ackstack_outbox_pending";
/// Seconds the oldest pending row has waited (0 when none), as of the last status query.
pub const OUTBOX_OLDEST_PENDING_SECONDS: &str = "ackstack_outbox_oldest_pending_seconds";
/// Rows parked now, as of the last status query.
pub const OUTBOX_PARKED: &str = "ackstack_outbox_parked";
/// Every outbox metric name, each labelled `outbox` (the table).
pub const OUTBOX_METRICS: &[&str] = &[
    OUTBOX_SENT,
    OUTBOX_SEND_FAILURES,
    OUTBOX_PARKED_TOTAL,
    OUTBOX_PENDING,
    OUTBOX_OLDEST_PENDING_SECONDS,
    OUTBOX_PARKED,
];

/// Adds `destinations.len()` to `total` and one per row to the metric of its destination.
pub(super) fn count(total: &AtomicU64, name: &'static str, table: &str, destinations: &[String]) {
    if destinations.is_empty() {
        return;
    }
    total.fetch_add(destinations.len() as u64, Ordering::Relaxed);
    let mut per: HashMap<&str, u64> = HashMap::new();
    for d in destinations {
        *per.entry(d.as_str()).or_default() += 1;
    }
    for (destination, n) in per {
        metrics::counter!(name, "outbox" => table.to_string(), "destination" => destination.to_string())
            .increment(n);
    }
}

/// Sets the gauges of `table` from a status query.
pub(super) fn record_status(table: &str, status: &OutboxStatus) {
    let table = table.to_string();
    metrics::gauge!(OUTBOX_PENDING, "outbox" => table.clone()).set(status.pending as f64);
    metrics::gauge!(OUTBOX_PARKED, "outbox" => table.clone()).set(status.parked as f64);
    metrics::gauge!(OUTBOX_OLDEST_PENDING_SECONDS, "outbox" => table)
        .set(status.oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
}
