//! Unit tests of a handler with `ackstack::testing::HandlerTest`: each message runs through
//! the real processing stack and runner over the in-memory broker, under tokio's paused clock
//! (`start_paused = true`), so the production backoff (seconds to minutes) passes in virtual
//! time and each test takes milliseconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack::testing::{Fate, HandlerTest, Report};
use ackstack::{
    Backoff, ConsumerConfig, DeadLetterReason, ErrorKind, Message, Outcome, handler_fn,
};
use example_testing::{Ledger, charge};

/// The configuration the service runs with: retries from 1 s doubling to 5 min, 3 attempts.
fn production() -> ConsumerConfig {
    let mut config = ConsumerConfig::default();
    config.retry.backoff =
        Backoff::exponential(Duration::from_secs(1), Duration::from_secs(300)).no_jitter();
    config.retry.max_attempts = 3;
    config
}

async fn run(ledger: &Ledger, messages: Vec<Message>) -> Report {
    let ledger = ledger.clone();
    HandlerTest::new(handler_fn(move |delivery, _cx| {
        charge(delivery, ledger.clone())
    }))
    .config(production())
    .run(messages)
    .await
}

#[tokio::test(start_paused = true)]
async fn a_valid_order_is_charged_once_and_acked() {
    let ledger = Ledger::default();

    let report = run(
        &ledger,
        vec![Message::new(r#"{"order_id":"A-1","amount_cents":1250}"#)],
    )
    .await;

    let order = &report.messages[0];
    assert_eq!(order.fate, Fate::Acked);
    assert_eq!(order.attempt_numbers(), [1]);
    assert_eq!(ledger.charges().get("A-1"), Some(&1250));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_order_is_dead_lettered_at_once_with_the_reason() {
    let ledger = Ledger::default();

    let report = run(
        &ledger,
        vec![Message::new("not json").header("tenant", "acme")],
    )
    .await;

    let order = &report.messages[0];
    assert_eq!(order.attempt_numbers(), [1], "never retried");
    let Fate::DeadLettered(letter) = &order.fate else {
        panic!("{:?}", order.fate)
    };
    assert_eq!(letter.error_kind, ErrorKind::Permanent);
    assert_eq!(letter.reason, DeadLetterReason::Permanent);
    assert_eq!(letter.attempts, 1);
    let copy = order
        .dead_letter
        .as_ref()
        .expect("the copy in the dead-letter queue");
    assert_eq!(
        &copy.payload[..],
        b"not json",
        "the payload is kept byte for byte"
    );
    assert_eq!(
        copy.headers.get_str("tenant"),
        Some("acme"),
        "so are the headers"
    );
    assert!(ledger.charges().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_on_the_production_schedule_then_succeeds() {
    let ledger = Ledger::default();

    let report = run(
        &ledger,
        vec![
            Message::new(r#"{"order_id":"A-2","amount_cents":500}"#).header("x-fail-attempts", "2"),
        ],
    )
    .await;

    let order = &report.messages[0];
    assert_eq!(order.fate, Fate::Acked);
    assert_eq!(order.attempt_numbers(), [1, 2, 3]);
    // The retries' delays, as the backoff gives them: 1 s, then 2 s.
    let delays: Vec<Duration> = order
        .attempts
        .iter()
        .filter_map(|a| match &a.outcome {
            Outcome::Retry { after, .. } => Some(*after),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [Duration::from_secs(1), Duration::from_secs(2)]);
    // ... and they passed, in virtual time.
    assert!(order.attempts[2].at >= Duration::from_secs(3));
    assert_eq!(ledger.charges().get("A-2"), Some(&500), "charged once");
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_outlasts_the_attempts_is_dead_lettered() {
    let ledger = Ledger::default();

    let report = run(
        &ledger,
        vec![
            Message::new(r#"{"order_id":"A-3","amount_cents":500}"#).header("x-fail-attempts", "9"),
        ],
    )
    .await;

    let order = &report.messages[0];
    assert_eq!(order.attempt_numbers(), [1, 2, 3]);
    let Fate::DeadLettered(letter) = &order.fate else {
        panic!("{:?}", order.fate)
    };
    assert_eq!(letter.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(letter.attempts, 3);
    assert!(
        letter
            .error_message
            .contains("payment provider unavailable")
    );
    assert_eq!(report.summary.dead_lettered, 1);
    assert!(ledger.charges().is_empty());
}
