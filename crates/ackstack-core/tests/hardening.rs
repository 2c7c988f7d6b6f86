//! Fault paths of the contract on the in-memory broker: one retry decision, store outages that
//! use up no attempts, byte keys, cancellation while waiting, leases versus settlement, and
//! configuration checks. See docs/CONTRACT.md for the invariant each test proves.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::handler::{Context, Layer, Process};
use ackstack_core::memory::{MemorySettler, MemorySource, MemoryToken};
use ackstack_core::{
    AckReport, Backoff, Capabilities, ConfigError, Consumer, ConsumerConfig, ConsumerError,
    DeadLetter, DedupKey, Delivery, DeliveryMode, Failure, HandlerError, KeyOrdering, MemoryBroker,
    MemoryDedupStore, Message, OnRefused, Outcome, Received, Settle, SettleError, SettleFailure,
    Settled, Source, SourceError, handler_fn,
};

mod common;
use common::{Outage, fast_retry, run_counting, until};

/// A layer that panics on every delivery.
struct Panics;

struct Panicking;

impl Process for Panicking {
    async fn process(&self, _: &Delivery, _: &Context) -> Outcome {
        panic!("layer bug")
    }
}

impl<P: Process> Layer<P> for Panics {
    type Process = Panicking;
    fn layer(&self, _inner: P) -> Panicking {
        Panicking
    }
}

#[tokio::test]
async fn a_panicking_layer_uses_up_attempts_and_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(3)
        .layer(Panics)
        .run_until(
            handler_fn(|_d, _cx| async { Ok(()) }),
            until(move || b.dead_letters("q").len() == 1),
        )
        .await
        .unwrap();
    assert_eq!(broker.dead_letters("q").len(), 1, "{summary:?}");
    assert_eq!(
        summary.retried, 2,
        "attempts 1 and 2 retried, 3 dead-lettered"
    );
    let meta =
        ackstack_core::DeadLetterMetadata::from_headers(&broker.dead_letters("q")[0].headers)
            .unwrap();
    assert_eq!(meta.attempts, 3);
    assert!(
        meta.error_message.contains("layer bug"),
        "{}",
        meta.error_message
    );
}

#[tokio::test]
async fn a_panicking_dedup_key_function_uses_up_attempts_and_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let b = broker.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(2)
        .dedup(
            MemoryDedupStore::new(),
            DedupKey::from_fn(|_d: &Delivery| -> Option<String> { panic!("key extractor bug") }),
        )
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }),
            until(move || b.dead_letters("q").len() == 1),
        )
        .await
        .unwrap();
    assert_eq!(broker.dead_letters("q").len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn in_place_retries_share_the_attempt_limit_with_the_immediate_tier() {
    // Per-key ordering retries in place; the retry layer counts the attempts itself.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m").key("k"));
    let b = broker.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut config = ConsumerConfig::default();
    config.retry.immediate = 1;
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .ordering(KeyOrdering::PerKey)
        .backoff(fast_retry())
        .max_attempts(3)
        .inspect(move |d, o| s.lock().unwrap().push((d.attempt, o.as_str())))
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("always")) }
            }),
            until(move || b.dead_letters("q").len() == 1),
        )
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        6,
        "3 attempts x (1 + 1 immediate)"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, "retry"), (2, "retry"), (3, "dead_letter")]
    );
    assert_eq!(summary.retried, 2);
    let meta =
        ackstack_core::DeadLetterMetadata::from_headers(&broker.dead_letters("q")[0].headers)
            .unwrap();
    assert_eq!(meta.attempts, 3);
}

