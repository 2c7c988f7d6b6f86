//! The receive loop: [`Consumer::run_until`] builds the stack, the acker and the lease keeper,
//! receives while there are free permits, spawns a task per delivery (or, with no permit
//! left, runs the last one itself until it first waits), and shuts down cleanly.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::batch::{BatchConfig, BatchHandler, Batcher};
use crate::cancel::{Cancel, HardStop, Slots};
use crate::dedup::DedupLayer;
use crate::delivery::Delivery;
use crate::handler::{Handler, Layer, Terminal};
use crate::outcome::Outcome;
use crate::retry::RetryLayer;
use crate::source::{Alone, Settle, Source};

use super::acker::{AckQueue, BatchAcker};
use super::builder::Consumer;
use super::config::{ConfigError, DeliveryMode, KeyOrdering};
use super::deliver::Refusals;
use super::deliver::{Shared, call_inspector};
use super::gate::AttemptGate;
use super::lease::{LeaseKeeper, Watch};
use super::ordering::KeyGate;
use super::state::Admit;
use super::status::{ConsumerError, Counters, InFlight, Summary};
use crate::metrics::MetricSets;

/// How often a paused receive loop looks again without being woken (a safety net: pause,
/// resume and circuit changes wake it at once).
const PAUSE_RECHECK: Duration = Duration::from_secs(1);

impl<S: Source, L> Consumer<S, L> {
    /// Runs until `shutdown` completes, then drains, flushes and returns what happened.
    pub async fn run_until<H, F>(self, handler: H, shutdown: F) -> Result<Summary, ConsumerError>
    where
        H: Handler,
        L: Layer<Terminal<H>>,
        F: Future<Output = ()> + Send,
    {
        self.run(handler, true, shutdown).await
    }

    /// Runs a batch handler until `shutdown` completes: deliveries are gathered into batches
    /// by `batches` and each delivery is settled by its own result; see the
    /// [`batch`](crate::batch) module. `handler_timeout` limits each batch call.
    pub async fn run_batches_until<B, F>(
        self,
        handler: B,
        batches: BatchConfig,
        shutdown: F,
    ) -> Result<Summary, ConsumerError>
    where
        B: BatchHandler,
        L: Layer<Terminal<Batcher<B>>>,
        F: Future<Output = ()> + Send,
    {
        self.validate()?;
        let cfg = self.effective_config();
        if batches.max_size == 0 || batches.max_size > cfg.max_concurrency() {
            return Err(ConsumerError::Config(ConfigError::BatchSize {
                max_size: batches.max_size,
                concurrency: cfg.max_concurrency(),
            }));
        }
        let batcher = Batcher::spawn(handler, batches, cfg.handler_timeout);
        // The batch call is timed, not each delivery's wait for its batch.
        self.run(batcher, false, shutdown).await
    }

