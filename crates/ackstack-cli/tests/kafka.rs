//! `ackstack dlq` on Kafka: librdkafka's mock cluster, hosted by this test process and handed
//! to the command as its bootstrap servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use ackstack_core::{Consumer, Headers, Message, Publish, handler_fn};
use ackstack_kafka::{KafkaConfig, KafkaPublisher, KafkaSource, from_record};
use ackstack_testkit::unique_name;
use bytes::Bytes;
use common::Fixture;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

struct Kafka {
    brokers: String,
    topic: String,
    /// Reads the work topic across calls (its own group).
    drain: Mutex<BaseConsumer>,
    _cluster: mpsc::Sender<()>,
}

impl Kafka {
    fn new() -> Kafka {
        let topic = unique_name("cli");
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let t = topic.clone();
        std::thread::spawn(move || {
            let cluster: MockCluster<'static, DefaultProducerContext> =
                MockCluster::new(1).unwrap();
            cluster.create_topic(&t, 2, 1).unwrap();
            cluster.create_topic(&format!("{t}-dlq"), 2, 1).unwrap();
            tx.send(cluster.bootstrap_servers()).unwrap();
            let _ = stopped.recv();
        });
        let brokers = rx.recv().unwrap();
        let drain: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("{topic}-drain"))
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        drain.subscribe(&[&topic]).unwrap();
        Kafka {
            brokers,
            topic,
            drain: Mutex::new(drain),
            _cluster: stop,
        }
    }
}

impl Fixture for Kafka {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "kafka".into(),
            "--queue".into(),
            self.topic.clone(),
            "--kafka-brokers".into(),
            self.brokers.clone(),
        ]
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let want = self.dead_letters().await + messages.len();
        let publisher = KafkaPublisher::new(&self.brokers, &self.topic).unwrap();
        let published = messages.len();
        // The topic keeps replays that were drained: the service takes those as fixed.
        let batch: std::sync::Arc<std::collections::HashSet<Bytes>> =
            std::sync::Arc::new(messages.iter().map(|m| m.payload.clone()).collect());
        for m in messages {
            publisher.publish(m).await.unwrap();
        }
        // The work topic keeps its records: read past them, so that only replays are drained
        // later.
        let mut skipped = 0;
        while skipped < published {
            let got = self.drain_work(published - skipped).await.len();
            assert!(got > 0, "the published records can be read back");
            skipped += got;
        }
        let mut config =
            KafkaConfig::new(&self.brokers, format!("{}-group", self.topic), &self.topic);
        config.session_timeout = Duration::from_secs(6);
        let source = KafkaSource::new(&config).unwrap();
        Consumer::new(source)
            .max_attempts(1)
            .run_until(
                handler_fn(move |d, _cx| {
                    let ours = batch.contains(&d.payload);
                    async move { if ours { common::fail(d).await } else { Ok(()) } }
                }),
                async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    while self.dead_letters().await < want && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            )
            .await
            .unwrap();
        assert_eq!(self.dead_letters().await, want);
    }

    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let consumer = self.drain.lock().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < expected && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let headers = from_record(m.headers()).headers;
                out.push((
                    Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                    headers,
                ));
            }
        }
        out
    }

    /// What the command itself counts: the letters not yet behind its replay group.
    async fn dead_letters(&self) -> usize {
        let run = common::ackstack(self, &["dlq", "list", "--json"]);
        assert_eq!(run.code, Some(0), "{run:?}");
        run.json_lines().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_list_show_and_filters() {
    common::list_show_and_filters(&Kafka::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_groups_replay_and_purge() {
    common::groups_replay_and_purge(&Kafka::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Kafka::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Kafka::new(), 1000, 500, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_stops_before_a_letter_whose_removal_cannot_be_recorded() {
    // One letter the filter keeps, then 1,000 it selects, all in one partition: the removed
    // ones past the kept one go into the replay group's commit metadata until it is full. The
    // run must stop before sending a letter it could not record (exit 3), and a second run
    // must send none of the letters again.
    use ackstack_core::{DeadLetter, Delivery, ErrorKind, Failure, Origin};
    let fx = Kafka::new();
    let dlq = format!("{}-dlq", fx.topic);
    let letter = |body: String, error: &str| {
        let delivery = Delivery::new(body.clone(), Origin::new("kafka", fx.topic.as_str(), "t"));
        let metadata = DeadLetter::new(&delivery, Failure::new(ErrorKind::Transient, error))
            .metadata(&delivery);
        let mut message = Message::new(body).key("one partition");
        metadata.apply_to(&mut message.headers);
        message
    };
    let publisher = KafkaPublisher::new(&fx.brokers, &dlq).unwrap();
    publisher
        .publish(letter("kept".into(), "left alone"))
        .await
        .unwrap();
    const SELECTED: usize = 1000;
    for i in 0..SELECTED {
        publisher
            .publish(letter(format!("r{i}"), "replay me"))
            .await
            .unwrap();
    }

    let first = common::ackstack(&fx, &["dlq", "replay", "--grep", "replay me"]);
    assert_eq!(first.code, Some(3), "{first:?}");
    assert!(first.stderr.contains("stopped at"), "{first:?}");
    let sent = fx.drain_work(SELECTED).await.len();
    assert!(
        (500..SELECTED).contains(&sent),
        "{sent} replayed before the metadata filled"
    );
    assert!(
        first
            .text()
            .contains(&format!("replayed {sent} dead letter(s)")),
        "every letter sent was recorded as removed: {first:?}"
    );

    let second = common::ackstack(&fx, &["dlq", "replay", "--grep", "replay me"]);
    assert_eq!(second.code, Some(3), "{second:?}");
    assert!(
        second.text().contains("replayed 0 dead letter(s)"),
        "{second:?}"
    );
    assert_eq!(
        fx.drain_work(1).await.len(),
        0,
        "a letter was sent again by the second run"
    );
}

/// The `[kafka]` table's librdkafka properties (TLS, SASL on a team's cluster) reach the
/// command's clients: a property librdkafka refuses ends the command naming it, and a refused
/// secret one is named without its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_properties_of_the_config_file_reach_the_clients() {
    let fx = Kafka::new();
    let file = std::env::temp_dir().join(format!("{}.toml", fx.topic));
    let run_with = |property: &str| {
        let table = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"g\"\ntopic = \"{}\"\n\
             [kafka.properties]\n{property}\n",
            fx.brokers, fx.topic
        );
        std::fs::write(&file, table).unwrap();
        let path = file.to_string_lossy().into_owned();
        common::ackstack(&fx, &["dlq", "list", "--config", &path])
    };
    let fine = run_with("\"socket.keepalive.enable\" = \"true\"");
    assert_eq!(fine.code, Some(0), "{fine:?}");
    let unknown = run_with("\"no.such.property\" = \"1\"");
    assert_ne!(unknown.code, Some(0), "{unknown:?}");
    assert!(unknown.stderr.contains("no.such.property"), "{unknown:?}");
    // librdkafka is built without libcurl here, so it refuses this secret's property.
    let secret = run_with("\"sasl.oauthbearer.client.secret\" = \"s3cret-value\"");
    let _ = std::fs::remove_file(&file);
    assert_ne!(secret.code, Some(0), "{secret:?}");
    assert!(
        secret.stderr.contains("sasl.oauthbearer.client.secret"),
        "{secret:?}"
    );
    assert!(!secret.stderr.contains("s3cret-value"), "{secret:?}");
}
