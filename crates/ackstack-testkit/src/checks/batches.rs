//! Batch handlers ([`Consumer::run_batches_until`]): every invariant holds per delivery.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::batch::{Batch, BatchConfig, BatchResults, batch_handler_fn};
use ackstack_core::{
    ConsumerConfig, DeadLetterReason, DedupKey, ErrorKind, HandlerError, KeyOrdering, Message,
    Source, Summary,
};

use super::{
    CheckResult, LEASE, Verdict, consumer, drain, ensure, publish_all, stop_when, test_config,
};
use crate::{Harness, TestQueue};

/// A batch as the handler saw it: each delivery's payload and attempt.
type Seen = Vec<(String, u32)>;

/// The payloads of each batch a handler was called with, and each success's effects.
#[derive(Clone, Default)]
struct Record {
    batches: Arc<Mutex<Vec<Seen>>>,
    effects: Arc<Mutex<HashMap<String, u32>>>,
}

impl Record {
    fn batch(&self, batch: &Batch) {
        let seen = batch
            .deliveries()
            .map(|d| (String::from_utf8_lossy(&d.payload).into_owned(), d.attempt))
            .collect();
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(seen);
    }
    fn effect(&self, payload: &str) {
        *self
            .effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(payload.to_string())
            .or_default() += 1;
    }
    /// Records the batch's effects and its success.
    fn succeed(&self, batch: &Batch) -> Result<BatchResults, HandlerError> {
        for d in batch.deliveries() {
            self.effect(&text(&d.payload));
        }
        Ok(BatchResults::succeeded(batch.len()))
    }
    /// Checks that each of `bodies` took effect exactly once.
    fn each_once<'a>(&self, bodies: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
        let effects = self.effects();
        for body in bodies {
            ensure(effects.get(body) == Some(&1), || {
                format!(
                    "{body} took effect {:?} times: {effects:?}",
                    effects.get(body)
                )
            })?;
        }
        Ok(())
    }
    fn effects(&self) -> HashMap<String, u32> {
        self.effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn batches(&self) -> Vec<Seen> {
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn largest(&self) -> usize {
        self.batches().iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// Runs a batch consumer of `queue` until `done()` holds and it is idle.
async fn run_batches<H: Harness, F, Fut>(
    h: &H,
    queue: &TestQueue,
    config: ConsumerConfig,
    dedup: Option<DedupKey>,
    batches: BatchConfig,
    handler: F,
    done: impl Fn() -> bool + Send,
) -> Result<Summary, String>
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BatchResults, HandlerError>> + Send,
{
    let consumer = consumer(h, queue, config, dedup).await;
    let status = consumer.status();
    consumer
        .run_batches_until(
            batch_handler_fn(handler),
            batches,
            stop_when(status, Duration::from_millis(300), done),
        )
        .await
        .map_err(|e| format!("consumer failed: {e}"))
}

/// Publishes `n` messages `{prefix}0`, `{prefix}1`, ... and returns their payloads.
async fn publish_numbered<H: Harness>(
    h: &H,
    queue: &TestQueue,
    prefix: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let bodies: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let messages = bodies.iter().map(|b| Message::new(b.clone())).collect();
    publish_all(&h.publisher(queue).await, messages).await?;
    Ok(bodies)
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Invariants 1, 2, 4 and 5 per delivery: in batches, each delivery is acked only after its
/// own success, a failed one is retried with its own attempt count, a poison one is
/// dead-lettered with its own metadata, and a duplicate is handled once.
pub async fn batch_outcomes_are_per_delivery<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let prefix = crate::unique_name("key");
    let keyed = |body: &str, key: &str| {
        Message::new(body.to_string()).header("idempotency-key", format!("{prefix}-{key}"))
    };
    let mut messages: Vec<Message> = (0..6)
        .map(|i| keyed(&format!("ok{i}"), &format!("ok{i}")))
        .collect();
    messages.push(keyed("ok0", "ok0"));
    messages.push(keyed("retry", "retry"));
    messages.push(keyed("poison", "poison"));
    publish_all(&h.publisher(&q).await, messages).await?;
    let record = Record::default();
    let r = record.clone();
    let attempts: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let a = attempts.clone();
    let (r2, dead) = (record.clone(), Arc::new(AtomicUsize::new(0)));
    let d2 = dead.clone();
    let summary = run_batches(
        &*h,
        &q,
        test_config(),
        Some(DedupKey::Header("idempotency-key".into())),
        BatchConfig {
            max_size: 4,
            max_wait: Duration::from_millis(300),
        },
        move |batch: Batch| {
            let (r, a, d) = (r.clone(), a.clone(), d2.clone());
            async move {
                r.batch(&batch);
                let mut results = BatchResults::succeeded(batch.len());
                for (i, delivery) in batch.deliveries().enumerate() {
                    let body = text(&delivery.payload);
                    a.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((body.clone(), delivery.attempt));
                    match (body.as_str(), delivery.attempt) {
                        ("retry", 1) => {
                            results.fail(i, HandlerError::transient("not this time"));
                        }
                        ("poison", _) => {
                            d.fetch_add(1, Ordering::SeqCst);
                            results.fail(i, HandlerError::permanent("row 7 is malformed"));
                        }
                        _ => r.effect(&body),
                    }
                }
                Ok(results)
            }
        },
        move || r2.effects().len() == 7 && dead.load(Ordering::SeqCst) >= 1,
    )
    .await?;
    record.each_once(["ok0", "ok1", "ok2", "ok3", "ok4", "ok5", "retry"])?;
    let attempts = attempts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let retry: Vec<u32> = attempts
        .iter()
        .filter(|(b, _)| b == "retry")
        .map(|(_, a)| *a)
        .collect();
    ensure(retry == [1, 2], || {
        format!("the failed delivery's attempts were {retry:?}, not [1, 2]")
    })?;
    ensure(summary.dead_lettered == 1, || format!("{summary:?}"))?;
    let largest = record.largest();
    ensure((2..=4).contains(&largest), || {
        format!("the largest batch held {largest} deliveries (max_size 4)")
    })?;
    let dl = h.wait_dead_letters(&q, 1, Duration::from_secs(10)).await;
    ensure(dl.len() == 1 && dl[0].payload == "poison", || {
        format!("expected the poison message's dead letter, found {dl:?}")
    })?;
    let meta = &dl[0].metadata;
    ensure(
        meta.reason == DeadLetterReason::Permanent
            && meta.error_kind == ErrorKind::Permanent
            && meta.attempts == 1
            && meta.error_message.contains("row 7 is malformed"),
        || format!("dead-letter metadata not the delivery's own: {meta:?}"),
    )?;
    let left = drain(&*h, &q, Duration::from_secs(3)).await?;
    ensure(left.iter().all(|(p, _)| p == "ok0"), || {
        format!("unexpected leftovers {left:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariants 1 and 2: a batch that fails as a whole (an error, or results that do not match
/// it) retries each of its deliveries; none is acked until it succeeds. (A panicking batch
/// handler is the same failure for all; the core crate's tests cover it.)
pub async fn batch_errors_fail_every_delivery<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(LEASE).await;
    let bodies = publish_numbered(&*h, &q, "row", 6).await?;
    let record = Record::default();
    // The batches of the three failing calls (calls run concurrently, so the order in which
    // `record` sees batches need not be the calls' order).
    let failing = Record::default();
    let (r, r2, f) = (record.clone(), record.clone(), failing.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let summary = run_batches(
        &*h,
        &q,
        test_config(),
        None,
        BatchConfig {
            max_size: 3,
            max_wait: Duration::from_millis(300),
        },
        move |batch: Batch| {
            let (r, f, call) = (r.clone(), f.clone(), c.fetch_add(1, Ordering::SeqCst));
            async move {
                r.batch(&batch);
                if call < 3 {
                    f.batch(&batch);
                }
                match call {
                    0 => Err(HandlerError::transient("bulk insert failed")),
                    1 => Ok(BatchResults::succeeded(batch.len().saturating_sub(1))),
                    2 => {
                        let mut results = BatchResults::succeeded(batch.len());
                        results.fail(batch.len(), HandlerError::transient("past the end"));
                        Ok(results)
                    }
                    _ => r.succeed(&batch),
                }
            }
        },
        move || r2.effects().len() == 6,
    )
    .await?;
    record.each_once(bodies.iter().map(String::as_str))?;
    let batches = record.batches();
    let failed_batches = failing.batches();
    let failed: usize = failed_batches.iter().map(Vec::len).sum();
    ensure(
        batches.len() > 3 && summary.retried >= failed as u64,
        || format!("{failed} deliveries in failed batches, {summary:?}; batches {batches:?}"),
    )?;
    // Every delivery of a failed batch came back with a higher attempt before it succeeded.
    for (body, attempt) in failed_batches.iter().flatten() {
        let later = batches
            .iter()
            .flatten()
            .any(|(b, a)| b == body && a > attempt);
        ensure(later, || {
            format!(
                "{body} (attempt {attempt}) never came back after its batch failed: {batches:?}"
            )
        })?;
    }
    ensure(summary.dead_lettered == 0, || format!("{summary:?}"))?;
    let left = drain(&*h, &q, Duration::from_secs(2)).await?;
    ensure(left.is_empty(), || format!("unexpected leftovers {left:?}"))?;
    Ok(Verdict::Passed)
}

/// Invariant 6: a batch that runs two and a half times its deliveries' lease keeps every
/// lease; each delivery is acked once.
pub async fn batch_leases_cover_the_whole_batch<H: Harness>(h: Arc<H>) -> CheckResult {
    let q = h.create(Duration::from_secs(4)).await;
    if h.source(&q).await.capabilities().lease.is_none() {
        return Ok(Verdict::Skipped("the broker has no leases".into()));
    }
    let bodies = publish_numbered(&*h, &q, "slow", 3).await?;
    let record = Record::default();
    let (r, r2) = (record.clone(), record.clone());
    let summary = run_batches(
        &*h,
        &q,
        test_config(),
        None,
        BatchConfig {
            max_size: 3,
            max_wait: Duration::from_millis(500),
        },
        move |batch: Batch| {
            let r = r.clone();
            async move {
                r.batch(&batch);
                tokio::time::sleep(Duration::from_secs(10)).await;
                r.succeed(&batch)
            }
        },
        move || r2.effects().len() == 3,
    )
    .await?;
    record.each_once(bodies.iter().map(String::as_str))?;
    ensure(summary.acked == 3 && summary.leases_lost == 0, || {
        format!("{summary:?}")
    })?;
    Ok(Verdict::Passed)
}

/// Invariant 11: with per-key ordering, a batch never holds two deliveries of one key, and
/// each key's messages are handled in order.
pub async fn batches_keep_key_order<H: Harness>(h: Arc<H>) -> CheckResult {
    if !h.preserves_key_order() {
        return Ok(Verdict::Skipped(
            "the broker does not keep publish order per key".into(),
        ));
    }
    let q = h.create(LEASE).await;
    let mut messages = Vec::new();
    for i in 0..4 {
        for key in ["a", "b", "c"] {
            messages.push(Message::new(format!("{key}{i}")).key(key));
        }
    }
    publish_all(&h.publisher(&q).await, messages).await?;
    let record = Record::default();
    let (r, r2) = (record.clone(), record.clone());
    // Batches holding two deliveries of one key (as the broker keys them).
    let mixed: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let m = mixed.clone();
    let mut config = test_config();
    config.ordering = KeyOrdering::PerKey;
    run_batches(
        &*h,
        &q,
        config,
        None,
        BatchConfig {
            max_size: 4,
            max_wait: Duration::from_millis(200),
        },
        move |batch: Batch| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                r.batch(&batch);
                let mut keys: Vec<_> = batch.deliveries().filter_map(|d| d.key.clone()).collect();
                let before = keys.len();
                keys.sort_unstable();
                keys.dedup();
                if keys.len() != before {
                    let seen = batch
                        .deliveries()
                        .map(|d| (text(&d.payload), d.attempt))
                        .collect();
                    m.lock().unwrap_or_else(|p| p.into_inner()).push(seen);
                }
                r.succeed(&batch)
            }
        },
        move || r2.effects().len() == 12,
    )
    .await?;
    let mixed = mixed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure(mixed.is_empty(), || {
        format!("batches held two deliveries of one key: {mixed:?}")
    })?;
    let batches = record.batches();
    let order: Vec<String> = batches.iter().flatten().map(|(b, _)| b.clone()).collect();
    for key in ["a", "b", "c"] {
        let of: Vec<&String> = order.iter().filter(|b| b.starts_with(key)).collect();
        let expected: Vec<String> = (0..4).map(|i| format!("{key}{i}")).collect();
        ensure(
            of.iter()
                .map(|s| s.as_str())
                .eq(expected.iter().map(|s| s.as_str())),
            || format!("key {key} handled out of order: {of:?}"),
        )?;
    }
    Ok(Verdict::Passed)
}
