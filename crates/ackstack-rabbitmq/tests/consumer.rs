//! End to end through `ackstack_core::Consumer` against the real RabbitMQ at `AMQP_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, DeadLetterMetadata, HandlerError, Message, Publish, Source, handler_fn,
};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};

mod common;

fn config() -> RabbitConfig {
    let mut c = common::config(common::url(), "e2e", &[300, 1000]);
    c.prefetch = 20;
    c
}

#[tokio::test]
async fn consumer_acks_retries_and_dead_letters_through_rabbitmq() {
    let config = config();
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    for i in 0..20 {
        publisher
            .publish(Message::new(format!("ok-{i}")))
            .await
            .unwrap();
    }
    publisher
        .publish(Message::new("flaky").header("kind", "flaky"))
        .await
        .unwrap();
    publisher
        .publish(Message::new("bad").header("kind", "bad"))
        .await
        .unwrap();

    let succeeded = Arc::new(Mutex::new(BTreeSet::new()));
    let attempts_seen = Arc::new(Mutex::new(Vec::new()));
    let (s, a) = (succeeded.clone(), attempts_seen.clone());
    let handler = handler_fn(move |d, _cx| {
        let (s, a) = (s.clone(), a.clone());
        async move {
            let body = String::from_utf8(d.payload.to_vec()).unwrap();
            match d.headers.get_str("kind") {
                Some("flaky") => {
                    a.lock().unwrap().push(d.attempt);
                    if d.attempt < 3 {
                        return Err(HandlerError::transient("not yet"));
                    }
                }
                Some("bad") => return Err(HandlerError::permanent("cannot parse")),
                _ => {}
            }
            s.lock().unwrap().insert(body);
            Ok(())
        }
    });

    let source = RabbitSource::connect(config.clone()).await.unwrap();
    let settler_stats = source.settler();
    let done = succeeded.clone();
    let dlq = config.dlq_name();
    let watcher = RabbitPublisher::connect(config.clone()).await.unwrap();
    let shutdown = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let finished = done.lock().unwrap().len() == 21;
            if finished && watcher.queue_len(&dlq).await.unwrap_or(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        Consumer::new(source)
            .concurrency(8)
            .backoff(
                Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1))
                    .no_jitter(),
            )
            .max_attempts(5)
            .run_until(handler, shutdown),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(succeeded.lock().unwrap().len(), 21);
    assert_eq!(*attempts_seen.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(summary.ack_failures, 0);
    let stats = settler_stats.stats();
    assert!(
        stats.ack_frames < summary.received,
        "batched: {} frames for {} deliveries",
        stats.ack_frames,
        summary.received
    );

    let copy = publisher.get_dead_letter().await.unwrap().unwrap();
    assert_eq!(&copy.payload[..], b"bad");
    assert_eq!(copy.headers.get_str("kind"), Some("bad"));
    let meta = DeadLetterMetadata::from_headers(&copy.headers).unwrap();
    assert_eq!(meta.error_message, "cannot parse");
    assert_eq!(meta.attempts, 1);

    // Everything was acked: a fresh consumer finds nothing.
    let mut fresh = RabbitSource::connect(config.clone()).await.unwrap();
    for _ in 0..5 {
        assert!(fresh.receive(10).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn consumer_acks_deliveries_behind_a_slow_one_while_it_still_runs() {
    let mut config = config();
    config.prefetch = 100;
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    publisher.publish(Message::new("slow")).await.unwrap();
    for i in 0..10 {
        publisher
            .publish(Message::new(format!("fast-{i}")))
            .await
            .unwrap();
    }
    let source = RabbitSource::connect(config.clone()).await.unwrap();
    let settler = source.settler();
    let watched = settler.clone();
    let seen_while_slow = Arc::new(Mutex::new(None));
    let seen = seen_while_slow.clone();
    let handler = handler_fn(move |d, _cx| {
        let (watched, seen) = (watched.clone(), seen.clone());
        async move {
            if d.payload == "slow" {
                // The first delivery (tag 1) holds the cumulative ack back while it runs: the
                // ten behind it must reach the broker anyway.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while watched.stats().acked_tokens < 10 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                *seen.lock().unwrap() = Some(watched.stats());
            }
            Ok::<(), HandlerError>(())
        }
    });
    let done = seen_while_slow.clone();
    let shutdown = async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while done.lock().unwrap().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        Consumer::new(source)
            .concurrency(16)
            .run_until(handler, shutdown),
    )
    .await
    .unwrap()
    .unwrap();
    let during = seen_while_slow
        .lock()
        .unwrap()
        .expect("the slow handler ran");
    assert_eq!(
        during.acked_tokens, 10,
        "deliveries behind the slow one were not acked at the broker while it ran: {during:?}"
    );
    assert_eq!(during.ack_frames, 10, "{during:?}");
    assert_eq!(summary.acked, 11);
    assert_eq!(settler.stats().acked_tokens, 11);
    let mut fresh = RabbitSource::connect(config.clone()).await.unwrap();
    for _ in 0..3 {
        assert!(fresh.receive(10).await.unwrap().is_empty());
    }
}
