//! What a handler's error asks for, on the in-memory broker: `?` on any error is a transient
//! failure, `.permanent()` dead-letters at once, `retry_after` replaces the backoff's delay
//! (capped by the backoff's cap), `defer` brings a message back without using an attempt
//! until `defer_limit`, and `handler_timeout` turns a hung attempt into a transient failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, Context, DeadLetterMetadata, DeadLetterReason, Delivery,
    ErrorKind, HandlerError, KeyOrdering, Layer, MemoryBroker, Message, Origin, Outcome, Process,
    ResultExt, RetryConfig, RetryLayer, Summary, Terminal, handler_fn,
};

fn backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(20), Duration::from_millis(300)).no_jitter()
}

/// Each settled outcome, by payload.
type Seen = Arc<Mutex<Vec<(String, Outcome)>>>;

fn inspector(seen: &Seen) -> impl Fn(&Delivery, &Outcome) + Send + Sync + 'static {
    let seen = seen.clone();
    move |d: &Delivery, o: &Outcome| {
        let body = String::from_utf8_lossy(&d.payload).into_owned();
        seen.lock().unwrap().push((body, o.clone()));
    }
}

/// The outcomes settled for `body`, in order.
fn outcomes_of(seen: &Seen, body: &str) -> Vec<Outcome> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|(b, _)| b == body)
        .map(|(_, o)| o.clone())
        .collect()
}

async fn until_empty(broker: MemoryBroker, queue: &'static str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !broker.is_empty(queue) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The handler's error for `body`: a number parses (`?` on `ParseIntError`, transient),
/// "bytes" is refused for good (`.permanent()`).
async fn parse(d: &Delivery) -> Result<u32, HandlerError> {
    let text = std::str::from_utf8(&d.payload).permanent()?;
    if text == "bytes" {
        return Err(HandlerError::permanent("not an order"));
    }
    Ok(text.parse::<u32>()?)
}

#[tokio::test]
async fn question_mark_retries_and_permanent_dead_letters_at_once() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("not-a-number"));
    broker.publish("q", Message::new(vec![0xff, 0xfe]));
    broker.publish("q", Message::new("7"));
    let seen = Seen::default();
    let summary = Consumer::new(broker.source("q"))
        .backoff(backoff())
        .max_attempts(3)
        .inspect(inspector(&seen))
        .run_until(
            handler_fn(|d, _cx| async move { parse(&d).await.map(|_| ()) }),
            until_empty(broker.clone(), "q"),
        )
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 2, "{summary:?}");
    // `?` on a ParseIntError: retried twice, then dead-lettered as transient.
    let tries = outcomes_of(&seen, "not-a-number");
    assert_eq!(tries.len(), 3, "{tries:?}");
    assert!(matches!(&tries[2], Outcome::DeadLetter(f) if f.kind == ErrorKind::Transient));
    // `.permanent()` on a Utf8Error: dead-lettered on the first attempt.
    let bad = outcomes_of(&seen, "\u{fffd}\u{fffd}");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(matches!(&bad[0], Outcome::DeadLetter(f) if f.kind == ErrorKind::Permanent));
    assert_eq!(outcomes_of(&seen, "7"), vec![Outcome::Ack]);
}

#[tokio::test]
async fn a_requested_delay_replaces_the_backoff_and_is_capped_by_its_cap() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("soon"));
    broker.publish("q", Message::new("much-later"));
    let seen = Seen::default();
    let summary = Consumer::new(broker.source("q"))
        .backoff(backoff())
        .inspect(inspector(&seen))
        .run_until(
            handler_fn(|d, _cx| async move {
                let asked = match &d.payload[..] {
                    b"soon" => Duration::from_millis(150),
                    _ => Duration::from_secs(600),
                };
                if d.attempt == 1 {
                    return Err(HandlerError::transient("429").retry_after(asked));
                }
                Ok(())
            }),
            until_empty(broker.clone(), "q"),
        )
        .await
        .unwrap();
    assert_eq!((summary.retried, summary.succeeded), (2, 2), "{summary:?}");
    let delay = |body: &str| match &outcomes_of(&seen, body)[0] {
        Outcome::Retry { after, .. } => *after,
        other => panic!("{other:?}"),
    };
    // The backoff alone says 20 ms for a first retry.
    assert_eq!(delay("soon"), Duration::from_millis(150));
    assert_eq!(
        delay("much-later"),
        Duration::from_millis(300),
        "capped by the backoff's cap"
    );
}

