//! The conformance checks. Each takes the harness, makes its own queue, and returns
//! [`Verdict::Passed`], [`Verdict::Skipped`] (does not apply to this broker) or an error
//! describing the violation.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, DeadLetterReason, DedupKey, Delivery, HandlerError,
    KeyOrdering, Message, Publish, Source, Status, Summary, handler_fn,
};
use tokio::time::Instant;

use crate::{Harness, TestQueue};

/// A check's verdict when it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The invariant held.
    Passed,
    /// The check does not apply to this broker; why.
    Skipped(String),
}

/// A check's result: a verdict, or what was violated.
pub type CheckResult = Result<Verdict, String>;

/// A check, boxed so that the list can be iterated.
pub type Check<H> = fn(Arc<H>) -> Pin<Box<dyn Future<Output = CheckResult> + Send>>;

/// Every check, by name.
pub fn all<H: Harness>() -> Vec<(&'static str, Check<H>)> {
    vec![
        ("acks_only_after_success", |h| {
            Box::pin(acks_only_after_success(h))
        }),
        ("unacked_work_is_redelivered", |h| {
            Box::pin(unacked_work_is_redelivered(h))
        }),
        ("attempts_survive_restart", |h| {
            Box::pin(attempts_survive_restart(h))
        }),
        ("retries_back_off", |h| Box::pin(retries_back_off(h))),
        ("dead_letters_after_max_attempts", |h| {
            Box::pin(dead_letters_after_max_attempts(h))
        }),
        ("permanent_failures_dead_letter_at_once", |h| {
            Box::pin(permanent_failures_dead_letter_at_once(h))
        }),
        ("dedup_marks_after_success", |h| {
            Box::pin(dedup_marks_after_success(h))
        }),
        ("long_handlers_keep_their_lease", |h| {
            Box::pin(long_handlers_keep_their_lease(h))
        }),
        ("lost_lease_is_never_acked", |h| {
            Box::pin(lost_lease_is_never_acked(h))
        }),
        ("acks_are_batched", |h| Box::pin(acks_are_batched(h))),
        ("out_of_order_completion_loses_nothing", |h| {
            Box::pin(out_of_order_completion_loses_nothing(h))
        }),
        ("shutdown_drains_in_flight_work", |h| {
            Box::pin(shutdown_drains_in_flight_work(h))
        }),
        ("panics_and_bad_input_do_not_stop_the_consumer", |h| {
            Box::pin(panics_and_bad_input_do_not_stop_the_consumer(h))
        }),
        ("per_key_ordering", |h| Box::pin(per_key_ordering(h))),
        ("concurrency_is_bounded", |h| {
            Box::pin(concurrency_is_bounded(h))
        }),
    ]
}

/// The longest any single consumer run in a check may take.
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// The lease test queues get unless a check needs another.
const LEASE: Duration = Duration::from_secs(10);

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// The suite's default consumer settings: fast retries without jitter, quick acks.
pub fn test_config() -> ConsumerConfig {
    ConsumerConfig {
        concurrency: 8,
        ack_delay: Duration::from_millis(20),
        shutdown_deadline: Duration::from_secs(10),
        retry: ackstack_core::RetryConfig {
            backoff: Backoff::exponential(Duration::from_millis(200), Duration::from_secs(2))
                .no_jitter(),
            max_attempts: 5,
            ..Default::default()
        },
        dedup: ackstack_core::DedupConfig {
            busy_retry_after: Duration::from_millis(100),
            store_retry_after: Duration::from_millis(200),
            ..Default::default()
        },
        ..ConsumerConfig::default()
    }
}

/// What a handler saw: payload text, attempt, when.
#[derive(Clone, Debug, Default)]
struct Seen(Arc<Mutex<Vec<(String, u32, Instant)>>>);