#[tokio::test]
async fn a_store_outage_uses_up_no_attempts() {
    // Two attempts allowed; the handler fails its first call. Were the outage's answers
    // counted as attempts, the first real failure would be the last attempt.
    let broker = MemoryBroker::new();
    for i in 0..5 {
        broker.publish(
            "q",
            Message::new(format!("m{i}")).message_id(format!("k{i}")),
        );
    }
    let store = Outage::new(true, false);
    let calls: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let c = calls.clone();
    let mut config = ConsumerConfig::default();
    config.dedup.store_retry_after = Duration::from_millis(50);
    let up = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        up.down.store(false, Ordering::SeqCst);
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .config(config)
        .backoff(fast_retry())
        .max_attempts(2)
        .dedup_shared(store.clone(), DedupKey::MessageId)
        .run_until(
            handler_fn(move |d, _cx| {
                let first = {
                    let mut calls = c.lock().unwrap();
                    let n = calls.entry(d.message_id.clone().unwrap()).or_insert(0);
                    *n += 1;
                    *n == 1
                };
                async move {
                    if first {
                        Err(HandlerError::transient("first call fails"))
                    } else {
                        Ok(())
                    }
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert!(
        store.claims.load(Ordering::SeqCst) > 10,
        "the store was asked again and again"
    );
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert!(broker.dead_letters("q").is_empty());
    assert!(broker.is_empty("q"), "every message acked");
    for (id, n) in calls.lock().unwrap().iter() {
        assert!(*n <= 2, "{id} handled {n} times");
    }
}

#[tokio::test]
async fn a_claim_applied_but_unanswered_is_ours_on_the_next_try() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m").message_id("k"));
    let store = Outage::new(false, true);
    let mut config = ConsumerConfig::default();
    config.dedup.store_retry_after = Duration::from_millis(50);
    let consumer = Consumer::new(broker.source("q"))
        .config(config)
        .dedup_shared(store.clone(), DedupKey::MessageId);
    let (calls, summary) = run_counting(consumer, &broker).await;
    assert_eq!(calls, 1);
    assert_eq!(summary.retried, 0, "not seen as busy: {summary:?}");
    assert_eq!(broker.stats("q").received, 1, "never redelivered");
}

/// Consumes everything in `broker`'s queue `q` with dedup on header `idem`; returns the
/// handler's call count and the summary.
async fn consume_dedup_by_header(broker: &MemoryBroker) -> (u32, ackstack_core::Summary) {
    let consumer = Consumer::new(broker.source("q"))
        .dedup(MemoryDedupStore::new(), DedupKey::Header("idem".into()));
    run_counting(consumer, broker).await
}

#[tokio::test]
async fn binary_ids_that_collide_under_lossy_utf8_are_both_handled() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("a").header("idem", vec![0xff_u8]));
    broker.publish("q", Message::new("b").header("idem", vec![0xfe_u8]));
    let (calls, summary) = consume_dedup_by_header(&broker).await;
    assert_eq!(calls, 2, "{summary:?}");
    assert_eq!(summary.deduplicated, 0);
}

#[tokio::test]
async fn empty_keys_are_not_deduplicated_and_are_counted() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("a").header("idem", ""));
    broker.publish("q", Message::new("b").header("idem", ""));
    broker.publish("q", Message::new("c"));
    let (calls, summary) = consume_dedup_by_header(&broker).await;
    assert_eq!(calls, 3);
    assert_eq!(summary.deduplicated, 0);
    assert_eq!(summary.dedup_keyless, 3, "{summary:?}");
}

#[tokio::test]
async fn a_delivery_whose_lease_is_lost_while_it_waits_for_its_key_is_never_handled() {
    // Both leases lapse (no extension allowed past 150 ms) while the first handler runs for
    // 800 ms; the second delivery of the key is still waiting for its turn.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("first").key("k"));
    broker.publish("q", Message::new("second").key("k"));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let mut config = ConsumerConfig::default();
    config.lease.max_total = Duration::from_millis(150);
    config.shutdown_deadline = Duration::from_millis(100);
    let summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(100)),
    )
    .config(config)
    .ordering(KeyOrdering::PerKey)
    .run_until(
        handler_fn(move |d, _cx| {
            h.lock()
                .unwrap()
                .push((String::from_utf8_lossy(&d.payload).into_owned(), d.attempt));
            async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                Ok(())
            }
        }),
        tokio::time::sleep(Duration::from_millis(1200)),
    )
    .await
    .unwrap();
    let handled = handled.lock().unwrap().clone();
    assert!(
        !handled.contains(&("second".to_string(), 1)),
        "the second delivery ran after its lease was lost: {handled:?}"
    );
    assert!(summary.leases_lost >= 2, "{summary:?}");
    assert_eq!(summary.acked, 0);
}

