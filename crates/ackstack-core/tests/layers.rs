//! The reliability layers on the in-memory broker: dedup, retry limits, batch ack, leases,
//! ordering, delivery modes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::dedup::{BoxFuture, Claim, DedupError, DedupStore};
use ackstack_core::memory::MemoryBroker;
use ackstack_core::{
    Consumer, ConsumerConfig, DedupKey, DeliveryMode, HandlerError, KeyOrdering, MemoryDedupStore,
    Message, OnStoreError, handler_fn,
};

mod common;
use common::{Outage, fast_retry, run_counting, until};

#[tokio::test]
async fn dedup_a_message_that_fails_once_then_succeeds_is_processed_exactly_once() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m").message_id("k1"));
    let effects = Arc::new(AtomicU32::new(0));
    let e = effects.clone();
    let handler = handler_fn(move |d, _cx| {
        let e = e.clone();
        async move {
            if d.attempt == 1 {
                return Err(HandlerError::transient("first attempt fails"));
            }
            e.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(5)
        .dedup(MemoryDedupStore::new(), DedupKey::MessageId)
        .run_until(handler, until(move || b.is_empty("q")))
        .await
        .unwrap();
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "a failed first attempt must not mark the key"
    );
    assert_eq!(summary.retried, 1);
    assert!(broker.dead_letters("q").is_empty());
}

#[tokio::test]
async fn dedup_duplicates_run_the_handler_once_even_concurrently() {
    let broker = MemoryBroker::new();
    for _ in 0..10 {
        broker.publish(
            "q",
            Message::new("same order").header("idempotency-key", "order-1"),
        );
    }
    broker.publish(
        "q",
        Message::new("other").header("idempotency-key", "order-2"),
    );
    let effects = Arc::new(AtomicU32::new(0));
    let e = effects.clone();
    let handler = handler_fn(move |_d, _cx| {
        let e = e.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let b = broker.clone();
    let mut config = ConsumerConfig::default();
    config.concurrency = 16;
    config.retry.backoff = fast_retry();
    config.retry.max_attempts = 50;
    config.dedup.busy_retry_after = Duration::from_millis(20);
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .dedup(
            MemoryDedupStore::new(),
            DedupKey::Header("idempotency-key".into()),
        )
        .run_until(handler, until(move || b.is_empty("q")))
        .await
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 2, "one effect per key");
    assert!(broker.is_empty("q"), "{summary:?}");
    assert_eq!(summary.deduplicated, 9, "{summary:?}");
    // Successes of the handler only: the duplicates are counted apart.
    assert_eq!(summary.succeeded, 2, "{summary:?}");
    assert_eq!(summary.acked, 11, "{summary:?}");
    assert!(
        broker.dead_letters("q").is_empty(),
        "busy duplicates retry, never drop"
    );
}

#[tokio::test]
async fn dedup_fails_closed_by_default_and_open_by_option() {
    for (on_error, expect_calls) in [(OnStoreError::FailClosed, 0), (OnStoreError::FailOpen, 1)] {
        let broker = MemoryBroker::new();
        broker.publish("q", Message::new("m").message_id("k"));
        let store = Outage::new(true, false);
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let mut config = ConsumerConfig::default();
        config.dedup.on_store_error = on_error;
        config.dedup.store_retry_after = Duration::from_millis(50);
        let c2 = calls.clone();
        let started = std::time::Instant::now();
        let summary = Consumer::new(broker.source("q"))
            .config(config)
            .dedup_shared(store.clone(), DedupKey::MessageId)
            .run_until(
                handler_fn(move |_d, _cx| {
                    c.fetch_add(1, Ordering::SeqCst);
                    async { Ok(()) }
                }),
                until(move || {
                    c2.load(Ordering::SeqCst) > 0 || started.elapsed() > Duration::from_millis(600)
                }),
            )
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), expect_calls, "{on_error:?}");
        if on_error == OnStoreError::FailClosed {
            assert_eq!(broker.len("q"), 1, "fail-closed keeps the message");
            assert_eq!(
                summary.retried, 0,
                "held in process while the store is down, not retried: {summary:?}"
            );
            // The store comes back: the message is processed.
            store.down.store(false, Ordering::SeqCst);
            let consumer =
                Consumer::new(broker.source("q")).dedup_shared(store.clone(), DedupKey::MessageId);
            let (calls, _) = run_counting(consumer, &broker).await;
            assert_eq!(calls, 1);
        }
    }
}