impl Seen {
    fn record(&self, d: &Delivery) {
        let text = String::from_utf8_lossy(&d.payload).into_owned();
        self.lock().push((text, d.attempt, Instant::now()));
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, u32, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn len(&self) -> usize {
        self.lock().len()
    }
    fn of(&self, payload: &str) -> Vec<(u32, Instant)> {
        self.lock()
            .iter()
            .filter(|(p, _, _)| p == payload)
            .map(|(_, a, t)| (*a, *t))
            .collect()
    }
    fn count(&self, payload: &str) -> usize {
        self.of(payload).len()
    }
    fn payloads(&self) -> Vec<String> {
        self.lock().iter().map(|(p, _, _)| p.clone()).collect()
    }
}

async fn publish_all<P: Publish>(publisher: &P, messages: Vec<Message>) -> Result<(), String> {
    for m in messages {
        publisher
            .publish(m)
            .await
            .map_err(|e| format!("publish failed: {e}"))?;
    }
    Ok(())
}

/// Completes when `done()` holds and the consumer has been idle for `idle`, or after the run
/// limit.
async fn stop_when(status: Status, idle: Duration, done: impl Fn() -> bool + Send) {
    let deadline = Instant::now() + RUN_LIMIT;
    while Instant::now() < deadline {
        if done() && status.idle_for() >= idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("conformance run hit its time limit");
}

/// Runs a consumer of `queue` with `config` until `done()` holds and it is idle.
async fn run<H: Harness, F, Fut>(
    h: &H,
    queue: &TestQueue,
    config: ConsumerConfig,
    dedup: Option<DedupKey>,
    handler: F,
    done: impl Fn() -> bool + Send,
) -> Result<Summary, String>
where
    F: Fn(Delivery, ackstack_core::Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    run_inner(
        h,
        queue,
        config,
        dedup,
        handler,
        done,
        Duration::from_millis(300),
    )
    .await
}

/// Runs a consumer of `queue` with `config` until `done()` holds, busy or not (for checks
/// whose handlers never finish by themselves).
async fn run_until_done<H: Harness, F, Fut>(
    h: &H,
    queue: &TestQueue,
    config: ConsumerConfig,
    handler: F,
    done: impl Fn() -> bool + Send,
) -> Result<Summary, String>
where
    F: Fn(Delivery, ackstack_core::Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    run_inner(h, queue, config, None, handler, done, Duration::ZERO).await
}

async fn run_inner<H: Harness, F, Fut>(
    h: &H,
    queue: &TestQueue,
    config: ConsumerConfig,
    dedup: Option<DedupKey>,
    handler: F,
    done: impl Fn() -> bool + Send,
    idle: Duration,
) -> Result<Summary, String>
where
    F: Fn(Delivery, ackstack_core::Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    let source = h.source(queue).await;
    let mut consumer = Consumer::new(source).config(config).name("conformance");
    if let Some(key) = dedup {
        consumer = consumer.dedup_shared(h.dedup_store(), key);
    }
    let status = consumer.status();
    consumer
        .run_until(handler_fn(handler), stop_when(status, idle, done))
        .await
        .map_err(|e| format!("consumer failed: {e}"))
}

/// Runs a fresh consumer for `wait` and returns the payloads it received (acking them).
async fn drain<H: Harness>(
    h: &H,
    queue: &TestQueue,
    wait: Duration,
) -> Result<Vec<(String, u32)>, String> {
    let seen = Seen::default();
    let s = seen.clone();
    let until = Instant::now() + wait;
    run(
        h,
        queue,
        test_config(),
        None,
        move |d, _cx| {
            s.record(&d);
            async { Ok(()) }
        },
        move || Instant::now() >= until,
    )
    .await?;
    Ok(seen
        .lock()
        .iter()
        .map(|(p, a, _)| (p.clone(), *a))
        .collect())
}

/// Invariants 1 and 7: every message handled successfully is acked exactly once, and a new
/// consumer finds nothing left.
pub async fn acks_only_after_success<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 30;
    publish_all(
        &h.publisher(&q).await,
        (0..n)
            .map(|i| Message::new(format!("m{i}")).message_id(format!("id-{i}")))
            .collect(),
    )
    .await?;
    let seen = Seen::default();
    let s = seen.clone();
    let s2 = seen.clone();
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            s.record(&d);
            async { Ok(()) }
        },
        move || s2.len() >= n,
    )
    .await?;
    for i in 0..n {
        ensure(seen.count(&format!("m{i}")) == 1, || {
            format!("m{i} handled {} times", seen.count(&format!("m{i}")))
        })?;
    }
    ensure(summary.acked == n as u64, || {
        format!("acked {} of {n}: {summary:?}", summary.acked)
    })?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("acked messages came back: {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 1, 2 and 9: work abandoned at the shutdown deadline is never acked; a new
/// consumer gets it again (with a higher attempt where the broker counts redeliveries).
pub async fn unacked_work_is_redelivered<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(3)).await;
    publish_all(&h.publisher(&q).await, vec![Message::new("stuck")]).await?;
    let started = Arc::new(AtomicBool::new(false));
    let (s, s2) = (started.clone(), started.clone());
    let mut config = test_config();
    config.shutdown_deadline = Duration::from_millis(200);
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |_d, cx| {
            s.store(true, Ordering::SeqCst);
            async move {
                cx.cancelled().await;
                Ok(())
            }
        },
        move || s2.load(Ordering::SeqCst),
    )
    .await?;
    ensure(summary.acked == 0, || {
        format!("abandoned work was acked: {summary:?}")
    })?;
    ensure(summary.abandoned == 1, || {
        format!("expected 1 abandoned: {summary:?}")
    })?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.len() == 1 && again[0].0 == "stuck", || {
        format!("expected the stuck message back once, got {again:?}")
    })?;
    if h.counts_redeliveries() {
        ensure(again[0].1 >= 2, || {
            format!("redelivery kept attempt {}", again[0].1)
        })?;
    }
    Ok(Verdict::Passed)
}

