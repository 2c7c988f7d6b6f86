//! The kill switch: a circuit breaker over the failure rate that closes the gate of
//! [`Control`](super::Control) while a consumer fails most of what it handles.
//!
//! Closed, it counts the outcomes of the deliveries that finished within a sliding `window`.
//! Once at least `activation` did and the share of failures reaches `trip`, it opens: nothing
//! is received for `cooldown`. It also opens once `activation` deliveries finished since the
//! start without a single success, however sparse they were. Then it is half-open: `probes`
//! deliveries are let through; if all of them succeed it closes (and counts afresh), and the
//! first failure opens it again.
//!
//! A failure is an attempt that failed transiently (an error or a panic, retried or
//! dead-lettered after the last attempt). A dead letter of a permanent error (a payload that
//! does not decode) counts only with `count_permanent`: one bad message is not a broken
//! consumer. A release (shutdown while waiting for the dedup store), a lost lease and work
//! abandoned at the shutdown deadline count as nothing; a half-open probe that ends so is
//! replaced by another delivery.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::control::{Admit, ConsumerState};
use crate::error::ErrorKind;
use crate::outcome::Outcome;

/// The kill switch's settings; off unless [`ConsumerConfig::kill_switch`](super::ConsumerConfig)
/// is set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KillSwitchConfig {
    /// The sliding window over which the failure rate is computed. Default 60 s.
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// Deliveries that must have finished within the window before it can trip. Default 20.
    pub activation: u32,
    /// The share of failures (above 0, at most 1) at which it trips. Default 0.5.
    pub trip: f64,
    /// How long it stays open before letting probes through. Default 30 s.
    #[serde(with = "crate::config::duration")]
    pub cooldown: Duration,
    /// Deliveries let through when half-open; all must succeed for it to close. Default 3.
    pub probes: u32,
    /// Whether dead letters of permanent errors count as failures. Default false.
    pub count_permanent: bool,
}

impl Default for KillSwitchConfig {
    fn default() -> Self {
        KillSwitchConfig {
            window: Duration::from_secs(60),
            activation: 20,
            trip: 0.5,
            cooldown: Duration::from_secs(30),
            probes: 3,
            count_permanent: false,
        }
    }
}

impl KillSwitchConfig {
    /// Why these settings cannot work, if they cannot.
    pub(super) fn problem(&self) -> Option<&'static str> {
        if self.window.is_zero() {
            return Some("kill_switch.window must not be zero");
        }
        if self.activation == 0 {
            return Some("kill_switch.activation must be at least 1");
        }
        if !(self.trip > 0.0 && self.trip <= 1.0) {
            return Some("kill_switch.trip must be above 0 and at most 1");
        }
        if self.cooldown.is_zero() {
            return Some("kill_switch.cooldown must not be zero");
        }
        if self.probes == 0 {
            return Some("kill_switch.probes must be at least 1");
        }
        None
    }
}

/// What recording an outcome did to the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    None,
    Opened,
    Closed,
    /// A half-open probe ended without a verdict: another delivery may take its place.
    ProbeFreed,
}

#[derive(Debug)]
enum Circuit {
    Closed,
    Open { until: Instant },
    HalfOpen { left: u32, pending: u32 },
}

/// The window is kept as this many buckets, each a tenth of it.
const BUCKETS: u32 = 10;

/// The circuit and the window of outcomes behind it; [`Control`](super::Control) keeps it
/// under its lock.
#[derive(Debug)]
pub(super) struct Breaker {
    config: KillSwitchConfig,
    circuit: Circuit,
    /// (bucket start, successes, failures), oldest first.
    buckets: VecDeque<(Instant, u32, u32)>,
    /// Outcomes since the start (or the last close), and whether one was a success.
    seen: u64,
    succeeded: bool,
    /// When it opened (kept through half-open and re-opening; cleared when it closes).
    opened_at: Option<Instant>,
}

impl Breaker {
    pub(super) fn new(config: KillSwitchConfig) -> Self {
        Breaker {
            config,
            circuit: Circuit::Closed,
            buckets: VecDeque::new(),
            seen: 0,
            succeeded: false,
            opened_at: None,
        }
    }

    /// The state it puts the consumer in.
    pub(super) fn state(&self) -> ConsumerState {
        match self.circuit {
            Circuit::Closed => ConsumerState::Running,
            Circuit::Open { .. } => ConsumerState::CircuitOpen,
            Circuit::HalfOpen { .. } => ConsumerState::HalfOpen,
        }
    }

