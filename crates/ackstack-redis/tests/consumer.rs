//! End to end: `ackstack_core::Consumer` on the in-memory broker, deduplicating through
//! [`RedisDedupStore`] on a real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`; the restart
//! test runs its own `redis-server` on a free port).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ackstack_core::dedup::DedupStore;
use ackstack_core::memory::MemoryBroker;
use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, DedupKey, HandlerError, Message, handler_fn,
};
mod common;
use common::{OwnRedis, free_port, redis_url, unique_prefix};

use ackstack_redis::{RedisDedupConfig, RedisDedupStore};

fn fast_retry() -> Backoff {
    Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter()
}

fn config() -> ConsumerConfig {
    let mut config = ConsumerConfig::default();
    config.dedup.claim_lease = Duration::from_secs(2);
    config.dedup.store_retry_after = Duration::from_millis(100);
    config
}

/// Runs a consumer of `broker`'s queue `q` deduplicating by message id in `store` until the
/// returned `Notify` is notified.
fn spawn_consumer(
    broker: &MemoryBroker,
    store: Arc<dyn DedupStore>,
    handler: impl ackstack_core::Handler,
    concurrency: usize,
    max_attempts: u32,
) -> (
    Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<ackstack_core::Summary>,
) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let stop_signal = stop.clone();
    let source = broker.source("q");
    let consumer = tokio::spawn(async move {
        Consumer::new(source)
            .config(config())
            .concurrency(concurrency)
            .backoff(fast_retry())
            .max_attempts(max_attempts)
            .dedup_shared(store, DedupKey::MessageId)
            .run_until(handler, async move { stop_signal.notified().await })
            .await
            .unwrap()
    });
    (stop, consumer)
}