/// Invariant 2: after a retry, a new consumer (a restarted process) sees the next attempt
/// number, because the broker carries it.
pub async fn attempts_survive_restart<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let caps = h.source(&q).await.capabilities();
    if !caps.broker_delay {
        return Ok(Verdict::Skipped(
            "retries happen in place; attempts restart with the process".into(),
        ));
    }
    publish_all(&h.publisher(&q).await, vec![Message::new("flaky")]).await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    // A delay long enough that this consumer stops before the retry comes back.
    let mut config = test_config();
    config.retry.backoff =
        Backoff::exponential(Duration::from_secs(2), Duration::from_secs(2)).no_jitter();
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            async { Err(HandlerError::transient("first attempt fails")) }
        },
        move || s2.len() >= 1,
    )
    .await?;
    ensure(summary.retried == 1, || {
        format!("expected one retry: {summary:?}")
    })?;
    let again = drain(&*h, &q, Duration::from_secs(8)).await?;
    ensure(again.len() == 1, || {
        format!("expected the retried message once, got {again:?}")
    })?;
    ensure(again[0].1 == 2, || {
        format!("restarted consumer saw attempt {}, not 2", again[0].1)
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 3: retries come back no sooner than the backoff delay of their attempt.
pub async fn retries_back_off<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(&h.publisher(&q).await, vec![Message::new("twice")]).await?;
    let backoff =
        Backoff::exponential(Duration::from_millis(600), Duration::from_secs(5)).no_jitter();
    let mut config = test_config();
    config.retry.backoff = backoff;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            let attempt = d.attempt;
            async move {
                if attempt <= 2 {
                    Err(HandlerError::transient("not yet"))
                } else {
                    Ok(())
                }
            }
        },
        move || s2.len() >= 3,
    )
    .await?;
    let runs = seen.of("twice");
    ensure(runs.len() == 3, || {
        format!("expected 3 attempts, saw {runs:?}")
    })?;
    let attempts: Vec<u32> = runs.iter().map(|r| r.0).collect();
    ensure(attempts == vec![1, 2, 3], || {
        format!("attempt numbers {attempts:?}")
    })?;
    let tolerance = Duration::from_millis(50);
    for n in 1..=2u32 {
        let gap = runs[n as usize].1 - runs[n as usize - 1].1;
        let min = backoff.delay_with(n, 1.0);
        ensure(gap + tolerance >= min, || {
            format!(
                "attempt {} came {gap:?} after attempt {n}; backoff says at least {min:?}",
                n + 1
            )
        })?;
    }
    ensure(summary.succeeded == 1 && summary.retried == 2, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 4: past the attempt limit, the message goes to the dead-letter destination with
/// its payload and headers intact and ackstack's metadata.
pub async fn dead_letters_after_max_attempts<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let payload = r#"{"order_id":"A-7","amount_cents":100}"#;
    publish_all(
        &h.publisher(&q).await,
        vec![
            Message::new(payload)
                .header("x-app", "kept as is")
                .message_id("dl-1"),
        ],
    )
    .await?;
    let mut config = test_config();
    config.retry.max_attempts = 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::transient("downstream unavailable")) }
        },
        move || c2.load(Ordering::SeqCst) >= 2,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 2, || {
        format!(
            "handler ran {} times for 2 attempts",
            calls.load(Ordering::SeqCst)
        )
    })?;
    ensure(summary.dead_lettered == 1, || format!("{summary:?}"))?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(10)).await;
    ensure(dl.len() == 1, || {
        format!("expected 1 dead letter, found {}", dl.len())
    })?;
    let copy = &dl[0];
    ensure(copy.payload == payload, || {
        format!("payload changed: {:?}", copy.payload)
    })?;
    ensure(copy.headers.get_str("x-app") == Some("kept as is"), || {
        format!("header lost: {:?}", copy.headers)
    })?;
    let m = &copy.metadata;
    ensure(m.attempts == 2, || {
        format!("metadata attempts {}", m.attempts)
    })?;
    ensure(m.reason == DeadLetterReason::MaxAttempts, || {
        format!("reason {:?}", m.reason)
    })?;
    ensure(m.error_message.contains("downstream unavailable"), || {
        format!("message {:?}", m.error_message)
    })?;
    ensure(m.queue == q.name, || {
        format!("queue {:?} != {:?}", m.queue, q.name)
    })?;
    ensure(m.consumer == "conformance", || {
        format!("consumer {:?}", m.consumer)
    })?;
    ensure(
        m.first_failure_ms.is_none_or(|f| f <= m.last_failure_ms),
        || format!("{m:?}"),
    )?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("the dead-lettered original was not acked: {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 4 and 10: a payload that does not decode is dead-lettered on its first attempt,
/// byte for byte.
pub async fn permanent_failures_dead_letter_at_once<H: Harness>(h: Arc<H>) -> CheckResult {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        order_id: String,
    }
    let q = h.create(LEASE).await;
    let body = "{not json at all";
    publish_all(&h.publisher(&q).await, vec![Message::new(body)]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            let decoded = ackstack_core::decode::json::<Order>(&d).map(|_| ());
            async move { decoded }
        },
        move || c2.load(Ordering::SeqCst) >= 1,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 1, || {
        "a permanent failure was retried".into()
    })?;
    ensure(summary.dead_lettered == 1 && summary.retried == 0, || {
        format!("{summary:?}")
    })?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(10)).await;
    ensure(dl.len() == 1, || {
        format!("expected 1 dead letter, found {}", dl.len())
    })?;
    ensure(dl[0].payload == body, || "payload changed".into())?;
    ensure(
        dl[0].metadata.reason == DeadLetterReason::Permanent && dl[0].metadata.attempts == 1,
        || format!("{:?}", dl[0].metadata),
    )?;
    Ok(Verdict::Passed)
}