#[tokio::test]
async fn a_hung_handler_fails_transiently_at_the_handler_timeout() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("hangs"));
    broker.publish("q", Message::new("quick"));
    let seen = Seen::default();
    let summary = Consumer::new(broker.source("q"))
        .backoff(backoff())
        .max_attempts(2)
        .handler_timeout(Duration::from_millis(200))
        .inspect(inspector(&seen))
        .run_until(
            handler_fn(|d, _cx| async move {
                if &d.payload[..] == b"hangs" {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }),
            until_empty(broker.clone(), "q"),
        )
        .await
        .unwrap();
    assert_eq!(
        (summary.succeeded, summary.dead_lettered),
        (1, 1),
        "{summary:?}"
    );
    let hung = outcomes_of(&seen, "hangs");
    assert!(
        matches!(&hung[0], Outcome::Retry { failure, .. } if failure.kind == ErrorKind::Transient)
    );
    match &hung[1] {
        Outcome::DeadLetter(failure) => {
            assert!(failure.message.contains("handler_timeout"), "{failure:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// The attempt numbers the handler saw for `body`, in order.
type Attempts = Arc<Mutex<Vec<(String, u32)>>>;

fn attempts_of(seen: &Attempts, body: &str) -> Vec<u32> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|(b, _)| b == body)
        .map(|(_, a)| *a)
        .collect()
}

/// "later" is deferred twice, then taken; "never" is deferred every time.
async fn defer_some(d: Delivery, seen: Attempts) -> Result<(), HandlerError> {
    let body = String::from_utf8_lossy(&d.payload).into_owned();
    let runs = {
        let mut seen = seen.lock().unwrap();
        seen.push((body.clone(), d.attempt));
        seen.iter().filter(|(b, _)| *b == body).count()
    };
    if body == "never" || runs <= 2 {
        return Err(HandlerError::defer(Duration::from_millis(60)));
    }
    Ok(())
}

async fn run_deferrals(broker: &MemoryBroker, ordering: KeyOrdering) -> (Summary, Attempts) {
    let mut config = ConsumerConfig::default();
    config.retry.defer_limit = Duration::from_millis(400);
    config.ordering = ordering;
    let seen = Attempts::default();
    let s = seen.clone();
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .backoff(backoff())
        .max_attempts(2)
        .run_until(
            handler_fn(move |d, _cx| defer_some(d, s.clone())),
            until_empty(broker.clone(), "q"),
        )
        .await
        .unwrap();
    (summary, seen)
}

#[tokio::test]
async fn a_deferral_uses_no_attempt_and_ends_in_a_dead_letter_at_the_defer_limit() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("later"));
    broker.publish("q", Message::new("never").message_id("n-1"));
    let (summary, seen) = run_deferrals(&broker, KeyOrdering::None).await;
    // Three runs of "later" with max_attempts 2: the deferrals used none.
    assert_eq!(attempts_of(&seen, "later"), vec![1, 1, 1]);
    let never = attempts_of(&seen, "never");
    assert!(never.iter().all(|&a| a == 1), "{never:?}");
    // Deferred every 60 ms within a 400 ms limit: about seven runs, not max_attempts.
    assert!((4..=9).contains(&never.len()), "{never:?}");
    assert_eq!(summary.succeeded, 1, "{summary:?}");
    assert_eq!(summary.retried, 0, "{summary:?}");
    assert_eq!(
        summary.deferred as usize,
        2 + never.len() - 1,
        "{summary:?}"
    );
    assert_eq!(broker.stats("q").deferrals, summary.deferred);
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.reason, DeadLetterReason::Deferred);
    assert_eq!(meta.attempts, 1);
    assert!(meta.error_message.contains("defer_limit"), "{meta:?}");
}

#[tokio::test]
async fn a_deferral_in_place_keeps_its_attempt_and_its_limit() {
    // Keyed and ordered: retries and deferrals happen in place, holding the key.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("later").key("k"));
    broker.publish("q", Message::new("never").key("k2"));
    let (summary, seen) = run_deferrals(&broker, KeyOrdering::PerKey).await;
    assert_eq!(attempts_of(&seen, "later"), vec![1, 1, 1]);
    let never = attempts_of(&seen, "never");
    assert!(never.iter().all(|&a| a == 1), "{never:?}");
    assert!((4..=9).contains(&never.len()), "{never:?}");
    // Nothing went back to the broker for a deferral.
    assert_eq!(broker.stats("q").deferrals, 0);
    assert_eq!(
        summary.deferred as usize,
        2 + never.len() - 1,
        "{summary:?}"
    );
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.reason, DeadLetterReason::Deferred);
}

