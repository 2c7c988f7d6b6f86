//! Adaptive concurrency against a simulated downstream whose latency rises, and which starts
//! refusing, once more calls run at once than it has capacity for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::{
    AdaptiveConcurrency, Backoff, Consumer, ConsumerConfig, HandlerError, MemoryBroker, Message,
    Status, handler_fn,
};

/// A downstream with `capacity` slots: a call takes 5 ms while no more than `capacity` run,
/// longer with the square of the overload beyond it, and fails past twice the capacity.
#[derive(Default)]
struct Downstream {
    capacity: AtomicUsize,
    inside: AtomicUsize,
    calls: AtomicU64,
    refused: AtomicU64,
}

impl Downstream {
    async fn call(&self) -> Result<(), HandlerError> {
        let inside = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let capacity = self.capacity.load(Ordering::Relaxed).max(1);
        let result = if inside > 2 * capacity {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Err(HandlerError::transient("downstream overloaded"))
        } else {
            let overload = (inside as f64 / capacity as f64).max(1.0);
            tokio::time::sleep(Duration::from_secs_f64(0.005 * overload * overload)).await;
            Ok(())
        };
        self.inside.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Calls and refusals so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// The share of calls refused while `during` runs.
async fn refused_share(downstream: &Downstream, during: Duration) -> f64 {
    let (calls, refused) = downstream.counts();
    tokio::time::sleep(during).await;
    let (calls2, refused2) = downstream.counts();
    (refused2 - refused) as f64 / (calls2 - calls).max(1) as f64
}

/// Keeps the queue stocked until `stop`.
fn keep_stocked(broker: MemoryBroker, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            while broker.len("q") < 2_000 {
                broker.publish("q", Message::new("work"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Runs a consumer calling `downstream` with `config`; returns its status and a stop switch.
fn start(
    config: ConsumerConfig,
    downstream: Arc<Downstream>,
) -> (Status, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let broker = MemoryBroker::new();
    let stop = Arc::new(AtomicBool::new(false));
    keep_stocked(broker.clone(), stop.clone());
    let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
        .config(config)
        .max_attempts(1_000)
        .backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(20),
        ));
    let status = consumer.status();
    let s = stop.clone();
    let run = tokio::spawn(async move {
        consumer
            .run_until(
                handler_fn(move |_d, _cx| {
                    let downstream = downstream.clone();
                    async move { downstream.call().await }
                }),
                async move {
                    while !s.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            )
            .await
            .unwrap();
    });
    (status, stop, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_falls_when_the_downstream_struggles_and_recovers_with_it() {
    // Fixed at 64, the downstream (capacity 4) refuses most calls: what adaptive prevents.
    let fixed = Arc::new(Downstream::default());
    fixed.capacity.store(4, Ordering::Relaxed);
    let mut config = ConsumerConfig::default();
    config.concurrency = 64;
    let (status, stop, run) = start(config, fixed.clone());
    let fixed_share = refused_share(&fixed, Duration::from_secs(2)).await;
    assert_eq!(status.concurrency_limit(), None);
    stop.store(true, Ordering::Relaxed);
    run.await.unwrap();
    assert!(fixed_share > 0.5, "fixed concurrency refused {fixed_share}");

    let downstream = Arc::new(Downstream::default());
    downstream.capacity.store(4, Ordering::Relaxed);
    let mut config = ConsumerConfig::default();
    let mut adaptive = AdaptiveConcurrency::new(1, 64);
    adaptive.round = Duration::from_millis(250);
    config.adaptive_concurrency = Some(adaptive);
    let (status, stop, run) = start(config, downstream.clone());
    // It finds the capacity, then stays near it with few refusals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut limits = Vec::new();
    let share = {
        let sampling = async {
            for _ in 0..20 {
                limits.push(status.concurrency_limit().unwrap());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let (share, ()) =
            tokio::join!(refused_share(&downstream, Duration::from_secs(2)), sampling);
        share
    };
    assert!(share < 0.1, "refused {share} of calls at limits {limits:?}");
    let worst = *limits.iter().max().unwrap();
    assert!(
        (1..=12).contains(&worst),
        "the limit stayed near the capacity of 4: {limits:?}"
    );

    // The downstream recovers (capacity 40): the limit grows again.
    downstream.capacity.store(40, Ordering::Relaxed);
    let mut grown = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        grown = status.concurrency_limit().unwrap();
        if grown >= 24 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    run.await.unwrap();
    assert!(grown >= 24, "the limit only grew to {grown}");
}

#[test]
fn settings_that_cannot_work_are_refused() {
    let mut config = ConsumerConfig::default();
    for bad in [
        AdaptiveConcurrency::new(0, 4),
        AdaptiveConcurrency::new(5, 4),
        {
            let mut a = AdaptiveConcurrency::new(1, 4);
            a.backoff = 1.0;
            a
        },
    ] {
        config.adaptive_concurrency = Some(bad);
        assert!(
            matches!(
                config.validate(),
                Err(ackstack_core::ConfigError::AdaptiveConcurrency(_))
            ),
            "{bad:?}"
        );
    }
    config.adaptive_concurrency = Some(AdaptiveConcurrency::new(2, 8));
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(config.max_concurrency(), 8);
}
