//! Stopping and restarting a consumer's receiving without stopping the consumer: by hand
//! ([`Control::pause`], [`Control::resume`]) and by the kill switch, a circuit breaker over
//! the failure rate ([`KillSwitchConfig`]).
//!
//! Both act at one point: the receive loop asks [`Control`] how many deliveries it may take
//! before each receive, and waits while the answer is none. In-flight work is not touched: it
//! finishes and settles as usual. Each broker then stops in its own terms: RabbitMQ's and
//! SQS's sources are simply not asked for more (no pull, no poll), and Kafka's poll thread goes
//! on serving the group (heartbeats, rebalances) while its partition queues are not read, so
//! the assignment is kept and nothing prefetched is thrown away.
//!
//! The kill switch's own logic (the window, the circuit and its probes) is in `kill_switch.rs`;
//! this file is the gate both share.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::kill_switch::{Breaker, Change, KillSwitchConfig, Probe};
use super::state::{Admit, ConsumerState};
use crate::metrics::Metrics;
use crate::outcome::Outcome;

/// Pauses and resumes a consumer, and shows whether it receives; from
/// [`Consumer::control`](super::Consumer::control). Cheap to clone; usable before, during and
/// after a run. The kill switch uses the same gate.
#[derive(Clone, Debug, Default)]
pub struct Control {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    paused: AtomicBool,
    /// Whether a kill switch is installed: without one, admitting takes no lock.
    armed: AtomicBool,
    trips: AtomicU64,
    breaker: Mutex<Option<Breaker>>,
    changed: Notify,
    /// The run's metric handles, for the state gauge and the trip counter.
    metrics: Mutex<Option<Arc<Metrics>>>,
}

impl Control {
    /// Stops receiving; deliveries in flight finish and settle as usual.
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
        tracing::info!("consumer paused");
        self.changed_state();
    }

    /// Receives again after [`Control::pause`] (the kill switch, if open, still decides).
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
        tracing::info!("consumer resumed");
        self.changed_state();
    }

    /// How long the kill switch has been open or half-open, if it is.
    pub(super) fn open_for(&self) -> Option<Duration> {
        let opened = self.lock().as_ref().and_then(Breaker::opened_at)?;
        Some(Instant::now().saturating_duration_since(opened))
    }

    /// Wakes the receive loop and shows the new state in the state gauge.
    fn changed_state(&self) {
        self.inner.changed.notify_waiters();
        let metrics = self
            .inner
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(m) = metrics {
            m.state(self.state());
        }
    }

    /// Whether the consumer receives now, and if not, why (a pause wins over the circuit).
    pub fn state(&self) -> ConsumerState {
        if self.inner.paused.load(Ordering::SeqCst) {
            return ConsumerState::Paused;
        }
        self.lock()
            .as_ref()
            .map_or(ConsumerState::Running, Breaker::state)
    }

    /// How many times the kill switch has tripped (opened), half-open failures included.
    pub fn trips(&self) -> u64 {
        self.inner.trips.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Breaker>> {
        self.inner
            .breaker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Arms the kill switch for a run (or disarms it with `None`).
    pub(super) fn install(&self, config: Option<KillSwitchConfig>, metrics: Arc<Metrics>) {
        *self.lock() = config.map(Breaker::new);
        self.inner.armed.store(config.is_some(), Ordering::SeqCst);
        metrics.state(self.state());
        *self
            .inner
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(metrics);
    }

    /// Completes on the next pause, resume or circuit change. Create it (and enable it)
    /// before calling [`Control::admit`], so that a change in between is not missed.
    pub(super) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.changed.notified()
    }

    /// How many of `want` deliveries the receive loop may take now.
    pub(super) fn admit(&self, want: usize) -> Admit {
        if self.inner.paused.load(Ordering::SeqCst) {
            return Admit::Wait(None);
        }
        if !self.inner.armed.load(Ordering::SeqCst) {
            return Admit::Take(want);
        }
        let mut guard = self.lock();
        let Some(breaker) = guard.as_mut() else {
            return Admit::Take(want);
        };
        let (admit, half_opened) = breaker.admit(want, Instant::now());
        drop(guard);
        if half_opened {
            self.changed_state();
        }
        admit
    }

    /// Counts `n` received deliveries against the half-open probes; returns the half-open
    /// period they probe, if they are probes.
    pub(super) fn admitted(&self, n: usize) -> Option<Probe> {
        if !self.inner.armed.load(Ordering::SeqCst) {
            return None;
        }
        self.lock().as_mut().and_then(|b| b.admitted(n))
    }

    /// Records a finished delivery's outcome, or `None` for one that finished without one
    /// (its lease lost, or abandoned at the shutdown deadline); `probe` is what
    /// [`Control::admitted`] said of it. Called only while a kill switch is installed.
    pub(super) fn record(&self, outcome: Option<&Outcome>, probe: Option<Probe>) {
        let change = self
            .lock()
            .as_mut()
            .map_or(Change::None, |b| b.record(outcome, probe, Instant::now()));
        if change == Change::Opened {
            self.inner.trips.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &*self
                .inner
                .metrics
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
            {
                m.circuit_trips.increment(1);
            }
        }
        if change != Change::None {
            self.changed_state();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Consumer, MemoryBroker, Message, handler_fn};

    use super::ConsumerState;

    #[tokio::test]
    async fn pause_stops_receiving_and_resume_starts_it_again() {
        let broker = MemoryBroker::new();
        for i in 0..10 {
            broker.publish("q", Message::new(format!("m{i}")));
        }
        let consumer = Consumer::new(broker.source("q"));
        let control = consumer.control();
        let status = consumer.status();
        control.pause();
        assert_eq!(control.state(), ConsumerState::Paused);
        let watch = control.clone();
        let summary = consumer
            .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert_eq!(
                    status.received_total(),
                    0,
                    "nothing is received while paused"
                );
                watch.resume();
                while status.received_total() < 10 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                status.idle(Duration::from_millis(200)).await;
            })
            .await
            .unwrap();
        assert_eq!(summary.acked, 10);
        assert_eq!(control.state(), ConsumerState::Running);
    }
}
