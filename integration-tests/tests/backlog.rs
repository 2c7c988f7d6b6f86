//! `Settle::backlog` on the real brokers: what waits at the broker for a consumer, as the
//! `ackstack_backlog` and `ackstack_partition_lag` gauges show it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::{Message, Publish, Settle, Source};
use ackstack_kafka::{KafkaConfig, KafkaPublisher, KafkaSource};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use ackstack_sqs::testing;
use ackstack_sqs::{SqsPublisher, SqsSource};
use ackstack_testkit::unique_name;

mod common;

/// Asks `settler` until its backlog is `want` (or 30 s pass); returns the last answer.
async fn backlog_until<S: Settle>(settler: &S, want: u64) -> Option<ackstack_core::Backlog> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let backlog = settler.backlog().await;
        if backlog.as_ref().is_some_and(|b| b.total == want)
            || tokio::time::Instant::now() > deadline
        {
            return backlog;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rabbitmq_counts_the_ready_messages() {
    let mut config = RabbitConfig::new(common::amqp_url(), unique_name("backlog"));
    config.prefetch = 1;
    config.queue_expires = Some(Duration::from_secs(120));
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    for i in 0..5 {
        publisher
            .publish(Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let source = RabbitSource::connect(config).await.unwrap();
    let settler = source.settler();
    // One message is pushed to the consumer (prefetch 1): four stay ready.
    let backlog = backlog_until(&settler, 4).await.expect("a backlog");
    assert_eq!(backlog.total, 4);
    assert!(backlog.partitions.is_empty());
    // The consuming channel survived the passive declares.
    let mut source = source;
    let got = source.receive(1).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn sqs_reports_the_approximate_number_of_messages() {
    let client = testing::client().await;
    let queue = testing::TestQueue::create(&client, "backlog", false)
        .await
        .unwrap();
    let publisher = SqsPublisher::new(client.clone(), queue.url.clone());
    for i in 0..3 {
        publisher
            .publish(Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let source = SqsSource::from_client(client.clone(), queue.config(Duration::from_secs(30)))
        .await
        .unwrap();
    let backlog = backlog_until(&source.settler(), 3)
        .await
        .expect("a backlog");
    assert_eq!(backlog.total, 3);
}

#[tokio::test]
async fn kafka_reports_the_lag_of_each_partition() {
    let topic = unique_name("backlog");
    let (brokers, _cluster) = common::mock_cluster(&topic, 2);
    let mut config = KafkaConfig::new(&brokers, format!("{topic}-group"), &topic);
    config.session_timeout = Duration::from_secs(6);
    let publisher = KafkaPublisher::new(&brokers, &topic).unwrap();
    for i in 0..6 {
        publisher
            .publish(Message::new(format!("m{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    let source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while source.assigned_partitions() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing is committed yet: every record is lag.
    let backlog = backlog_until(&settler, 6).await.expect("a backlog");
    assert_eq!(backlog.total, 6, "{backlog:?}");
    let mut partitions = backlog.partitions.clone();
    partitions.sort();
    assert_eq!(partitions.len(), 2);
    assert_eq!(partitions.iter().map(|(_, lag)| lag).sum::<u64>(), 6);
}
