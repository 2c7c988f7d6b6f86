//! End to end through `ackstack_core::Consumer` against the SQS endpoint (moto by default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, DeadLetterReason, Delivery, HandlerError, Message, Publish, handler_fn,
};
use ackstack_sqs::testing::{self, TestQueue};
use ackstack_sqs::{DeadLetterRecord, SqsPublisher, SqsSource};

#[tokio::test]
async fn consumer_acks_retries_extends_and_dead_letters() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let client = testing::client().await;
        let queue = TestQueue::create(&client, "e2e", false).await.unwrap();
        // A 4 s lease: the slow handler (6 s) only finishes once because the lease keeper
        // extends it. (With 2 s, an extension sent at 70% had 0.6 s to reach a loaded moto,
        // and under parallel tests it sometimes did not.)
        let source = SqsSource::from_client(client.clone(), queue.config(Duration::from_secs(4)))
            .await
            .unwrap();
        let publisher = SqsPublisher::for_source(&source);
        let mut expected = 0;
        for i in 0..12 {
            publisher
                .publish(Message::new(format!("ok-{i}")))
                .await
                .unwrap();
            expected += 1;
        }
        for body in ["flaky", "poison", "slow"] {
            publisher
                .publish(Message::new(body).header("kind", body))
                .await
                .unwrap();
            expected += 1;
        }

        let calls: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let handler = {
            let calls = calls.clone();
            let finished = finished.clone();
            handler_fn(move |d: Delivery, _cx| {
                let calls = calls.clone();
                let finished = finished.clone();
                async move {
                    let body = String::from_utf8(d.payload.to_vec()).unwrap();
                    calls
                        .lock()
                        .unwrap()
                        .entry(body.clone())
                        .or_default()
                        .push(d.attempt);
                    match body.as_str() {
                        "flaky" if d.attempt < 2 => {
                            return Err(HandlerError::transient("not yet"));
                        }
                        "poison" => {
                            finished.fetch_add(1, Ordering::SeqCst);
                            return Err(HandlerError::permanent("cannot decode"));
                        }
                        "slow" => tokio::time::sleep(Duration::from_millis(6000)).await,
                        _ => {}
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        };
        let done = finished.clone();
        let shutdown = async move {
            let wait = async {
                while done.load(Ordering::SeqCst) < expected {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
            // Let the last settlements (dead-letter copy, acks) go out.
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let consumer = Consumer::new(source)
            .concurrency(8)
            .backoff(
                Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1)).no_jitter(),
            )
            .max_attempts(3)
            .shutdown_deadline(Duration::from_secs(10));
        let summary = consumer.run_until(handler, shutdown).await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), expected, "{summary:?}");

        let calls = calls.lock().unwrap().clone();
        for i in 0..12 {
            assert_eq!(calls[&format!("ok-{i}")], vec![1], "ok-{i} handled once");
        }
        assert_eq!(calls["flaky"], vec![1, 2], "retried once, attempt from SQS");
        assert_eq!(calls["poison"], vec![1], "permanent: dead-lettered at once");
        assert_eq!(calls["slow"], vec![1], "lease extended, never redelivered");
        assert_eq!(summary.dead_lettered, 1, "{summary:?}");
        assert_eq!(summary.retried, 1, "{summary:?}");
        assert_eq!(summary.ack_failures, 0, "{summary:?}");
        assert_eq!(summary.leases_lost, 0, "{summary:?}");

        assert_eq!(
            queue.approximate_count(&client).await.unwrap(),
            0,
            "{summary:?}"
        );
        let dead = queue
            .read_dead_letters(&client, 1, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].body(), Some("poison"));
        let attrs = dead[0].message_attributes().unwrap();
        assert_eq!(attrs["kind"].string_value(), Some("poison"));
        let record = DeadLetterRecord::from_attributes(attrs).unwrap();
        assert_eq!(record.metadata.reason, DeadLetterReason::Permanent);
        assert_eq!(record.metadata.error_message, "cannot decode");
        queue.delete(&client).await;
    })
    .await
    .expect("test timed out");
}
