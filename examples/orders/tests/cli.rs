//! The `orders` binary's command-line contract, driven as scripts drive it: flags, stdout lines,
//! the summary and ledger, exit codes, on every broker.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`), Redis on 127.0.0.1:6379 (or `REDIS_URL`)
//! and an SQS endpoint such as moto on 127.0.0.1:4566 (or `SQS_ENDPOINT`), and PostgreSQL on
//! 127.0.0.1:5432 (or `DATABASE_URL`). Kafka runs on the in-process mock cluster. Every run is killed after a time limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::{Duration, Instant};

use ackstack::Message;
use ackstack::rabbitmq::{RabbitConfig, RabbitPublisher};
use ackstack_testkit::unique_name;
use common::{database_url, env_or, pg_charges};

mod common;

/// A finished run of the binary.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn summary(&self) -> HashMap<String, u64> {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("summary "))
            .unwrap_or_else(|| panic!("no summary line in:\n{}", self.stdout));
        line.split_whitespace()
            .skip(1)
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    fn ledger(&self) -> BTreeMap<String, u64> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("ledger order_id="))
            .map(|rest| {
                let (id, count) = rest.split_once(" count=").unwrap();
                (id.to_string(), count.parse().unwrap())
            })
            .collect()
    }

    /// The `delay_ms` of the line starting with `prefix`.
    fn delay_ms(&self, prefix: &str) -> u64 {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.stdout));
        let value = line.split("delay_ms=").nth(1).unwrap();
        value.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn has_line(&self, prefix: &str) -> bool {
        self.stdout.lines().any(|l| l.starts_with(prefix))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `orders` with `args` and extra `env`, without `REDIS_URL`, `KAFKA_BROKERS` and
/// `DATABASE_URL` unless given; kills it and fails after `limit`.
fn orders(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut cmd = common::orders_command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + limit;
    let (code, timed_out) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status.code(), false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(
        !timed_out,
        "orders {args:?} did not finish in {limit:?}:\n{run:?}"
    );
    run
}

fn good_ledger() -> BTreeMap<String, u64> {
    ["A-1001", "A-1002", "A-1003", "A-1004"]
        .into_iter()
        .map(|id| (id.to_string(), 1))
        .collect()
}

/// What every publishing run with the default flags must show, whatever the broker.
fn assert_sample_run(run: &Run, broker_delays_retries: bool) {
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.starts_with("published "))
            .count(),
        6,
        "{run:?}"
    );
    let s = run.summary();
    assert_eq!(s["acked"], 5, "four orders and the duplicate: {run:?}");
    assert_eq!(s["dead_lettered"], 1, "{run:?}");
    assert_eq!(s["deduplicated"], 1, "{run:?}");
    assert_eq!(s["abandoned"], 0, "{run:?}");
    assert!(run.has_line(
        "dead_lettered order_id=- attempt=1 reason=\"permanent: payload is not a valid Order"
    ));
    assert!(run.has_line("acked order_id=A-1004 attempt=3"), "{run:?}");
    // fail_first=2: two retries, delays from the backoff (base 200 ms, equal jitter).
    assert!(s["retried"] >= 2, "{run:?}");
    if broker_delays_retries {
        // Each retry is a redelivery.
        assert_eq!(s["received"], 6 + s["retried"], "{run:?}");
    } else {
        // In-place retries run again without a redelivery.
        assert_eq!(s["received"], 6, "{run:?}");
    }
    let first = run.delay_ms("retried order_id=A-1004 attempt=1 ");
    let second = run.delay_ms("retried order_id=A-1004 attempt=2 ");
    assert!((100..=200).contains(&first), "{run:?}");
    assert!((200..=400).contains(&second), "{run:?}");
    assert_eq!(
        run.ledger(),
        good_ledger(),
        "each good order charged once: {run:?}"
    );
}

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn memory_run_retries_dead_letters_and_deduplicates() {
    let run = orders(&[], &[], LIMIT);
    assert_sample_run(&run, true);
    assert!(
        run.stdout
            .starts_with("start broker=memory queue=orders dlq=orders-dlq")
    );
}