#[test]
fn a_deferral_made_permanent_is_no_longer_a_deferral() {
    let deferral = HandlerError::defer(Duration::from_secs(5));
    assert_eq!(deferral.deferred_for(), Some(Duration::from_secs(5)));
    assert_eq!(deferral.kind(), ErrorKind::Transient);
    let permanent = HandlerError::permanent(deferral);
    assert_eq!(permanent.deferred_for(), None);
    assert_eq!(HandlerError::transient("x").deferred_for(), None);
}

#[tokio::test]
async fn where_the_broker_cannot_defer_a_deferral_is_a_retry_bounded_by_max_attempts() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("never"));
    let seen = Seen::default();
    let retry = RetryLayer::from_config(RetryConfig::default())
        .max_attempts(3)
        .defers(false);
    let stack = retry.layer(Terminal::new(handler_fn(|_d, _cx| async {
        Err(HandlerError::defer(Duration::from_millis(20)))
    })));
    let cx = Context::new();
    let mut delivery = Delivery::new("never", Origin::new("memory", "q", "c"));
    for attempt in 1..=3 {
        delivery.attempt = attempt;
        let outcome = stack.process(&delivery, &cx).await;
        seen.lock().unwrap().push(("never".into(), outcome));
    }
    let outcomes = outcomes_of(&seen, "never");
    assert!(
        matches!(&outcomes[0], Outcome::Retry { after, .. } if *after == Duration::from_millis(20)),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], Outcome::Retry { .. }),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[2], Outcome::DeadLetter(f) if f.deferred_since.is_none()),
        "the last attempt's deferral is dead-lettered as max_attempts: {outcomes:?}"
    );
}

#[tokio::test]
async fn a_deferral_of_zero_waits_at_least_the_backoffs_base() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("now?"));
    let seen = Seen::default();
    let summary = Consumer::new(broker.source("q"))
        .backoff(
            Backoff::exponential(Duration::from_millis(80), Duration::from_secs(1)).no_jitter(),
        )
        .inspect(inspector(&seen))
        .run_until(
            handler_fn(|d, _cx| async move {
                if d.headers
                    .get_str(ackstack_core::deadletter::DEFERRED_SINCE_HEADER)
                    .is_none()
                {
                    return Err(HandlerError::defer(Duration::ZERO));
                }
                Ok(())
            }),
            until_empty(broker.clone(), "q"),
        )
        .await
        .unwrap();
    assert_eq!((summary.deferred, summary.succeeded), (1, 1), "{summary:?}");
    match &outcomes_of(&seen, "now?")[0] {
        Outcome::Defer { after, .. } => assert_eq!(*after, Duration::from_millis(80)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_deferral_in_place_ends_before_the_lease_runs_out() {
    // Held in place, a delivery cannot outlive its lease's max_total: the deferral that would
    // dead-letters it, long before defer_limit (an hour).
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("held").key("k"));
    let mut config = ConsumerConfig::default();
    config.ordering = KeyOrdering::PerKey;
    config.lease.max_total = Duration::from_secs(2);
    let seen = Attempts::default();
    let s = seen.clone();
    let summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(500)),
    )
    .config(config)
    .backoff(backoff())
    .run_until(
        handler_fn(move |d, _cx| {
            s.lock().unwrap().push(("held".into(), d.attempt));
            async { Err(HandlerError::defer(Duration::from_millis(300))) }
        }),
        until_empty(broker.clone(), "q"),
    )
    .await
    .unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(summary.leases_lost, 0, "{summary:?}");
    let runs = attempts_of(&seen, "held");
    assert!(runs.iter().all(|&a| a == 1), "{runs:?}");
    // 1.5 s of lease (max_total less one lease) in 300 ms deferrals.
    assert!((4..=6).contains(&runs.len()), "{runs:?}");
    let letters = broker.dead_letters("q");
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.reason, DeadLetterReason::Deferred);
    assert!(meta.error_message.contains("max_total"), "{meta:?}");
}

#[tokio::test(start_paused = true)]
async fn the_defer_limit_runs_on_a_paused_clock() {
    // An hour of deferrals ten minutes apart passes in virtual time.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("never"));
    let seen = Attempts::default();
    let s = seen.clone();
    let summary = Consumer::new(broker.source("q"))
        .run_until(
            handler_fn(move |d, _cx| {
                s.lock().unwrap().push(("never".into(), d.attempt));
                async { Err(HandlerError::defer(Duration::from_secs(600))) }
            }),
            {
                let broker = broker.clone();
                async move {
                    while !broker.is_empty("q") {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    // At 0, 10, ..., 60 minutes, and one more where the seventh run falls a sliver short of
    // the hour (the last deferral then waits the backoff's base).
    let runs = attempts_of(&seen, "never").len();
    assert!((7..=8).contains(&runs), "{runs} runs");
}
