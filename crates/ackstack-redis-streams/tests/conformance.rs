//! The conformance suite against the Redis at `REDIS_URL` (default the local one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_redis_streams::redis::{self, Value};
use ackstack_redis_streams::{RedisStreamsConfig, RedisStreamsPublisher, RedisStreamsSource};
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all, unique_name};
use bytes::Bytes;

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

struct RedisStreams {
    conn: redis::aio::ConnectionManager,
}

impl RedisStreams {
    fn config(queue: &TestQueue) -> RedisStreamsConfig {
        let mut config = RedisStreamsConfig::new(url(), queue.name.clone());
        config.lease = queue.lease.max(Duration::from_secs(1));
        config.block = Duration::from_millis(500);
        config
    }
}

/// The bulk strings of an array reply.
fn strings(value: &Value) -> Vec<Bytes> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => Some(Bytes::from(b.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl Harness for RedisStreams {
    type Source = RedisStreamsSource;
    type Publisher = RedisStreamsPublisher;

    fn name(&self) -> &'static str {
        "redis streams"
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        let queue = TestQueue {
            name: unique_name("conformance"),
            lease,
        };
        // The group exists before anything is published.
        RedisStreamsSource::connect(RedisStreams::config(&queue))
            .await
            .unwrap();
        queue
    }

    async fn source(&self, queue: &TestQueue) -> RedisStreamsSource {
        RedisStreamsSource::connect(RedisStreams::config(queue))
            .await
            .unwrap()
    }

    async fn publisher(&self, queue: &TestQueue) -> RedisStreamsPublisher {
        RedisStreamsPublisher::new(self.conn.clone(), queue.name.clone())
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // Read and deleted, so that each copy is returned once.
        let dlq = RedisStreams::config(queue).dlq_stream();
        let mut conn = self.conn.clone();
        let entries: Value = redis::cmd("XRANGE")
            .arg(&dlq)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(entries) = entries else {
            return Vec::new();
        };
        let mut copies = Vec::new();
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let id = strings(&Value::Array(parts[..1].to_vec()));
            let fields = strings(&parts[1]);
            let mut payload = Bytes::new();
            let mut headers = ackstack_core::Headers::new();
            for pair in fields.chunks(2) {
                if pair[0].as_ref() == b"payload" {
                    payload = pair[1].clone();
                } else {
                    headers.append(
                        String::from_utf8_lossy(&pair[0]).into_owned(),
                        pair[1].clone(),
                    );
                }
            }
            let _: i64 = redis::cmd("XDEL")
                .arg(&dlq)
                .arg(id[0].as_ref())
                .query_async(&mut conn)
                .await
                .unwrap();
            copies.push(
                DeadLetterCopy::from_headers(payload, headers)
                    .expect("a dead letter carries metadata"),
            );
        }
        copies
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_conforms() {
    let conn = redis::Client::open(url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    run_all(RedisStreams { conn }).await.assert_passed();
}