#[test]
fn memory_run_honours_the_tuning_flags() {
    // Two attempts: the order failing its first two is dead-lettered; one at a time: no
    // dedup "busy" retry; 50 ms base delay.
    let run = orders(
        &[
            "--max-attempts",
            "2",
            "--base-delay-ms=50",
            "--concurrency",
            "1",
            "--exit-when-idle",
            "1",
            "--queue",
            "tuned",
        ],
        &[],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let s = run.summary();
    assert_eq!(
        (s["retried"], s["dead_lettered"], s["acked"]),
        (1, 2, 4),
        "{run:?}"
    );
    assert!((25..=50).contains(&run.delay_ms("retried order_id=A-1004 attempt=1 ")));
    assert!(
        run.has_line("dead_lettered order_id=A-1004 attempt=2"),
        "{run:?}"
    );
    assert!(run.stdout.contains("queue=tuned dlq=tuned-dlq"));
    let mut ledger = good_ledger();
    ledger.remove("A-1004");
    assert_eq!(run.ledger(), ledger);
}

#[test]
fn consume_only_on_memory_exits_when_idle() {
    let run = orders(&["--consume-only", "--exit-when-idle", "1"], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.has_line("published"));
    assert_eq!(run.summary()["received"], 0);
}

#[test]
fn bad_arguments_exit_2_and_help_exits_0() {
    for args in [
        &["--bogus"][..],
        &["--broker", "pulsar"],
        &["--broker"],
        &["--concurrency", "0"],
        &["--max-attempts", "many"],
        &["--exit-when-idle", "-1"],
        &["--queue", "no spaces"],
        &["extra"],
    ] {
        let run = orders(args, &[], Duration::from_secs(30));
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{args:?}: {run:?}");
        assert!(run.stderr.contains("orders: "), "{args:?}: {run:?}");
    }
    let help = orders(&["--help"], &[], Duration::from_secs(30));
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("USAGE") && help.stdout.contains("--exit-when-idle"));
}

#[test]
fn unreachable_broker_waits_then_exits_1_at_the_connect_timeout_without_leaking_the_password() {
    let run = orders(
        &[
            "--broker",
            "rabbitmq",
            "--amqp-url",
            "amqp://guest:hunter2@127.0.0.1:1/%2f",
            "--connect-timeout",
            "3",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("waiting for RabbitMQ"), "{run:?}");
    assert!(
        run.stderr
            .contains("orders: error: not reachable within --connect-timeout 3s: RabbitMQ at"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"));
    assert!(!run.stderr.contains("panicked"));
}

/// Declares `queue` durable with `args` through a plain client, as a team's existing service
/// would have.
fn declare_as_a_team_would(
    queue: &str,
    args: &[(&str, ackstack::rabbitmq::lapin::types::AMQPValue)],
) {
    let mut table = ackstack::rabbitmq::lapin::types::FieldTable::default();
    for (name, value) in args {
        table.insert((*name).into(), value.clone());
    }
    plain_client(queue, Some(table));
}

/// Through a plain client: declares `queue` durable with `declare`'s arguments, or deletes it
/// (`None`).
fn plain_client(queue: &str, declare: Option<ackstack::rabbitmq::lapin::types::FieldTable>) {
    use ackstack::rabbitmq::lapin;
    let uri = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        match declare {
            Some(args) => {
                let options = lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.into(), options, args)
                    .await
                    .map(drop)
                    .unwrap();
            }
            None => {
                let options = lapin::options::QueueDeleteOptions::default();
                channel
                    .queue_delete(queue.into(), options)
                    .await
                    .map(drop)
                    .unwrap();
            }
        }
        conn.close(200, "done".into()).await.unwrap();
    });
}

