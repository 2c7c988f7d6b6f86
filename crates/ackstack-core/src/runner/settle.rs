//! Settlement: acks through the batch acker, retries, dead letters (kept trying where a
//! release would not redeliver) and releases, with the lease given up in the right order.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::deadletter::DeadLetter;
use crate::delivery::Delivery;
use crate::error::SettleError;
use crate::handler::{Context, Process};
use crate::outcome::Outcome;
use crate::source::{Settle, SettleFailure, Settled};

use super::config::OnRefused;
use super::deliver::Shared;
use super::lease::LeaseGuard;

impl<P: Process, S: Settle> Shared<P, S> {
    /// Dead-letters; where a released delivery would not come back by itself (cumulative
    /// commits), keeps trying in place until the copy is confirmed, the lease is lost or the
    /// work is cancelled.
    async fn dead_letter(
        &self,
        mut token: S::Token,
        delivery: &Delivery,
        letter: &DeadLetter,
        cx: &Context,
    ) -> Result<Settled<S::Token>, SettleFailure<S::Token>> {
        let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30))
            .equal_jitter();
        let mut tries = 0;
        loop {
            let result = self.settler.dead_letter(token, delivery, letter).await;
            self.stats.dead_letters.set(
                result
                    .as_ref()
                    .is_err_and(|failure| !failure.error.is_lease_lost()),
            );
            if let Err(failure) = &result
                && matches!(failure.error, SettleError::Rejected(_))
            {
                self.refused(delivery, &failure.error, cx);
            }
            match result {
                Err(failure)
                    if (!self.release_redelivers
                        || (self.on_refused == OnRefused::Hold
                            && matches!(failure.error, SettleError::Rejected(_))))
                        && !failure.error.is_lease_lost()
                        && !cx.is_cancelled() =>
                {
                    tries += 1;
                    let wait = backoff.delay(tries);
                    tracing::warn!(error = %failure.error, retry_in = ?wait, "dead-letter not confirmed; trying again");
                    tokio::select! {
                        _ = cx.cancelled() => return Err(failure),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    token = failure.token;
                }
                other => return other,
            }
        }
    }

    /// Counts a dead-letter copy the broker refused for good; logs it at error once per message.
    fn refused(&self, delivery: &Delivery, error: &SettleError, cx: &Context) {
        cx.metrics().dead_letters_refused.increment(1);
        self.stats
            .dead_letters_refused
            .fetch_add(1, AtomicOrdering::Relaxed);
        if self.refusals.first_time(delivery) {
            tracing::error!(
                error = %error,
                message_id = delivery.message_id.as_deref().unwrap_or(""),
                "the broker refuses this message's dead-letter copy for good; it is kept \
                 unacked (policy {:?}) until an operator deals with it",
                self.on_refused
            );
        } else {
            tracing::debug!(error = %error, "dead-letter copy refused again");
        }
    }

    /// Releases the delivery for redelivery: its lease first (waiting out an extension in
    /// flight, so none lands after the release), then the message. A lease already lost is
    /// not ours to release.
    async fn give_back(
        &self,
        token: S::Token,
        lease: Option<LeaseGuard<S::Token>>,
        at_shutdown: bool,
    ) {
        if let Some(lease) = lease {
            if lease.is_lost() {
                return;
            }
            lease.release().await;
        }
        if at_shutdown {
            self.settler.release_at_shutdown(token).await;
        } else {
            self.settler.release(token).await;
        }
    }

    /// Settles from the outcome. The lease is kept until the ack is confirmed; for a retry it
    /// is released (waiting out an extension in flight) before the broker is told to hold the
    /// message back, so that no extension undoes the delay.
    pub(super) async fn settle(
        &self,
        token: S::Token,
        delivery: &Delivery,
        outcome: Outcome,
        mut lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
    ) {
        let settled = match outcome {
            Outcome::Release => {
                // Never started; when the run is ending, given back in the broker's terms for
                // a delivery left at shutdown.
                let at_shutdown = self.stopping.is_cancelled();
                self.give_back(token, lease, at_shutdown).await;
                return;
            }
            Outcome::Ack => {
                self.counters
                    .succeeded
                    .fetch_add(1, AtomicOrdering::Relaxed);
                self.acks.push_held(token, lease).await;
                return;
            }
            Outcome::Retry { after, failure } => {
                self.counters.retried.fetch_add(1, AtomicOrdering::Relaxed);
                cx.metrics().retried(failure.kind);
                tracing::info!(after = ?after, error = %failure, "retry");
                if let Some(lease) = lease.take() {
                    lease.release().await;
                }
                self.settler.retry(token, delivery, after, &failure).await
            }
            Outcome::Defer { after, failure } => {
                // Counted by the retry layer, which decided it. The lease is kept until the
                // original is acked, as for a dead letter: a deferral is most often a copy
                // (RabbitMQ, SQS), and an original whose lease lapsed before its ack would come
                // back and be deferred twice.
                tracing::info!(after = ?after, attempt = delivery.attempt, "deferred");
                let settled = self.settler.defer(token, delivery, after, &failure).await;
                if let (Ok(Settled::Done), Some(lease)) = (&settled, lease.take()) {
                    // Held back at the broker: no extension may follow.
                    lease.release().await;
                }
                settled
            }
            Outcome::DeadLetter(failure) => {
                let letter = DeadLetter::new(delivery, failure);
                self.settle_letter(token, delivery, letter, lease, cx).await;
                return;
            }
        };
        self.finish(settled, delivery, lease, cx).await;
    }

    /// Dead-letters with `letter` (its copy confirmed before the original is acked).
    pub(super) async fn settle_letter(
        &self,
        token: S::Token,
        delivery: &Delivery,
        letter: DeadLetter,
        lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
    ) {
        self.counters
            .dead_lettered
            .fetch_add(1, AtomicOrdering::Relaxed);
        cx.metrics().dead_lettered(letter.failure.kind);
        tracing::warn!(error = %letter.failure, reason = ?letter.reason, "dead-letter");
        let settled = self.dead_letter(token, delivery, &letter, cx).await;
        self.finish(settled, delivery, lease, cx).await;
    }

    /// Acks the original of a confirmed copy, or gives a delivery whose settlement failed back
    /// after a pause (unless it is no longer ours).
    pub(super) async fn finish(
        &self,
        settled: Result<Settled<S::Token>, SettleFailure<S::Token>>,
        delivery: &Delivery,
        lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
    ) {
        match settled {
            Ok(Settled::Done) => {}
            Ok(Settled::AckOriginal(token)) => {
                self.acks.push_held(token, lease).await;
            }
            Err(SettleFailure { token, error }) => {
                self.counters
                    .settle_failures
                    .fetch_add(1, AtomicOrdering::Relaxed);
                cx.metrics().settle_failures.increment(1);
                if error.is_lease_lost() {
                    tracing::warn!(error = %error, "settlement failed: the delivery is no longer ours");
                    return;
                }
                // Give it back after a pause, so that a failure that repeats (an unroutable
                // dead-letter queue, a broker alarm) does not become a hot redelivery loop. The
                // lease is still kept meanwhile.
                let pause = self
                    .backoff
                    .delay_with(delivery.attempt, 1.0)
                    .min(Duration::from_secs(30));
                tracing::warn!(error = %error, release_in = ?pause, "settlement failed; the delivery will be released for redelivery");
                tokio::select! {
                    _ = cx.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                self.give_back(token, lease, false).await;
            }
        }
    }
}
