//! Unit tests of `retry.rs`.

use super::*;
use crate::delivery::Origin;
use std::sync::atomic::{AtomicU32, Ordering};

/// Fails transiently (or panics) on every call, counting calls; asks for `asked`.
struct Failing {
    calls: Arc<AtomicU32>,
    panic: bool,
    asked: Duration,
}

impl Process for Failing {
    async fn process(&self, _: &Delivery, _: &Context) -> Outcome {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic {
            panic!("boom");
        }
        Outcome::Retry {
            after: self.asked,
            failure: Failure::new(ErrorKind::Transient, "nope"),
        }
    }
}

fn delivery(attempt: u32) -> Delivery {
    let mut d = Delivery::new("x", Origin::new("memory", "q", "c"));
    d.attempt = attempt;
    d
}

fn layer() -> RetryLayer {
    RetryLayer::new(
        Backoff::exponential(Duration::from_millis(1), Duration::from_millis(4)).no_jitter(),
    )
    .max_attempts(3)
}

/// The delay the layer decides when the inner step asks for `asked`.
async fn decided(asked: Duration) -> Duration {
    let retry = layer().layer(Failing {
        calls: Arc::new(AtomicU32::new(0)),
        panic: false,
        asked,
    });
    let outcome = retry.process(&delivery(2), &Context::new()).await;
    let Outcome::Retry { after, failure } = outcome else {
        panic!("expected a retry, got {outcome:?}");
    };
    assert_eq!(failure.attempt, 2);
    after
}

#[tokio::test]
async fn the_delay_is_the_backoffs_unless_one_was_asked_for_and_never_above_its_cap() {
    assert_eq!(
        decided(Duration::ZERO).await,
        Duration::from_millis(2),
        "backoff.delay(2)"
    );
    assert_eq!(
        decided(Duration::from_millis(3)).await,
        Duration::from_millis(3)
    );
    assert_eq!(
        decided(Duration::from_secs(3600)).await,
        Duration::from_millis(4),
        "the cap"
    );
}

#[tokio::test]
async fn panics_count_as_attempts_and_end_in_the_dead_letter_queue() {
    let calls = Arc::new(AtomicU32::new(0));
    let retry = layer().layer(Failing {
        calls: calls.clone(),
        panic: true,
        asked: Duration::ZERO,
    });
    assert!(matches!(
        retry.process(&delivery(1), &Context::new()).await,
        Outcome::Retry { .. }
    ));
    let outcome = retry.process(&delivery(3), &Context::new()).await;
    let Outcome::DeadLetter(failure) = outcome else {
        panic!("a panic on the last attempt must dead-letter, got {outcome:?}");
    };
    assert!(failure.message.contains("boom"), "{}", failure.message);
}

/// Runs a delivery's first attempt in place, with one immediate retry per attempt,
/// through an inner step that always fails asking for `asked`: the outcome and the calls.
async fn in_place_with_immediate(asked: Duration) -> (Outcome, u32) {
    let calls = Arc::new(AtomicU32::new(0));
    let retry = layer()
        .in_place(true)
        .immediate(1, Duration::ZERO)
        .layer(Failing {
            calls: calls.clone(),
            panic: false,
            asked,
        });
    let outcome = retry.process(&delivery(1), &Context::new()).await;
    (outcome, calls.load(Ordering::SeqCst))
}

#[tokio::test]
async fn in_place_retries_count_attempts_up_to_the_limit() {
    let (outcome, calls) = in_place_with_immediate(Duration::ZERO).await;
    let Outcome::DeadLetter(failure) = outcome else {
        panic!("expected a dead letter, got {outcome:?}");
    };
    assert_eq!(failure.attempt, 3);
    assert_eq!(calls, 6, "3 attempts x (1 + 1 immediate)");
}

#[tokio::test]
async fn a_requested_delay_is_not_cut_short_by_the_immediate_tier() {
    let (outcome, calls) = in_place_with_immediate(Duration::from_millis(3)).await;
    assert!(matches!(outcome, Outcome::DeadLetter(_)), "{outcome:?}");
    assert_eq!(calls, 3, "one call per attempt");
}

#[tokio::test]
async fn a_cancelled_delivery_is_not_decided() {
    let calls = Arc::new(AtomicU32::new(0));
    let retry = layer().in_place(true).layer(Failing {
        calls: calls.clone(),
        panic: false,
        asked: Duration::ZERO,
    });
    let cx = Context::new();
    cx.token().cancel();
    let outcome = retry.process(&delivery(3), &cx).await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
