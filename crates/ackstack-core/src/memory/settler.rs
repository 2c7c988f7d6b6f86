//! [`MemorySettler`]: settling deliveries of one in-memory queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::later;
use crate::deadletter::{DeadLetter, millis};
use crate::delivery::Delivery;
use crate::error::{Failure, SettleError};
use crate::source::{AckReport, Backlog, Settle, SettleFailure, Settled};

use super::broker::{DLQ_SUFFIX, MemoryBroker, MemoryToken, QueueStats, Stored};

/// Settles deliveries of a [`MemorySource`].
#[derive(Clone, Debug)]
pub struct MemorySettler {
    pub(super) broker: MemoryBroker,
    pub(super) queue: Arc<str>,
}

impl MemorySettler {
    /// Hides the owned message for `after`, once `record` has noted why on it and in the
    /// queue's counts.
    fn hold_back(
        &self,
        token: MemoryToken,
        after: Duration,
        record: impl FnOnce(&mut Stored, &mut QueueStats),
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let result = self.broker.with_queue(&self.queue, |q| {
            let mut stats = q.stats;
            record(q.owned(token)?, &mut stats);
            q.stats = stats;
            q.hide(token.id, later(Instant::now(), after));
            Ok(())
        });
        match result {
            Ok(()) => {
                // A receive already waiting must learn of the new due time.
                self.broker.shared.notify.notify_waiters();
                Ok(Settled::Done)
            }
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }
}

impl Settle for MemorySettler {
    type Token = MemoryToken;

    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        self.broker.with_queue(&self.queue, |q| {
            q.stats.ack_calls += 1;
            let mut report = AckReport::all(0);
            for token in tokens {
                match q.owned(token) {
                    Ok(_) => {
                        q.messages.remove(&token.id);
                        report.acked += 1;
                    }
                    Err(e) => report.failed.push((token, e)),
                }
            }
            q.stats.acked += report.acked as u64;
            report
        })
    }

    async fn retry(
        &self,
        token: MemoryToken,
        _delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.hold_back(token, after, |m, stats| {
            m.first_failure.get_or_insert(failure.at);
            stats.retries += 1;
        })
    }

    /// Hides the message for `after` and counts the receive that follows as a deferral, not
    /// an attempt; the first deferral's time travels in its
    /// [`DEFERRED_SINCE_HEADER`](crate::deadletter::DEFERRED_SINCE_HEADER).
    async fn defer(
        &self,
        token: MemoryToken,
        _delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let since = failure.deferred_since.unwrap_or(failure.at);
        self.hold_back(token, after, |m, stats| {
            m.deferrals = m.deferrals.saturating_add(1);
            m.message.headers.insert(
                crate::deadletter::DEFERRED_SINCE_HEADER,
                millis(since).to_string(),
            );
            stats.deferrals += 1;
        })
    }

    async fn dead_letter(
        &self,
        token: MemoryToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        let copy = self.broker.with_queue(&self.queue, |q| {
            let m = q.owned(token)?;
            let mut meta = letter.metadata(delivery);
            if let Some(first) = m.first_failure {
                meta.first_failure_ms = Some(millis(first));
            }
            let mut message = m.message.clone();
            meta.apply_to(&mut message.headers);
            q.stats.dead_lettered += 1;
            Ok(message)
        });
        match copy {
            Ok(message) => {
                self.broker
                    .publish(&format!("{}{DLQ_SUFFIX}", self.queue), message);
                Ok(Settled::AckOriginal(token))
            }
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }

    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        self.broker.with_queue(&self.queue, |q| {
            q.owned(*token)?;
            q.hide(token.id, later(Instant::now(), by));
            q.stats.extends += 1;
            Ok(())
        })
    }

    async fn release(&self, token: MemoryToken) {
        let released = self.broker.with_queue(&self.queue, |q| {
            if q.owned(token).is_err() {
                return false;
            }
            q.hide(token.id, Instant::now());
            true
        });
        if released {
            self.broker.shared.notify.notify_waiters();
        }
    }

    /// The messages of the queue not received by anyone now.
    async fn backlog(&self) -> Option<Backlog> {
        let waiting = self.broker.with_queue(&self.queue, |q| {
            q.messages.values().filter(|m| !m.in_flight).count()
        });
        Some(Backlog::new(waiting as u64))
    }
}
