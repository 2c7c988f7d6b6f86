//! The backlog watcher: asks the broker every `backlog_interval` how many messages wait
//! ([`Settle::backlog`]) and shows the answer in the `ackstack_backlog` gauge, and per
//! partition in `ackstack_partition_lag`. When the broker stops answering after it did, the
//! gauges say unknown (NaN) rather than keep their last value.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::AbortOnDropHandle;

use crate::metrics::Metrics;
use crate::source::Settle;

/// Starts asking `settler` every `every`; `None` when `every` is zero. Stops when dropped.
pub(super) fn spawn<S: Settle>(
    settler: S,
    every: Duration,
    metrics: Arc<Metrics>,
) -> Option<AbortOnDropHandle<()>> {
    if every.is_zero() {
        return None;
    }
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        let mut partitions = HashMap::new();
        let mut shown = false;
        loop {
            let answer = settler.backlog().await;
            if answer.is_none() && shown {
                metrics.backlog.set(f64::NAN);
                for gauge in partitions.values() {
                    metrics::Gauge::set(gauge, f64::NAN);
                }
            }
            if let Some(backlog) = answer {
                shown = true;
                metrics.backlog.set(backlog.total as f64);
                // A partition no longer in the answer (revoked) shows no lag, not its last.
                for gauge in partitions.values() {
                    metrics::Gauge::set(gauge, 0.0);
                }
                for (partition, lag) in backlog.partitions {
                    partitions
                        .entry(partition)
                        .or_insert_with(|| metrics.partition_lag(partition))
                        .set(lag as f64);
                }
            }
            tokio::time::sleep(every).await;
        }
    })))
}