/// Invariant 5: duplicates run the handler once; a message whose first attempt fails is still
/// processed (the key is marked only after success).
pub async fn dedup_marks_after_success<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let prefix = crate::unique_name("key");
    let key = |k: &str| format!("{prefix}-{k}");
    let mut messages: Vec<Message> = (0..3)
        .map(|_| Message::new("dup").header("idempotency-key", key("dup")))
        .collect();
    messages.push(Message::new("flaky").header("idempotency-key", key("flaky")));
    publish_all(&h.publisher(&q).await, messages).await?;
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (e, c, c2) = (effects.clone(), calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        Some(DedupKey::Header("idempotency-key".into())),
        move |d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            let e = e.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = String::from_utf8_lossy(&d.payload).into_owned();
                if body == "flaky" && d.attempt == 1 {
                    return Err(HandlerError::transient("first attempt fails"));
                }
                *e.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(body)
                    .or_default() += 1;
                Ok(())
            }
        },
        {
            let e = effects.clone();
            move || {
                e.lock().map(|m| m.len() == 2).unwrap_or(false) && c2.load(Ordering::SeqCst) >= 3
            }
        },
    )
    .await?;
    let effects = effects.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure(effects.get("dup") == Some(&1), || {
        format!("duplicate effects: {effects:?}")
    })?;
    ensure(effects.get("flaky") == Some(&1), || {
        format!("a failed first attempt lost or repeated the message: {effects:?}")
    })?;
    ensure(summary.dead_lettered == 0, || format!("{summary:?}"))?;
    let left = drain(&*h, &q, Duration::from_secs(3)).await?;
    ensure(left.iter().all(|(p, _)| p == "dup"), || {
        format!("unexpected leftovers {left:?}")
    })?;
    ensure(summary.deduplicated + left.len() as u64 >= 2, || {
        format!("duplicates neither deduplicated nor pending: {summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 6: a handler that runs three and a half times its lease keeps it and is acked
/// once.
pub async fn long_handlers_keep_their_lease<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(2)).await;
    if h.source(&q).await.capabilities().lease.is_none() {
        return Ok(Verdict::Skipped("the broker has no leases".into()));
    }
    publish_all(&h.publisher(&q).await, vec![Message::new("slow")]).await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, c2) = (calls.clone(), calls.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |_d, _cx| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(7)).await;
                Ok(())
            }
        },
        move || c2.load(Ordering::SeqCst) >= 1,
    )
    .await?;
    ensure(calls.load(Ordering::SeqCst) == 1, || {
        "redelivered while its handler still ran".into()
    })?;
    ensure(summary.acked == 1 && summary.leases_lost == 0, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 6: when the lease is lost, the handler's token fires and the delivery is never
/// acked; it comes back.
pub async fn lost_lease_is_never_acked<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(2)).await;
    if h.source(&q).await.capabilities().lease.is_none() {
        return Ok(Verdict::Skipped("the broker has no leases".into()));
    }
    publish_all(
        &h.publisher(&q).await,
        vec![Message::new("outlives its lease")],
    )
    .await?;
    let mut config = test_config();
    config.lease.max_total = Duration::from_secs(2);
    config.concurrency = 1;
    let cancelled = Arc::new(AtomicBool::new(false));
    let (c, c2) = (cancelled.clone(), cancelled.clone());
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |_d, cx| {
            let c = c.clone();
            async move {
                tokio::select! {
                    _ = cx.cancelled() => c.store(true, Ordering::SeqCst),
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                }
                Ok(())
            }
        },
        move || c2.load(Ordering::SeqCst),
    )
    .await?;
    ensure(cancelled.load(Ordering::SeqCst), || {
        "the handler's token never fired".into()
    })?;
    ensure(summary.acked == 0 && summary.leases_lost >= 1, || {
        format!("{summary:?}")
    })?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.iter().any(|(p, _)| p == "outlives its lease"), || {
        format!("the message was lost: {again:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 7 and 8: acks are coalesced into fewer broker calls than deliveries.
pub async fn acks_are_batched<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 60;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("b{i}"))).collect(),
    )
    .await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let mut config = test_config();
    config.concurrency = 16;
    let summary = run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            s.record(&d);
            async { Ok(()) }
        },
        move || s2.len() >= n,
    )
    .await?;
    ensure(summary.acked == n as u64, || format!("{summary:?}"))?;
    ensure(summary.ack_calls < n as u64, || {
        format!("{} ack calls for {n} deliveries", summary.ack_calls)
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 8: with out-of-order completion, a delivery still in flight when its successors
/// are acked is not lost when it is abandoned (no cumulative ack passed it).
pub async fn out_of_order_completion_loses_nothing<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(3)).await;
    let n = 12;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("o{i}"))).collect(),
    )
    .await?;
    let seen = Seen::default();
    let s = seen.clone();
    let finished = Arc::new(AtomicUsize::new(0));
    let (f, f2) = (finished.clone(), finished.clone());
    let mut config = test_config();
    config.concurrency = n;
    config.shutdown_deadline = Duration::from_millis(200);
    let summary = run_until_done(
        &*h,
        &q,
        config,
        move |d, cx| {
            s.record(&d);
            let body = String::from_utf8_lossy(&d.payload).into_owned();
            let f = f.clone();
            async move {
                if body == "o2" {
                    cx.cancelled().await;
                    return Ok(());
                }
                // Later messages finish first.
                let i: u64 = body.trim_start_matches('o').parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(20 * (12 - i))).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
        move || f2.load(Ordering::SeqCst) >= n - 1,
    )
    .await?;
    ensure(summary.abandoned == 1, || format!("{summary:?}"))?;
    ensure(summary.acked == n as u64 - 1, || format!("{summary:?}"))?;
    let again = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(again.iter().any(|(p, _)| p == "o2"), || {
        format!("o2 was lost: a cumulative ack passed it ({again:?})")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 9: at shutdown, in-flight handlers finish and their deliveries are acked.
pub async fn shutdown_drains_in_flight_work<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(
        &h.publisher(&q).await,
        (0..4).map(|i| Message::new(format!("d{i}"))).collect(),
    )
    .await?;
    let started = Arc::new(AtomicUsize::new(0));
    let (s, s2) = (started.clone(), started.clone());
    let source = h.source(&q).await;
    let summary = Consumer::new(source)
        .config(test_config())
        .run_until(
            handler_fn(move |_d, _cx| {
                s.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(())
                }
            }),
            async move {
                let deadline = Instant::now() + RUN_LIMIT;
                while s2.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    ensure(summary.acked == 4 && summary.abandoned == 0, || {
        format!("in-flight work not drained: {summary:?}")
    })?;
    let left = drain(&*h, &q, h.redelivery_wait(&q)).await?;
    ensure(left.is_empty(), || {
        format!("drained work came back: {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 10: a panicking handler is a transient failure; malformed input is a permanent
/// one; neither stops the consumer.
pub async fn panics_and_bad_input_do_not_stop_the_consumer<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    publish_all(
        &h.publisher(&q).await,
        vec![
            Message::new("panic-once"),
            Message::new("\u{7f}garbage ]} ☃").header("x-odd-header", "\u{fffd}☃"),
            Message::new(r#"{"ok":true}"#),
        ],
    )
    .await?;
    let seen = Seen::default();
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = run(
        &*h,
        &q,
        test_config(),
        None,
        move |d, _cx| {
            s.record(&d);
            let body = String::from_utf8_lossy(&d.payload).into_owned();
            let attempt = d.attempt;
            let decoded = ackstack_core::decode::json::<serde_json::Value>(&d).map(|_| ());
            async move {
                if body == "panic-once" && attempt == 1 {
                    panic!("handler bug");
                }
                if body == "panic-once" {
                    return Ok(());
                }
                decoded
            }
        },
        move || s2.count("panic-once") >= 2 && s2.len() >= 4,
    )
    .await?;
    ensure(summary.retried == 1, || {
        format!("the panic was not retried: {summary:?}")
    })?;
    ensure(summary.dead_lettered == 1, || {
        format!("the malformed payload was not dead-lettered: {summary:?}")
    })?;
    ensure(seen.count(r#"{"ok":true}"#) == 1, || {
        format!("{:?}", seen.payloads())
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 11: with per-key ordering, a retrying message holds back later messages of its
/// key, and only of its key.
pub async fn per_key_ordering<H: Harness>(h: Arc<H>) -> CheckResult {
    if !h.preserves_key_order() {
        return Ok(Verdict::Skipped(
            "the broker does not keep publish order per key".into(),
        ));
    }
    let q = h.create(LEASE).await;
    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push(Message::new(format!("a{i}")).key("a"));
        messages.push(Message::new(format!("b{i}")).key("b"));
    }
    publish_all(&h.publisher(&q).await, messages).await?;
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let (o, o2) = (order.clone(), order.clone());
    let mut config = test_config();
    config.ordering = KeyOrdering::PerKey;
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(300), Duration::from_secs(1)).no_jitter();
    run(
        &*h,
        &q,
        config,
        None,
        move |d, _cx| {
            let o = o.clone();
            async move {
                let body = String::from_utf8_lossy(&d.payload).into_owned();
                if body == "a0" && d.attempt < 3 {
                    return Err(HandlerError::transient("a0 not yet"));
                }
                o.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                Ok(())
            }
        },
        move || o2.lock().map(|v| v.len() >= 6).unwrap_or(false),
    )
    .await?;
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let of = |k: char| {
        order
            .iter()
            .filter(|s| s.starts_with(k))
            .cloned()
            .collect::<Vec<_>>()
    };
    ensure(of('a') == ["a0", "a1", "a2"], || {
        format!("key a out of order: {order:?}")
    })?;
    ensure(of('b') == ["b0", "b1", "b2"], || {
        format!("key b out of order: {order:?}")
    })?;
    Ok(Verdict::Passed)
}

/// The runner never runs more handlers at once than its concurrency.
pub async fn concurrency_is_bounded<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let n = 24;
    publish_all(
        &h.publisher(&q).await,
        (0..n).map(|i| Message::new(format!("c{i}"))).collect(),
    )
    .await?;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (nw, pk, dn, dn2) = (now.clone(), peak.clone(), done.clone(), done.clone());
    let mut config = test_config();
    config.concurrency = 4;
    run(
        &*h,
        &q,
        config,
        None,
        move |_d, _cx| {
            let (nw, pk, dn) = (nw.clone(), pk.clone(), dn.clone());
            async move {
                let cur = nw.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(cur, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                nw.fetch_sub(1, Ordering::SeqCst);
                dn.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
        move || dn2.load(Ordering::SeqCst) >= n,
    )
    .await?;
    let peak = peak.load(Ordering::SeqCst);
    ensure(peak <= 4, || {
        format!("{peak} handlers ran at once with concurrency 4")
    })?;
    ensure(done.load(Ordering::SeqCst) == n, || {
        format!("handled {} of {n}", done.load(Ordering::SeqCst))
    })?;
    Ok(Verdict::Passed)
}