#[test]
fn a_queue_rabbitmq_cannot_consume_ends_the_start_at_once_with_exit_1() {
    // A stream queue: ackstack cannot consume it as a work queue, which no retry can fix. No
    // --connect-timeout: waiting would be for ever, so the test's own time limit catches it.
    use ackstack::rabbitmq::lapin::types::AMQPValue;
    let queue = unique_name("orders-refused");
    declare_as_a_team_would(
        &queue,
        &[("x-queue-type", AMQPValue::LongString("stream".into()))],
    );
    let run = orders(
        &["--broker", "rabbitmq", "--queue", &queue, "--consume-only"],
        &[],
        Duration::from_secs(60),
    );
    plain_client(&queue, None);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("stream queue"), "{run:?}");
    assert!(
        !run.stderr.contains("waiting for RabbitMQ"),
        "a refusal was waited out as an outage: {run:?}"
    );
    assert!(!run.stderr.contains("panicked"));
}

#[test]
fn a_queue_the_team_declared_with_its_own_arguments_is_adopted() {
    // The team's queue has a TTL and a dead-letter exchange of its own: ackstack's declare is
    // refused, and the queue is consumed as it is.
    use ackstack::rabbitmq::lapin::types::AMQPValue;
    let queue = unique_name("orders-adopted");
    declare_as_a_team_would(
        &queue,
        &[
            ("x-message-ttl", AMQPValue::LongInt(600_000)),
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            ("x-expires", AMQPValue::LongInt(300_000)),
        ],
    );
    let run = orders(
        &[
            "--broker",
            "rabbitmq",
            "--queue",
            &queue,
            "--connect-timeout",
            "20",
        ],
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("acked order_id=A-1001"), "{run:?}");
    assert!(
        run.stdout.contains("ledger order_id=A-1004 count=1"),
        "{run:?}"
    );
}

#[test]
fn an_sqs_queue_that_cannot_exist_ends_the_start_at_once_with_exit_1() {
    // A dot is only allowed in the ".fifo" suffix: SQS refuses to create this queue
    // (InvalidParameterValue), which no retry can fix.
    let run = orders(
        &["--broker", "sqs", "--queue", "orders.v2", "--consume-only"],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        !run.stderr.contains("waiting for SQS"),
        "a refusal was waited out as an outage: {run:?}"
    );
    assert!(!run.stderr.contains("panicked"));
}

#[test]
fn rabbitmq_publish_run_then_consume_only_run() {
    let queue = unique_name("orders-cli");
    let run = orders(&["--broker", "rabbitmq", "--queue", &queue], &[], LIMIT);
    assert_sample_run(&run, true);

    // The dead letter is on <queue>-dlq, byte for byte; then someone else publishes three
    // orders, and a consume-only run picks them up.
    let uri = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let mut config = RabbitConfig::new(uri, queue.clone());
    config.declare_topology = ackstack::rabbitmq::Topology::Never;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let publisher = RabbitPublisher::connect(config).await.unwrap();
        let dead = publisher
            .get(&format!("{queue}-dlq"))
            .await
            .unwrap()
            .expect("a dead letter");
        assert_eq!(&dead.payload[..], b"this is not an order");
        for id in ["B-1", "B-2", "B-3"] {
            let body = format!(r#"{{"order_id":"{id}","amount_cents":100}}"#);
            publisher
                .publish_to(&queue, Message::new(body))
                .await
                .unwrap();
        }
    });

    let run = orders(
        &[
            "--broker",
            "rabbitmq",
            "--queue",
            &queue,
            "--consume-only",
            "--exit-when-idle",
            "3",
        ],
        &[],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(!run.has_line("published"), "{run:?}");
    let s = run.summary();
    assert_eq!((s["received"], s["acked"]), (3, 3), "{run:?}");
    let ledger: BTreeMap<String, u64> = [("B-1", 1), ("B-2", 1), ("B-3", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(run.ledger(), ledger, "{run:?}");
}

#[test]
fn sqs_publish_run() {
    let endpoint = env_or("SQS_ENDPOINT", "http://127.0.0.1:4566");
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "no SQS endpoint at {endpoint}: start moto with `moto_server -H 127.0.0.1 -p 4566`"
    );
    let queue = unique_name("orders-cli");
    let run = orders(&["--broker", "sqs", "--queue", &queue], &[], LIMIT);
    assert_sample_run(&run, true);
}

/// A work queue with a redrive policy to a dead-letter queue of the team's own naming,
/// created by a plain client; the URL of that dead-letter queue.
fn sqs_team_queue(queue: &str, max_receive_count: u32) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = ackstack::sqs::testing::client().await;
        let made = ackstack::sqs::testing::TestQueue::with_redrive_policy(
            &client,
            queue,
            max_receive_count,
        );
        made.await.unwrap().dlq_url
    })
}