    /// The run: `timed` limits each handler call to `handler_timeout`.
    async fn run<H, F>(
        mut self,
        handler: H,
        timed: bool,
        shutdown: F,
    ) -> Result<Summary, ConsumerError>
    where
        H: Handler,
        L: Layer<Terminal<H>>,
        F: Future<Output = ()> + Send,
    {
        self.validate()?;
        let mut cfg = self.effective_config();
        let caps = self.source.capabilities();
        if let Some(limit) = caps.broker_limit
            && cfg.mode != DeliveryMode::AtMostOnce
            && cfg.retry.max_attempts >= limit.deliveries
        {
            let max_attempts = cfg.retry.max_attempts;
            if !limit.lower_max_attempts || limit.deliveries < 2 {
                return Err(ConsumerError::Config(ConfigError::BrokerLimit {
                    deliveries: limit.deliveries,
                    max_attempts,
                }));
            }
            cfg.retry.max_attempts = limit.deliveries - 1;
            tracing::info!(
                broker_limit = limit.deliveries,
                max_attempts = cfg.retry.max_attempts,
                configured = max_attempts,
                "max_attempts lowered below the broker's own delivery limit"
            );
        }
        let settler = self.source.settler();
        let per_key = match cfg.ordering {
            KeyOrdering::PerKey => true,
            KeyOrdering::None => false,
            KeyOrdering::Auto => !caps.broker_delay,
        };
        // At-most-once acks on receipt: there is nothing left to retry in place.
        let in_place = (!caps.broker_delay || per_key) && cfg.mode != DeliveryMode::AtMostOnce;
        let stats = self.status.inner.stats.clone();
        let metrics = Arc::new(MetricSets::new(
            &self.source.origin(),
            self.name.clone(),
            cfg.otel_metric_names,
        ));
        let own = metrics.own().clone();
        self.status.configure_health(cfg.health);
        // Each attempt retried in place is shown to the inspector and, with a kill switch
        // armed, counted as a failure: a delivery retried in place (Kafka) may never finish
        // while its downstream is down, and the switch must see those failures.
        let inspector = self.inspector.clone();
        let judge = cfg.kill_switch.is_some().then(|| self.control.clone());
        let on_in_place: Option<crate::retry::OnInPlaceRetry> =
            (inspector.is_some() || judge.is_some()).then(|| {
                Arc::new(
                    move |d: &Delivery, o: &Outcome, cx: &crate::handler::Context| {
                        if let Some(inspect) = &inspector {
                            call_inspector(inspect, d, o);
                        }
                        // A deferral in place is no verdict, and the probe it may be is
                        // still in flight.
                        if let Some(control) = &judge
                            && !matches!(o, Outcome::Defer { .. })
                        {
                            control.record(Some(o), cx.probe());
                        }
                    },
                ) as crate::retry::OnInPlaceRetry
            });
        let terminal = Terminal::new(handler)
            .classify(self.classifier.clone())
            .timeout(cfg.handler_timeout.filter(|_| timed))
            .arrival_limit(
                (caps.careful_for.is_some() && cfg.mode != DeliveryMode::AtMostOnce)
                    .then_some(cfg.retry.max_attempts),
            );
        let dedup = self
            .dedup
            .take()
            .map(|(store, key)| DedupLayer::shared(store, key).config(cfg.dedup));
        let retry = RetryLayer::from_config(cfg.retry)
            .in_place(in_place)
            .defers(caps.defers)
            .max_delay(caps.max_retry_delay)
            .on_in_place_retry(on_in_place)
            .gated();
        let stack = retry.layer(dedup.layer(self.layers.layer(terminal)));
        let ack_batch = cfg
            .ack_batch
            .unwrap_or(caps.max_ack_batch)
            .clamp(1, caps.max_ack_batch);
        let acker = BatchAcker::spawn(
            settler.clone(),
            ack_batch,
            cfg.ack_delay,
            caps.parallel_acks,
            (ack_batch * (caps.parallel_acks + 1)).max(cfg.max_concurrency() * 2),
            own.clone(),
        );
        // Stops the deliveries' tasks at the shutdown deadline, and cancels their work.
        let hard_stop = Arc::new(HardStop::default());
        let leases = caps.lease.map(|lease| {
            let watch = Watch {
                metrics: own.clone(),
                stats: stats.clone(),
            };
            LeaseKeeper::spawn(settler.clone(), lease, cfg.lease, watch, hard_stop.clone())
        });
        let backlog = super::backlog::spawn(settler.clone(), cfg.backlog_interval, own.clone());
        let permits = Arc::new(Semaphore::new(cfg.max_concurrency()));
        let adaptive = cfg.adaptive_concurrency.map(|config| {
            super::adaptive::Controller::start(
                config,
                permits.clone(),
                own.clone(),
                self.status.clone(),
            )
        });
        let shared = Arc::new(Shared {
            adaptive,
            stack,
            settler,
            acks: acker.queue(),
            mode: cfg.mode,
            in_place,
            counters: Counters::default(),
            stats: stats.clone(),
            correlation_header: cfg.correlation_header.clone(),
            name: self.name.clone(),
            inspector: self.inspector.clone(),
            backoff: cfg.retry.backoff,
            release_redelivers: caps.broker_delay,
            status: self.status.clone(),
            stopping: Arc::new(CancellationToken::new()),
            on_refused: cfg.on_dead_letter_refused,
            refusals: Refusals::default(),
            kill_switch: cfg.kill_switch.is_some().then(|| self.control.clone()),
            metrics,
            abort_on_loss: cfg.lease.abort_on_loss,
            max_attempts: cfg.retry.max_attempts,
            gate: (caps.alone == Alone::Attempts && cfg.mode != DeliveryMode::AtMostOnce)
                .then(AttemptGate::default),
        });
        self.control.install(cfg.kill_switch, own.clone());
        let control = self.control.clone();
        let gate = per_key.then(KeyGate::new);
        let stopping = shared.stopping.clone();
        let adaptive = shared.adaptive.clone();
        let receive_batch = cfg.receive_batch;
        let reconnect = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
            .equal_jitter();
        let tasks = super::tasks::Tasks::new(hard_stop.clone());
        let mut receive_errors = 0u64;
        let mut consecutive_errors = 0u32;
        // Receives one at a time until then (see `Capabilities::careful_for`).
        let careful_for = caps
            .careful_for
            .filter(|_| cfg.mode != DeliveryMode::AtMostOnce);
        let mut careful_until = careful_for
            .filter(|_| caps.careful_from_start)
            .map(|p| Instant::now() + p);
        // The box of the last delivery that finished in the loop's own poll, reused.
        let mut spare = None;
        tokio::pin!(shutdown);

        let result = 'receive: loop {
            if let Some(adaptive) = &adaptive
                && permits.available_permits() == 0
            {
                adaptive.saturated();
            }
            let first = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            // Paused, or the kill switch open: take nothing until that changes. Asked with a
            // permit in hand, right before the receive, so that nothing is received after a
            // pause or a trip that happened while the loop waited for a permit.
            let admitted = loop {
                let changed = control.changed();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match control.admit(receive_batch) {
                    Admit::Take(n) => break n,
                    Admit::Wait(until) => {
                        let until = until.unwrap_or_else(|| Instant::now() + PAUSE_RECHECK);
                        tokio::select! {
                            biased;
                            _ = &mut shutdown => break 'receive Ok(()),
                            _ = changed => {}
                            _ = tokio::time::sleep_until(until) => {}
                        }
                    }
                }
            };
            // After a suspect, one at a time where the broker counts receives (SQS): a suspect
            // received beside others would wait for its run alone while they run, and a crash
            // among them would be counted for it too.
            let careful = careful_until.is_some_and(|until| Instant::now() < until);
            let mut max = if careful {
                1
            } else {
                (1 + permits.available_permits())
                    .min(receive_batch)
                    .min(admitted)
            };
            // The permits of what this receive may return, taken now: received deliveries
            // never wait for a permit without a lease kept (adaptive concurrency's holder
            // takes free permits back whenever the limit falls).
            let mut reserved = None;
            if max > 1 {
                let extra = u32::try_from(max - 1).unwrap_or(u32::MAX);
                reserved = permits.clone().try_acquire_many_owned(extra).ok();
                if reserved.is_none() {
                    max = 1;
                }
            }
            let batch = tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                batch = self.source.receive(max) => batch,
            };
            let batch = match batch {
                Ok(batch) => {
                    if consecutive_errors > 0 {
                        consecutive_errors = 0;
                        shared.status.set_receive_failures(0);
                    }
                    batch
                }
                Err(err) if err.is_fatal() => break Err(ConsumerError::Source(err)),
                Err(err) => {
                    receive_errors += 1;
                    own.receive_errors.increment(1);
                    consecutive_errors = consecutive_errors.saturating_add(1);
                    shared.status.set_receive_failures(consecutive_errors);
                    let wait = reconnect.delay(consecutive_errors);
                    tracing::warn!(error = %err, retry_in = ?wait, "receive failed");
                    drop(first);
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            let received_at = Instant::now();
            if batch.iter().any(|r| r.suspect) {
                careful_until = careful_for.map(|p| received_at + p);
            }
            let probe = control.admitted(batch.len());
            shared.status.received(batch.len() as u64);
            // The batch's leases, handed to the keeper at once; each delivery takes its guard,
            // whose slot also holds the delivery's cancellation (fired if its lease is lost).
            // Without leases, the batch's cancellations get slots of their own (see
            // `cancel.rs`: a token is made only for a delivery something waits to cancel).
            let mut guards = leases
                .as_ref()
                .map(|k| k.hold_batch(received_at, batch.iter().map(|r| r.token.clone())));
            let mut cancels = guards
                .is_none()
                .then(|| Slots::batch(&hard_stop, batch.len()));
            let mut first = Some(first);
            let last = batch.len().saturating_sub(1);
            for (index, received) in batch.into_iter().enumerate() {
                // A suspect runs alone: nothing else in flight, so that a crash during its
                // run is its own (see `Settle::arm`). Where it runs alone among attempts
                // instead, its task waits at the attempt gate (`gate.rs`).
                let alone = received.suspect
                    && shared.mode != DeliveryMode::AtMostOnce
                    && shared.gate.is_none();
                let permit = match first
                    .take()
                    .or_else(|| reserved.as_mut().and_then(|r| r.split(1)))
                {
                    Some(p) => p,
                    None => match permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                shared
                    .counters
                    .received
                    .fetch_add(1, AtomicOrdering::Relaxed);
                let metrics = shared.metrics.of(&received.delivery.origin);
                metrics.received();
                let lease = guards.as_mut().and_then(Iterator::next);
                let cancel = match &lease {
                    Some(lease) => lease.cancel(),
                    None => cancels
                        .as_mut()
                        .and_then(Iterator::next)
                        .unwrap_or_else(|| Cancel::Token(hard_stop.token().child_token())),
                };
                let turn = match (&gate, &received.delivery.key) {
                    (Some(gate), Some(key)) => Some(gate.enter(key.clone())),
                    _ => None,
                };
                if alone {
                    // Everything before it finished and acked: a crash during its run must
                    // not leave an ack unsent (the broker would count a redelivery of a
                    // message that was handled).
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break 'receive Ok(()),
                        () = settle_in_flight(&tasks, &shared.acks) => {}
                    }
                }
                let task_shared = shared.clone();
                let in_flight = InFlight::start(shared.status.clone(), metrics.clone());
                let future = async move {
                    let _permit = permit;
                    let _in_flight = in_flight;
                    task_shared
                        .run_one(received, cancel, lease, turn, metrics, probe)
                        .await;
                };
                // In the box of a delivery that finished in the loop's own poll, if there is
                // one (its future is done: replacing it drops nothing of a live delivery).
                let task = super::tasks::boxed(spare.take(), future);
                if index == last {
                    // Permits kept for deliveries the broker did not return go back first.
                    drop(reserved.take());
                }
                if index == last && permits.available_permits() == 0 {
                    // The loop would only wait for a permit now: run it here until it waits.
                    spare = tasks.start(task).await;
                } else {
                    tasks.spawn(task);
                }
                if alone {
                    // Its own ack too: a crash right after must not make it come back.
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break 'receive Ok(()),
                        () = settle_in_flight(&tasks, &shared.acks) => {}
                    }
                }
            }
        };