#[tokio::test]
async fn past_max_attempts_lands_in_the_dlq_with_metadata() {
    let broker = MemoryBroker::new();
    broker.publish(
        "q",
        Message::new(r#"{"x":1}"#)
            .header("trace", "abc")
            .message_id("m-9"),
    );
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .name("billing")
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("downstream 503")) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.dead_lettered, 1);
    let dl = broker.dead_letters("q");
    assert_eq!(dl.len(), 1);
    let meta = ackstack_core::DeadLetterMetadata::from_headers(&dl[0].headers).unwrap();
    assert_eq!(meta.attempts, 3);
    assert_eq!(meta.reason, ackstack_core::DeadLetterReason::MaxAttempts);
    assert_eq!(meta.error_message, "downstream 503");
    assert_eq!(meta.queue, "q");
    assert_eq!(meta.consumer, "billing");
    assert_eq!(meta.message_id.as_deref(), Some("m-9"));
    assert!(meta.first_failure_ms.unwrap() <= meta.last_failure_ms);
    assert_eq!(dl[0].headers.get_str("trace"), Some("abc"));
}

#[tokio::test]
async fn immediate_tier_runs_in_process_before_the_broker_retry() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut config = ConsumerConfig::default();
    config.retry.backoff = fast_retry();
    config.retry.max_attempts = 2;
    config.retry.immediate = 2;
    config.retry.immediate_delay = Duration::from_millis(1);
    let b = broker.clone();
    Consumer::new(broker.source("q"))
        .config(config)
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("no")) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2 * (1 + 2),
        "max_attempts * (1 + immediate)"
    );
}

#[tokio::test]
async fn batch_ack_makes_fewer_ack_calls_than_deliveries() {
    let broker = MemoryBroker::new();
    for _ in 0..200 {
        broker.publish("q", Message::new("x"));
    }
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q").max_ack_batch(50))
        .concurrency(64)
        .run_until(
            handler_fn(|_d, _cx| async { Ok(()) }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(summary.acked, 200);
    let calls = broker.stats("q").ack_calls;
    assert!((4..200).contains(&calls), "ack calls: {calls}");
}

#[tokio::test]
async fn a_long_handler_keeps_its_lease_and_is_acked_once() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow"));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let b = broker.clone();
    let summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(200))
            .poll_wait(Duration::from_millis(20)),
    )
    .concurrency(4)
    .run_until(
        handler_fn(move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(())
            }
        }),
        until(move || b.is_empty("q")),
    )
    .await
    .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "never redelivered while held"
    );
    assert_eq!(summary.acked, 1);
    assert!(broker.stats("q").extends >= 3);
}

#[tokio::test]
async fn a_lost_lease_is_never_acked() {
    // The lease runs out because the total hold time is capped below the handler's duration.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow"));
    let cancelled = Arc::new(AtomicBool::new(false));
    let c = cancelled.clone();
    let mut config = ConsumerConfig::default();
    config.lease.max_total = Duration::from_millis(250);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(200)),
    )
    .config(config)
    .run_until(
        handler_fn(move |_d, cx| {
            let (c, d) = (c.clone(), d.clone());
            async move {
                tokio::select! {
                    _ = cx.cancelled() => c.store(true, Ordering::SeqCst),
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                d.store(true, Ordering::SeqCst);
                Ok(())
            }
        }),
        until(move || done.load(Ordering::SeqCst)),
    )
    .await
    .unwrap();
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the handler's token fired"
    );
    assert!(summary.leases_lost >= 1);
    assert_eq!(
        summary.acked, 0,
        "returned Ok after losing the lease, yet never acked"
    );
    assert_eq!(broker.len("q"), 1);
}

