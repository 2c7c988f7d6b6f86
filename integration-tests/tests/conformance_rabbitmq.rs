//! The conformance suite against RabbitMQ at `AMQP_URL` (default the local server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_rabbitmq::{QueueType, RabbitConfig, RabbitPublisher, RabbitSource};
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all, unique_name};

struct Rabbit {
    queue_type: QueueType,
}

impl Rabbit {
    fn config(&self, queue: &TestQueue) -> RabbitConfig {
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let mut c = RabbitConfig::new(url, queue.name.clone());
        c.queue_type = self.queue_type;
        c.delay_buckets = [200, 500, 1000, 2000, 5000]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        c.poll_interval = Duration::from_millis(200);
        // The suite makes dozens of queues per run: they delete themselves once unused.
        // A run declares about three hundred queues (delay and dead-letter queues included).
        // RabbitMQ counts file handles for each, and once its budget (about 900 under the
        // usual limit of 1,024 open files) is spent it stops accepting connections: let the
        // queues go a minute after their check stopped using them.
        c.queue_expires = Some(Duration::from_secs(60));
        c
    }
}

impl Harness for Rabbit {
    type Source = RabbitSource;
    type Publisher = RabbitPublisher;

    fn name(&self) -> &'static str {
        match self.queue_type {
            QueueType::Classic => "rabbitmq (classic queue)",
            QueueType::Quorum => "rabbitmq (quorum queue)",
            _ => "rabbitmq",
        }
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        let queue = TestQueue {
            name: unique_name("conformance"),
            lease,
        };
        // Declares the work queue, its delay queues and its dead-letter queue.
        RabbitPublisher::connect(self.config(&queue)).await.unwrap();
        queue
    }

    async fn source(&self, queue: &TestQueue) -> RabbitSource {
        RabbitSource::connect(self.config(queue)).await.unwrap()
    }

    async fn publisher(&self, queue: &TestQueue) -> RabbitPublisher {
        RabbitPublisher::connect(self.config(queue)).await.unwrap()
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // `basic.get` consumes: take what the dead-letter queue holds.
        let publisher = self.publisher(queue).await;
        let mut found = Vec::new();
        while let Some(fetched) = publisher.get_dead_letter().await.unwrap() {
            found.push(
                DeadLetterCopy::from_headers(fetched.payload, fetched.headers)
                    .expect("dead letter carries metadata"),
            );
        }
        found
    }

    fn counts_redeliveries(&self) -> bool {
        // Classic queues do not count redeliveries; a quorum queue's x-delivery-count does,
        // but it rises for every prefetched message at every crash, so it is no attempt: a
        // redelivery runs alone as a suspect instead (docs/DESIGN.md).
        false
    }

    fn redelivery_wait(&self, _queue: &TestQueue) -> Duration {
        // Unacked deliveries return as soon as their channel closes.
        Duration::from_secs(3)
    }
}

/// Classic and quorum queues, one after the other: a run declares about a hundred queues, and
/// two runs at once overload a small broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_conforms_on_classic_and_quorum_queues() {
    let classic = run_all(Rabbit {
        queue_type: QueueType::Classic,
    })
    .await;
    let quorum = run_all(Rabbit {
        queue_type: QueueType::Quorum,
    })
    .await;
    classic.assert_passed();
    quorum.assert_passed();
}
