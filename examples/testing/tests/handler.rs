//! Unit tests of a handler, run the way it runs in production: through a `Consumer` over the
//! in-memory broker. Each test publishes, runs the consumer until the queue is idle, then
//! asserts on the summary, on the handler's effects and on the dead letters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack::{
    Backoff, Consumer, DeadLetterMetadata, DeadLetterReason, ErrorKind, MemoryBroker, Message,
    Summary, handler_fn,
};
use example_testing::{Ledger, charge};

/// Runs `charge` over `queue` until nothing has happened for 200 ms, with fast retries so that
/// a test takes milliseconds, not the production backoff's minutes.
async fn run(broker: &MemoryBroker, queue: &str, ledger: &Ledger) -> Summary {
    let consumer = Consumer::new(broker.source(queue))
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(10),
        ))
        .max_attempts(3);
    let idle = consumer.status();
    let ledger = ledger.clone();
    consumer
        .run_until(
            handler_fn(move |delivery, _cx| charge(delivery, ledger.clone())),
            async move { idle.idle(Duration::from_millis(200)).await },
        )
        .await
        .expect("the consumer runs")
}

#[tokio::test]
async fn a_valid_order_is_charged_once_and_acked() {
    let broker = MemoryBroker::new();
    broker.publish(
        "orders",
        Message::new(r#"{"order_id":"A-1","amount_cents":1250}"#),
    );
    let ledger = Ledger::default();

    let summary = run(&broker, "orders", &ledger).await;

    assert_eq!(
        (summary.acked, summary.retried, summary.dead_lettered),
        (1, 0, 0)
    );
    assert_eq!(ledger.charges().get("A-1"), Some(&1250));
    assert!(broker.is_empty("orders"), "nothing is left to redeliver");
}

#[tokio::test]
async fn a_malformed_order_is_dead_lettered_at_once_with_the_reason() {
    let broker = MemoryBroker::new();
    broker.publish("orders", Message::new("not json").header("tenant", "acme"));
    let ledger = Ledger::default();

    let summary = run(&broker, "orders", &ledger).await;

    assert_eq!((summary.retried, summary.dead_lettered), (0, 1));
    let letters = broker.dead_letters("orders");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        &letter.payload[..],
        b"not json",
        "the payload is kept byte for byte"
    );
    assert_eq!(
        letter.headers.get_str("tenant"),
        Some("acme"),
        "so are the headers"
    );
    let meta = DeadLetterMetadata::from_headers(&letter.headers).expect("metadata is attached");
    assert_eq!(meta.error_kind, ErrorKind::Permanent);
    assert_eq!(meta.reason, DeadLetterReason::Permanent);
    assert_eq!(meta.attempts, 1);
    assert!(ledger.charges().is_empty());
}

#[tokio::test]
async fn a_transient_failure_is_retried_then_succeeds() {
    let broker = MemoryBroker::new();
    broker.publish(
        "orders",
        Message::new(r#"{"order_id":"A-2","amount_cents":500}"#).header("x-fail-attempts", "2"),
    );
    let ledger = Ledger::default();

    let summary = run(&broker, "orders", &ledger).await;

    assert_eq!(
        (summary.retried, summary.acked, summary.dead_lettered),
        (2, 1, 0)
    );
    assert_eq!(
        ledger.charges().get("A-2"),
        Some(&500),
        "charged once, on attempt 3"
    );
}

#[tokio::test]
async fn a_failure_that_outlasts_the_attempts_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.publish(
        "orders",
        Message::new(r#"{"order_id":"A-3","amount_cents":500}"#).header("x-fail-attempts", "9"),
    );
    let ledger = Ledger::default();

    let summary = run(&broker, "orders", &ledger).await;

    assert_eq!((summary.retried, summary.dead_lettered), (2, 1));
    let letters = broker.dead_letters("orders");
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).expect("metadata");
    assert_eq!(meta.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(meta.attempts, 3);
    assert!(ledger.charges().is_empty());
}