#[test]
fn an_sqs_queue_with_the_teams_redrive_policy_is_adopted() {
    let queue = unique_name("orders-redrive");
    let team_dlq = sqs_team_queue(&queue, 10);
    let run = orders(&["--broker", "sqs", "--queue", &queue], &[], LIMIT);
    assert_sample_run(&run, true);
    assert!(
        run.stdout
            .contains(&format!("note dead letters go to {team_dlq}")),
        "{run:?}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = ackstack::sqs::testing::client().await;
        let letters = ackstack::sqs::testing::drain(&client, &team_dlq, 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(letters.len(), 1, "the malformed order, in the team's queue");
        assert_eq!(letters[0].body(), Some("this is not an order"));
        let own = client
            .get_queue_url()
            .queue_name(format!("{queue}-dlq"))
            .send()
            .await;
        assert!(own.is_err(), "no <queue>-dlq beside the team's");
    });
}

#[test]
fn an_sqs_redrive_limit_not_above_max_attempts_ends_the_start_with_exit_1() {
    let queue = unique_name("orders-redrive-low");
    sqs_team_queue(&queue, 2);
    let run = orders(
        &["--broker", "sqs", "--queue", &queue, "--consume-only"],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    for fix in [
        "maxReceiveCount",
        "raise maxReceiveCount above",
        "lower max_attempts below 2",
    ] {
        assert!(run.stderr.contains(fix), "{fix:?}: {run:?}");
    }
    assert!(!run.stderr.contains("panicked"), "{run:?}");
}

#[test]
fn kafka_publish_run_on_the_mock_cluster() {
    let queue = unique_name("orders-cli");
    let run = orders(&["--broker", "kafka", "--queue", &queue], &[], LIMIT);
    assert!(run.has_line("note KAFKA_BROKERS is not set"), "{run:?}");
    // Kafka retries in place (the record holds its place in its partition): reported, but
    // not redelivered.
    assert_sample_run(&run, false);
}

/// A team's Kafka group with history (`KAFKA_GROUP`): the example joins it and continues from
/// its committed offset; `KAFKA_PROPERTIES` reach the clients (an unknown property is refused
/// by librdkafka at start, exit 1, naming it).
#[test]
fn kafka_joins_the_teams_group_and_continues_from_its_committed_offset() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let topic = unique_name("orders-group");
    cluster.create_topic(&topic, 1, 1).unwrap();
    cluster.create_topic(&format!("{topic}-dlq"), 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let config = |group: Option<&str>| {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &brokers);
        if let Some(group) = group {
            c.set("group.id", group);
        }
        c
    };
    let producer: BaseProducer = config(None).create().unwrap();
    for n in 1..=4 {
        let body = format!(r#"{{"order_id":"H-{n}","amount_cents":100}}"#);
        producer
            .send(BaseRecord::<(), str>::to(&topic).payload(&body))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    // The team's current consumer handled H-1 and H-2: offset 2 is committed.
    let group = unique_name("team-orders");
    let old: BaseConsumer = config(Some(&group)).create().unwrap();
    let mut position = rdkafka::TopicPartitionList::new();
    position
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(2))
        .unwrap();
    old.commit(&position, CommitMode::Sync).unwrap();
    drop(old);

    let args = [
        "--broker",
        "kafka",
        "--queue",
        &topic,
        "--consume-only",
        "--exit-when-idle",
        "3s",
    ];
    let env = [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_GROUP", group.as_str()),
        (
            "KAFKA_PROPERTIES",
            "client.id=orders-service;socket.keepalive.enable=true",
        ),
    ];
    let run = orders(&args, &env, LIMIT);
    assert_eq!(run.code, Some(0), "{run:?}");
    let ledger: BTreeMap<String, u64> = [("H-3".to_string(), 1), ("H-4".to_string(), 1)].into();
    assert_eq!(run.ledger(), ledger, "continued from offset 2: {run:?}");

    let env = [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_PROPERTIES", "no.such.property=1"),
    ];
    let refused = orders(&args, &env, Duration::from_secs(60));
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("no.such.property"), "{refused:?}");
}

