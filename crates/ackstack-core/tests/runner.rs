//! The runner against the in-memory broker: ack only after success, outcomes, panics,
//! shutdown, concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ErrorKind, HandlerError, MemoryBroker, Message, Summary, handler_fn,
};
use tokio::sync::Notify;

fn fast_retry() -> Backoff {
    Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter()
}

/// Runs `consumer` until `done` says stop, or 20 s.
async fn stop_when(done: impl Fn() -> bool + Send + 'static) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn acks_only_after_the_handler_succeeds() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("one"));
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let (r, s) = (release.clone(), started.clone());
    let handler = handler_fn(move |_d, _cx| {
        let (r, s) = (r.clone(), s.clone());
        async move {
            s.notify_one();
            r.notified().await;
            Ok(())
        }
    });
    let b = broker.clone();
    let run = tokio::spawn(async move {
        Consumer::new(b.source("q"))
            .run_until(handler, stop_when(move || false))
            .await
    });
    started.notified().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.len("q"), 1, "not acked while the handler runs");
    assert_eq!(broker.stats("q").acked, 0);
    release.notify_one();
    for _ in 0..100 {
        if broker.is_empty("q") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.len("q"), 0, "acked once the handler returned Ok");
    run.abort();
}

#[tokio::test]
async fn transient_retries_and_permanent_dead_letters() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("transient-once").header("kind", "t"));
    broker.publish("q", Message::new("permanent").header("kind", "p"));
    let handler = handler_fn(|d, _cx| async move {
        match (d.headers.get_str("kind"), d.attempt) {
            (Some("t"), 1) => Err(HandlerError::transient("try again")),
            (Some("p"), _) => Err(HandlerError::permanent("never")),
            _ => Ok(()),
        }
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .run_until(handler, stop_when(move || b.is_empty("q")))
        .await
        .unwrap();
    assert_eq!(summary.retried, 1);
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(
        summary.acked, 2,
        "the success and the dead-lettered original"
    );
    let dl = broker.dead_letters("q");
    assert_eq!(dl.len(), 1);
    assert_eq!(&dl[0].payload[..], b"permanent");
    assert_eq!(
        dl[0].headers.get_str("x-ackstack-dl-error-kind"),
        Some("permanent")
    );
}

#[tokio::test]
async fn a_panicking_handler_does_not_stop_the_consumer() {
    let broker = MemoryBroker::new();
    for i in 0..5 {
        broker.publish("q", Message::new(format!("{i}")));
    }
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = handler_fn(move |d, _cx| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            if &d.payload[..] == b"2" && d.attempt == 1 {
                panic!("boom on 2");
            }
            Ok(())
        }
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .run_until(handler, stop_when(move || b.is_empty("q")))
        .await
        .unwrap();
    assert!(broker.is_empty("q"));
    assert_eq!(
        summary.retried, 1,
        "the panic counts as a transient failure"
    );
    assert_eq!(summary.succeeded, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn shutdown_drains_in_flight_work() {
    let broker = MemoryBroker::new();
    for _ in 0..4 {
        broker.publish("q", Message::new("slow"));
    }
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let handler = handler_fn(move |_d, _cx| {
        s.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(())
        }
    });
    let s = started.clone();
    let summary = Consumer::new(broker.source("q"))
        .concurrency(4)
        .shutdown_deadline(Duration::from_secs(5))
        .run_until(handler, stop_when(move || s.load(Ordering::SeqCst) == 4))
        .await
        .unwrap();
    assert_eq!(summary.abandoned, 0);
    assert_eq!(
        summary.acked, 4,
        "work in flight at shutdown finished and was acked"
    );
    assert!(broker.is_empty("q"));
}

#[tokio::test]
async fn work_past_the_shutdown_deadline_is_abandoned_unacked() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("stuck"));
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let handler = handler_fn(move |_d, _cx| {
        s.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    });
    let s = started.clone();
    let summary: Summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(400)),
    )
    .shutdown_deadline(Duration::from_millis(100))
    .run_until(handler, stop_when(move || s.load(Ordering::SeqCst) == 1))
    .await
    .unwrap();
    assert_eq!(summary.abandoned, 1);
    assert_eq!(summary.acked, 0);
    assert_eq!(broker.len("q"), 1, "never acked");
    // It comes back for the next consumer, with its attempt counted by the broker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = Arc::new(AtomicU32::new(0));
    let s2 = seen.clone();
    let b = broker.clone();
    Consumer::new(broker.source("q"))
        .run_until(
            handler_fn(move |d, _cx| {
                s2.store(d.attempt, Ordering::SeqCst);
                async { Ok(()) }
            }),
            stop_when(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn never_more_than_concurrency_handlers_at_once() {
    let broker = MemoryBroker::new();
    for _ in 0..60 {
        broker.publish("q", Message::new("x"));
    }
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let handler = handler_fn(move |_d, _cx| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let cur = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(cur, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .concurrency(7)
        .run_until(handler, stop_when(move || b.is_empty("q")))
        .await
        .unwrap();
    assert_eq!(summary.acked, 60);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        7,
        "reaches but never exceeds the limit"
    );
}

#[tokio::test]
async fn classifier_overrides_the_handlers_kind() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("x"));
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .classify(|err| {
            if err.inner().to_string().contains("validation") {
                ErrorKind::Permanent
            } else {
                err.kind()
            }
        })
        .run_until(
            handler_fn(|_d, _cx| async { Err(HandlerError::transient("validation failed")) }),
            stop_when(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(summary.retried, 0);
}

#[tokio::test]
async fn status_reports_idle_only_when_nothing_arrives_or_runs() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("x"));
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(50)));
    let status = consumer.status();
    let watcher = status.clone();
    let started = tokio::time::Instant::now();
    let summary = consumer
        .run_until(
            handler_fn(|_d, _cx| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            }),
            async move { watcher.idle(Duration::from_millis(200)).await },
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(summary.acked, 1);
    assert_eq!(status.in_flight(), 0);
    assert_eq!(status.received_total(), 1);
    // Busy for 300 ms, then idle for 200 ms: empty polls every 50 ms do not count as activity.
    assert!(
        took >= Duration::from_millis(500),
        "stopped while busy: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "never saw idle: {took:?}");
}

