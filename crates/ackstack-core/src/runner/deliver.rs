//! One delivery's task: waits for its key's turn, runs the processing stack (the decision:
//! retry, dedup, your layers, the handler) and hands the outcome to settlement.

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::cancel::Cancel;
use crate::context::{Context, RunStats};
use crate::deadletter::DeadLetter;
use crate::delivery::Delivery;
use crate::handler::Process;
use crate::outcome::Outcome;
use crate::source::{Armed, Received, Settle};

use super::acker::AckQueue;
use super::builder::Inspector;
use super::config::{DeliveryMode, OnRefused};
use super::control::Control;
use super::gate::{AttemptGate, Marking, Seat};
use super::kill_switch::Probe;
use super::lease::LeaseGuard;
use super::ordering::Turn;
use super::status::{Counters, Status};
use crate::metrics::{MetricSets, Metrics};

/// Calls `inspect`; its panics are logged, never propagated.
pub(super) fn call_inspector(inspect: &Inspector, delivery: &Delivery, outcome: &Outcome) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inspect(delivery, outcome)))
        .is_err()
    {
        tracing::error!("the outcome inspector panicked");
    }
}

pub(super) struct Shared<P, S: Settle> {
    pub(super) stack: P,
    pub(super) settler: S,
    pub(super) acks: AckQueue<S::Token>,
    pub(super) mode: DeliveryMode,
    /// Whether the retry layer retries in place.
    pub(super) in_place: bool,
    pub(super) counters: Counters,
    pub(super) stats: Arc<RunStats>,
    pub(super) correlation_header: Option<String>,
    pub(super) name: Option<Arc<str>>,
    pub(super) inspector: Option<Inspector>,
    pub(super) backoff: Backoff,
    /// Whether a released delivery comes back by itself (false for cumulative-commit brokers
    /// such as Kafka, where an unsettled record holds its partition back).
    pub(super) release_redelivers: bool,
    pub(super) status: Status,
    /// Fired when shutdown begins.
    pub(super) stopping: Arc<CancellationToken>,
    pub(super) on_refused: OnRefused,
    pub(super) refusals: Refusals,
    /// The consumer's control, when a kill switch is armed (it then counts outcomes).
    pub(super) kill_switch: Option<Control>,
    /// The run's metric handles, one set per queue.
    pub(super) metrics: Arc<MetricSets>,
    /// Whether a lost lease drops the handler's future (`LeaseConfig::abort_on_loss`).
    pub(super) abort_on_loss: bool,
    /// `RetryConfig::max_attempts`, from which a suspect's crash limit follows.
    pub(super) max_attempts: u32,
    /// Where suspects run alone among attempts ([`Alone::Attempts`](crate::Alone::Attempts)):
    /// the gate every attempt passes.
    pub(super) gate: Option<AttemptGate>,
    /// The adaptive concurrency controller, told of each finished delivery.
    pub(super) adaptive: Option<Arc<super::adaptive::Controller>>,
}

impl<P: Process, S: Settle> Shared<P, S> {
    /// Calls the inspector, if any; its panics are logged, never propagated.
    fn inspect(&self, delivery: &Delivery, outcome: &Outcome) {
        if let Some(inspect) = &self.inspector {
            call_inspector(inspect, delivery, outcome);
        }
    }

    /// Counts the outcome decided for a delivery and how long it took: its metrics, and the
    /// round of adaptive concurrency.
    fn count_outcome(&self, cx: &Context, outcome: &Outcome, seconds: f64) {
        cx.metrics().outcome(outcome, Some(seconds));
        if let Some(adaptive) = &self.adaptive {
            adaptive.record(outcome, seconds);
        }
    }

    /// Tells adaptive concurrency of a handler that outlived its lease: the downstream's
    /// struggle too.
    fn count_lost(&self, seconds: f64) {
        if let Some(adaptive) = &self.adaptive {
            adaptive.lost(seconds);
        }
    }

