//! What a run reports: the live [`Status`], the [`Summary`] it returns and the
//! [`ConsumerError`] it may stop with, and the counters behind them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::SourceError;
use crate::handler::RunStats;

use super::config::ConfigError;

/// The consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The source failed in a way receiving again cannot fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The configuration cannot work.
    #[error("invalid consumer configuration: {0}")]
    Config(#[from] ConfigError),
    /// A bug: the run could not be wound down cleanly.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// What a run did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries received.
    pub received: u64,
    /// Deliveries the handler stack decided to ack (including deduplicated ones).
    pub succeeded: u64,
    /// Acks the broker confirmed.
    pub acked: u64,
    /// Ack calls made (each a batch).
    pub ack_calls: u64,
    /// Deliveries settled for a later retry.
    pub retried: u64,
    /// Deliveries forwarded to the dead-letter destination.
    pub dead_lettered: u64,
    /// Deliveries acked as duplicates without calling the handler.
    pub deduplicated: u64,
    /// Deliveries processed without deduplication because their key was missing or empty.
    pub dedup_keyless: u64,
    /// Acks the broker refused (the messages come back).
    pub ack_failures: u64,
    /// Retries or dead-letters the broker did not confirm (the messages come back).
    pub settle_failures: u64,
    /// Deliveries whose lease was lost while they ran (never acked).
    pub leases_lost: u64,
    /// Deliveries still running at the shutdown deadline (abandoned, never acked).
    pub abandoned: u64,
    /// Receive calls that failed.
    pub receive_errors: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) succeeded: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) settle_failures: AtomicU64,
    pub(super) leases_lost: AtomicU64,
}

/// A live view of a running consumer, from [`Consumer::status`](crate::Consumer::status): for health checks, progress
/// reports and "stop when idle" conditions.
#[derive(Clone, Debug)]
pub struct Status {
    pub(super) inner: Arc<StatusInner>,
}

#[derive(Debug)]
pub(super) struct StatusInner {
    started: Instant,
    received: AtomicU64,
    finished: AtomicU64,
    last_activity_ms: AtomicU64,
    pub(super) stats: Arc<RunStats>,
    /// Receive calls that failed in a row (0 once one succeeds).
    receive_failures: std::sync::atomic::AtomicU32,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            inner: Arc::new(StatusInner {
                started: Instant::now(),
                received: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                last_activity_ms: AtomicU64::new(0),
                stats: Arc::default(),
                receive_failures: std::sync::atomic::AtomicU32::new(0),
            }),
        }
    }
}

impl Status {
    fn touch(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner
            .last_activity_ms
            .fetch_max(ms, AtomicOrdering::Relaxed);
    }

    pub(super) fn received(&self, n: u64) {
        if n > 0 {
            self.inner.received.fetch_add(n, AtomicOrdering::Relaxed);
            self.touch();
        }
    }

    fn finished(&self) {
        self.inner.finished.fetch_add(1, AtomicOrdering::Relaxed);
        self.touch();
    }

    /// Deliveries received so far.
    pub fn received_total(&self) -> u64 {
        self.inner.received.load(AtomicOrdering::Relaxed)
    }

    /// Deliveries being processed or settled now.
    pub fn in_flight(&self) -> u64 {
        let finished = self.inner.finished.load(AtomicOrdering::Relaxed);
        self.received_total().saturating_sub(finished)
    }

    /// Dead-letter copies the broker refused for good so far (see [`OnRefused`](crate::OnRefused)). Rising means
    /// messages are stuck: too large, or invalid, for the dead-letter destination.
    pub fn dead_letters_refused(&self) -> u64 {
        self.inner
            .stats
            .dead_letters_refused
            .load(AtomicOrdering::Relaxed)
    }

    /// Receive calls that failed in a row just now (the broker is unreachable or refusing;
    /// the consumer keeps trying with backoff). 0 once a receive succeeds.
    pub fn receive_failures(&self) -> u32 {
        self.inner.receive_failures.load(AtomicOrdering::Relaxed)
    }

    pub(super) fn set_receive_failures(&self, n: u32) {
        self.inner
            .receive_failures
            .store(n, AtomicOrdering::Relaxed);
    }

    /// Deliveries held in process right now because the dedup store does not answer or their
    /// key is busy elsewhere. Non-zero for long means the store is down.
    pub fn held_for_store(&self) -> u64 {
        self.inner.stats.held.load(AtomicOrdering::Relaxed)
    }

    /// How long nothing has been received and nothing has been in flight (zero while busy).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.inner.last_activity_ms.load(AtomicOrdering::Relaxed));
        self.inner.started.elapsed().saturating_sub(last)
    }

    /// Completes once the consumer has been idle for `period`: a ready-made shutdown signal.
    pub async fn idle(&self, period: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= period {
                return;
            }
            tokio::time::sleep((period - idle).max(Duration::from_millis(5))).await;
        }
    }
}

/// Counts a delivery as in flight until dropped (also when its task is aborted).
pub(super) struct InFlight {
    status: Status,
}

impl InFlight {
    pub(super) fn start(status: Status) -> Self {
        metrics::gauge!(crate::metrics::IN_FLIGHT).increment(1.0);
        InFlight { status }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::IN_FLIGHT).decrement(1.0);
        self.status.finished();
    }
}