#[tokio::test]
async fn deliveries_that_lose_their_lease_while_waiting_never_let_the_next_run_beside_the_long_one()
{
    // "long" runs 600 ms; the two deliveries of its key behind it lose their leases (no
    // extension past 150 ms) and come back; none of the key's handlers may overlap another.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("long").key("k"));
    broker.publish("q", Message::new("w1").key("k"));
    broker.publish("q", Message::new("w2").key("k"));
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let mut config = ConsumerConfig::default();
    config.lease.max_total = Duration::from_millis(150);
    config.shutdown_deadline = Duration::from_millis(700);
    Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(100)),
    )
    .config(config)
    .ordering(KeyOrdering::PerKey)
    .run_until(
        handler_fn(move |d, _cx| {
            let runs = r.clone();
            async move {
                let start = tokio::time::Instant::now();
                let long = &d.payload[..] == b"long" && d.attempt == 1;
                tokio::time::sleep(Duration::from_millis(if long { 600 } else { 5 })).await;
                runs.lock().unwrap().push((
                    String::from_utf8_lossy(&d.payload).into_owned(),
                    start,
                    tokio::time::Instant::now(),
                ));
                Ok(())
            }
        }),
        tokio::time::sleep(Duration::from_millis(900)),
    )
    .await
    .unwrap();
    let mut runs = runs.lock().unwrap().clone();
    runs.sort_by_key(|(_, start, _)| *start);
    assert!(
        runs.len() >= 2,
        "something ran after the long one: {runs:?}"
    );
    for pair in runs.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "{} started while {} was still running",
            pair[1].0,
            pair[0].0
        );
    }
}

/// Runs one handler that ignores its cancellation token for 5 s, with leases lost after
/// 150 ms; returns whether its future was dropped while the consumer still ran, and whether
/// it ran to its end.
async fn handler_that_ignores_a_lost_lease(abort_on_loss: bool) -> (bool, bool) {
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("slow"));
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let (d, f) = (dropped.clone(), finished.clone());
    let mut config = ConsumerConfig::default();
    config.lease.max_total = Duration::from_millis(150);
    config.lease.abort_on_loss = abort_on_loss;
    let consumer = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(100)),
    )
    .config(config);
    let seen = dropped.clone();
    let dropped_while_running = Arc::new(AtomicBool::new(false));
    let answer = dropped_while_running.clone();
    consumer
        .run_until(
            handler_fn(move |_d, _cx| {
                let guard = Dropped(d.clone());
                let finished = f.clone();
                async move {
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    finished.store(true, Ordering::SeqCst);
                    Ok(())
                }
            }),
            async move {
                // The lease lapses at 100 ms (no extension past 150 ms); give the handler
                // until 1.5 s to be stopped.
                let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
                while !seen.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answer.store(seen.load(Ordering::SeqCst), Ordering::SeqCst);
            },
        )
        .await
        .unwrap();
    (
        dropped_while_running.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn a_lost_lease_stops_the_handler_when_abort_on_loss_is_set() {
    let (dropped, finished) = handler_that_ignores_a_lost_lease(true).await;
    assert!(dropped, "the handler still ran after its lease was lost");
    assert!(!finished);
}

#[tokio::test]
async fn a_lost_lease_only_cancels_the_handler_cooperatively_by_default() {
    let (dropped, _) = handler_that_ignores_a_lost_lease(false).await;
    assert!(
        !dropped,
        "without abort_on_loss, the handler is told (Context::cancelled), not stopped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_the_ack_waits_is_not_acked() {
    // The handler is done at once, but its ack waits 400 ms in the batch; the lease lapses at
    // 100 ms (no extension allowed past 120 ms). On tokio's paused clock: the outcome does not
    // depend on how fast this machine gets through the first 100 ms.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let mut config = ConsumerConfig::default();
    config.lease.max_total = Duration::from_millis(120);
    config.ack_delay = Duration::from_millis(400);
    config.ack_batch = Some(10);
    let summary = Consumer::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(100))
            .max_ack_batch(10),
    )
    .config(config)
    .run_until(
        handler_fn(|_d, _cx| async { Ok(()) }),
        tokio::time::sleep(Duration::from_millis(250)),
    )
    .await
    .unwrap();
    // Each lapsed delivery comes back and is received again; only the acks of deliveries whose
    // lease still holds are sent, so the broker never refuses one. On the paused clock the run
    // is the same every time: two copies lose their leases while their acks wait, and the
    // third still holds its lease when shutdown flushes the acks.
    assert_eq!(summary.received, 3, "{summary:?}");
    assert_eq!(summary.leases_lost, 2, "{summary:?}");
    assert_eq!(summary.acked, 1, "{summary:?}");
    assert_eq!(
        summary.ack_failures, 0,
        "an ack was sent for a lost lease: {summary:?}"
    );
}

