//! The conformance suite against SQS at `SQS_ENDPOINT` (default the local moto server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ackstack_core::Headers;
use ackstack_sqs::attrs::{DEAD_LETTER_ATTRIBUTE, DeadLetterRecord, attribute_bytes};
use ackstack_sqs::testing;
use ackstack_sqs::{SqsPublisher, SqsSource};
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all};
use aws_sdk_sqs::Client;

struct Sqs {
    client: Client,
    fifo: bool,
    queues: Mutex<HashMap<String, testing::TestQueue>>,
}

impl Sqs {
    fn queue(&self, queue: &TestQueue) -> testing::TestQueue {
        self.queues.lock().unwrap()[&queue.name].clone()
    }
}

impl Harness for Sqs {
    type Source = SqsSource;
    type Publisher = SqsPublisher;

    fn name(&self) -> &'static str {
        if self.fifo {
            "sqs (fifo queue)"
        } else {
            "sqs (standard queue)"
        }
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        let q = testing::TestQueue::create(&self.client, "conformance", self.fifo)
            .await
            .unwrap();
        let name = q.name.clone();
        self.queues.lock().unwrap().insert(name.clone(), q);
        TestQueue { name, lease }
    }

    async fn source(&self, queue: &TestQueue) -> SqsSource {
        let config = self.queue(queue).config(queue.lease);
        SqsSource::from_client(self.client.clone(), config)
            .await
            .unwrap()
    }

    async fn publisher(&self, queue: &TestQueue) -> SqsPublisher {
        SqsPublisher::new(self.client.clone(), self.queue(queue).url)
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // Receive-and-delete consumes; one second of long polls.
        let q = self.queue(queue);
        let messages = q
            .read_dead_letters(&self.client, usize::MAX, Duration::from_secs(1))
            .await
            .unwrap();
        messages
            .into_iter()
            .map(|m| {
                let attrs = m.message_attributes.clone().unwrap_or_default();
                let record = DeadLetterRecord::from_attributes(&attrs)
                    .expect("dead letter carries metadata");
                let headers: Headers = attrs
                    .iter()
                    .filter(|(name, _)| name.as_str() != DEAD_LETTER_ATTRIBUTE)
                    .map(|(name, value)| (name.clone(), attribute_bytes(value)))
                    .collect();
                DeadLetterCopy {
                    payload: m.body.unwrap_or_default().into(),
                    headers,
                    metadata: record.metadata,
                }
            })
            .collect()
    }

    fn preserves_key_order(&self) -> bool {
        // Standard queues deliver in no particular order; FIFO queues keep each group's order.
        self.fifo
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_standard_queue_conforms() {
    run_all(Sqs {
        client: testing::client().await,
        fifo: false,
        queues: Mutex::default(),
    })
    .await
    .assert_passed();
}

/// FIFO queues keep each message group's order: the ordering check applies there. (The rest of
/// the suite assumes independent messages, which a FIFO queue's one default group is not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_fifo_queue_keeps_per_key_order() {
    let harness = std::sync::Arc::new(Sqs {
        client: testing::client().await,
        fifo: true,
        queues: Mutex::default(),
    });
    let verdict = ackstack_testkit::checks::per_key_ordering(harness)
        .await
        .unwrap();
    assert_eq!(verdict, ackstack_testkit::checks::Verdict::Passed);
}