    pub(super) async fn run_one(
        &self,
        received: Received<S::Token>,
        cancel: Cancel,
        lease: Option<LeaseGuard<S::Token>>,
        turn: Option<Turn>,
        metrics: Arc<Metrics>,
        probe: Option<Probe>,
    ) {
        let seat = (received.suspect && self.mode != DeliveryMode::AtMostOnce)
            .then(|| self.gate.as_ref().map(|g| Arc::new(Seat::new(g.clone()))))
            .flatten();
        self.run_seated(received, cancel, lease, turn, metrics, probe, seat.clone())
            .await;
        if let Some(seat) = seat
            && seat.holds_alone()
        {
            // Settled (or given up on): its ack sent before anything else runs, then the
            // mark of its run alone cleared.
            self.acks.flush().await;
            seat.step_aside(true).await;
        }
    }

    /// [`Shared::run_one`], with `seat` for a suspect that runs alone among attempts.
    #[allow(clippy::too_many_arguments)]
    async fn run_seated(
        &self,
        received: Received<S::Token>,
        cancel: Cancel,
        mut lease: Option<LeaseGuard<S::Token>>,
        mut turn: Option<Turn>,
        metrics: Arc<Metrics>,
        probe: Option<Probe>,
        seat: Option<Arc<Seat>>,
    ) {
        let Received {
            mut delivery,
            token,
            suspect,
        } = received;
        if let Some(name) = &self.name {
            delivery.origin.consumer = name.clone();
        }
        let correlation = self
            .correlation_header
            .as_deref()
            .and_then(|h| delivery.headers.get_str(h))
            .unwrap_or("");
        let span = tracing::info_span!(
            "delivery",
            consumer = %delivery.origin.consumer,
            broker = delivery.origin.broker,
            queue = %delivery.origin.queue,
            message_id = delivery.message_id.as_deref().unwrap_or(""),
            attempt = delivery.attempt,
            correlation_id = correlation,
            outcome = tracing::field::Empty,
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, &delivery.headers);
        async {
            if let Some(turn) = &mut turn {
                // Waiting for the key's turn; a lost lease or the deadline ends the wait.
                // The turn is polled first: a key with no one ahead costs no cancellation
                // token (one is made only to wait); a lease lost meanwhile is found below.
                tokio::select! {
                    biased;
                    _ = turn.wait() => {}
                    _ = cancel.cancelled() => {}
                }
            }
            if cancel.is_cancelled() {
                // Checked right before the handler: a delivery whose lease was lost (or a
                // partition revoked) while it waited is never processed.
                self.not_processed(lease.as_ref(), probe);
                return;
            }
            let mut cx = self
                .context(cancel)
                .with_metrics(metrics)
                .with_probe(probe)
                .with_lease_deadline(lease.as_ref().map(LeaseGuard::deadline));
            if let Some(gate) = &self.gate {
                if let Some(seat) = &seat {
                    // Alone among attempts: those running now finish first, none starts.
                    let guard = tokio::select! {
                        biased;
                        _ = cx.cancelled() => {
                            self.not_processed(lease.as_ref(), probe);
                            return;
                        }
                        guard = gate.exclusive() => guard,
                    };
                    seat.hold(guard);
                    seat.on_marks(
                        self.step_aside_hook(&token),
                        self.rejoin_hook(&token, &delivery),
                    );
                    // What was handled is acked first, so that a crash now does not bring
                    // it back as a suspect.
                    self.acks.flush().await;
                }
                cx = cx.with_gate(gate.clone(), seat);
            }
            let Some(token) = self
                .admit_unsettled(token, &delivery, suspect, &mut lease, &cx, probe)
                .await
            else {
                return;
            };
            let started = Instant::now();
            if let Some(produced_at) = delivery.produced_at {
                cx.metrics().queue_time(produced_at);
            }
            if self.mode == DeliveryMode::AtMostOnce {
                // Acked on receipt: the lease no longer matters.
                drop(lease.take());
                self.acks.push(token).await;
                let outcome = self.stack.process(&delivery, &cx).await;
                self.count_outcome(&cx, &outcome, started.elapsed().as_secs_f64());
                tracing::Span::current().record("outcome", outcome.as_str());
                self.judge(Some(&outcome), probe);
                if outcome == Outcome::Ack {
                    self.counters
                        .succeeded
                        .fetch_add(1, AtomicOrdering::Relaxed);
                }
                return;
            }
            let cx = if self.in_place {
                cx.with_attempt_slot()
            } else {
                cx
            };
            let outcome = if self.abort_on_loss && lease.is_some() {
                tokio::select! {
                    biased;
                    outcome = self.stack.process(&delivery, &cx) => Some(outcome),
                    // The lease is lost (or the shutdown deadline passed): stop the handler at
                    // its current `.await` instead of waiting for it to notice.
                    _ = cx.cancelled() => None,
                }
            } else {
                Some(self.stack.process(&delivery, &cx).await)
            };
            let Some(outcome) = outcome else {
                tracing::debug!("handler stopped: its lease was lost");
                self.count_lost(started.elapsed().as_secs_f64());
                self.not_processed(lease.as_ref(), probe);
                return;
            };
            if let Some(attempt) = cx.attempt_reached() {
                // Retried in place: report and dead-letter with the attempt it reached.
                delivery.attempt = attempt;
            }
            let seconds = started.elapsed().as_secs_f64();
            if cx.is_cancelled() {
                // Not acked (a successful handler's done mark is already written, so the
                // redelivery is recognised).
                self.count_lost(seconds);
                self.not_processed(lease.as_ref(), probe);
                return;
            }
            self.count_outcome(&cx, &outcome, seconds);
            tracing::Span::current().record("outcome", outcome.as_str());
            self.judge(Some(&outcome), probe);
            self.inspect(&delivery, &outcome);
            self.settle(token, &delivery, outcome, lease, &cx).await;
        }
        .instrument(span)
        .await
    }

