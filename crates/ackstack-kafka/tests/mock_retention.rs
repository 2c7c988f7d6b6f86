//! The mock cluster's 5 MiB-per-partition retention, measured (run with `--ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ackstack_core::{Settle, Source};
use ackstack_kafka::KafkaSource;
use ackstack_testkit::unique_name;
use common::{kafka, receive_for};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;

/// Produces `n` records of 256 B to one partition, then consumes from a fresh group and
/// reports the partition's watermarks and what arrived.
async fn backlog(n: usize) -> (i64, i64, usize) {
    let k = kafka();
    let topic = unique_name("backlog");
    k.create_topic(&topic, 1).await;
    let producer = k.producer();
    let payload = vec![b'x'; 256];
    let mut futures = Vec::new();
    for _ in 0..n {
        let r: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic).payload(&payload[..]);
        futures.push(producer.send_result(r).map_err(|(e, _)| e).unwrap());
    }
    for f in futures {
        f.await.unwrap().unwrap();
    }
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .create()
        .unwrap();
    let t = topic.clone();
    let (low, high) = tokio::task::spawn_blocking(move || {
        probe
            .fetch_watermarks(&t, 0, Duration::from_secs(5))
            .unwrap()
    })
    .await
    .unwrap();
    let mut source = KafkaSource::new(&k.config(&unique_name("g"), &topic)).unwrap();
    let settler = source.settler();
    let got = receive_for(&mut source, Duration::from_secs(10)).await;
    settler
        .ack(got.iter().map(|r| r.token.clone()).collect())
        .await;
    (low, high, got.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: cargo test -p ackstack-kafka --test mock_retention -- --ignored --nocapture"]
async fn mock_partition_retention() {
    for n in [2_000, 50_000] {
        let (low, high, got) = backlog(n).await;
        eprintln!("produced {n}: low watermark {low}, high {high}, consumed {got}");
        assert_eq!(got as i64, high - low, "everything retained arrives");
    }
}

/// The same backlog read by a plain `StreamConsumer` (what was seen to stall).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: cargo test -p ackstack-kafka --test mock_retention -- --ignored --nocapture"]
async fn stream_consumer_on_a_trimmed_partition() {
    use rdkafka::consumer::StreamConsumer;
    for n in [2_000usize, 50_000] {
        let k = kafka();
        let topic = unique_name("stream");
        k.create_topic(&topic, 1).await;
        let producer = k.producer();
        let payload = vec![b'x'; 256];
        let mut futures = Vec::new();
        for _ in 0..n {
            let r: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic).payload(&payload[..]);
            futures.push(producer.send_result(r).map_err(|(e, _)| e).unwrap());
        }
        for f in futures {
            f.await.unwrap().unwrap();
        }
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &k.brokers)
            .set("group.id", unique_name("g"))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic.as_str()]).unwrap();
        let mut got = 0usize;
        let mut first = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
                Ok(Ok(m)) => {
                    use rdkafka::Message;
                    first.get_or_insert(m.offset());
                    got += 1;
                }
                Ok(Err(e)) => eprintln!("error: {e}"),
                Err(_) => {}
            }
        }
        eprintln!("StreamConsumer, produced {n}: first offset {first:?}, consumed {got}");
    }
}
