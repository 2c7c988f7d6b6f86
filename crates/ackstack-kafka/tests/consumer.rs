//! End to end through `ackstack_core::Consumer`: in-place retry, dead-letter, commits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::dedup::{BoxFuture, Claim, DedupError};
use ackstack_core::{Backoff, Consumer, DeadLetterMetadata, HandlerError, handler_fn};
use ackstack_kafka::{KafkaSource, read_topic};
use ackstack_testkit::unique_name;
use common::kafka;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_retries_in_place_dead_letters_and_commits_everything() {
    let k = kafka();
    let topic = unique_name("e2e");
    let group = unique_name("g");
    k.create_topic(&topic, 2).await;
    let config = k.config(&group, &topic);
    k.create_topic(&config.dlq_topic(), 1).await;
    const N: usize = 60;
    k.produce(&topic, N, 2).await;

    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let finished = Arc::new(Notify::new());
    let handler = {
        let attempts = attempts.clone();
        let finished = finished.clone();
        handler_fn(move |d, _cx| {
            let attempts = attempts.clone();
            let finished = finished.clone();
            async move {
                let body = String::from_utf8_lossy(&d.payload).to_string();
                let n = {
                    let mut a = attempts.lock().unwrap();
                    let n = {
                        let n = a.entry(body.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if a.len() == N {
                        finished.notify_one();
                    }
                    n
                };
                match body.as_str() {
                    "m-5" => Err(HandlerError::permanent("poison")),
                    "m-7" if n < 3 => Err(HandlerError::transient("flaky")),
                    _ => Ok(()),
                }
            }
        })
    };
    let source = KafkaSource::new(&config).unwrap();
    let consumer = Consumer::new(source)
        .concurrency(8)
        .backoff(
            Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter(),
        )
        .max_attempts(5);
    let shutdown = {
        let finished = finished.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), finished.notified()).await;
            // Let the last retries and the dead-letter settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        consumer.run_until(handler, shutdown),
    )
    .await
    .expect("run ends")
    .unwrap();
    assert_eq!(attempts.lock().unwrap().len(), N, "{summary:?}");
    assert_eq!(attempts.lock().unwrap()["m-7"], 3, "retried in place");
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(summary.ack_failures, 0, "{summary:?}");

    let per_partition = (N / 2) as i64;
    assert_eq!(
        k.committed(&group, &topic, 2).await,
        vec![per_partition, per_partition]
    );
    let dlq = read_topic(&k.brokers, &config.dlq_topic(), 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(&dlq[0].payload[..], b"m-5");
    let meta = DeadLetterMetadata::from_headers(&dlq[0].headers).unwrap();
    assert_eq!(meta.error_message, "poison");
}

/// A dedup store that never answers for one key (as if down for it) and is an in-memory
/// store for the others.
struct DownFor {
    key: &'static [u8],
    inner: ackstack_core::MemoryDedupStore,
}

impl ackstack_core::DedupStore for DownFor {
    fn claim<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        if key == self.key {
            return Box::pin(async { Err(DedupError("store unreachable for this key".into())) });
        }
        self.inner.claim(key, token, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        self.inner.complete(key, token, ttl)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_released_at_shutdown_never_rewinds_its_partition_past_the_drain() {
    // One partition: m-0 is slow and finishes during the drain, m-1 waits for its dedup store
    // (down for its key) and is given back at shutdown, m-2.. succeed at once. The final
    // commit must reach m-1 (m-0 done), and m-0 must finish uncancelled.
    let k = kafka();
    let topic = unique_name("release-at-shutdown");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    let config = k.config(&group, &topic);
    const N: usize = 10;
    k.produce(&topic, N, 1).await;

    let fast_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow_started = Arc::new(Notify::new());
    let slow_cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow_finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (fast_done, slow_started) = (fast_done.clone(), slow_started.clone());
        let (slow_cancelled, slow_finished) = (slow_cancelled.clone(), slow_finished.clone());
        handler_fn(move |d, cx| {
            let (fast_done, slow_started) = (fast_done.clone(), slow_started.clone());
            let (slow_cancelled, slow_finished) = (slow_cancelled.clone(), slow_finished.clone());
            async move {
                if &d.payload[..] == b"m-0" {
                    slow_started.notify_one();
                    tokio::select! {
                        _ = cx.cancelled() => slow_cancelled.store(true, Ordering::SeqCst),
                        _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
                    }
                    slow_finished.store(true, Ordering::SeqCst);
                } else {
                    fast_done.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }
        })
    };
    let consumer = Consumer::new(KafkaSource::new(&config).unwrap())
        .concurrency(16)
        .ordering(ackstack_core::KeyOrdering::None)
        .dedup(
            DownFor {
                key: b"1",
                inner: ackstack_core::MemoryDedupStore::new(),
            },
            ackstack_core::DedupKey::Header("seq".into()),
        );
    let shutdown = {
        let fast_done = fast_done.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), slow_started.notified())
                .await
                .expect("m-0 started");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while fast_done.load(Ordering::SeqCst) < N - 2 {
                assert!(tokio::time::Instant::now() < deadline, "m-2.. handled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(90),
        consumer.run_until(handler, shutdown),
    )
    .await
    .expect("run ends")
    .unwrap();
    assert!(slow_finished.load(Ordering::SeqCst), "{summary:?}");
    assert!(
        !slow_cancelled.load(Ordering::SeqCst),
        "m-0 was cancelled by a rewind during the drain"
    );
    assert_eq!(
        k.committed(&group, &topic, 1).await,
        vec![1],
        "the final commit stops right before the released m-1, and not below it: {summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_shows_in_status_and_health_and_consuming_resumes() {
    // The mock cluster's only broker goes down while the consumer runs: receives fail, the
    // status counts them and health turns degraded, then unhealthy; once the broker is back,
    // the failures clear and new records are consumed.
    let k = kafka();
    if k.mock().is_none() {
        eprintln!("skipped: a real cluster (KAFKA_BROKERS) cannot be taken down from here");
        return;
    }
    let topic = unique_name("unreachable");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 5, 1).await;
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = handled.clone();
    let mut config = ackstack_core::ConsumerConfig::default();
    config.health.unhealthy_after = Duration::from_secs(2);
    let consumer = Consumer::new(KafkaSource::new(&k.config(&group, &topic)).unwrap())
        .config(config)
        .backoff(
            Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter(),
        );
    let status = consumer.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let counted = handled.clone();
    // The mock cluster cannot move between threads: the consumer runs in a task of its own,
    // and this test takes the broker down and up.
    let run = tokio::spawn(consumer.run_until(
        handler_fn(move |_d, _cx| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
        async move {
            let _ = stopped.await;
        },
    ));
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    until("the first records", || h.load(Ordering::SeqCst) == 5).await;
    k.mock().unwrap().broker_down(1).unwrap();
    until("receive failures while the broker is down", || {
        status.receive_failures() > 0
    })
    .await;
    until("unhealthy after 2 s unreachable", || {
        status.health().level == ackstack_core::HealthLevel::Unhealthy
    })
    .await;
    let mut seen = vec![format!("{:?}", status.health())];
    k.mock().unwrap().broker_up(1).unwrap();
    until("the failures clear once the broker is back", || {
        status.receive_failures() == 0
    })
    .await;
    k.produce(&topic, 5, 1).await;
    until("records produced after the outage", || {
        h.load(Ordering::SeqCst) >= 10
    })
    .await;
    seen.push(format!("{:?}", status.health()));
    let _ = stop.send(());
    let summary = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("run ends")
        .unwrap()
        .unwrap();
    assert!(seen[0].contains("BrokerUnreachable"), "{seen:?}");
    assert!(summary.receive_errors > 0, "{summary:?}");
    assert!(
        !seen[1].contains("BrokerUnreachable"),
        "the broker is no longer reported once it answers: {seen:?}"
    );
}
