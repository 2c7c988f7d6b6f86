//! Set-up shared by the broker tests that are not conformance suites.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// `AMQP_URL`, or the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A librdkafka mock cluster with `topic` of `partitions` partitions, on a thread of its own
/// (it is not `Send`): its bootstrap servers, and a sender whose drop stops it.
pub fn mock_cluster(topic: &str, partitions: i32) -> (String, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel();
    let (stop, stopped) = mpsc::channel::<()>();
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
        cluster.create_topic(&topic, partitions, 1).unwrap();
        tx.send(cluster.bootstrap_servers()).unwrap();
        let _ = stopped.recv();
    });
    (rx.recv().unwrap(), stop)
}

/// Waits until `done` holds, for at most `limit`; returns whether it did.
pub async fn eventually(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
