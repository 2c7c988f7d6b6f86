//! A message that takes the whole process down (invariant 2): a consumer written as a user
//! would (`src/bin/poison_consumer.rs`, concurrency 4, at most 3 attempts, default prefetch)
//! runs as a child process whose handler aborts on one payload, and is restarted after each
//! crash, as an orchestrator would. The poison must be dead-lettered after at most 3 crashes
//! (with the crash count in its metadata), every other message handled and none
//! dead-lettered, nothing lost: on SQS, RabbitMQ classic and quorum queues, Kafka, NATS
//! JetStream and Redis Streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ackstack_core::{DeadLetterMetadata, DeadLetterReason, Message, Publish};
use ackstack_rabbitmq::{QueueType, RabbitPublisher};
use ackstack_sqs::testing::{self, TestQueue};
use ackstack_sqs::{DeadLetterRecord, SqsPublisher};
use integration_tests::rabbitmq_config;

const GOOD: usize = 30;
const MAX_ATTEMPTS: usize = 3;

/// How the runs of the child went.
struct Runs {
    crashes: usize,
    last: String,
}

/// Runs the child with `args` until one run ends without a crash and `done` holds, at most
/// 10 runs; each run is bounded.
fn restart_until(args: &[&str], done: impl Fn() -> bool) -> Runs {
    let mut crashes = 0;
    let mut last = String::new();
    for _ in 0..10 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_poison_consumer"))
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the consumer did not finish within 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            use std::io::Read;
            let _ = stdout.read_to_string(&mut out);
        }
        if status.success() {
            last = out;
            if done() {
                break;
            }
        } else {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(6),
                "the child ended other than by its abort: {status:?}"
            );
            crashes += 1;
        }
    }
    Runs { crashes, last }
}

/// The good messages not in the `handled` file yet. Each is looked up by name: a message
/// handled twice (redelivered after a crash) does not stand in for one not handled yet.
fn good_not_handled(handled: &std::path::Path) -> Vec<String> {
    let lines = std::fs::read_to_string(handled).unwrap_or_default();
    let seen: BTreeSet<&str> = lines.lines().collect();
    (0..GOOD)
        .map(|i| format!("g{i}"))
        .filter(|g| !seen.contains(g.as_str()))
        .collect()
}

/// The payloads of the suite: 30 good ones with the poison among them.
fn payloads() -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..GOOD {
        if i == GOOD / 3 {
            out.push("poison".to_string());
        }
        out.push(format!("g{i}"));
    }
    out
}

/// Asserts that `dead` holds the poison alone, once; returns its metadata.
fn only_the_poison(dead: &[(&[u8], &ackstack_core::Headers)]) -> DeadLetterMetadata {
    let bodies: Vec<&[u8]> = dead.iter().map(|(payload, _)| *payload).collect();
    assert_eq!(
        bodies,
        vec![&b"poison"[..]],
        "only the poison is dead-lettered, once"
    );
    DeadLetterMetadata::from_headers(dead[0].1).unwrap()
}

impl Runs {
    /// Asserts that `dead` holds the poison alone, dead-lettered as `crashed` after
    /// `MAX_ATTEMPTS` crashes, which is how many there were.
    fn assert_only_the_poison_crashed_out(&self, dead: &[(&[u8], &ackstack_core::Headers)]) {
        let metadata = only_the_poison(dead);
        assert_eq!(metadata.reason, DeadLetterReason::Crashed);
        assert_eq!(metadata.attempts as usize, MAX_ATTEMPTS);
        assert_eq!(self.crashes, MAX_ATTEMPTS, "dead-lettered at the limit");
    }

    /// Asserts that every good message is in the `handled` file (removed then), and that the
    /// child crashed at least once and at most `max_attempts` times.
    fn assert_poison_stopped_and_all_good_handled(&self, handled: &std::path::Path) {
        let missing = good_not_handled(handled);
        let _ = std::fs::remove_file(handled);
        assert!(
            missing.is_empty(),
            "good messages never handled: {missing:?}"
        );
        assert!(
            (1..=MAX_ATTEMPTS).contains(&self.crashes),
            "{} crashes for max_attempts {MAX_ATTEMPTS}; last run: {}",
            self.crashes,
            self.last
        );
    }
}

