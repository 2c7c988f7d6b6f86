//! Shared test setup: the broker's URL, a config for a fresh queue, and receiving until enough
//! deliveries arrived.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::{Duration, Instant};

use ackstack_core::{Delivery, Failure, Received, Settle, Settled, Source, SourceError};
use ackstack_rabbitmq::{RabbitConfig, RabbitSettler, RabbitSource, RabbitToken};
use ackstack_testkit::unique_name;

/// `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test or run uses: `ackstack-test-<prefix>-<unique>`.
pub fn unique(prefix: &str) -> String {
    unique_name(&format!("ackstack-test-{prefix}"))
}

/// A config on `uri` for a fresh queue named by [`unique`], whose connection has the queue's
/// name (so that `rabbitmqctl` can find it), with delay buckets of `delays_ms`, 200 ms polls,
/// and a queue that deletes itself 300 s after its last use, so that runs leave nothing behind.
pub fn config(uri: String, prefix: &str, delays_ms: &[u64]) -> RabbitConfig {
    let queue = unique(prefix);
    let mut c = RabbitConfig::new(uri, queue.clone());
    c.connection_name = Some(queue);
    c.delay_buckets = delays_ms
        .iter()
        .copied()
        .map(Duration::from_millis)
        .collect();
    c.poll_interval = Duration::from_millis(200);
    c.queue_expires = Some(Duration::from_secs(300));
    c
}

/// Receives until `n` deliveries arrived or `within` passed; disconnections are retried.
pub async fn receive_n(
    source: &mut RabbitSource,
    n: usize,
    within: Duration,
) -> Vec<Received<RabbitToken>> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        match source.receive(n - out.len()).await {
            Ok(batch) => out.extend(batch),
            Err(SourceError::Disconnected(_)) => continue,
            Err(e) => panic!("receive failed: {e}"),
        }
    }
    out
}

/// Retries `delivery` after `delay` and acks the original, as the runner does with a retry
/// whose copy the broker holds (`Settled::AckOriginal`).
pub async fn retry_and_ack(
    settler: &RabbitSettler,
    token: RabbitToken,
    delivery: &Delivery,
    delay: Duration,
    failure: &Failure,
) {
    let settled = settler
        .retry(token, delivery, delay, failure)
        .await
        .unwrap();
    let Settled::AckOriginal(token) = settled else {
        panic!("expected AckOriginal");
    };
    assert!(settler.ack(vec![token]).await.failed.is_empty());
}