/// A memory source whose dead-letter writes always fail, as with an unroutable dead-letter
/// queue.
struct NoDeadLetters(ackstack_core::memory::MemorySource);

#[derive(Clone)]
struct NoDeadLettersSettler(ackstack_core::memory::MemorySettler);

impl ackstack_core::Source for NoDeadLetters {
    type Token = ackstack_core::memory::MemoryToken;
    type Settler = NoDeadLettersSettler;
    async fn receive(
        &mut self,
        max: usize,
    ) -> Result<Vec<ackstack_core::Received<Self::Token>>, ackstack_core::SourceError> {
        self.0.receive(max).await
    }
    fn settler(&self) -> NoDeadLettersSettler {
        NoDeadLettersSettler(self.0.settler())
    }
    fn capabilities(&self) -> ackstack_core::Capabilities {
        self.0.capabilities()
    }
}

impl ackstack_core::Settle for NoDeadLettersSettler {
    type Token = ackstack_core::memory::MemoryToken;
    async fn ack(&self, tokens: Vec<Self::Token>) -> ackstack_core::AckReport<Self::Token> {
        self.0.ack(tokens).await
    }
    async fn retry(
        &self,
        token: Self::Token,
        d: &ackstack_core::Delivery,
        after: Duration,
        f: &ackstack_core::Failure,
    ) -> Result<ackstack_core::Settled<Self::Token>, ackstack_core::SettleFailure<Self::Token>>
    {
        self.0.retry(token, d, after, f).await
    }
    async fn dead_letter(
        &self,
        token: Self::Token,
        _: &ackstack_core::Delivery,
        _: &ackstack_core::DeadLetter,
    ) -> Result<ackstack_core::Settled<Self::Token>, ackstack_core::SettleFailure<Self::Token>>
    {
        Err(ackstack_core::SettleFailure::new(
            token,
            ackstack_core::SettleError::Broker("dead-letter queue unroutable".into()),
        ))
    }
    async fn extend(
        &self,
        token: &Self::Token,
        by: Duration,
    ) -> Result<(), ackstack_core::SettleError> {
        self.0.extend(token, by).await
    }
    async fn release(&self, token: Self::Token) {
        self.0.release(token).await
    }
}

#[tokio::test]
async fn a_failing_dead_letter_is_released_after_a_pause_not_in_a_hot_loop() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("poison"));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let started = std::time::Instant::now();
    let summary = Consumer::new(NoDeadLetters(
        broker.source("q").poll_wait(Duration::from_millis(20)),
    ))
    .backoff(Backoff::exponential(Duration::from_millis(300), Duration::from_secs(5)).no_jitter())
    .run_until(
        handler_fn(move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::permanent("poison")) }
        }),
        stop_when(move || started.elapsed() > Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let calls = calls.load(Ordering::SeqCst);
    // Released after 300 ms, then 600 ms: at most 3 handler runs in 1.5 s, not hundreds.
    assert!((2..=4).contains(&calls), "handler ran {calls} times");
    assert!(summary.settle_failures >= 2, "{summary:?}");
    assert_eq!(
        summary.acked, 0,
        "never acked without a confirmed dead letter"
    );
    assert_eq!(broker.len("q"), 1, "the message is kept");
}