/// A memory source whose lease extensions are slow (or never finish), logging the order of
/// extensions and settlements.
struct SlowExtend {
    inner: MemorySource,
    settler: SlowSettler,
}

#[derive(Clone)]
struct SlowSettler {
    inner: MemorySettler,
    delay: Option<Duration>,
    log: Arc<Mutex<Vec<&'static str>>>,
    /// Refuse every dead-letter copy for good, as a broker refuses one too large.
    refuse_dead_letters: bool,
}

impl SlowExtend {
    fn new(inner: MemorySource, delay: Option<Duration>) -> Self {
        let settler = SlowSettler {
            inner: inner.settler(),
            delay,
            log: Arc::default(),
            refuse_dead_letters: false,
        };
        SlowExtend { inner, settler }
    }

    fn refusing_dead_letters(mut self) -> Self {
        self.settler.refuse_dead_letters = true;
        self
    }
}

impl Source for SlowExtend {
    type Token = MemoryToken;
    type Settler = SlowSettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        self.inner.receive(max).await
    }
    fn settler(&self) -> SlowSettler {
        self.settler.clone()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

impl Settle for SlowSettler {
    type Token = MemoryToken;
    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        self.inner.ack(tokens).await
    }
    async fn retry(
        &self,
        token: MemoryToken,
        d: &Delivery,
        after: Duration,
        f: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.log.lock().unwrap().push("retry");
        self.inner.retry(token, d, after, f).await
    }
    async fn dead_letter(
        &self,
        token: MemoryToken,
        d: &Delivery,
        l: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        if self.refuse_dead_letters {
            self.log.lock().unwrap().push("dead letter refused");
            return Err(SettleFailure::new(
                token,
                SettleError::Rejected("message too large".into()),
            ));
        }
        self.inner.dead_letter(token, d, l).await
    }
    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        self.log.lock().unwrap().push("extend started");
        match self.delay {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
        let result = self.inner.extend(token, by).await;
        self.log.lock().unwrap().push("extend landed");
        result
    }
    async fn release(&self, token: MemoryToken) {
        self.inner.release(token).await
    }
}

#[tokio::test]
async fn an_extension_in_flight_never_lands_after_the_retry() {
    // Lease 400 ms, extended at 280 ms by a call that takes 100 ms; the handler fails at
    // 300 ms, while that extension is in flight.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let source = SlowExtend::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(400)),
        Some(Duration::from_millis(100)),
    );
    let log = source.settler.log.clone();
    let l = log.clone();
    Consumer::new(source)
        .backoff(Backoff::exponential(Duration::from_secs(5), Duration::from_secs(5)).no_jitter())
        .run_until(
            handler_fn(|_d, _cx| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err(HandlerError::transient("fails"))
            }),
            until(move || l.lock().unwrap().contains(&"retry")),
        )
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec!["extend started", "extend landed", "retry"],
        "the retry's visibility change is the last word"
    );
}

#[tokio::test]
async fn a_lease_lapses_even_while_its_extension_hangs() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let source = SlowExtend::new(
        broker
            .source("q")
            .visibility_timeout(Duration::from_millis(200)),
        None,
    );
    let cancelled = Arc::new(AtomicBool::new(false));
    let c = cancelled.clone();
    let c2 = cancelled.clone();
    let summary = Consumer::new(source)
        .shutdown_deadline(Duration::from_millis(100))
        .run_until(
            handler_fn(move |_d, cx| {
                let c = c.clone();
                async move {
                    tokio::select! {
                        _ = cx.cancelled() => c.store(true, Ordering::SeqCst),
                        _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                    }
                    Ok(())
                }
            }),
            until(move || c2.load(Ordering::SeqCst)),
        )
        .await
        .unwrap();
    assert!(
        cancelled.load(Ordering::SeqCst),
        "the lapse cancelled the handler"
    );
    assert_eq!(summary.acked, 0);
    assert!(summary.leases_lost >= 1);
}

