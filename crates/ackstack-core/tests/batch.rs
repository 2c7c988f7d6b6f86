//! Batch handlers on the in-memory broker: the settings they refuse and how a batch that fails
//! as a whole (a timeout, one error, a panic) settles each delivery. (The conformance suite's
//! batch checks run on every adapter.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::batch::{Batch, BatchConfig, BatchResults, batch_handler_fn};
use ackstack_core::{
    Backoff, ConfigError, Consumer, ConsumerError, DeadLetterMetadata, HandlerError, MemoryBroker,
    Message, Summary,
};

/// A broker whose queue `q` holds these payloads.
fn broker_with(payloads: &[&str]) -> MemoryBroker {
    let broker = MemoryBroker::new();
    for p in payloads {
        broker.publish("q", Message::new(p.to_string()));
    }
    broker
}

/// Runs `handler` over `q` with concurrency 8 and quick retries until the consumer is idle.
async fn run<F, Fut>(
    broker: &MemoryBroker,
    consumer: impl FnOnce(
        Consumer<ackstack_core::memory::MemorySource>,
    ) -> Consumer<ackstack_core::memory::MemorySource>,
    max_size: usize,
    handler: F,
) -> Summary
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BatchResults, HandlerError>> + Send,
{
    let source = broker.source("q").poll_wait(Duration::from_millis(20));
    let consumer = consumer(Consumer::new(source).concurrency(8).backoff(
        Backoff::exponential(Duration::from_millis(10), Duration::from_millis(50)).no_jitter(),
    ));
    let status = consumer.status();
    consumer
        .run_batches_until(
            batch_handler_fn(handler),
            BatchConfig {
                max_size,
                max_wait: Duration::from_millis(100),
            },
            async move { status.idle(Duration::from_millis(300)).await },
        )
        .await
        .unwrap()
}

/// What a batch handler's call returns, boxed.
type Call = std::pin::Pin<Box<dyn Future<Output = Result<BatchResults, HandlerError>> + Send>>;

/// A handler whose first call runs `first` and whose later calls succeed; and its call count.
fn fails_first<F, Fut>(
    first: F,
) -> (
    impl Fn(Batch) -> Call + Send + Sync + 'static,
    Arc<AtomicUsize>,
)
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BatchResults, HandlerError>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = move |batch: Batch| -> Call {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Box::pin(first(batch))
        } else {
            Box::pin(async move { Ok(BatchResults::succeeded(batch.len())) })
        }
    };
    (handler, calls)
}

#[tokio::test]
async fn a_batch_larger_than_the_concurrency_is_refused() {
    let broker = MemoryBroker::new();
    let ok = || batch_handler_fn(|b: Batch| async move { Ok(BatchResults::succeeded(b.len())) });
    let batches = BatchConfig {
        max_size: 10,
        max_wait: Duration::from_millis(10),
    };
    let consumer = Consumer::new(broker.source("q")).concurrency(8);
    let err = consumer.run_batches_until(ok(), batches, async {}).await;
    assert!(
        matches!(
            err,
            Err(ConsumerError::Config(ConfigError::BatchSize {
                max_size: 10,
                concurrency: 8
            }))
        ),
        "{err:?}"
    );
    let zero = BatchConfig {
        max_size: 0,
        ..batches
    };
    let consumer = Consumer::new(broker.source("q"));
    assert!(matches!(
        consumer.run_batches_until(ok(), zero, async {}).await,
        Err(ConsumerError::Config(ConfigError::BatchSize { .. }))
    ));
}

#[tokio::test]
async fn a_full_batch_is_handled_at_once_and_a_partial_one_after_max_wait() {
    let broker = broker_with(&["m0", "m1", "m2", "m3", "m4"]);
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let s = sizes.clone();
    let summary = run(
        &broker,
        |c| c,
        4,
        move |batch: Batch| {
            s.lock().unwrap().push(batch.len());
            async move { Ok(BatchResults::succeeded(batch.len())) }
        },
    )
    .await;
    assert_eq!(summary.acked, 5);
    assert_eq!(*sizes.lock().unwrap(), vec![4, 1]);
    assert!(broker.is_empty("q"));
}

#[tokio::test]
async fn a_batch_past_the_handler_timeout_fails_every_delivery() {
    let broker = broker_with(&["a", "b"]);
    let (handler, calls) = fails_first(|batch: Batch| async move {
        // Longer than the timeout: the batch is dropped, both retried.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(BatchResults::succeeded(batch.len()))
    });
    let timed = |c: Consumer<_>| c.handler_timeout(Duration::from_millis(200));
    let summary = run(&broker, timed, 2, handler).await;
    assert_eq!((summary.retried, summary.acked), (2, 2), "{summary:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_panicking_batch_handler_retries_every_delivery() {
    let broker = broker_with(&["a", "b"]);
    let (handler, calls) = fails_first(|_batch: Batch| async move {
        panic!("the bulk client panicked");
    });
    let summary = run(&broker, |c| c, 2, handler).await;
    assert_eq!((summary.retried, summary.acked), (2, 2), "{summary:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn one_error_for_the_batch_keeps_its_kind_for_each_delivery() {
    let broker = broker_with(&["a", "b"]);
    let summary = run(
        &broker,
        |c| c,
        2,
        |_batch: Batch| async { Err(HandlerError::permanent("the schema was dropped")) },
    )
    .await;
    assert_eq!(summary.dead_lettered, 2, "{summary:?}");
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 2);
    for letter in letters {
        let meta = DeadLetterMetadata::from_headers(&letter.headers).unwrap();
        assert_eq!(meta.error_message, "the schema was dropped");
        assert_eq!(meta.attempts, 1);
    }
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_batch_call_nobody_waits_for_is_dropped_with_abort_on_loss() {
    let broker = broker_with(&["a", "b"]);
    let (dropped, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (d, f, watch) = (dropped.clone(), finished.clone(), dropped.clone());
    let before_stop = Arc::new(AtomicUsize::new(0));
    let seen = before_stop.clone();
    let mut config = ackstack_core::ConsumerConfig::default();
    config.concurrency = 4;
    // Leases of 1 s, kept for at most 1 s: lost while the batch runs.
    config.lease.max_total = Duration::from_secs(1);
    config.lease.abort_on_loss = true;
    let source = broker
        .source("q")
        .visibility_timeout(Duration::from_secs(1))
        .poll_wait(Duration::from_millis(20));
    let consumer = Consumer::new(source).config(config);
    let status = consumer.status();
    let summary = consumer
        .run_batches_until(
            batch_handler_fn(move |batch: Batch| {
                let (guard, f) = (DropFlag(d.clone()), f.clone());
                async move {
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok(BatchResults::succeeded(batch.len()))
                }
            }),
            BatchConfig {
                max_size: 2,
                max_wait: Duration::from_millis(100),
            },
            async move {
                // Past the first call's loss, before any call could finish.
                tokio::time::sleep(Duration::from_secs(3)).await;
                seen.store(watch.load(Ordering::SeqCst), Ordering::SeqCst);
                drop(status);
            },
        )
        .await
        .unwrap();
    assert!(summary.leases_lost >= 2, "{summary:?}");
    assert_eq!(summary.acked, 0, "{summary:?}");
    assert!(
        before_stop.load(Ordering::SeqCst) >= 1,
        "the abandoned call was dropped once its deliveries' leases were lost, not at the end"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "no abandoned call ran on"
    );
}
