//! Shared test setup: a mock cluster (or `KAFKA_BROKERS`), producing and reading committed
//! offsets.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::{Duration, Instant};

use ackstack_core::{Received, Source};
use ackstack_kafka::{KafkaConfig, KafkaSource, KafkaToken};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A broker to test against: the mock cluster unless `KAFKA_BROKERS` is set.
pub struct Kafka {
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pub brokers: String,
}

pub fn kafka() -> Kafka {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) if !brokers.trim().is_empty() => Kafka {
            mock: None,
            brokers,
        },
        _ => {
            let mock = MockCluster::new(1).unwrap();
            let brokers = mock.bootstrap_servers();
            Kafka {
                mock: Some(mock),
                brokers,
            }
        }
    }
}

impl Kafka {
    /// The mock cluster, for fault injection (`None` against a real cluster).
    pub fn mock(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        self.mock.as_ref()
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        if let Some(mock) = &self.mock {
            mock.create_topic(topic, partitions, 1).unwrap();
            return;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let _ = admin.create_topics(&[t], &AdminOptions::new()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    pub fn config(&self, group: &str, topic: &str) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.brokers, group, topic);
        c.session_timeout = Duration::from_secs(6);
        c.commit_interval = Duration::from_millis(200);
        c
            // Small fetches keep the mock responsive.
            .property("fetch.wait.max.ms", "100")
            .property("heartbeat.interval.ms", "500")
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Produces `n` records `"m-<i>"` to `partition` (or round robin over `partitions`).
    pub async fn produce(&self, topic: &str, n: usize, partitions: i32) {
        let producer = self.producer();
        let mut futures = Vec::new();
        for i in 0..n {
            let payload = format!("m-{i}");
            let key = format!("k-{i}");
            let record = FutureRecord::to(topic)
                .payload(&payload)
                .key(&key)
                .partition((i as i32) % partitions)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "seq",
                    value: Some(&i.to_string()),
                }));
            futures.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for f in futures {
            tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .expect("delivery report in time")
                .expect("delivery future")
                .expect("delivered");
        }
    }

    /// The group's committed offset of each of `partitions` (-1 when none).
    pub async fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let out = tokio::task::spawn_blocking(move || {
            consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .unwrap()
        })
        .await
        .unwrap();
        (0..partitions)
            .map(|p| match out.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => o,
                _ => -1,
            })
            .collect()
    }
}

/// Receives until `n` records arrived or `within` passed.
pub async fn receive_n(
    source: &mut KafkaSource,
    n: usize,
    within: Duration,
) -> Vec<Received<KafkaToken>> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let batch = source.receive(n - out.len()).await.unwrap();
        out.extend(batch);
    }
    out
}

/// Receives for `for_` and returns whatever came.
pub async fn receive_for(source: &mut KafkaSource, for_: Duration) -> Vec<Received<KafkaToken>> {
    let deadline = Instant::now() + for_;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        out.extend(source.receive(100).await.unwrap());
    }
    out
}

/// Waits until `cond` holds, or panics after `within`.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