    /// When it opened, while it is open or half-open.
    pub(super) fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// How many of `want` deliveries may be received at `now`, and whether it turned
    /// half-open just now (its cooldown over).
    pub(super) fn admit(&mut self, want: usize, now: Instant) -> (Admit, bool) {
        let mut half_opened = false;
        if let Circuit::Open { until } = self.circuit {
            if now < until {
                return (Admit::Wait(Some(until)), false);
            }
            tracing::info!(probes = self.config.probes, "kill switch half-open");
            self.circuit = Circuit::HalfOpen {
                left: self.config.probes,
                pending: 0,
            };
            half_opened = true;
        }
        let admit = match self.circuit {
            Circuit::HalfOpen { left: 0, .. } => Admit::Wait(None),
            Circuit::HalfOpen { left, .. } => {
                Admit::Take(want.min(usize::try_from(left).unwrap_or(usize::MAX)))
            }
            _ => Admit::Take(want),
        };
        (admit, half_opened)
    }

    /// Counts `n` received deliveries against the half-open probes.
    pub(super) fn admitted(&mut self, n: usize) {
        if let Circuit::HalfOpen { left, pending } = &mut self.circuit {
            let n = u32::try_from(n).unwrap_or(u32::MAX).min(*left);
            *left -= n;
            *pending += n;
        }
    }

    /// Records a finished delivery's outcome at `now` (`None`: it finished without one).
    pub(super) fn record(&mut self, outcome: Option<&Outcome>, now: Instant) -> Change {
        let verdict = outcome.and_then(|o| self.classify(o));
        self.judge(verdict, now)
    }

    /// `Some(true)` for a failure, `Some(false)` for a success, `None` for what does not count.
    fn classify(&self, outcome: &Outcome) -> Option<bool> {
        match outcome {
            Outcome::Ack => Some(false),
            Outcome::Retry { .. } => Some(true),
            Outcome::DeadLetter(failure) => match failure.kind {
                ErrorKind::Transient => Some(true),
                ErrorKind::Permanent => self.config.count_permanent.then_some(true),
            },
            Outcome::Release => None,
        }
    }

    /// Records one finished delivery: `Some(true)` failed, `Some(false)` succeeded, `None`
    /// says nothing either way.
    fn judge(&mut self, verdict: Option<bool>, now: Instant) -> Change {
        match &mut self.circuit {
            // Deliveries that were in flight when it opened: already judged.
            Circuit::Open { .. } => Change::None,
            Circuit::HalfOpen { left, pending } => {
                *pending = pending.saturating_sub(1);
                let Some(failed) = verdict else {
                    // Not a verdict on the failures: let another delivery probe instead.
                    *left += 1;
                    return Change::ProbeFreed;
                };
                if failed {
                    self.open(now, "a probe failed");
                    Change::Opened
                } else if *pending == 0 && *left == 0 {
                    tracing::info!("kill switch closed: the probes succeeded");
                    self.circuit = Circuit::Closed;
                    self.buckets.clear();
                    self.seen = 0;
                    self.succeeded = false;
                    self.opened_at = None;
                    Change::Closed
                } else {
                    Change::None
                }
            }
            Circuit::Closed => {
                let Some(failed) = verdict else {
                    return Change::None;
                };
                self.count(failed, now);
                self.seen += 1;
                self.succeeded |= !failed;
                let (ok, bad) = self
                    .buckets
                    .iter()
                    .fold((0u64, 0u64), |(o, b), &(_, ok, bad)| {
                        (o + u64::from(ok), b + u64::from(bad))
                    });
                let total = ok + bad;
                let activation = u64::from(self.config.activation);
                if total >= activation && bad as f64 >= self.config.trip * total as f64 {
                    self.open(now, "the failure rate reached the trip level");
                    Change::Opened
                } else if !self.succeeded && self.seen >= activation {
                    self.open(now, "nothing has succeeded since the start");
                    Change::Opened
                } else {
                    Change::None
                }
            }
        }
    }

