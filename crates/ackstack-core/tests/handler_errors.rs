//! What a handler's error asks for, on the in-memory broker: `?` on any error is a transient
//! failure, `.permanent()` dead-letters at once, `retry_after` replaces the backoff's delay
//! (capped by the backoff's cap), and `handler_timeout` turns a hung attempt into a transient
//! failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, Delivery, ErrorKind, HandlerError, MemoryBroker, Message, Outcome,
    ResultExt, handler_fn,
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
