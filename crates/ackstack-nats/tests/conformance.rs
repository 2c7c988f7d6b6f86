//! The conformance suite against the NATS server at `NATS_URL` (default the local one, with
//! JetStream).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_nats::async_nats::jetstream::{self, consumer::pull};
use ackstack_nats::{NatsConfig, NatsPublisher, NatsSource};
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all, unique_name};
use futures::StreamExt;

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

struct Nats {
    client: ackstack_nats::async_nats::Client,
}

impl Nats {
    fn config(queue: &TestQueue) -> NatsConfig {
        let mut config = NatsConfig::new(url(), queue.name.clone());
        config.ack_wait = queue.lease.max(Duration::from_secs(1));
        config.fetch_wait = Duration::from_millis(500);
        config
    }
}

impl Harness for Nats {
    type Source = NatsSource;
    type Publisher = NatsPublisher;

    fn name(&self) -> &'static str {
        "nats jetstream"
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        let queue = TestQueue {
            name: unique_name("conformance").replace(['.', '*', '>'], "_"),
            lease,
        };
        // The stream, its dead-letter stream and the consumer exist before anything is
        // published.
        NatsSource::from_client(self.client.clone(), Nats::config(&queue))
            .await
            .unwrap();
        queue
    }

    async fn source(&self, queue: &TestQueue) -> NatsSource {
        NatsSource::from_client(self.client.clone(), Nats::config(queue))
            .await
            .unwrap()
    }

    async fn publisher(&self, queue: &TestQueue) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), queue.name.clone())
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // A durable reader of the dead-letter stream that acks what it read.
        let config = Nats::config(queue);
        let js = jetstream::new(self.client.clone());
        let stream = js.get_stream(config.dlq_stream()).await.unwrap();
        let reader = stream
            .get_or_create_consumer(
                "reader",
                pull::Config {
                    durable_name: Some("reader".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut batch = reader
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        let mut copies = Vec::new();
        while let Some(Ok(message)) = batch.next().await {
            message.ack().await.unwrap();
            let mut headers = ackstack_core::Headers::new();
            if let Some(map) = &message.headers {
                for (name, values) in map.iter() {
                    for value in values {
                        headers.append(name.to_string(), value.as_str().to_string());
                    }
                }
            }
            copies.push(
                DeadLetterCopy::from_headers(message.payload.clone(), headers)
                    .expect("a dead letter carries metadata"),
            );
        }
        copies
    }

    fn preserves_key_order(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_conforms() {
    let client = ackstack_nats::async_nats::connect(url()).await.unwrap();
    run_all(Nats { client }).await.assert_passed();
}