    fn count(&mut self, failed: bool, now: Instant) {
        let width = self.config.window / BUCKETS;
        while let Some(&(start, _, _)) = self.buckets.front() {
            if now.duration_since(start) >= self.config.window {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
        match self.buckets.back_mut() {
            Some((start, ok, bad)) if now.duration_since(*start) < width => {
                if failed {
                    *bad += 1;
                } else {
                    *ok += 1;
                }
            }
            _ => self
                .buckets
                .push_back((now, u32::from(!failed), u32::from(failed))),
        }
    }

    fn open(&mut self, now: Instant, why: &str) {
        tracing::warn!(cooldown = ?self.config.cooldown, "kill switch open: {why}; receiving stops");
        self.circuit = Circuit::Open {
            until: now + self.config.cooldown,
        };
        self.opened_at.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    use crate::{
        Backoff, ConfigError, Consumer, ConsumerConfig, HandlerError, MemoryBroker, Message,
        handler_fn,
    };

    use super::super::control::{Admit, ConsumerState, Control};
    use super::KillSwitchConfig;

    fn switch(activation: u32, window: Duration, cooldown: Duration) -> KillSwitchConfig {
        KillSwitchConfig {
            window,
            activation,
            trip: 0.5,
            cooldown,
            probes: 2,
            count_permanent: false,
        }
    }

    /// A consumer of `n` messages, one handler at a time, retrying after 1 ms for ever.
    fn consumer(
        broker: &MemoryBroker,
        n: usize,
        kill_switch: KillSwitchConfig,
    ) -> Consumer<crate::memory::MemorySource> {
        for i in 0..n {
            broker.publish("q", Message::new(format!("m{i}")));
        }
        let config = ConsumerConfig {
            concurrency: 1,
            kill_switch: Some(kill_switch),
            ..ConsumerConfig::default()
        };
        Consumer::new(broker.source("q"))
            .config(config)
            .retry(Backoff::exponential(
                Duration::from_millis(1),
                Duration::from_millis(1),
            ))
            .max_attempts(1_000)
    }

    async fn until(control: &Control, what: impl Fn(&Control) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !what(control) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn it_trips_at_the_failure_rate_and_stops_receiving() {
        let broker = MemoryBroker::new();
        let consumer = consumer(
            &broker,
            50,
            switch(5, Duration::from_secs(60), Duration::from_secs(3600)),
        );
        let control = consumer.control();
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let watch = control.clone();
        let seen = calls.clone();
        consumer
            .run_until(
                handler_fn(move |_d, _cx| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Err(HandlerError::transient("down")) }
                }),
                async move {
                    until(&watch, |c| c.state() == ConsumerState::CircuitOpen).await;
                    let at_open = seen.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    assert_eq!(
                        seen.load(Ordering::SeqCst),
                        at_open,
                        "nothing runs while open"
                    );
                },
            )
            .await
            .unwrap();
        let calls = calls.load(Ordering::SeqCst);
        assert!(
            (5..=6).contains(&calls),
            "tripped after the 5th failure: {calls} calls"
        );
        assert_eq!(control.trips(), 1);
        assert_eq!(control.state(), ConsumerState::CircuitOpen);
    }

    #[tokio::test]
    async fn failed_attempts_retried_in_place_count_towards_tripping() {
        // Per-key ordering retries in place: the one delivery in flight never finishes while
        // its handler fails, so only its attempts can trip the switch.
        let broker = MemoryBroker::new();
        let consumer = consumer(
            &broker,
            3,
            switch(5, Duration::from_secs(60), Duration::from_secs(3600)),
        )
        .ordering(crate::KeyOrdering::PerKey);
        let control = consumer.control();
        let watch = control.clone();
        consumer
            .run_until(
                handler_fn(|_d, _cx| async { Err(HandlerError::transient("down")) }),
                async move {
                    until(&watch, |c| c.state() == ConsumerState::CircuitOpen).await;
                },
            )
            .await
            .unwrap();
        assert_eq!(control.trips(), 1);
    }

    #[tokio::test]
    async fn it_never_trips_below_activation() {
        let broker = MemoryBroker::new();
        let consumer = consumer(
            &broker,
            20,
            switch(100, Duration::from_secs(60), Duration::from_secs(3600)),
        )
        .max_attempts(1);
        let control = consumer.control();
        let idle = consumer.status();
        let summary = consumer
            .run_until(
                handler_fn(|_d, _cx| async { Err(HandlerError::transient("down")) }),
                async move { idle.idle(Duration::from_millis(300)).await },
            )
            .await
            .unwrap();
        assert_eq!(summary.dead_lettered, 20, "every failure was handled");
        assert_eq!(control.trips(), 0);
        assert_eq!(control.state(), ConsumerState::Running);
    }

    /// Failures too sparse for the window ever to hold `activation` of them: the window alone
    /// never trips, but a consumer that has never succeeded does.
    async fn sparse_failures(first_succeeds: bool) -> Control {
        let broker = MemoryBroker::new();
        if first_succeeds {
            broker.publish("q", Message::new("ok"));
        }
        let consumer = consumer(
            &broker,
            30,
            switch(5, Duration::from_millis(100), Duration::from_secs(3600)),
        );
        let control = consumer.control();
        let watch = control.clone();
        consumer
            .run_until(
                handler_fn(|d, _cx| async move {
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    if &d.payload[..] == b"ok" {
                        Ok(())
                    } else {
                        Err(HandlerError::transient("down"))
                    }
                }),
                async move {
                    let give_up = tokio::time::sleep(Duration::from_millis(1200));
                    tokio::select! {
                        () = until(&watch, |c| c.trips() > 0) => {}
                        () = give_up => {}
                    }
                },
            )
            .await
            .unwrap();
        control
    }

    #[tokio::test]
    async fn it_trips_on_a_consumer_that_never_succeeded() {
        assert_eq!(sparse_failures(false).await.trips(), 1);
        assert_eq!(
            sparse_failures(true).await.trips(),
            0,
            "the same sparse failures after one success: the window decides, and it never fills"
        );
    }

    #[tokio::test]
    async fn it_recovers_through_half_open_once_the_failures_stop() {
        let broker = MemoryBroker::new();
        let consumer = consumer(
            &broker,
            20,
            switch(4, Duration::from_secs(60), Duration::from_millis(200)),
        );
        let control = consumer.control();
        let failing = Arc::new(AtomicBool::new(true));
        let flag = failing.clone();
        let watch = control.clone();
        let idle = consumer.status();
        let summary = consumer
            .run_until(
                handler_fn(move |_d, _cx| {
                    let failing = flag.load(Ordering::SeqCst);
                    async move {
                        if failing {
                            Err(HandlerError::transient("down"))
                        } else {
                            Ok(())
                        }
                    }
                }),
                async move {
                    until(&watch, |c| c.state() == ConsumerState::CircuitOpen).await;
                    failing.store(false, Ordering::SeqCst);
                    until(&watch, |c| c.state() == ConsumerState::Running).await;
                    idle.idle(Duration::from_millis(300)).await;
                },
            )
            .await
            .unwrap();
        assert_eq!(summary.acked, 20, "everything went through once it closed");
        assert_eq!(control.trips(), 1);
        assert_eq!(control.state(), ConsumerState::Running);
    }

    #[tokio::test]
    async fn a_failing_probe_opens_it_again() {
        let broker = MemoryBroker::new();
        let consumer = consumer(
            &broker,
            20,
            switch(3, Duration::from_secs(60), Duration::from_millis(50)),
        );
        let control = consumer.control();
        let watch = control.clone();
        consumer
            .run_until(
                handler_fn(|_d, _cx| async { Err(HandlerError::transient("down")) }),
                async move { until(&watch, |c| c.trips() >= 3).await },
            )
            .await
            .unwrap();
        assert!(control.trips() >= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_ends_without_a_verdict_gives_its_place_back() {
        use crate::error::{ErrorKind, Failure};
        use crate::outcome::Outcome;

        let control = Control::default();
        control.install(
            Some(switch(2, Duration::from_secs(60), Duration::from_secs(1))),
            Arc::new(crate::metrics::Metrics::detached()),
        );
        let failed = Outcome::Retry {
            after: Duration::ZERO,
            failure: Failure::new(ErrorKind::Transient, "down"),
        };
        control.record(Some(&failed));
        control.record(Some(&failed));
        assert_eq!(control.state(), ConsumerState::CircuitOpen);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(control.admit(10), Admit::Take(2)), "two probes");
        control.admitted(2);
        // One probe is a permanent dead letter (not counted), the other's lease is lost (no
        // outcome at all): neither says whether the failures are over, so both are tried again.
        let bad_input = Outcome::DeadLetter(Failure::new(ErrorKind::Permanent, "not json"));
        control.record(Some(&bad_input));
        control.record(None);
        assert!(
            matches!(control.admit(10), Admit::Take(2)),
            "the probes' places are given back, not lost"
        );
        control.admitted(2);
        control.record(Some(&Outcome::Ack));
        control.record(Some(&Outcome::Ack));
        assert_eq!(control.state(), ConsumerState::Running);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        for bad in [
            KillSwitchConfig {
                trip: 0.0,
                ..KillSwitchConfig::default()
            },
            KillSwitchConfig {
                trip: f64::NAN,
                ..KillSwitchConfig::default()
            },
            KillSwitchConfig {
                activation: 0,
                ..KillSwitchConfig::default()
            },
            KillSwitchConfig {
                probes: 0,
                ..KillSwitchConfig::default()
            },
            KillSwitchConfig {
                cooldown: Duration::ZERO,
                ..KillSwitchConfig::default()
            },
            KillSwitchConfig {
                window: Duration::ZERO,
                ..KillSwitchConfig::default()
            },
        ] {
            let config = ConsumerConfig {
                kill_switch: Some(bad),
                ..ConsumerConfig::default()
            };
            assert!(
                matches!(config.validate(), Err(ConfigError::KillSwitch(_))),
                "{bad:?}"
            );
        }
        let config: ConsumerConfig = serde_json::from_str(
            r#"{"kill_switch":{"activation":10,"trip":0.8,"cooldown":"10s"}}"#,
        )
        .unwrap();
        let switch = config.kill_switch.unwrap();
        assert_eq!(
            (switch.activation, switch.cooldown),
            (10, Duration::from_secs(10))
        );
        assert!(config.validate().is_ok());
    }
}
