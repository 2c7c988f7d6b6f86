//! Metric names, recorded through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any `metrics` recorder (Prometheus, StatsD, ...) to collect them; with none installed
//! recording costs next to nothing. The metrics carry no labels (a label per queue would cost
//! an allocation per message); run one recorder scope per consumer to tell consumers apart.
//! `acked` counts what the adapter accepted as acknowledged (RabbitMQ may still hold a tag back
//! for its next cumulative ack; Kafka commits on its next commit tick).
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `ackstack_received_total` | counter | deliveries received |
//! | `ackstack_acked_total` | counter | deliveries acked by the broker |
//! | `ackstack_retried_total` | counter | deliveries settled for a later retry |
//! | `ackstack_dead_lettered_total` | counter | deliveries forwarded to the dead-letter destination |
//! | `ackstack_deduplicated_total` | counter | deliveries acked without calling the handler (already done) |
//! | `ackstack_ack_failures_total` | counter | acks the broker refused (the message will come back) |
//! | `ackstack_settle_failures_total` | counter | retries or dead-letters the broker did not confirm |
//! | `ackstack_lease_extensions_total` | counter | lease extensions made |
//! | `ackstack_leases_lost_total` | counter | leases lost while a handler ran (work cancelled, not acked) |
//! | `ackstack_handler_panics_total` | counter | handler panics caught (counted as transient failures) |
//! | `ackstack_abandoned_total` | counter | deliveries left unacked at the shutdown deadline |
//! | `ackstack_dedup_held_total` | counter | deliveries held in process because the dedup store was unreachable or their key busy (not counted as attempts) |
//! | `ackstack_dedup_keyless_total` | counter | deliveries without a (non-empty) dedup key, processed without deduplication |
//! | `ackstack_dead_letters_refused_total` | counter | dead-letter copies the broker refused for good (too large, invalid); the message is kept unacked |
//! | `ackstack_in_flight` | gauge | deliveries being processed now |
//! | `ackstack_handler_seconds` | histogram | time from handler start to outcome |

/// Deliveries received.
pub const RECEIVED: &str = "ackstack_received_total";
/// Deliveries acked by the broker.
pub const ACKED: &str = "ackstack_acked_total";
/// Deliveries settled for a later retry.
pub const RETRIED: &str = "ackstack_retried_total";
/// Deliveries forwarded to the dead-letter destination.
pub const DEAD_LETTERED: &str = "ackstack_dead_lettered_total";
/// Deliveries acked without calling the handler because their key was already done.
pub const DEDUPLICATED: &str = "ackstack_deduplicated_total";
/// Acks the broker refused.
pub const ACK_FAILURES: &str = "ackstack_ack_failures_total";
/// Retries or dead-letters the broker did not confirm.
pub const SETTLE_FAILURES: &str = "ackstack_settle_failures_total";
/// Lease extensions made.
pub const LEASE_EXTENSIONS: &str = "ackstack_lease_extensions_total";
/// Leases lost while a handler ran.
pub const LEASES_LOST: &str = "ackstack_leases_lost_total";
/// Handler panics caught.
pub const HANDLER_PANICS: &str = "ackstack_handler_panics_total";
/// Deliveries left unacked at the shutdown deadline.
pub const ABANDONED: &str = "ackstack_abandoned_total";
/// Deliveries being processed now.
pub const IN_FLIGHT: &str = "ackstack_in_flight";
/// Handler latency in seconds.
pub const HANDLER_SECONDS: &str = "ackstack_handler_seconds";
/// Deliveries held in process while the dedup store was unreachable or their key busy.
pub const DEDUP_HELD: &str = "ackstack_dedup_held_total";
/// Deliveries without a non-empty dedup key (not deduplicated).
pub const DEDUP_KEYLESS: &str = "ackstack_dedup_keyless_total";
/// Dead-letter copies the broker refused for good.
pub const DEAD_LETTERS_REFUSED: &str = "ackstack_dead_letters_refused_total";