#[tokio::test]
async fn bad_configuration_is_a_typed_error_not_a_panic() {
    let broker = MemoryBroker::new();
    let run = |config: ConsumerConfig| {
        let source = broker.source("q");
        async move {
            Consumer::new(source)
                .config(config)
                .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async {})
                .await
        }
    };
    let mut nan = ConsumerConfig::default();
    nan.lease.extend_at = f64::NAN;
    assert!(matches!(
        run(nan).await,
        Err(ConsumerError::Config(ConfigError::ExtendAt(_)))
    ));
    let mut one = ConsumerConfig::default();
    one.lease.extend_at = 1.0;
    assert!(matches!(
        run(one).await,
        Err(ConsumerError::Config(ConfigError::ExtendAt(_)))
    ));
    let mut zero = ConsumerConfig::default();
    zero.concurrency = 0;
    assert!(matches!(
        run(zero).await,
        Err(ConsumerError::Config(ConfigError::ZeroConcurrency))
    ));
    let at_most_once_with_dedup = Consumer::new(broker.source("q"))
        .mode(DeliveryMode::AtMostOnce)
        .dedup(MemoryDedupStore::new(), DedupKey::MessageId);
    assert_eq!(
        at_most_once_with_dedup.validate(),
        Err(ConfigError::AtMostOnceWithDedup)
    );
    assert_eq!(
        Consumer::new(broker.source("q"))
            .mode(DeliveryMode::EffectivelyOnce)
            .validate(),
        Err(ConfigError::EffectivelyOnceWithoutStore)
    );
}

#[tokio::test]
async fn setters_and_config_edit_one_config_in_any_order() {
    let broker = MemoryBroker::new();
    let mut base = ConsumerConfig::default();
    base.ack_delay = Duration::from_millis(7);
    let consumer = Consumer::new(broker.source("q"))
        .concurrency(3)
        .backoff(fast_retry())
        .max_attempts(4)
        .mode(DeliveryMode::AtMostOnce)
        .config(base);
    let effective = consumer.effective_config();
    assert_eq!(effective.concurrency, 3);
    assert_eq!(effective.retry.backoff, fast_retry());
    assert_eq!(effective.retry.max_attempts, 4);
    assert_eq!(effective.mode, DeliveryMode::AtMostOnce);
    assert_eq!(effective.ack_delay, Duration::from_millis(7));
    let with_dedup = Consumer::new(broker.source("q"))
        .dedup(MemoryDedupStore::new(), DedupKey::MessageId)
        .config(ConsumerConfig::default());
    assert_eq!(
        with_dedup.effective_config().mode,
        DeliveryMode::EffectivelyOnce,
        "a later .config() does not undo the mode .dedup() implies"
    );
    assert_eq!(
        ConsumerConfig::default().ordering,
        KeyOrdering::default(),
        "one default for ordering"
    );
}

/// A memory source whose first `failures` receives fail as if the broker were unreachable.
struct Unreachable {
    inner: MemorySource,
    failures: u32,
}