#[tokio::test]
async fn per_key_ordering_holds_back_later_messages_of_a_retrying_key() {
    let broker = MemoryBroker::new();
    for i in 0..3 {
        broker.publish("q", Message::new(format!("a{i}")).key("a"));
        broker.publish("q", Message::new(format!("b{i}")).key("b"));
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let b = broker.clone();
    Consumer::new(broker.source("q"))
        .concurrency(8)
        .ordering(KeyOrdering::PerKey)
        .backoff(fast_retry())
        .max_attempts(5)
        .run_until(
            handler_fn(move |d, _cx| {
                let s = s.clone();
                async move {
                    let body = String::from_utf8_lossy(&d.payload).into_owned();
                    if body == "a0" && d.attempt < 3 {
                        return Err(HandlerError::transient("a0 not yet"));
                    }
                    s.lock().unwrap().push(body);
                    Ok(())
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    let a: Vec<_> = seen
        .iter()
        .filter(|s| s.starts_with('a'))
        .cloned()
        .collect();
    let bs: Vec<_> = seen
        .iter()
        .filter(|s| s.starts_with('b'))
        .cloned()
        .collect();
    assert_eq!(
        a,
        vec!["a0", "a1", "a2"],
        "key a stays in order through a0's retries"
    );
    assert_eq!(bs, vec!["b0", "b1", "b2"]);
    let pos = |x: &str| seen.iter().position(|s| s == x).unwrap();
    assert!(
        pos("b2") < pos("a0"),
        "key b is not held back by key a: {seen:?}"
    );
}

#[tokio::test]
async fn at_most_once_acks_on_receipt() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("disposable"));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let c2 = calls.clone();
    let summary = Consumer::new(broker.source("q"))
        .mode(DeliveryMode::AtMostOnce)
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("lost, by design")) }
            }),
            until(move || c2.load(Ordering::SeqCst) > 0),
        )
        .await
        .unwrap();
    assert_eq!(summary.acked, 1);
    assert!(broker.is_empty("q"), "acked although the handler failed");
    assert!(broker.dead_letters("q").is_empty());
}

#[tokio::test]
async fn effectively_once_refuses_to_start_without_a_store() {
    let broker = MemoryBroker::new();
    let err = Consumer::new(broker.source("q"))
        .mode(DeliveryMode::EffectivelyOnce)
        .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("dedup"));
}

