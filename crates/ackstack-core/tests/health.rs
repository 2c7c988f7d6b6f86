//! `Status::health()`: healthy, degraded with its reasons, unhealthy once the broker has been
//! unreachable for longer than configured; and back to healthy when the cause goes away.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ackstack_core::memory::{MemorySettler, MemorySource, MemoryToken};
use ackstack_core::{
    AckReport, Capabilities, Consumer, ConsumerConfig, DeadLetter, DedupKey, Delivery, Failure,
    HandlerError, Health, HealthLevel, KillSwitchConfig, MemoryBroker, Message, Problem, Received,
    Settle, SettleError, SettleFailure, Settled, Source, SourceError, Status, handler_fn,
};
use common::{Outage, until};

/// A memory source whose receives, dead-letter writes and lease extensions fail while the
/// matching switch is on.
struct Faulty {
    inner: MemorySource,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    receive: AtomicBool,
    dead_letter: AtomicBool,
    extend: AtomicBool,
}

#[derive(Clone)]
struct FaultySettler {
    inner: MemorySettler,
    faults: Arc<Faults>,
}

impl Source for Faulty {
    type Token = MemoryToken;
    type Settler = FaultySettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        if self.faults.receive.load(Ordering::SeqCst) {
            return Err(SourceError::Disconnected("connection refused".into()));
        }
        self.inner.receive(max).await
    }
    fn settler(&self) -> FaultySettler {
        FaultySettler {
            inner: self.inner.settler(),
            faults: self.faults.clone(),
        }
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

impl Settle for FaultySettler {
    type Token = MemoryToken;
    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        self.inner.ack(tokens).await
    }
    async fn retry(
        &self,
        token: MemoryToken,
        d: &Delivery,
        after: Duration,
        f: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.inner.retry(token, d, after, f).await
    }
    async fn dead_letter(
        &self,
        token: MemoryToken,
        d: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        if self.faults.dead_letter.load(Ordering::SeqCst) {
            return Err(SettleFailure::new(
                token,
                SettleError::Broker("dead-letter queue unroutable".into()),
            ));
        }
        self.inner.dead_letter(token, d, letter).await
    }
    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        if self.faults.extend.load(Ordering::SeqCst) {
            return Err(SettleError::Broker("extension timed out".into()));
        }
        self.inner.extend(token, by).await
    }
    async fn release(&self, token: MemoryToken) {
        self.inner.release(token).await
    }
}

fn faulty(broker: &MemoryBroker, faults: &Arc<Faults>) -> Faulty {
    Faulty {
        inner: broker
            .source("q")
            .poll_wait(Duration::from_millis(20))
            .visibility_timeout(Duration::from_millis(400)),
        faults: faults.clone(),
    }
}

fn problems(health: &Health) -> Vec<Problem> {
    health.reasons.iter().map(|r| r.problem).collect()
}

/// Waits (up to the common deadline) until `status`'s health satisfies `what`; returns it.
async fn health_until(status: &Status, what: impl Fn(&Health) -> bool + Send + 'static) -> Health {
    let s = status.clone();
    until(move || what(&s.health())).await;
    status.health()
}

#[tokio::test]
async fn a_consumer_is_healthy_while_nothing_is_wrong() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)));
    let status = consumer.status();
    assert!(status.health().is_healthy(), "healthy before it runs");
    let watch = status.clone();
    let summary = consumer
        .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
            watch.idle(Duration::from_millis(200)).await
        })
        .await
        .unwrap();
    assert_eq!(summary.acked, 1);
    let health = status.health();
    assert_eq!(health.level, HealthLevel::Healthy);
    assert!(health.reasons.is_empty());
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"status": "healthy", "reasons": []})
    );
}

#[tokio::test]
async fn an_unreachable_broker_degrades_then_makes_it_unhealthy_and_recovery_heals_it() {
    let broker = MemoryBroker::new();
    let faults = Arc::new(Faults::default());
    faults.receive.store(true, Ordering::SeqCst);
    let mut config = ConsumerConfig::default();
    config.health.unhealthy_after = Duration::from_millis(600);
    let consumer = Consumer::new(faulty(&broker, &faults)).config(config);
    let status = consumer.status();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let run = tokio::spawn(
        consumer.run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
            stopped.cancelled().await
        }),
    );

    let degraded = health_until(&status, |h| !h.is_healthy()).await;
    assert_eq!(degraded.level, HealthLevel::Degraded, "{degraded:?}");
    assert_eq!(problems(&degraded), [Problem::BrokerUnreachable]);

    let unhealthy = health_until(&status, Health::is_unhealthy).await;
    assert!(unhealthy.reasons[0].since >= Duration::from_millis(600));
    let json = serde_json::to_value(&unhealthy).unwrap();
    assert_eq!(json["status"], "unhealthy");
    assert_eq!(json["reasons"][0]["reason"], "broker_unreachable");
    assert!(json["reasons"][0]["for_seconds"].as_f64().unwrap() >= 0.6);

    faults.receive.store(false, Ordering::SeqCst);
    broker.publish("q", Message::new("m"));
    let healed = health_until(&status, Health::is_healthy).await;
    assert!(healed.reasons.is_empty(), "{healed:?}");
    stop.cancel();
    assert_eq!(run.await.unwrap().unwrap().acked, 1);
}

