//! Whether the cluster answers. librdkafka retries its connections by itself and says so only
//! through error events: `ALL_BROKERS_DOWN` when no broker of the cluster can be reached. The
//! source then fails its receives once nothing it fetched earlier is left to hand out (so the
//! runner counts receive errors and reports the broker unreachable in its status and health)
//! until the cluster answers again: a metadata request, asked at most once a second by the
//! poll thread, succeeds. (A record is no sign: it may have been prefetched before the outage.)
//!
//! A transport failure of one broker is not the cluster being unreachable: librdkafka moves to
//! another broker, and the error is only logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::types::RDKafkaErrorCode;

/// How often the poll thread asks a down cluster for metadata.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Since when the cluster has been unreachable, and why.
#[derive(Debug, Default)]
pub(crate) struct Reachability {
    down: Mutex<Option<Down>>,
}

#[derive(Debug)]
struct Down {
    since: Instant,
    reason: String,
    probed: Instant,
}

/// Whether an error code means that no broker of the cluster can be reached.
pub(crate) fn means_unreachable(code: RDKafkaErrorCode) -> bool {
    code == RDKafkaErrorCode::AllBrokersDown
}

impl Reachability {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the cluster cannot be reached (first report wins; later ones are quiet).
    pub(crate) fn lost(&self, reason: &str) {
        let mut down = self.lock();
        if down.is_none() {
            tracing::warn!(
                reason,
                "Kafka cluster unreachable; receives fail until it answers"
            );
            let now = Instant::now();
            *down = Some(Down {
                since: now,
                reason: reason.to_string(),
                probed: now,
            });
        }
    }

    /// Records that the cluster answered.
    pub(crate) fn regained(&self) {
        if let Some(down) = self.lock().take() {
            tracing::info!(after = ?down.since.elapsed(), "Kafka cluster reachable again");
        }
    }

    /// While the cluster is unreachable: what to tell the runner.
    pub(crate) fn error(&self) -> Option<String> {
        self.lock().as_ref().map(|d| {
            format!(
                "Kafka cluster unreachable for {:.1?}: {}",
                d.since.elapsed(),
                d.reason
            )
        })
    }

    /// Whether the cluster is down and was not asked for [`PROBE_EVERY`]; marks it asked.
    pub(crate) fn probe_due(&self) -> bool {
        match self.lock().as_mut() {
            Some(down) if down.probed.elapsed() >= PROBE_EVERY => {
                down.probed = Instant::now();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_until_regained_and_probed_at_most_once_a_second() {
        let reach = Reachability::default();
        assert!(reach.error().is_none());
        assert!(!reach.probe_due(), "nothing to probe while reachable");
        reach.lost("all brokers down");
        reach.lost("a second report");
        let error = reach.error().unwrap();
        assert!(error.contains("all brokers down"), "{error}");
        assert!(!reach.probe_due(), "just lost: the next probe waits");
        reach.regained();
        assert!(reach.error().is_none());
        assert!(means_unreachable(RDKafkaErrorCode::AllBrokersDown));
        assert!(!means_unreachable(RDKafkaErrorCode::BrokerTransportFailure));
    }
}