#[tokio::test]
async fn a_panicking_layer_is_a_transient_failure() {
    struct PanicsOnce<P>(P, Arc<AtomicBool>);
    impl<P: ackstack_core::Process> ackstack_core::Process for PanicsOnce<P> {
        async fn process(
            &self,
            d: &ackstack_core::Delivery,
            cx: &ackstack_core::Context,
        ) -> ackstack_core::Outcome {
            if !self.1.swap(true, Ordering::SeqCst) {
                panic!("layer bug");
            }
            self.0.process(d, cx).await
        }
    }
    struct PanicsOnceLayer(Arc<AtomicBool>);
    impl<P: ackstack_core::Process> ackstack_core::Layer<P> for PanicsOnceLayer {
        type Process = PanicsOnce<P>;
        fn layer(&self, inner: P) -> PanicsOnce<P> {
            PanicsOnce(inner, self.0.clone())
        }
    }
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .layer(PanicsOnceLayer(Arc::default()))
        .run_until(
            handler_fn(|_d, _cx| async { Ok(()) }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(summary.retried, 1);
    assert_eq!(summary.succeeded, 1);
    assert!(broker.is_empty("q"));
}

#[tokio::test]
async fn layers_run_in_the_order_they_are_added_outermost_first() {
    /// Records its name, then runs the inner step.
    struct Named<P>(P, &'static str, Arc<Mutex<Vec<&'static str>>>);
    impl<P: ackstack_core::Process> ackstack_core::Process for Named<P> {
        async fn process(
            &self,
            d: &ackstack_core::Delivery,
            cx: &ackstack_core::Context,
        ) -> ackstack_core::Outcome {
            self.2.lock().unwrap().push(self.1);
            self.0.process(d, cx).await
        }
    }
    struct NamedLayer(&'static str, Arc<Mutex<Vec<&'static str>>>);
    impl<P: ackstack_core::Process> ackstack_core::Layer<P> for NamedLayer {
        type Process = Named<P>;
        fn layer(&self, inner: P) -> Named<P> {
            Named(inner, self.0, self.1.clone())
        }
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let (b, seen) = (broker.clone(), order.clone());
    Consumer::new(broker.source("q"))
        .layer(NamedLayer("audit", order.clone()))
        .layer(NamedLayer("timeout", order.clone()))
        .run_until(
            handler_fn(move |_d, _cx| {
                seen.lock().unwrap().push("handler");
                async { Ok(()) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    // As with tower::ServiceBuilder: the first layer added is the outermost.
    assert_eq!(*order.lock().unwrap(), ["audit", "timeout", "handler"]);
}

#[tokio::test]
async fn a_lost_dedup_claim_is_not_acked_and_the_duplicate_is_absorbed() {
    /// A store whose extensions always report the claim as lost.
    struct LosesClaims(MemoryDedupStore);
    impl DedupStore for LosesClaims {
        fn claim<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            lease: Duration,
        ) -> BoxFuture<'a, Result<Claim, DedupError>> {
            self.0.claim(key, token, lease)
        }
        fn complete<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<bool, DedupError>> {
            self.0.complete(key, token, ttl)
        }
        fn release<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
        ) -> BoxFuture<'a, Result<(), DedupError>> {
            self.0.release(key, token)
        }
        fn extend<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            _: Duration,
        ) -> BoxFuture<'a, Result<bool, DedupError>> {
            // Every extension reports the claim lost (the claim itself still lapses only
            // with its lease in the inner store).
            let _ = (key, token);
            Box::pin(async { Ok(false) })
        }
    }
    // The message was published twice. The first copy's handler outlives its claim, whose
    // extension reports it lost: that handler is cancelled and its copy is not acked. The
    // second copy then claims the key and succeeds; the first copy's redelivery finds the key
    // done and is acked without calling the handler (absorbed).
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow").message_id("k"));
    broker.publish("q", Message::new("slow").message_id("k"));
    let calls = Arc::new(AtomicU32::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (c, x) = (calls.clone(), cancelled.clone());
    let mut config = ConsumerConfig::default();
    config.dedup.claim_lease = Duration::from_millis(100);
    config.dedup.busy_retry_after = Duration::from_millis(20);
    config.retry.backoff = fast_retry();
    config.retry.max_attempts = 5;
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .dedup(LosesClaims(MemoryDedupStore::new()), DedupKey::MessageId)
        .run_until(
            handler_fn(move |_d, cx| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let x = x.clone();
                async move {
                    if n == 0 {
                        // Outlive the claim: its extension reports it lost, which cancels us.
                        tokio::select! {
                            _ = cx.cancelled() => x.store(true, Ordering::SeqCst),
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                    }
                    Ok(())
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert!(
        cancelled.load(Ordering::SeqCst),
        "losing the claim cancels the handler"
    );
    assert!(broker.is_empty("q"), "{summary:?}");
    assert_eq!(
        summary.leases_lost, 0,
        "a lost dedup claim is not a lost lease"
    );
    assert_eq!(
        summary.retried, 1,
        "the copy whose claim was lost: {summary:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the cancelled run and one successful run: {summary:?}"
    );
    assert_eq!(
        summary.deduplicated, 1,
        "the other copy is absorbed as a duplicate: {summary:?}"
    );
    assert!(broker.dead_letters("q").is_empty());
}

/// Each done mark is written as soon as its handler succeeded, not when its ack batch goes
/// out: at concurrency 1 with acks held for a second, every key is done before the next
/// delivery's handler starts, and while its message is still unacked (done before ack). A
/// crash then leaves no more than one store round trip of charged but unmarked deliveries.
#[tokio::test]
async fn dedup_done_marks_are_written_when_the_handler_succeeds_and_before_the_ack() {
    struct Recorder {
        inner: MemoryDedupStore,
        broker: MemoryBroker,
        after_ack: AtomicUsize,
        completes: AtomicUsize,
    }
    impl Recorder {
        /// Counts the mark of `key` and whether its message was already acked.
        fn check_unacked(&self, key: &[u8]) {
            let id = String::from_utf8_lossy(key);
            let unacked = self
                .broker
                .peek_all("q")
                .iter()
                .any(|m| m.message_id.as_deref() == Some(&*id));
            if !unacked {
                self.after_ack.fetch_add(1, Ordering::SeqCst);
            }
            self.completes.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl DedupStore for Recorder {
        fn claim<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            lease: Duration,
        ) -> BoxFuture<'a, Result<Claim, DedupError>> {
            self.inner.claim(key, token, lease)
        }
        fn complete<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<bool, DedupError>> {
            self.check_unacked(key);
            self.inner.complete(key, token, ttl)
        }
        fn complete_all<'a>(
            &'a self,
            marks: &'a [(&'a [u8], &'a str)],
            ttl: Duration,
        ) -> BoxFuture<'a, Vec<Result<bool, DedupError>>> {
            for (key, _) in marks {
                self.check_unacked(key);
            }
            self.inner.complete_all(marks, ttl)
        }
        fn release<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
        ) -> BoxFuture<'a, Result<(), DedupError>> {
            self.inner.release(key, token)
        }
        fn extend<'a>(
            &'a self,
            key: &'a [u8],
            token: &'a str,
            lease: Duration,
        ) -> BoxFuture<'a, Result<bool, DedupError>> {
            self.inner.extend(key, token, lease)
        }
    }
    let broker = MemoryBroker::new();
    const N: usize = 40;
    for i in 0..N {
        broker.publish("q", Message::new("m").message_id(format!("k{i}")));
    }
    let store = Arc::new(Recorder {
        inner: MemoryDedupStore::new(),
        broker: broker.clone(),
        after_ack: AtomicUsize::new(0),
        completes: AtomicUsize::new(0),
    });
    let b = broker.clone();
    let (handled, unmarked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h, u, seen) = (handled.clone(), unmarked.clone(), store.clone());
    let mut config = ConsumerConfig::default();
    config.ack_delay = Duration::from_secs(1);
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .concurrency(1)
        .dedup_shared(store.clone(), DedupKey::MessageId)
        .run_until(
            handler_fn(move |_d, _cx| {
                // Every delivery handled before this one has its mark already.
                if seen.completes.load(Ordering::SeqCst) != h.fetch_add(1, Ordering::SeqCst) {
                    u.fetch_add(1, Ordering::SeqCst);
                }
                async { Ok(()) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), N);
    assert_eq!(
        unmarked.load(Ordering::SeqCst),
        0,
        "a handler started while the previous delivery's done mark waited for its ack batch"
    );
    assert_eq!(summary.acked, N as u64);
    assert_eq!(store.completes.load(Ordering::SeqCst), N);
    assert_eq!(
        store.after_ack.load(Ordering::SeqCst),
        0,
        "a key was marked done after its message was acked"
    );
    // The keys are done: duplicates published now are absorbed.
    for i in 0..N {
        broker.publish("q", Message::new("m").message_id(format!("k{i}")));
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .dedup_shared(store.clone(), DedupKey::MessageId)
        .run_until(
            handler_fn(move |_d, _cx| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(summary.deduplicated, N as u64);
}