impl Source for Unreachable {
    type Token = MemoryToken;
    type Settler = MemorySettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(SourceError::Disconnected("connection refused".into()));
        }
        self.inner.receive(max).await
    }
    fn settler(&self) -> MemorySettler {
        self.inner.settler()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[tokio::test]
async fn a_consumer_started_while_its_broker_is_unreachable_waits_and_shows_it() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let consumer = Consumer::new(Unreachable {
        inner: broker.source("q"),
        failures: 3,
    });
    let status = consumer.status();
    let worst = Arc::new(AtomicU32::new(0));
    let w = worst.clone();
    let watch = tokio::spawn(async move {
        loop {
            w.fetch_max(status.receive_failures(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let b = broker.clone();
    let summary = consumer
        .run_until(
            handler_fn(|_d, _cx| async { Ok(()) }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    watch.abort();
    assert_eq!(summary.receive_errors, 3);
    assert_eq!(summary.acked, 1, "it kept trying and then consumed");
    assert!(
        worst.load(Ordering::SeqCst) >= 2,
        "visible in Status while failing"
    );
}

/// Runs a consumer whose dead-letter copies are all refused, on one poison message, for
/// `run_for`; returns the summary, the refusals `Status` saw, and the settler's log.
async fn run_with_refused_dead_letters(
    broker: &MemoryBroker,
    policy: OnRefused,
    run_for: Duration,
) -> (ackstack_core::Summary, u64, Vec<&'static str>) {
    broker.publish("q", Message::new("poison"));
    let source = SlowExtend::new(broker.source("q"), Some(Duration::ZERO)).refusing_dead_letters();
    let log = source.settler.log.clone();
    let mut config = ConsumerConfig::default();
    config.on_dead_letter_refused = policy;
    let consumer = Consumer::new(source)
        .config(config)
        .backoff(
            Backoff::exponential(Duration::from_millis(300), Duration::from_secs(5)).no_jitter(),
        )
        .shutdown_deadline(Duration::from_millis(100));
    let status = consumer.status();
    let summary = consumer
        .run_until(
            handler_fn(|_d, _cx| async { Err(HandlerError::permanent("poison")) }),
            tokio::time::sleep(run_for),
        )
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    (summary, status.dead_letters_refused(), log)
}

#[tokio::test]
async fn a_dead_letter_refused_for_good_is_released_with_backoff_never_acked() {
    let broker = MemoryBroker::new();
    let (summary, refused, log) =
        run_with_refused_dead_letters(&broker, OnRefused::Release, Duration::from_millis(2500))
            .await;
    let tries = log.iter().filter(|l| **l == "dead letter refused").count();
    assert!(tries >= 2, "released and tried again: {log:?}");
    assert!(
        tries <= 4,
        "released after a growing pause, not in a hot loop: {log:?}"
    );
    assert_eq!(refused, tries as u64, "each refusal visible in Status");
    assert_eq!(summary.acked, 0, "{summary:?}");
    assert_eq!(broker.len("q"), 1, "the message is still there");
    assert!(broker.dead_letters("q").is_empty());
    assert!(
        broker.stats("q").received >= 2,
        "redelivered after each release"
    );
}

#[tokio::test]
async fn a_dead_letter_refused_for_good_can_be_held_in_process() {
    let broker = MemoryBroker::new();
    let (summary, refused, log) =
        run_with_refused_dead_letters(&broker, OnRefused::Hold, Duration::from_millis(1500)).await;
    let tries = log.iter().filter(|l| **l == "dead letter refused").count();
    assert!(tries >= 3, "tried again in process: {log:?}");
    assert_eq!(refused, tries as u64);
    assert_eq!(summary.acked, 0, "{summary:?}");
    assert_eq!(broker.stats("q").received, 1, "held, never released");
    assert_eq!(broker.len("q"), 1);
}

#[test]
fn the_configuration_in_the_guide_parses_and_validates() {
    let guide = include_str!("../../../docs/GUIDE.md");
    let block = "```json\n{\n";
    let start = guide
        .find(block)
        .expect("the full json block in docs/GUIDE.md")
        + "```json\n".len();
    let end = start + guide[start..].find("```").unwrap();
    let config: ConsumerConfig = serde_json::from_str(&guide[start..end]).unwrap();
    config.validate().unwrap();
    assert_eq!(config.retry.max_attempts, 8);
    assert_eq!(config.on_dead_letter_refused, OnRefused::Release);
    let unknown = r#"{"retry": {"base": "1s", "max_attempt": 3}}"#;
    assert!(
        serde_json::from_str::<ConsumerConfig>(unknown).is_err(),
        "a misspelt retry field is an error, not ignored"
    );
}

#[tokio::test]
async fn at_most_once_never_retries_in_place() {
    // Per-key ordering makes retries happen in place; at-most-once has acked already, so a
    // failure must end there instead of re-running the handler.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m").key("k"));
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let c2 = calls.clone();
    Consumer::new(broker.source("q"))
        .mode(DeliveryMode::AtMostOnce)
        .ordering(KeyOrdering::PerKey)
        .backoff(fast_retry())
        .max_attempts(5)
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::transient("fails")) }
            }),
            async move {
                until(move || c2.load(Ordering::SeqCst) > 0).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            },
        )
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no retries in at-most-once"
    );
    assert!(broker.is_empty("q"), "acked on receipt");
}