async fn rabbitmq_poison(queue_type: QueueType, name: &'static str) {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let queue = testing::unique_name(&format!("ackstack-test-poison-{name}"));
    let config = rabbitmq_config(&url, &queue, queue_type);
    let publisher = std::sync::Arc::new(RabbitPublisher::connect(config.clone()).await.unwrap());
    for payload in payloads() {
        publisher.publish(Message::new(payload)).await.unwrap();
    }
    let handled = std::env::temp_dir().join(testing::unique_name("poison-handled"));
    let handled_path = handled.to_string_lossy().into_owned();
    let rt = tokio::runtime::Handle::current();
    let (p, c) = (publisher.clone(), config.clone());
    let runs = tokio::task::spawn_blocking(move || {
        restart_until(
            &["rabbitmq", &url, &queue, name, &handled_path],
            move || {
                let (p, c) = (p.clone(), c.clone());
                rt.block_on(async move {
                    p.queue_len(&c.queue).await.unwrap() == 0
                        && p.queue_len(&c.alone_queue_name()).await.unwrap_or(0) == 0
                })
            },
        )
    })
    .await
    .unwrap();

    runs.assert_poison_stopped_and_all_good_handled(&handled);
    let mut dead = Vec::new();
    while let Some(letter) = publisher.get_dead_letter().await.unwrap() {
        dead.push(letter);
    }
    let letters: Vec<_> = dead.iter().map(|m| (&m.payload[..], &m.headers)).collect();
    runs.assert_only_the_poison_crashed_out(&letters);
    assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
    let alone = config.alone_queue_name();
    assert_eq!(
        publisher.queue_len(&alone).await.unwrap(),
        0,
        "left in {alone}"
    );
    println!(
        "poison-suite broker=rabbitmq-{name} good={GOOD} crashes={} max_attempts={MAX_ATTEMPTS}",
        runs.crashes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_classic_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    rabbitmq_poison(QueueType::Classic, "classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_quorum_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    rabbitmq_poison(QueueType::Quorum, "quorum").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    let client = testing::client().await;
    let queue = TestQueue::create(&client, "poison", false).await.unwrap();
    let publisher = SqsPublisher::new(client.clone(), queue.url.clone());
    for payload in payloads() {
        publisher.publish(Message::new(payload)).await.unwrap();
    }
    let handled = std::env::temp_dir().join(testing::unique_name("poison-handled"));
    let handled_path = handled.to_string_lossy().into_owned();
    let (c, q) = (client.clone(), queue.clone());
    let rt = tokio::runtime::Handle::current();
    let (url, dlq_url) = (queue.url.clone(), queue.dlq_url.clone());
    let runs = tokio::task::spawn_blocking(move || {
        restart_until(&["sqs", &url, &dlq_url, &handled_path], move || {
            let (c, q) = (c.clone(), q.clone());
            rt.block_on(async move { q.approximate_count(&c).await.unwrap() == 0 })
        })
    })
    .await
    .unwrap();

    runs.assert_poison_stopped_and_all_good_handled(&handled);
    let dead = queue
        .read_dead_letters(&client, GOOD + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let bodies: Vec<&str> = dead.iter().filter_map(|m| m.body()).collect();
    assert_eq!(
        bodies,
        vec!["poison"],
        "only the poison is dead-lettered, once"
    );
    let record = DeadLetterRecord::from_attributes(dead[0].message_attributes().unwrap()).unwrap();
    // SQS's receive count passed max_attempts: dead-lettered on arrival, unrun, with the
    // crash count in the metadata.
    assert_eq!(record.metadata.reason, DeadLetterReason::MaxAttempts);
    assert!(
        record
            .metadata
            .error_message
            .contains("without a settlement"),
        "{:?}",
        record.metadata
    );
    assert_eq!(record.metadata.attempts as usize, MAX_ATTEMPTS + 1);
    assert_eq!(
        queue.approximate_count(&client).await.unwrap(),
        0,
        "nothing left behind"
    );
    println!(
        "poison-suite broker=sqs good={GOOD} crashes={} max_attempts={MAX_ATTEMPTS}",
        runs.crashes
    );
    queue.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    use ackstack_kafka::{KafkaPublisher, read_topic};
    let topic = testing::unique_name("poison");
    let (brokers, _cluster) = common::mock_cluster(&topic, 2);
    let publisher = KafkaPublisher::new(&brokers, &topic).unwrap();
    // Keyed so that both partitions get some.
    for (i, payload) in payloads().into_iter().enumerate() {
        let message = Message::new(payload).key(format!("k{}", i % 5));
        publisher.publish(message).await.unwrap();
    }
    let dlq = format!("{topic}-dlq");
    let handled = std::env::temp_dir().join(testing::unique_name("poison-handled"));
    let handled_path = handled.to_string_lossy().into_owned();
    let rt = tokio::runtime::Handle::current();
    let reader = brokers.clone();
    let (b, d, h) = (brokers.clone(), dlq.clone(), handled.clone());
    let runs = tokio::task::spawn_blocking(move || {
        restart_until(&["kafka", &brokers, &topic, &handled_path], move || {
            good_not_handled(&h).is_empty()
                && rt
                    .block_on(read_topic(&b, &d, 1, Duration::from_secs(5)))
                    .is_ok_and(|dead| !dead.is_empty())
        })
    })
    .await
    .unwrap();

    runs.assert_poison_stopped_and_all_good_handled(&handled);
    let dead = read_topic(&reader, &dlq, 2, Duration::from_secs(20))
        .await
        .unwrap();
    let letters: Vec<_> = dead.iter().map(|m| (&m.payload[..], &m.headers)).collect();
    runs.assert_only_the_poison_crashed_out(&letters);
    println!(
        "poison-suite broker=kafka good={GOOD} crashes={} max_attempts={MAX_ATTEMPTS}",
        runs.crashes
    );
}

/// A stream entry's field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// Publishes [`payloads`] with `publisher`, then runs the child with `args` and a file of
/// its own for what it handled, restarting it until `drained` holds; returns the runs and
/// that file.
async fn publish_and_restart<F, Fut>(
    publisher: &impl Publish,
    args: [&str; 3],
    drained: F,
) -> (Runs, std::path::PathBuf)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool>,
{
    for payload in payloads() {
        publisher.publish(Message::new(payload)).await.unwrap();
    }
    let handled = std::env::temp_dir().join(testing::unique_name("poison-handled"));
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(handled.to_string_lossy().into_owned());
    let rt = tokio::runtime::Handle::current();
    let runs = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        restart_until(&args, move || rt.block_on(drained()))
    })
    .await
    .unwrap();
    (runs, handled)
}

/// NATS and Redis Streams count every hand-out, crashes too, as SQS does: the poison comes
/// back past `max_attempts` and is dead-lettered on arrival, unrun, with its count of
/// deliveries that ended without a settlement.
fn assert_dead_lettered_on_arrival(runs: &Runs, dead: &[(&[u8], &ackstack_core::Headers)]) {
    let metadata = only_the_poison(dead);
    assert_eq!(
        metadata.reason,
        DeadLetterReason::MaxAttempts,
        "{metadata:?}"
    );
    assert!(
        metadata.error_message.contains("without a settlement"),
        "{metadata:?}"
    );
    assert_eq!(metadata.attempts as usize, MAX_ATTEMPTS + 1);
    assert_eq!(runs.crashes, MAX_ATTEMPTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    use ackstack::nats::async_nats::jetstream::{self, consumer::pull};
    use ackstack::nats::{NatsPublisher, async_nats};
    use futures::StreamExt;
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let stream = testing::unique_name("poison").replace('.', "_");
    let client = async_nats::connect(&url).await.unwrap();
    let js = jetstream::new(client.clone());
    // The stream and its dead-letter stream, as the consumer would create them.
    for (name, subject) in [
        (stream.clone(), stream.clone()),
        (format!("{stream}-dlq"), format!("{stream}.dlq")),
    ] {
        js.create_stream(jetstream::stream::Config {
            name,
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let publisher = NatsPublisher::new(client.clone(), stream.clone());
    let (s, j) = (stream.clone(), js.clone());
    let (runs, handled) = publish_and_restart(&publisher, ["nats", &url, &stream], move || {
        let (s, j) = (s.clone(), j.clone());
        async move {
            let Ok(mut consumer) = j
                .get_stream(&s)
                .await
                .unwrap()
                .get_consumer::<pull::Config>("ackstack")
                .await
            else {
                return false;
            };
            let info = consumer.info().await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        }
    })
    .await;

    runs.assert_poison_stopped_and_all_good_handled(&handled);
    let reader = js
        .get_stream(format!("{stream}-dlq"))
        .await
        .unwrap()
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = reader
        .fetch()
        .max_messages(GOOD + 1)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut dead = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let mut headers = ackstack_core::Headers::new();
        for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
            for value in values {
                headers.append(name.to_string(), value.as_str().to_string());
            }
        }
        dead.push((m.payload.to_vec(), headers));
    }
    let letters: Vec<_> = dead.iter().map(|(p, h)| (&p[..], h)).collect();
    assert_dead_lettered_on_arrival(&runs, &letters);
    println!(
        "poison-suite broker=nats good={GOOD} crashes={} max_attempts={MAX_ATTEMPTS}",
        runs.crashes
    );
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}-dlq")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_a_message_that_kills_the_process_is_dead_lettered_and_nothing_else_is() {
    use ackstack::redis_streams::RedisStreamsPublisher;
    use ackstack::redis_streams::redis;
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stream = testing::unique_name("poison");
    let publisher = RedisStreamsPublisher::connect(&url, stream.clone()).unwrap();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The group first (from the start of the stream), then the messages.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("ackstack")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (s, c) = (stream.clone(), conn.clone());
    let args = ["redis-streams", &url, &stream];
    let (runs, handled) = publish_and_restart(&publisher, args, move || {
        let (s, mut c) = (s.clone(), c.clone());
        async move {
            let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&s)
                .query_async(&mut c)
                .await
                .unwrap();
            groups.iter().all(|g| {
                ["pending", "lag"]
                    .iter()
                    .all(|k| matches!(g.get(*k), Some(redis::Value::Int(0))))
            })
        }
    })
    .await;

    runs.assert_poison_stopped_and_all_good_handled(&handled);
    let entries: Vec<(String, Vec<Field>)> = redis::cmd("XRANGE")
        .arg(format!("{stream}-dlq"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let dead: Vec<(Vec<u8>, ackstack_core::Headers)> = entries
        .into_iter()
        .map(|(_, fields)| {
            let mut payload = Vec::new();
            let mut headers = ackstack_core::Headers::new();
            for (name, value) in fields {
                if name == b"payload" {
                    payload = value;
                } else {
                    headers.append(String::from_utf8_lossy(&name).into_owned(), value);
                }
            }
            (payload, headers)
        })
        .collect();
    let letters: Vec<_> = dead.iter().map(|(p, h)| (&p[..], h)).collect();
    assert_dead_lettered_on_arrival(&runs, &letters);
    println!(
        "poison-suite broker=redis-streams good={GOOD} crashes={} max_attempts={MAX_ATTEMPTS}",
        runs.crashes
    );
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&stream)
        .arg(format!("{stream}-dlq"))
        .query_async(&mut conn)
        .await;
}