        // Shutdown: stop receiving, drain up to the deadline, abandon the rest, flush.
        stopping.cancel();
        self.source.close().await;
        let mut abandoned = 0;
        if tokio::time::timeout(cfg.shutdown_deadline, tasks.idle())
            .await
            .is_err()
        {
            abandoned = tasks.len() as u64;
            tracing::warn!(
                abandoned,
                "shutdown deadline reached; abandoning in-flight work unacked"
            );
            own.abandoned.increment(abandoned);
            tasks.stop();
            tasks.idle().await;
        }
        let Ok(shared) = Arc::try_unwrap(shared) else {
            return Err(ConsumerError::Internal("tasks outlived shutdown"));
        };
        let Shared {
            settler,
            acks,
            counters,
            ..
        } = shared;
        drop(acks);
        let ack_stats = acker.stats().clone();
        acker.shutdown().await;
        settler.flush().await;
        if let Some(leases) = leases {
            leases.shutdown();
        }
        drop(backlog);
        result?;
        let deduplicated = stats.deduplicated.load(AtomicOrdering::Relaxed);
        Ok(Summary {
            received: counters.received.into_inner(),
            // Decided `Ack`: the handler's successes and the duplicates acked without it.
            succeeded: counters.succeeded.into_inner().saturating_sub(deduplicated),
            acked: ack_stats.acked.load(AtomicOrdering::Relaxed),
            ack_calls: ack_stats.calls.load(AtomicOrdering::Relaxed),
            retried: counters.retried.into_inner()
                + stats.retried_in_place.load(AtomicOrdering::Relaxed),
            dead_lettered: counters.dead_lettered.into_inner(),
            deferred: stats.deferred.load(AtomicOrdering::Relaxed),
            deduplicated,
            dedup_keyless: stats.dedup_keyless.load(AtomicOrdering::Relaxed),
            ack_failures: ack_stats.failed.load(AtomicOrdering::Relaxed),
            settle_failures: counters.settle_failures.into_inner(),
            leases_lost: counters.leases_lost.into_inner()
                + ack_stats.lost.load(AtomicOrdering::Relaxed),
            abandoned,
            receive_errors,
        })
    }
}

/// Waits until every task in `tasks` has finished and the acker has sent their acks.
async fn settle_in_flight<T: Send + 'static>(tasks: &super::tasks::Tasks, acks: &AckQueue<T>) {
    tasks.idle().await;
    acks.flush().await;
}
