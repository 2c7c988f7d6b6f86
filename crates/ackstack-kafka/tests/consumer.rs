//! End to end through `ackstack_core::Consumer`: in-place retry, dead-letter, commits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{Backoff, Consumer, DeadLetterMetadata, HandlerError, handler_fn};
use ackstack_kafka::{KafkaSource, read_topic};
use ackstack_testkit::unique_name;
use common::kafka;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_retries_in_place_dead_letters_and_commits_everything() {
    let k = kafka();
    let topic = unique_name("e2e");
    let group = unique_name("g");
    k.create_topic(&topic, 2).await;
    let config = k.config(&group, &topic);
    k.create_topic(&config.dlq_topic(), 1).await;
    const N: usize = 60;
    k.produce(&topic, N, 2).await;

    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let finished = Arc::new(Notify::new());
    let handler = {
        let attempts = attempts.clone();
        let finished = finished.clone();
        handler_fn(move |d, _cx| {
            let attempts = attempts.clone();
            let finished = finished.clone();
            async move {
                let body = String::from_utf8_lossy(&d.payload).to_string();
                let n = {
                    let mut a = attempts.lock().unwrap();
                    let n = {
                        let n = a.entry(body.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if a.len() == N {
                        finished.notify_one();
                    }
                    n
                };
                match body.as_str() {
                    "m-5" => Err(HandlerError::permanent("poison")),
                    "m-7" if n < 3 => Err(HandlerError::transient("flaky")),
                    _ => Ok(()),
                }
            }
        })
    };
    let source = KafkaSource::new(&config).unwrap();
    let consumer = Consumer::new(source)
        .concurrency(8)
        .retry(
            Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter(),
        )
        .max_attempts(5);
    let shutdown = {
        let finished = finished.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), finished.notified()).await;
            // Let the last retries and the dead-letter settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        consumer.run_until(handler, shutdown),
    )
    .await
    .expect("run ends")
    .unwrap();
    assert_eq!(attempts.lock().unwrap().len(), N, "{summary:?}");
    assert_eq!(attempts.lock().unwrap()["m-7"], 3, "retried in place");
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(summary.ack_failures, 0, "{summary:?}");

    let per_partition = (N / 2) as i64;
    assert_eq!(
        k.committed(&group, &topic, 2).await,
        vec![per_partition, per_partition]
    );
    let dlq = read_topic(&k.brokers, &config.dlq_topic(), 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(&dlq[0].payload[..], b"m-5");
    let meta = DeadLetterMetadata::from_headers(&dlq[0].headers).unwrap();
    assert_eq!(meta.error_message, "poison");
}