#[tokio::test]
async fn a_store_outage_degrades_and_its_end_heals() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m").message_id("k1"));
    let store = Outage::new(true, false);
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
        .dedup_shared(store.clone(), DedupKey::MessageId);
    let status = consumer.status();
    let b = broker.clone();
    let run = tokio::spawn(consumer.run_until(
        handler_fn(|_d, _cx| async { Ok(()) }),
        until(move || b.is_empty("q")),
    ));
    let degraded = health_until(&status, |h| !h.is_healthy()).await;
    assert_eq!(degraded.level, HealthLevel::Degraded);
    assert_eq!(problems(&degraded), [Problem::StoreUnavailable]);
    store.down.store(false, Ordering::SeqCst);
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.acked, 1, "held through the outage, then processed");
    assert!(status.health().is_healthy(), "{:?}", status.health());
}

#[tokio::test]
async fn failing_dead_letter_writes_degrade_until_one_succeeds() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("poison"));
    let faults = Arc::new(Faults::default());
    faults.dead_letter.store(true, Ordering::SeqCst);
    let consumer = Consumer::new(faulty(&broker, &faults));
    let status = consumer.status();
    let b = broker.clone();
    let run = tokio::spawn(consumer.run_until(
        handler_fn(|_d, _cx| async { Err(HandlerError::permanent("bad")) }),
        until(move || b.is_empty("q")),
    ));
    let degraded = health_until(&status, |h| !h.is_healthy()).await;
    assert_eq!(problems(&degraded), [Problem::DeadLetterWritesFailing]);
    faults.dead_letter.store(false, Ordering::SeqCst);
    let summary = run.await.unwrap().unwrap();
    assert_eq!(broker.dead_letters("q").len(), 1);
    assert!(summary.settle_failures >= 1);
    assert!(status.health().is_healthy(), "{:?}", status.health());
}

#[tokio::test]
async fn failing_lease_extensions_degrade_until_one_succeeds() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow"));
    let faults = Arc::new(Faults::default());
    faults.extend.store(true, Ordering::SeqCst);
    let consumer = Consumer::new(faulty(&broker, &faults));
    let status = consumer.status();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<Health>();
    let seen_tx = std::sync::Mutex::new(Some(seen_tx));
    let watch = status.clone();
    let f = faults.clone();
    let b = broker.clone();
    let summary = consumer
        .run_until(
            handler_fn(move |_d, _cx| {
                let watch = watch.clone();
                let f = f.clone();
                let tx = seen_tx.lock().unwrap().take();
                async move {
                    // The keeper extends at 70% of the 400 ms lease and retries failures
                    // at a quarter of what is left: degraded within the lease.
                    let degraded = health_until(&watch, |h| !h.is_healthy()).await;
                    f.extend.store(false, Ordering::SeqCst);
                    let _ = health_until(&watch, Health::is_healthy).await;
                    if let Some(tx) = tx {
                        let _ = tx.send(degraded);
                    }
                    Ok(())
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    let degraded = seen_rx.await.unwrap();
    assert_eq!(problems(&degraded), [Problem::LeaseExtensionsFailing]);
    assert!(status.health().is_healthy());
    // The lease may lapse while extensions fail; then the work is redone on redelivery.
    assert!(summary.acked <= 1);
}

#[tokio::test]
async fn an_open_kill_switch_degrades_the_consumer() {
    let broker = MemoryBroker::new();
    for i in 0..20 {
        broker.publish("q", Message::new(format!("m{i}")));
    }
    let mut config = ConsumerConfig::default();
    let mut kill_switch = KillSwitchConfig::default();
    kill_switch.activation = 5;
    kill_switch.cooldown = Duration::from_secs(60);
    config.kill_switch = Some(kill_switch);
    config.retry.max_attempts = 1;
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
        .config(config)
        .concurrency(1);
    let status = consumer.status();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let run = tokio::spawn(consumer.run_until(
        handler_fn(|_d, _cx| async { Err(HandlerError::transient("downstream down")) }),
        async move { stopped.cancelled().await },
    ));
    let open = health_until(&status, |h| !h.is_healthy()).await;
    assert_eq!(open.level, HealthLevel::Degraded, "{open:?}");
    assert_eq!(problems(&open), [Problem::CircuitOpen]);
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[test]
fn the_worst_of_several_consumers_is_reported() {
    let healthy = Health {
        level: HealthLevel::Healthy,
        reasons: Vec::new(),
    };
    let degraded = Health {
        level: HealthLevel::Degraded,
        reasons: vec![ackstack_core::HealthReason {
            problem: Problem::StoreUnavailable,
            since: Duration::from_secs(3),
        }],
    };
    let worst = Health::worst([healthy.clone(), degraded.clone()]);
    assert_eq!(worst, degraded);
    assert_eq!(Health::worst([healthy.clone()]), healthy);
}