    /// Arms a suspect before its run alone: its crash count recorded, or moved, or given up
    /// on (see `Settle::arm`). Returns the token to run with, or `None` when the delivery was
    /// settled here (the kill switch is told how it ended, so a probe never stays pending).
    async fn admit_unsettled(
        &self,
        token: S::Token,
        delivery: &Delivery,
        suspect: bool,
        lease: &mut Option<LeaseGuard<S::Token>>,
        cx: &Context,
        probe: Option<Probe>,
    ) -> Option<S::Token> {
        if !suspect || self.mode == DeliveryMode::AtMostOnce {
            return Some(token);
        }
        // Runs that crashed alone before, counting the one that made it a suspect.
        let give_up_at = self.max_attempts.saturating_sub(1).max(1);
        match self.settler.arm(token, delivery, give_up_at).await {
            Ok(Armed::Run { token, crashes }) => {
                if crashes > 0 {
                    tracing::warn!(
                        crashes,
                        "running alone a message whose handling took the process down before"
                    );
                }
                Some(token)
            }
            Ok(Armed::Moved(settled)) => {
                tracing::info!("suspect moved to run alone later");
                self.judge(None, probe);
                self.finish(Ok(settled), delivery, lease.take(), cx).await;
                None
            }
            Ok(Armed::GiveUp { token, crashes }) => {
                self.crashed(token, delivery, crashes + 1, lease.take(), cx, probe)
                    .await;
                None
            }
            Err(failure) => {
                self.judge(None, probe);
                self.finish(Err(failure), delivery, lease.take(), cx).await;
                None
            }
        }
    }

