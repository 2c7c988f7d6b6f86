//! The conformance suite against Kafka: librdkafka's mock cluster, or `KAFKA_BROKERS`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use ackstack_kafka::{KafkaConfig, KafkaPublisher, KafkaSource, read_topic};
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all, unique_name};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Requests to create a topic (name, partitions) with where to send the answer.
type TopicRequests = mpsc::Sender<(String, i32, mpsc::Sender<Result<(), String>>)>;

struct Kafka {
    brokers: String,
    /// Creates topics on the mock cluster, which lives on its own thread (it is not `Send`).
    mock: Option<Mutex<TopicRequests>>,
    /// How many dead letters of each queue `read_dead_letters` has returned.
    returned: Mutex<HashMap<String, usize>>,
}

/// How long one read of a dead-letter topic waits for a record.
const READ_WINDOW: Duration = Duration::from_secs(10);

/// Starts a mock cluster on a thread of its own; returns its bootstrap servers and a channel
/// that creates topics on it. The cluster stops when the channel is dropped.
fn start_mock() -> (String, TopicRequests) {
    let (tx, rx) = mpsc::channel::<(String, i32, mpsc::Sender<Result<(), String>>)>();
    let (boot_tx, boot_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
        boot_tx.send(cluster.bootstrap_servers()).unwrap();
        while let Ok((topic, partitions, reply)) = rx.recv() {
            let result = cluster
                .create_topic(&topic, partitions, 1)
                .map_err(|e| e.to_string());
            let _ = reply.send(result);
        }
    });
    (boot_rx.recv().unwrap(), tx)
}

impl Kafka {
    fn config(&self, queue: &TestQueue) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.brokers, format!("{}-group", queue.name), &queue.name);
        c.session_timeout = Duration::from_secs(6);
        c.commit_interval = Duration::from_millis(100);
        // Partition ownership is Kafka's lease: check it as often as the suite's lease says.
        c.ownership_check = queue.lease;
        c.property("fetch.wait.max.ms", "100")
            .property("heartbeat.interval.ms", "500")
    }
}

impl Harness for Kafka {
    type Source = KafkaSource;
    type Publisher = KafkaPublisher;

    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        let name = unique_name("conformance");
        let dlq = format!("{name}-dlq");
        if let Some(mock) = &self.mock {
            for (topic, partitions) in [(name.clone(), 2), (dlq, 1)] {
                let (reply, answer) = mpsc::channel();
                mock.lock()
                    .unwrap()
                    .send((topic, partitions, reply))
                    .unwrap();
                answer.recv().unwrap().unwrap();
            }
            return TestQueue { name, lease };
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let topics = [
            NewTopic::new(&name, 2, TopicReplication::Fixed(1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
        ];
        for result in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            result.unwrap();
        }
        TestQueue { name, lease }
    }

    async fn source(&self, queue: &TestQueue) -> KafkaSource {
        KafkaSource::new(&self.config(queue)).unwrap()
    }

    async fn publisher(&self, queue: &TestQueue) -> KafkaPublisher {
        KafkaPublisher::new(&self.brokers, &queue.name).unwrap()
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // Each read is a new reader from the earliest offset, which first joins its group
        // (seconds): it waits for one record past those returned before, and skips those.
        let seen = self.returned.lock().unwrap().get(&queue.name).copied();
        let seen = seen.unwrap_or_default();
        let dlq = format!("{}-dlq", queue.name);
        let records = read_topic(&self.brokers, &dlq, seen + 1, READ_WINDOW)
            .await
            .unwrap();
        let new: Vec<DeadLetterCopy> = records
            .into_iter()
            .skip(seen)
            .map(|d| DeadLetterCopy::from_headers(d.payload, d.headers).expect("metadata"))
            .collect();
        *self
            .returned
            .lock()
            .unwrap()
            .entry(queue.name.clone())
            .or_default() += new.len();
        new
    }

    fn counts_redeliveries(&self) -> bool {
        false
    }

    fn redelivery_wait(&self, _queue: &TestQueue) -> Duration {
        // A new group member needs a rebalance before it reads from the committed offset.
        Duration::from_secs(10)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_conforms() {
    let kafka = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) if !brokers.trim().is_empty() => Kafka {
            brokers,
            mock: None,
            returned: Mutex::default(),
        },
        _ => {
            let (brokers, topics) = start_mock();
            Kafka {
                brokers,
                mock: Some(Mutex::new(topics)),
                returned: Mutex::default(),
            }
        }
    };
    run_all(kafka).await.assert_passed();
}