#[test]
fn redis_ledger_charges_each_order_once_across_runs() {
    let url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let queue = unique_name("orders-cli");
    let env = [("REDIS_URL", url.as_str())];
    let first = orders(&["--queue", &queue], &env, LIMIT);
    assert_sample_run(&first, true);
    assert!(first.stdout.contains("dedup=redis ledger=redis"));

    // The ledger is in Redis: HGETALL <queue>:charges.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let charges: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{queue}:charges"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(charges, good_ledger());

    // A second run publishes the same orders again: every good one is a duplicate now.
    let second = orders(&["--queue", &queue], &env, LIMIT);
    assert_eq!(second.code, Some(0), "{second:?}");
    let s = second.summary();
    assert_eq!((s["deduplicated"], s["acked"]), (5, 5), "{second:?}");
    assert_eq!(second.ledger(), good_ledger(), "{second:?}");

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{queue}:*"))
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
}

/// The rows of `queue` in the example's PostgreSQL ledger table.
fn pg_ledger(queue: &str) -> BTreeMap<String, u64> {
    use ackstack::postgres::tokio_postgres;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        pg_charges(&client, queue).await
    })
}

/// With `DATABASE_URL`, dedup is the PostgreSQL inbox and the ledger a PostgreSQL table; a
/// second publishing run on the same queue finds every good order in the inbox.
#[test]
fn postgres_inbox_charges_each_order_once_across_runs() {
    let url = database_url();
    let queue = unique_name("orders-cli-pg");
    let env = [("DATABASE_URL", url.as_str())];
    let first = orders(&["--queue", &queue], &env, LIMIT);
    assert_sample_run(&first, true);
    assert!(
        first.stdout.contains("dedup=postgres ledger=postgres"),
        "{first:?}"
    );
    assert_eq!(pg_ledger(&queue), good_ledger());

    // Both set: PostgreSQL wins. The same orders again: every good one is a duplicate now.
    let redis = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("REDIS_URL", redis.as_str()),
    ];
    let second = orders(&["--queue", &queue], &env, LIMIT);
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(second.stdout.contains("dedup=postgres ledger=postgres"));
    let s = second.summary();
    assert_eq!((s["deduplicated"], s["acked"]), (5, 5), "{second:?}");
    assert_eq!(second.ledger(), good_ledger(), "{second:?}");
    assert_eq!(pg_ledger(&queue), good_ledger());
}

/// A database URL whose TLS check cannot pass (`verify-full` for 127.0.0.1, which no
/// certificate of the local server names) is a setting to fix: exit 1 at once, not a wait.
#[test]
fn a_database_url_whose_tls_check_fails_ends_the_start_with_exit_1() {
    let url = "postgres://postgres@127.0.0.1:5432/test?sslmode=verify-full";
    let queue = unique_name("orders-cli-pg");
    let run = orders(
        &["--queue", &queue, "--consume-only"],
        &[("DATABASE_URL", url)],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("TLS to the database failed"), "{run:?}");
    assert!(
        !run.stderr.contains("waiting for PostgreSQL"),
        "a refusal was waited out as an outage: {run:?}"
    );
}

