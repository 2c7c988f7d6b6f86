//! The conformance checks. Each takes the harness, makes its own queue, and returns
//! [`Verdict::Passed`], [`Verdict::Skipped`] (does not apply to this broker) or an error
//! describing the violation.
//!
//! This file holds the list of checks ([`all`]), their result types, the suite's consumer
//! settings ([`test_config`]) and the helpers every check uses to publish, run a consumer and
//! drain a queue. The checks themselves are grouped by the invariants of the repository's
//! `docs/CONTRACT.md` they prove, one file a group:
//!
//! - `acks.rs`: invariants 1 (no loss), 7 (batch ack) and 8 (watermarks):
//!   [`acks_only_after_success`], [`acks_are_batched`],
//!   [`out_of_order_completion_loses_nothing`].
//! - `retry.rs`: invariants 2 (attempts survive restarts) and 3 (backoff):
//!   [`attempts_survive_restart`], [`retries_back_off`], [`handler_chosen_delays_are_honoured`].
//! - `defer.rs`: deferrals keep their attempt (2) and end in a dead letter at the limit (4):
//!   [`deferrals_use_no_attempt`], [`deferrals_end_at_the_defer_limit`].
//! - `dead_letters.rs`: invariant 4 (dead-lettering), with 10 for undecodable payloads:
//!   [`dead_letters_after_max_attempts`], [`permanent_failures_dead_letter_at_once`].
//! - `dedup.rs`: invariant 5 (deduplication): [`dedup_marks_after_success`].
//! - `leases.rs`: invariant 6 (leases): [`long_handlers_keep_their_lease`],
//!   [`lost_lease_is_never_acked`].
//! - `shutdown.rs`: invariant 9 (graceful shutdown), with 1 and 2:
//!   [`unacked_work_is_redelivered`], [`shutdown_drains_in_flight_work`].
//! - `bad_input.rs`: invariant 10 (bad input never panics):
//!   [`panics_and_bad_input_do_not_stop_the_consumer`].
//! - `ordering.rs`: invariant 11 (ordering when asked) and the runner's concurrency bound:
//!   [`per_key_ordering`], [`concurrency_is_bounded`].
//! - `produced.rs`: invariant 12 (observability): [`deliveries_carry_their_produce_time`].
//! - `batches.rs`: batch handlers keep invariants 1, 2, 4, 5, 6 and 11 per delivery:
//!   [`batch_outcomes_are_per_delivery`], [`batch_errors_fail_every_delivery`],
//!   [`batch_leases_cover_the_whole_batch`], [`batches_keep_key_order`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, DedupKey, Delivery, HandlerError, Message, Publish, Status,
    Summary, handler_fn,
};
use tokio::time::Instant;

use crate::{Harness, TestQueue};

mod acks;
mod bad_input;
mod batches;
mod dead_letters;
mod dedup;
mod defer;
mod leases;
mod ordering;
mod produced;
mod retry;
mod shutdown;

pub use acks::{acks_are_batched, acks_only_after_success, out_of_order_completion_loses_nothing};
pub use bad_input::panics_and_bad_input_do_not_stop_the_consumer;
pub use batches::{
    batch_errors_fail_every_delivery, batch_leases_cover_the_whole_batch,
    batch_outcomes_are_per_delivery, batches_keep_key_order,
};
pub use dead_letters::{dead_letters_after_max_attempts, permanent_failures_dead_letter_at_once};
pub use dedup::dedup_marks_after_success;
pub use defer::{deferrals_end_at_the_defer_limit, deferrals_use_no_attempt};
pub use leases::{long_handlers_keep_their_lease, lost_lease_is_never_acked};
pub use ordering::{concurrency_is_bounded, per_key_ordering};
pub use produced::deliveries_carry_their_produce_time;
pub use retry::{attempts_survive_restart, handler_chosen_delays_are_honoured, retries_back_off};
pub use shutdown::{shutdown_drains_in_flight_work, unacked_work_is_redelivered};

/// A check's verdict when it did not fail.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
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
        ("handler_chosen_delays_are_honoured", |h| {
            Box::pin(handler_chosen_delays_are_honoured(h))
        }),
        ("deferrals_use_no_attempt", |h| {
            Box::pin(deferrals_use_no_attempt(h))
        }),
        ("deferrals_end_at_the_defer_limit", |h| {
            Box::pin(deferrals_end_at_the_defer_limit(h))
        }),
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
        ("batch_outcomes_are_per_delivery", |h| {
            Box::pin(batch_outcomes_are_per_delivery(h))
        }),
        ("batch_errors_fail_every_delivery", |h| {
            Box::pin(batch_errors_fail_every_delivery(h))
        }),
        ("batch_leases_cover_the_whole_batch", |h| {
            Box::pin(batch_leases_cover_the_whole_batch(h))
        }),
        ("batches_keep_key_order", |h| {
            Box::pin(batches_keep_key_order(h))
        }),
        ("deliveries_carry_their_produce_time", |h| {
            Box::pin(deliveries_carry_their_produce_time(h))
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
    let mut config = ConsumerConfig::default();
    config.concurrency = 8;
    config.ack_delay = Duration::from_millis(20);
    config.shutdown_deadline = Duration::from_secs(10);
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(200), Duration::from_secs(2)).no_jitter();
    config.retry.max_attempts = 5;
    config.dedup.busy_retry_after = Duration::from_millis(100);
    config.dedup.store_retry_after = Duration::from_millis(200);
    config
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
    /// How long since the last run (zero before the first).
    fn quiet_for(&self) -> Duration {
        self.lock()
            .last()
            .map_or(Duration::ZERO, |(_, _, at)| at.elapsed())
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
    let consumer = consumer(h, queue, config, dedup).await;
    let status = consumer.status();
    consumer
        .run_until(handler_fn(handler), stop_when(status, idle, done))
        .await
        .map_err(|e| format!("consumer failed: {e}"))
}

/// A fresh consumer of `queue` named `conformance`, deduplicating by `dedup` in the harness's
/// store when given.
async fn consumer<H: Harness>(
    h: &H,
    queue: &TestQueue,
    config: ConsumerConfig,
    dedup: Option<DedupKey>,
) -> Consumer<H::Source> {
    let source = h.source(queue).await;
    let consumer = Consumer::new(source).config(config).name("conformance");
    match dedup {
        Some(key) => consumer.dedup_shared(h.dedup_store(), key),
        None => consumer,
    }
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
