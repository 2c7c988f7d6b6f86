//! The kill switch on the real brokers: when every delivery fails it trips, the consumer stops
//! receiving (RabbitMQ stops pulling, SQS stops polling, Kafka stops taking records while its
//! poll loop keeps serving the group, so the group never evicts it), and once the failures stop
//! it lets a probe through after its cooldown, closes, and every message is processed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, ConsumerState, HandlerError, KillSwitchConfig, Message,
    Publish, Source, handler_fn,
};
use ackstack_kafka::{KafkaConfig, KafkaPublisher, KafkaSource};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use ackstack_sqs::testing;
use ackstack_sqs::{SqsPublisher, SqsSource};
use ackstack_testkit::unique_name;
use common::eventually;

mod common;

const MESSAGES: usize = 20;

/// Publishes [`MESSAGES`], runs a consumer whose handler fails until told otherwise, and checks
/// that the kill switch trips, that nothing is received while it is open, and that it closes
/// and everything is processed once the failures stop. `once_open` runs right after it
/// tripped, `once_closed` right after it closed, while the consumer still runs.
///
/// With `heal_at_open`, the failures stop as soon as it trips: deliveries that retry in place
/// (Kafka), and so hold their concurrency permits, then finish while it is open, and only the
/// gate keeps the freed permits from receiving more.
async fn trips_and_recovers<S: Source>(
    source: S,
    publisher: impl Publish,
    cooldown: Duration,
    heal_at_open: bool,
    once_open: impl FnOnce(),
    once_closed: impl FnOnce(),
) {
    for i in 0..MESSAGES {
        publisher
            .publish(Message::new(format!("m{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    let failing = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let mut kill_switch = KillSwitchConfig::default();
    kill_switch.window = Duration::from_secs(60);
    kill_switch.activation = 4;
    kill_switch.trip = 0.5;
    kill_switch.cooldown = cooldown;
    kill_switch.probes = 1;
    let mut config = ConsumerConfig::default();
    config.concurrency = 2;
    config.retry.max_attempts = 100_000;
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter();
    config.kill_switch = Some(kill_switch);
    let consumer = Consumer::new(source).config(config);
    let control = consumer.control();
    let status = consumer.status();
    let (f, h) = (failing.clone(), handled.clone());
    let done = handled.clone();
    let run = tokio::spawn(consumer.run_until(
        handler_fn(move |d, _cx| {
            let (f, h) = (f.clone(), h.clone());
            async move {
                if f.load(Ordering::SeqCst) {
                    return Err(HandlerError::transient("downstream down"));
                }
                h.lock().unwrap().insert(d.payload.clone());
                Ok(())
            }
        }),
        async move {
            eventually(Duration::from_secs(120), || {
                done.lock().unwrap().len() == MESSAGES
            })
            .await;
        },
    ));

    let c = control.clone();
    assert!(
        eventually(Duration::from_secs(30), || c.state()
            == ConsumerState::CircuitOpen)
        .await,
        "the kill switch trips"
    );
    once_open();
    if heal_at_open {
        failing.store(false, Ordering::SeqCst);
    }
    // In-flight work settles as usual; after that nothing more is received while it is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status.received_total();
    tokio::time::sleep(cooldown / 2).await;
    assert_eq!(control.state(), ConsumerState::CircuitOpen);
    assert_eq!(
        status.received_total(),
        before,
        "nothing is received while the circuit is open"
    );
    let health = status.health();
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.problem == ackstack_core::Problem::CircuitOpen),
        "health says the circuit is open: {health:?}"
    );

    failing.store(false, Ordering::SeqCst);
    let c = control.clone();
    assert!(
        eventually(cooldown * 3 + Duration::from_secs(10), || {
            c.state() == ConsumerState::Running
        })
        .await,
        "it closes once a probe succeeds"
    );
    once_closed();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(handled.lock().unwrap().len(), MESSAGES, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0);
    assert!(control.trips() >= 1);
}

#[tokio::test]
async fn rabbitmq_stops_pulling_while_the_kill_switch_is_open() {
    let mut config = RabbitConfig::new(common::amqp_url(), unique_name("kill-switch"));
    config.delay_buckets = [100, 200, 500]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    config.queue_expires = Some(Duration::from_secs(180));
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    let source = RabbitSource::connect(config).await.unwrap();
    trips_and_recovers(
        source,
        publisher,
        Duration::from_secs(3),
        false,
        || {},
        || {},
    )
    .await;
}

#[tokio::test]
async fn sqs_stops_polling_while_the_kill_switch_is_open() {
    let client = testing::client().await;
    let queue = testing::TestQueue::create(&client, "kill-switch", false)
        .await
        .unwrap();
    let publisher = SqsPublisher::new(client.clone(), queue.url.clone());
    let source = SqsSource::from_client(client.clone(), queue.config(Duration::from_secs(30)))
        .await
        .unwrap();
    trips_and_recovers(
        source,
        publisher,
        Duration::from_secs(3),
        false,
        || {},
        || {},
    )
    .await;
}

#[tokio::test]
async fn kafka_keeps_its_partitions_while_the_kill_switch_is_open() {
    let topic = unique_name("kill-switch");
    let (brokers, _cluster) = common::mock_cluster(&topic, 2);
    let mut config = KafkaConfig::new(&brokers, format!("{topic}-group"), &topic);
    config.session_timeout = Duration::from_secs(6);
    config.commit_interval = Duration::from_millis(100);
    // Open longer than the poll interval a silent member would be evicted after: the poll
    // loop must keep serving the group while nothing is taken.
    let config = config
        .property("max.poll.interval.ms", "6000")
        .property("heartbeat.interval.ms", "500");
    let publisher = KafkaPublisher::new(&brokers, &topic).unwrap();
    let source = KafkaSource::new(&config).unwrap();
    let stats = source.stats();
    let at_open = Arc::new(Mutex::new((0, 0)));
    let (seen, check) = (at_open.clone(), stats.clone());
    trips_and_recovers(
        source,
        publisher,
        Duration::from_secs(9),
        true,
        move || *seen.lock().unwrap() = (check.lost(), check.revocations()),
        move || {
            // (Closing the consumer at the end revokes its partitions; not yet.)
            let (lost, revoked) = *at_open.lock().unwrap();
            assert_eq!(
                stats.lost(),
                lost,
                "the group did not evict the member while the circuit was open"
            );
            if stats.revocations() != revoked {
                // The group may rebalance of its own accord (a join that took too long under
                // load); the member took part, so its partitions came back.
                eprintln!(
                    "{} partitions revoked by a rebalance while open, none lost",
                    stats.revocations() - revoked
                );
            }
        },
    )
    .await;
}
