//! RabbitMQ: a message retried three times arrives with attempt 4, each retry delayed by the
//! delay bucket its backoff delay rounds up to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, HandlerError, Message, Publish, handler_fn,
};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use ackstack_testkit::unique_name;
use tokio::time::Instant;

#[tokio::test]
async fn retried_three_times_arrives_with_attempt_four_after_bucketed_delays() {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut config = RabbitConfig::new(url, unique_name("retries"));
    // Backoff delays 300 ms, 600 ms, 1200 ms round up to these buckets: 500 ms, 1 s, 2 s.
    config.delay_buckets = vec![
        Duration::from_millis(500),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ];
    config.poll_interval = Duration::from_millis(100);
    config.queue_expires = Some(Duration::from_secs(300));
    let backoff =
        Backoff::exponential(Duration::from_millis(300), Duration::from_secs(10)).no_jitter();
    for (n, bucket) in [(1, 500), (2, 1000), (3, 2000)] {
        assert_eq!(
            config.bucket_for(backoff.delay(n)),
            Some(Duration::from_millis(bucket))
        );
    }

    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    publisher.publish(Message::new("flaky")).await.unwrap();

    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let s = seen.clone();
    let mut consumer_config = ConsumerConfig::default();
    consumer_config.retry.backoff = backoff;
    let consumer =
        Consumer::new(RabbitSource::connect(config.clone()).await.unwrap()).config(consumer_config);
    let done = seen.clone();
    let summary = consumer
        .run_until(
            handler_fn(move |d, _cx| {
                s.lock().unwrap().push((d.attempt, Instant::now()));
                async move {
                    if d.attempt <= 3 {
                        Err(HandlerError::transient("not yet"))
                    } else {
                        Ok(())
                    }
                }
            }),
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while done.lock().unwrap().len() < 4 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            },
        )
        .await
        .unwrap();

    let seen = seen.lock().unwrap().clone();
    let attempts: Vec<u32> = seen.iter().map(|s| s.0).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4]);
    for (i, bucket_ms) in [500u64, 1000, 2000].into_iter().enumerate() {
        let gap = seen[i + 1].1 - seen[i].1;
        let bucket = Duration::from_millis(bucket_ms);
        assert!(
            gap >= bucket,
            "retry {} came after {gap:?}, before its {bucket:?} bucket",
            i + 1
        );
        assert!(
            gap < bucket + Duration::from_secs(1),
            "retry {} took {gap:?} for a {bucket:?} bucket",
            i + 1
        );
    }
    assert_eq!(summary.retried, 3);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
}