/// Resolves when `done` holds, or after 20 s (the test's assertions then fail).
async fn until(done: impl Fn() -> bool + Send + 'static) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn duplicates_run_the_handler_once_and_failed_attempts_do_not_mark() {
    let store = RedisDedupStore::connect(
        RedisDedupConfig::new(redis_url()).key_prefix(unique_prefix("e2e-dups")),
    )
    .await
    .unwrap();
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
    // Fails on its first attempt: must still be processed (marking happens after success).
    broker.publish(
        "q",
        Message::new("flaky").header("idempotency-key", "order-3"),
    );
    let effects = Arc::new(AtomicU32::new(0));
    let e = effects.clone();
    let handler = handler_fn(move |d, _cx| {
        let e = e.clone();
        async move {
            if d.payload.as_ref() == b"flaky" && d.attempt == 1 {
                return Err(HandlerError::transient("first attempt fails"));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            e.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let b = broker.clone();
    let summary = Consumer::new(broker.source("q"))
        .config(config())
        .concurrency(16)
        .backoff(fast_retry())
        .max_attempts(100)
        .dedup(store.clone(), DedupKey::Header("idempotency-key".into()))
        .run_until(handler, until(move || b.is_empty("q")))
        .await
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 3, "one effect per key");
    assert_eq!(summary.deduplicated, 9, "{summary:?}");
    assert!(broker.dead_letters("q").is_empty());
    let stats = store.stats();
    assert!(stats.operations > 0 && stats.round_trips > 0, "{stats:?}");
}

#[tokio::test]
async fn two_consumers_sharing_redis_process_each_key_once() {
    // Two consumers (think: two processes) each receive a copy of every message.
    let prefix = unique_prefix("e2e-shared");
    let keys = 50;
    let effects = Arc::new(AtomicU32::new(0));
    let mut runs = Vec::new();
    for _ in 0..2 {
        let store =
            RedisDedupStore::connect(RedisDedupConfig::new(redis_url()).key_prefix(prefix.clone()))
                .await
                .unwrap();
        let broker = MemoryBroker::new();
        for k in 0..keys {
            broker.publish("q", Message::new("m").message_id(format!("msg-{k}")));
        }
        let e = effects.clone();
        let handler = handler_fn(move |_d, _cx| {
            let e = e.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                e.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let b = broker.clone();
        runs.push(tokio::spawn(async move {
            let summary = Consumer::new(broker.source("q"))
                .config(config())
                .concurrency(8)
                .backoff(fast_retry())
                .max_attempts(100)
                .dedup(store, DedupKey::MessageId)
                .run_until(handler, until(move || b.is_empty("q")))
                .await
                .unwrap();
            assert!(broker.dead_letters("q").is_empty());
            summary
        }));
    }
    let mut deduplicated = 0;
    for run in runs {
        deduplicated += run.await.unwrap().deduplicated;
    }
    assert_eq!(
        effects.load(Ordering::SeqCst),
        keys,
        "each key handled once in total"
    );
    assert_eq!(
        deduplicated,
        u64::from(keys),
        "every second copy was deduplicated"
    );
}

#[tokio::test]
async fn a_running_consumer_fails_closed_while_redis_is_down_and_recovers() {
    let port = free_port();
    let mut server = OwnRedis::start(port);
    server.wait_ready().await;
    let store: Arc<dyn DedupStore> = Arc::new(
        RedisDedupStore::connect(
            RedisDedupConfig::new(format!("redis://127.0.0.1:{port}"))
                .key_prefix(unique_prefix("e2e-restart"))
                .timeout(Duration::from_millis(300))
                .connect_timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap(),
    );

    let broker = MemoryBroker::new();
    let effects = Arc::new(AtomicU32::new(0));
    let e = effects.clone();
    let handler = handler_fn(move |_d, _cx| {
        let e = e.clone();
        async move {
            e.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let (stop, consumer) = spawn_consumer(&broker, store, handler, 4, 10_000);
    let wait_effects = |n: u32| {
        let effects = effects.clone();
        until(move || effects.load(Ordering::SeqCst) >= n)
    };

    broker.publish("q", Message::new("m").message_id("one"));
    wait_effects(1).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);

    server.kill();
    broker.publish("q", Message::new("m").message_id("two"));
    broker.publish("q", Message::new("m").message_id("three"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "fail-closed: the handler is not called while the store is down"
    );
    assert_eq!(broker.len("q"), 2, "the messages are kept for later");
    assert!(broker.dead_letters("q").is_empty());

    // Redis comes back on the same port: the same consumer and store carry on.
    let server = OwnRedis::start(port);
    server.wait_ready().await;
    wait_effects(3).await;
    assert_eq!(effects.load(Ordering::SeqCst), 3);
    // A duplicate after recovery is recognised.
    broker.publish("q", Message::new("m").message_id("two"));
    let b = broker.clone();
    until(move || b.is_empty("q")).await;
    assert!(broker.is_empty("q"));

    stop.notify_one();
    let summary = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("consumer stopped")
        .unwrap();
    assert_eq!(effects.load(Ordering::SeqCst), 3, "{summary:?}");
    assert_eq!(summary.deduplicated, 1, "{summary:?}");
    assert_eq!(
        summary.retried, 0,
        "held in process while redis was down, not retried: {summary:?}"
    );
    assert!(broker.dead_letters("q").is_empty());
}

#[tokio::test]
async fn a_frozen_redis_uses_up_no_attempts() {
    // Redis answers nothing for 40 s (SIGSTOP) in the middle of a run. Messages keep arriving
    // before, during and after; every handler fails its first call. With two attempts allowed,
    // a store outage counted as attempts would dead-letter messages on their first real
    // failure.
    let port = free_port();
    let server = OwnRedis::start(port);
    server.wait_ready().await;
    let store = Arc::new(
        RedisDedupStore::connect(
            RedisDedupConfig::new(server.url())
                .key_prefix(unique_prefix("e2e-freeze"))
                .timeout(Duration::from_millis(500))
                .connect_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap(),
    );
    let broker = MemoryBroker::new();
    let calls: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let c = calls.clone();
    let handler = handler_fn(move |d, _cx| {
        let first = {
            let mut calls = c.lock().unwrap();
            let n = calls
                .entry(d.message_id.clone().unwrap_or_default())
                .or_insert(0);
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
    });
    let (stop, consumer) = spawn_consumer(&broker, store, handler, 8, 2);

    let total = 30;
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for i in 0..total {
                broker.publish("q", Message::new("m").message_id(format!("order-{i}")));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.signal("STOP");
    tokio::time::sleep(Duration::from_secs(40)).await;
    server.signal("CONT");
    publisher.await.unwrap();
    let b = broker.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.is_empty("q") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.notify_one();
    let summary = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("consumer stopped")
        .unwrap();
    assert!(broker.is_empty("q"), "every message acked: {summary:?}");
    assert!(broker.dead_letters("q").is_empty(), "{summary:?}");
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), total, "every message handled");
    for (id, n) in calls.iter() {
        assert!(*n <= 2, "{id} handled {n} times: {summary:?}");
    }
    drop(server);
}