/// The same on RabbitMQ, with `--database-url`: two publishing runs on one queue, the ledger
/// stays at 1 and the second run reports every good order deduplicated.
#[test]
fn rabbitmq_with_the_postgres_inbox_deduplicates_across_runs() {
    let url = database_url();
    let queue = unique_name("orders-cli-pg");
    let args = [
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--database-url",
        &url,
    ];
    let first = orders(&args, &[], LIMIT);
    assert_sample_run(&first, true);
    assert!(first.stdout.contains("dedup=postgres ledger=postgres"));
    let second = orders(&args, &[], LIMIT);
    assert_eq!(second.code, Some(0), "{second:?}");
    let s = second.summary();
    assert_eq!((s["deduplicated"], s["acked"]), (5, 5), "{second:?}");
    assert_eq!(second.ledger(), good_ledger(), "{second:?}");
    assert_eq!(pg_ledger(&queue), good_ledger());
}

#[test]
fn unreachable_postgres_exits_1_at_the_connect_timeout_without_leaking_the_password() {
    let run = orders(
        &[
            "--database-url",
            "postgres://postgres:hunter2@127.0.0.1:1/test",
            "--connect-timeout",
            "2",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("waiting for PostgreSQL"), "{run:?}");
    assert!(
        run.stderr
            .contains("orders: error: not reachable within --connect-timeout 2s: PostgreSQL"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"));
}

/// `--emit NAME`: each charge writes an event in the same transaction; the relay beside the
/// consumer sends it to `--emit-broker`, and a second run consuming those events charges each
/// order once in its own ledger.
fn events_reach_the_emit_broker_through_the_outbox(emit_broker: &str) {
    let url = database_url();
    let queue = unique_name("orders-emit");
    let events = format!("{queue}-ev");
    let env = [("DATABASE_URL", url.as_str())];
    let first = orders(
        &[
            "--queue",
            &queue,
            "--emit",
            &events,
            "--emit-broker",
            emit_broker,
        ],
        &env,
        LIMIT,
    );
    assert_sample_run(&first, true);
    assert!(
        first
            .stdout
            .contains(&format!("emit={events} emit_broker={emit_broker} relay=on")),
        "{first:?}"
    );
    assert!(
        first.has_line("relay sent=4 failures=0 parked=0"),
        "{first:?}"
    );
    let second = orders(
        &[
            "--broker",
            emit_broker,
            "--queue",
            &events,
            "--consume-only",
            "--exit-when-idle",
            "3",
        ],
        &env,
        LIMIT,
    );
    assert_eq!(second.code, Some(0), "{second:?}");
    assert_eq!(second.ledger(), good_ledger(), "{second:?}");
    assert_eq!(pg_ledger(&events), good_ledger());
}

#[test]
fn events_reach_rabbitmq_through_the_outbox() {
    events_reach_the_emit_broker_through_the_outbox("rabbitmq");
}

#[test]
fn events_reach_sqs_through_the_outbox() {
    events_reach_the_emit_broker_through_the_outbox("sqs");
}

/// `--dedup-key message-id`: the samples get ids (the twice-published order one id twice),
/// and the duplicate is recognised by it.
#[test]
fn memory_run_deduplicates_by_message_id() {
    let run = orders(&["--dedup-key", "message-id"], &[], LIMIT);
    assert_sample_run(&run, true);
}

#[test]
fn emitting_without_a_database_is_a_bad_argument() {
    let run = orders(&["--emit", "events"], &[], LIMIT);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("--emit needs --database-url"),
        "{run:?}"
    );
}
