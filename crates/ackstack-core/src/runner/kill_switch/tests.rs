//! The kill switch's tests: on the in-memory broker, and on the circuit itself under tokio's
//! paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::{
    Backoff, ConfigError, Consumer, ConsumerConfig, HandlerError, MemoryBroker, Message, handler_fn,
};

use super::super::control::Control;
use super::super::state::{Admit, ConsumerState};
use super::KillSwitchConfig;
use crate::error::{ErrorKind, Failure};
use crate::outcome::Outcome;

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

/// A transient failure, as the stack reports one.
fn failed() -> Outcome {
    Outcome::Retry {
        after: Duration::ZERO,
        failure: Failure::new(ErrorKind::Transient, "down"),
    }
}

/// A control with a kill switch tripped by `activation` failures (cooldown 1 s).
fn tripped(activation: u32) -> Control {
    let control = Control::default();
    control.install(
        Some(switch(
            activation,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )),
        Arc::new(crate::metrics::Metrics::detached()),
    );
    for _ in 0..activation {
        control.record(Some(&failed()), None);
    }
    assert_eq!(control.state(), ConsumerState::CircuitOpen);
    control
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
        .backoff(Backoff::exponential(
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
    assert_eq!(
        calls, 5,
        "one handler at a time: nothing runs after the 5th failure tripped it"
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
    let control = tripped(2);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(control.admit(10), Admit::Take(2)), "two probes");
    let probe = control.admitted(2);
    assert!(probe.is_some());
    // One probe is a permanent dead letter (not counted), the other's lease is lost (no
    // outcome at all): neither says whether the failures are over, so both are tried again.
    let bad_input = Outcome::DeadLetter(Failure::new(ErrorKind::Permanent, "not json"));
    control.record(Some(&bad_input), probe);
    control.record(None, probe);
    assert!(
        matches!(control.admit(10), Admit::Take(2)),
        "the probes' places are given back, not lost"
    );
    assert_eq!(control.admitted(2), probe, "the same half-open period");
    control.record(Some(&Outcome::Ack), probe);
    control.record(Some(&Outcome::Ack), probe);
    assert_eq!(control.state(), ConsumerState::Running);
}

#[tokio::test(start_paused = true)]
async fn only_deliveries_received_while_half_open_decide_it() {
    let control = tripped(2);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(control.admit(10), Admit::Take(2)));
    let probes = control.admitted(2);
    // Two deliveries received before the trip finish now, one well and one badly: they
    // were not let through by the half-open circuit, so they decide nothing.
    control.record(Some(&Outcome::Ack), None);
    control.record(Some(&Outcome::Ack), None);
    control.record(Some(&failed()), None);
    assert_eq!(
        control.state(),
        ConsumerState::HalfOpen,
        "closed or re-opened by deliveries that were not its probes"
    );
    control.record(Some(&Outcome::Ack), probes);
    assert_eq!(
        control.state(),
        ConsumerState::HalfOpen,
        "one probe is left"
    );
    control.record(Some(&Outcome::Ack), probes);
    assert_eq!(control.state(), ConsumerState::Running);
    assert_eq!(control.trips(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_probe_of_an_earlier_half_open_period_does_not_decide_the_next() {
    let control = tripped(1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(control.admit(1), Admit::Take(1)));
    let first = control.admitted(1);
    assert!(matches!(control.admit(1), Admit::Take(1)));
    let slow = control.admitted(1);
    control.record(Some(&failed()), first);
    assert_eq!(control.state(), ConsumerState::CircuitOpen);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(control.admit(2), Admit::Take(2)));
    let second = control.admitted(2);
    assert_ne!(second, slow);
    // The slow probe of the first period succeeds only now: not this period's verdict.
    control.record(Some(&Outcome::Ack), slow);
    control.record(Some(&Outcome::Ack), second);
    assert_eq!(control.state(), ConsumerState::HalfOpen);
    control.record(Some(&Outcome::Ack), second);
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
    let config: ConsumerConfig =
        serde_json::from_str(r#"{"kill_switch":{"activation":10,"trip":0.8,"cooldown":"10s"}}"#)
            .unwrap();
    let switch = config.kill_switch.unwrap();
    assert_eq!(
        (switch.activation, switch.cooldown),
        (10, Duration::from_secs(10))
    );
    assert!(config.validate().is_ok());
}
