//! Runs the example against a librdkafka mock cluster hosted by this test (or the cluster at
//! `KAFKA_BROKERS`), and Redis (`REDIS_URL`, default 127.0.0.1:6379), on topics of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack::Publish;
use ackstack::kafka::{KafkaPublisher, read_topic};
use ackstack_testkit::unique_name;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

#[path = "../../support/run.rs"]
mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_processed_deduplicated_and_dead_lettered_then_it_exits_when_idle() {
    let topic = unique_name("example-kafka");
    let dlq = format!("{topic}-dlq");
    // The cluster lives in this process; the example reaches it over 127.0.0.1.
    let mut mock: Option<MockCluster<'static, DefaultProducerContext>> = None;
    let brokers = match std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
    {
        Some(brokers) => brokers,
        None => {
            let cluster = MockCluster::new(1).unwrap();
            cluster.create_topic(&topic, 3, 1).unwrap();
            cluster.create_topic(&dlq, 1, 1).unwrap();
            let brokers = cluster.bootstrap_servers();
            mock = Some(cluster);
            brokers
        }
    };
    let publisher = KafkaPublisher::new(&brokers, &topic).unwrap();
    for message in support::sample_orders() {
        publisher.publish(message).await.unwrap();
    }

    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let env = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("REDIS_URL", redis),
        ("APP_KAFKA__TOPIC", topic.clone()),
        ("APP_KAFKA__GROUP_ID", format!("{topic}-group")),
        ("APP_KAFKA__SESSION_TIMEOUT", "6s".to_string()),
        ("APP_REDIS__KEY_PREFIX", format!("{topic}:")),
        // Joining the group takes a few seconds; idle counts from the start.
        ("APP_EXIT_WHEN_IDLE", "10s".to_string()),
    ];
    let bin = env!("CARGO_BIN_EXE_kafka");
    let run =
        tokio::task::spawn_blocking(move || support::run(bin, &env, Duration::from_secs(120)))
            .await
            .unwrap();

    support::assert_sample_orders_handled(&run);
    let letters = read_topic(&brokers, &dlq, 1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(&letters[0].payload[..], b"not an order");
    drop(mock);
}