    /// What a suspect's step aside records first: [`Settle::step_aside`] for `token`.
    fn step_aside_hook(&self, token: &S::Token) -> Marking {
        let (settler, token) = (self.settler.clone(), token.clone());
        Arc::new(move || {
            let (settler, token) = (settler.clone(), token.clone());
            Box::pin(async move {
                match settler.step_aside(&token).await {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "could not record the end of a run alone");
                        false
                    }
                }
            })
        })
    }

    /// What a suspect's later attempt records first: [`Settle::arm`] again, for `token`.
    fn rejoin_hook(&self, token: &S::Token, delivery: &Delivery) -> Marking {
        let (settler, token) = (self.settler.clone(), token.clone());
        let delivery = Arc::new(delivery.clone());
        Arc::new(move || {
            let (settler, token, delivery) = (settler.clone(), token.clone(), delivery.clone());
            Box::pin(async move {
                // Its count does not change while it runs: it is not given up on here.
                match settler.arm(token, &delivery, u32::MAX).await {
                    Ok(Armed::Run { .. }) => true,
                    Ok(_) => false,
                    Err(failure) => {
                        tracing::warn!(error = %failure.error, "could not arm a suspect again");
                        false
                    }
                }
            })
        })
    }

    /// Dead-letters a delivery that stopped the consumer `crashes` times.
    async fn crashed(
        &self,
        token: S::Token,
        delivery: &Delivery,
        crashes: u32,
        lease: Option<LeaseGuard<S::Token>>,
        cx: &Context,
        probe: Option<Probe>,
    ) {
        let letter = DeadLetter::crashed(delivery, crashes);
        let outcome = Outcome::DeadLetter(letter.failure.clone());
        cx.metrics().outcome(&outcome, None);
        tracing::Span::current().record("outcome", outcome.as_str());
        self.judge(Some(&outcome), probe);
        self.inspect(delivery, &outcome);
        tracing::error!(
            crashes,
            message_id = delivery.message_id.as_deref().unwrap_or(""),
            "dead-lettering a message that took the consumer down {crashes} times"
        );
        self.settle_letter(token, delivery, letter, lease, cx).await;
    }

    /// Tells the kill switch, if one is armed, how a delivery ended (`None`: without an
    /// outcome); `probe`: the half-open period it probes, if it is a probe.
    fn judge(&self, outcome: Option<&Outcome>, probe: Option<Probe>) {
        if let Some(control) = &self.kill_switch {
            control.record(outcome, probe);
        }
    }

    /// Records why a cancelled delivery is left unsettled.
    fn not_processed(&self, lease: Option<&LeaseGuard<S::Token>>, probe: Option<Probe>) {
        self.judge(None, probe);
        if lease.is_some_and(LeaseGuard::is_lost) {
            // Not ours any more: the broker redelivers it. Never ack, never release.
            tracing::Span::current().record("outcome", "lease_lost");
            self.counters
                .leases_lost
                .fetch_add(1, AtomicOrdering::Relaxed);
        } else {
            // The shutdown deadline passed: abandoned unacked.
            tracing::Span::current().record("outcome", "abandoned");
        }
    }

    fn context(&self, cancel: Cancel) -> Context {
        Context::for_run(cancel, self.stopping.clone(), self.stats.clone())
    }
}

/// The messages whose refused dead letter was already logged at error: bounded, forgetting
/// everything once full (a message then logs again, which is harmless).
#[derive(Debug, Default)]
pub(super) struct Refusals {
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl Refusals {
    const CAPACITY: usize = 4096;

    /// Whether `delivery`'s message was not seen before (and remembers it).
    pub(super) fn first_time(&self, delivery: &Delivery) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        delivery.origin.queue.hash(&mut h);
        match &delivery.message_id {
            Some(id) => id.hash(&mut h),
            None => {
                delivery.origin.partition.hash(&mut h);
                delivery.origin.offset.hash(&mut h);
                delivery.payload.hash(&mut h);
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= Self::CAPACITY {
            seen.clear();
        }
        seen.insert(h.finish())
    }
}
