//! The two-hop crash suite: exactly-once effects across a pipeline of two services joined by
//! the transactional outbox.
//!
//! ```text
//! orders (RabbitMQ) -> hop 1: `orders --emit events --relay off`   inbox + charge + outbox row, one transaction
//!                      relay: `orders --relay only`                outbox rows -> Kafka, marked sent after the delivery report
//! events (Kafka)    -> hop 2: `orders --queue events`              inbox + charge, one transaction
//! ```
//!
//! Three OS processes of the `orders` binary, each SIGKILLed in turn while orders flow (hop 1,
//! the relay, hop 2, again and again) and restarted; hop 1's RabbitMQ connections are dropped
//! once, and the PostgreSQL server is restarted once in immediate mode (the server's own crash:
//! every backend killed, recovery from the WAL). PostgreSQL is a server of the test's own
//! (`initdb` into a temporary directory, on a free port), so the restart touches no other test.
//! Kafka is librdkafka's mock cluster hosted in this test process; the children get its
//! bootstrap servers.
//!
//! The audit, at both hops: every good order charged exactly once in that hop's ledger
//! (`lost=0`, `double=0`), and the outbox empty. Hop 2 deduplicates by message id
//! (`--dedup-key message-id`): a relay killed after a record reached Kafka and before its
//! commit sends it again with the row's stable id, which hop 2's inbox acknowledges as a
//! duplicate. The mock cluster answers after 25 ms, widening that window; since kills land in it
//! only by chance, the suite also publishes ten events again at the end, byte for byte as such
//! a relay would (`replayed=10`), waits until hop 2's group has committed them, and audits
//! again. The events topic is read back too: one message id per order (`relay_resends` counts
//! the copies killed relays sent). One line per kill shows where things stood, and
//! one figures line ends the run, e.g.
//! `two-hop-crash orders=120 kills=6 (hop1=2 relay=2 hop2=2) connection_drops=1 pg_restarts=1
//! hop1_lost=0 hop1_double=0 hop2_lost=0 hop2_double=0 seed=...`.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`) with `rabbitmqctl` on the PATH, and
//! PostgreSQL's server binaries (`initdb`, `pg_ctl`; found in `/usr/lib/postgresql/*/bin` or on
//! the PATH). Knobs: `ACKSTACK_CRASH_ORDERS` (default 120), `ACKSTACK_CRASH_SEED`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ackstack::Message;
use ackstack::postgres::tokio_postgres::{self, Client, NoTls};
use ackstack::rabbitmq::{RabbitConfig, RabbitPublisher, Topology};
use ackstack_testkit::unique_name;

use common::{Rng, close_rabbit_connections, env_or, rabbitmqctl};

/// Orders published when `ACKSTACK_CRASH_ORDERS` is not set.
const DEFAULT_ORDERS: usize = 120;
/// Kill rounds: each kills hop 1, the relay and hop 2 once.
const ROUNDS: usize = 2;
/// How long the pipeline may take to settle after the last fault.
const SETTLE_WAIT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------------
// A PostgreSQL server of the test's own
// ---------------------------------------------------------------------------------------------

/// `initdb`'s directory: `/usr/lib/postgresql/<newest>/bin`, else the PATH.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) if bin.join(name).exists() => bin.join(name),
        _ => PathBuf::from(name),
    }
}

/// A PostgreSQL server in a temporary directory on a free port; stopped and removed on drop.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
    /// As root, the server runs as the `postgres` user (initdb refuses root).
    as_postgres: bool,
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let dir = std::env::temp_dir().join(unique_name("ackstack-two-hop-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres {
            dir,
            port,
            as_postgres,
        };
        let data = pg.data();
        run(&mut pg.command(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        ));
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let bin = pg_bin(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(bin);
            cmd
        } else {
            Command::new(bin)
        };
        cmd.args(args);
        cmd
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        run(&mut self.command(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        ));
    }

    /// The server's own crash: every backend killed at once, recovery from the WAL on start.
    fn restart_immediate(&self) {
        run(&mut self.command("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]));
        self.pg_ctl_start();
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn pg_client(url: &str) -> Option<Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .ok()?
            .ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// A hop's ledger, or `None` while the server (or the table) is not there.
async fn ledger(url: &str, queue: &str) -> Option<BTreeMap<String, u64>> {
    let client = pg_client(url).await?;
    let exists = client
        .query_one(
            "SELECT to_regclass('ackstack_example_charges') IS NOT NULL",
            &[],
        )
        .await
        .ok()?
        .get::<_, bool>(0);
    if !exists {
        return Some(BTreeMap::new());
    }
    let rows = client
        .query(
            "SELECT order_id, count FROM ackstack_example_charges WHERE queue = $1",
            &[&queue],
        )
        .await
        .ok()?;
    rows.iter()
        .map(|r| {
            let count: i32 = r.try_get(1).ok()?;
            Some((r.try_get::<_, String>(0).ok()?, u64::try_from(count).ok()?))
        })
        .collect()
}

/// A hop's ledger, waiting (up to a minute) while the server does not answer.
async fn ledger_when_up(url: &str, queue: &str) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ledger) = ledger(url, queue).await {
            return ledger;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not answer for a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A record as read back: key, payload and headers.
type Record = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

/// Every record of `topic` (3 partitions) by message id: how many times each was published,
/// and the records themselves.
fn published(brokers: &str, topic: &str) -> (BTreeMap<String, usize>, Vec<Record>) {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("two-hop-audit"))
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        assignment
            .add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut ids = BTreeMap::new();
    let mut records = Vec::new();
    let mut ended = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "reading {topic} took over a minute"
        );
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(record)) => {
                use rdkafka::message::Headers as _;
                let headers: Vec<(String, Vec<u8>)> = record
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                let id = headers
                    .iter()
                    .find(|(k, _)| k == ackstack::kafka::MESSAGE_ID_HEADER)
                    .map_or_else(
                        || "-".to_string(),
                        |(_, v)| String::from_utf8_lossy(v).into_owned(),
                    );
                *ids.entry(id).or_insert(0) += 1;
                records.push((
                    record.key().map(<[u8]>::to_vec),
                    record.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                ended.insert(partition);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    (ids, records)
}

/// Publishes `records` to `topic` again, byte for byte: what a relay killed between Kafka's
/// delivery report and its commit does.
fn publish_again(brokers: &str, topic: &str, records: &[Record]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for (key, payload, headers) in records {
        let mut kafka_headers = rdkafka::message::OwnedHeaders::new();
        for (name, value) in headers {
            kafka_headers = kafka_headers.insert(rdkafka::message::Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
            .payload(payload.as_slice())
            .headers(kafka_headers);
        if let Some(key) = key {
            record = record.key(key.as_slice());
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Waits (up to two minutes) until `group` has committed every record of `topic`.
fn wait_until_consumed(brokers: &str, group: &str, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut partitions = rdkafka::TopicPartitionList::new();
        let mut high = 0;
        for partition in 0..3 {
            partitions.add_partition(topic, partition);
            high += consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap()
                .1;
        }
        let committed: i64 = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .unwrap()
            .elements()
            .iter()
            .filter_map(|e| e.offset().to_raw())
            .filter(|o| *o >= 0)
            .sum();
        if committed >= high {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group} committed {committed} of {high}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Outbox rows not yet sent, or `None` while the server is not there.
async fn outbox_pending(url: &str) -> Option<i64> {
    let client = pg_client(url).await?;
    client
        .query_one(
            "SELECT count(*) FROM ackstack_outbox WHERE sent_at IS NULL",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}

// ---------------------------------------------------------------------------------------------
// The three processes
// ---------------------------------------------------------------------------------------------

/// One of the pipeline's processes: its arguments, and the running child (SIGKILLed on drop).
struct Role {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Role {
    fn new(name: &'static str, args: Vec<String>, dir: &Path) -> Role {
        Role {
            name,
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(
            log,
            "=== start {}: orders {}",
            self.starts,
            self.args.join(" ")
        )
        .unwrap();
        let err = log.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .args(&self.args)
            .env_remove("REDIS_URL")
            .env_remove("KAFKA_BROKERS")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, reap, and start again.
    fn kill_and_restart(&mut self) {
        self.sigkill();
        self.start();
    }

    fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited by itself ({status}):\n{}",
                    self.name,
                    self.tail()
                );
            }
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

fn number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}"))
        }
        _ => default,
    }
}

/// Good orders: `T-00000`.. with an amount; every fifth fails transiently once first; every
/// seventh is published twice.
fn bodies(n: usize) -> (BTreeSet<String>, Vec<String>) {
    let mut good = BTreeSet::new();
    let mut bodies = Vec::new();
    for i in 0..n {
        let id = format!("T-{i:05}");
        let body = if i % 5 == 0 {
            format!(
                r#"{{"order_id":"{id}","amount_cents":{},"fail_first":1}}"#,
                100 + i
            )
        } else {
            format!(r#"{{"order_id":"{id}","amount_cents":{}}}"#, 100 + i)
        };
        if i % 7 == 0 {
            bodies.push(body.clone());
        }
        bodies.push(body);
        good.insert(id);
    }
    (good, bodies)
}

/// Lost and doubly charged orders of one hop.
fn audit(good: &BTreeSet<String>, ledger: &BTreeMap<String, u64>) -> (Vec<String>, Vec<String>) {
    let lost = good
        .iter()
        .filter(|id| !ledger.contains_key(*id))
        .cloned()
        .collect();
    let double = ledger
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| format!("{id}x{n}"))
        .collect();
    (lost, double)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hop_pipeline_survives_kills_at_every_hop() {
    let orders = usize::try_from(number("ACKSTACK_CRASH_ORDERS", DEFAULT_ORDERS as u64))
        .unwrap()
        .max(30);
    let seed = number(
        "ACKSTACK_CRASH_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut rng = Rng(seed);
    let pg = OwnPostgres::start();
    let url = pg.url();
    let amqp = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let queue = unique_name("orders-2hop");
    let events = format!("{queue}-events");
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic(&events, 3, 1).unwrap();
    mock.create_topic(&format!("{events}-dlq"), 1, 1).unwrap();
    // Slower answers widen the time between a record reaching Kafka and the relay's commit,
    // so that relay kills land there (a resend hop 2 must recognise).
    mock.broker_round_trip_time(1, Duration::from_millis(25))
        .unwrap();
    let brokers = mock.bootstrap_servers();
    let logs = std::env::temp_dir().join(unique_name("ackstack-two-hop-logs"));
    std::fs::create_dir_all(&logs).unwrap();

    let common = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--database-url",
            &url,
            "--kafka-brokers",
            &brokers,
            "--amqp-url",
            &amqp,
            "--concurrency",
            "8",
            "--max-attempts",
            "200",
            "--base-delay-ms",
            "50",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mut hop1 = Role::new(
        "hop1",
        common(&[
            "--broker",
            "rabbitmq",
            "--queue",
            &queue,
            "--consume-only",
            "--emit",
            &events,
            "--emit-broker",
            "kafka",
            "--relay",
            "off",
        ]),
        &logs,
    );
    let mut relay = Role::new(
        "relay",
        common(&[
            "--relay",
            "only",
            "--queue",
            &queue,
            "--emit",
            &events,
            "--emit-broker",
            "kafka",
        ]),
        &logs,
    );
    let mut hop2 = Role::new(
        "hop2",
        // Deduplicated by message id: the relay's resends carry the row's stable id.
        common(&[
            "--broker",
            "kafka",
            "--queue",
            &events,
            "--consume-only",
            "--dedup-key",
            "message-id",
        ]),
        &logs,
    );
    hop1.start();
    relay.start();
    hop2.start();

    // Hop 1 declares its queue on start; publish once it is there.
    let mut config = RabbitConfig::new(amqp.clone(), queue.clone());
    config.declare_topology = Topology::Never;
    let publisher = RabbitPublisher::connect(config).await.expect("RabbitMQ");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rabbitmqctl(&["list_queues", "name", "--no-table-headers", "-q"])
        .lines()
        .any(|l| l.trim() == queue)
    {
        assert!(
            Instant::now() < deadline,
            "hop 1 never declared {queue}:\n{}",
            hop1.tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (good, bodies) = bodies(orders);
    // Faults, in order: each round kills hop 1, the relay and hop 2; a connection drop and a
    // PostgreSQL restart are slotted into the first and second round.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        Kill(usize),
        DropConnection,
        RestartPostgres,
    }
    let mut faults = Vec::new();
    for round in 0..ROUNDS {
        faults.extend([Fault::Kill(0), Fault::Kill(1), Fault::Kill(2)]);
        faults.insert(
            faults.len() - 1 - rng.below(3),
            if round == 0 {
                Fault::DropConnection
            } else {
                Fault::RestartPostgres
            },
        );
    }
    let waves = faults.len() + 1;
    let mut kills = [0usize; 3];
    let (mut drops, mut restarts) = (0, 0);
    // Orders charged at each hop when the last fault struck.
    let mut progress = [0usize; 2];
    for (i, fault) in faults.iter().enumerate() {
        // A wave of orders, then the fault once the wave is moving through the pipeline.
        let wave = &bodies[bodies.len() * i / waves..bodies.len() * (i + 1) / waves];
        for body in wave {
            publisher
                .publish_to(&queue, Message::new(body.clone()))
                .await
                .unwrap();
        }
        // Wait until the hop the fault hits has moved on since the last fault, then a random
        // moment more.
        let started = Instant::now();
        // The relay is killed while hop 1 writes rows, when its rounds are busy.
        let hop_of = |fault: &Fault| match fault {
            Fault::Kill(0) | Fault::Kill(1) | Fault::DropConnection => 0,
            _ => 1,
        };
        let watched = [&queue, &events][hop_of(fault)];
        let before = progress[hop_of(fault)];
        loop {
            let now = ledger(&url, watched).await.map_or(0, |l| l.len());
            if now >= (before + 3).min(good.len()) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "no progress at {watched} before fault {}:\n--- hop1\n{}\n--- relay\n{}\n--- hop2\n{}",
                i + 1,
                hop1.tail(),
                relay.tail(),
                hop2.tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let extra = if matches!(fault, Fault::Kill(1)) {
            60
        } else {
            300
        };
        tokio::time::sleep(Duration::from_millis(rng.below(extra) as u64)).await;
        let wait = started.elapsed();
        let l1 = ledger_when_up(&url, &queue).await;
        let l2 = ledger_when_up(&url, &events).await;
        let doubles = [&l1, &l2].map(|l| l.values().filter(|n| **n > 1).count());
        let (at1, at2) = (l1.len(), l2.len());
        progress = [at1, at2];
        let what = match *fault {
            Fault::Kill(n) => {
                kills[n] += 1;
                let role = match n {
                    0 => &mut hop1,
                    1 => &mut relay,
                    _ => &mut hop2,
                };
                role.kill_and_restart();
                format!("SIGKILL {}", role.name)
            }
            Fault::DropConnection => {
                drops += close_rabbit_connections(&queue).min(1);
                "RabbitMQ connections of hop 1 closed".to_string()
            }
            Fault::RestartPostgres => {
                pg.restart_immediate();
                restarts += 1;
                "PostgreSQL restarted (immediate)".to_string()
            }
        };
        println!(
            "fault {} {what}: after {wait:.1?}, hop 1 had charged {at1}, hop 2 {at2} of {} orders; \
             double so far hop1={} hop2={}",
            i + 1,
            good.len(),
            doubles[0],
            doubles[1]
        );
        assert_eq!(doubles, [0, 0], "an order charged twice (seed {seed})");
    }
    for body in &bodies[bodies.len() * (waves - 1) / waves..] {
        publisher
            .publish_to(&queue, Message::new(body.clone()))
            .await
            .unwrap();
    }

    // Settle: every order through both hops, and nothing left in the outbox.
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let l1 = ledger(&url, &queue).await.unwrap_or_default();
        let l2 = ledger(&url, &events).await.unwrap_or_default();
        let pending = outbox_pending(&url).await.unwrap_or(-1);
        if l1.len() == good.len() && l2.len() == good.len() && pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "not settled within {SETTLE_WAIT:?}: hop 1 {}/{}, hop 2 {}/{}, outbox pending {pending}\n\
                 --- hop1\n{}\n--- relay\n{}\n--- hop2\n{}",
                l1.len(),
                good.len(),
                l2.len(),
                good.len(),
                hop1.tail(),
                relay.tail(),
                hop2.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A moment for late duplicates (a redelivery after a kill) to land, then the audit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let l1 = ledger(&url, &queue).await.unwrap();
    let (lost1, double1) = audit(&good, &l1);
    // What the relay published: one id per charged order, some sent twice by a killed relay.
    let (published, records) = published(&brokers, &events);
    let resent: usize = published.values().map(|n| n - 1).sum();
    assert_eq!(
        published.len(),
        good.len(),
        "one message id per order: {published:?}"
    );
    assert!(
        !published.contains_key("-"),
        "every event carries a message id"
    );
    // A killed relay's resends are rare and land by chance: send some events again as such a
    // relay would, and let hop 2 take them. Its inbox must recognise them by message id.
    const REPLAYED: usize = 10;
    publish_again(&brokers, &events, &records[..REPLAYED.min(records.len())]);
    wait_until_consumed(&brokers, &format!("{events}-example-orders"), &events);
    // Taken as duplicates, not dead-lettered: hop 2's dead-letter topic is empty.
    let dead_letters = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        consumer
            .fetch_watermarks(&format!("{events}-dlq"), 0, Duration::from_secs(10))
            .unwrap()
            .1
    };
    assert_eq!(dead_letters, 0, "hop 2 dead-lettered events");
    let l2 = ledger(&url, &events).await.unwrap();
    let (lost2, double2) = audit(&good, &l2);
    println!(
        "two-hop-crash orders={} publishes={} kills={} (hop1={} relay={} hop2={}) connection_drops={drops} \
         pg_restarts={restarts} events={} relay_resends={resent} replayed={REPLAYED} hop1_lost={} hop1_double={} hop2_lost={} \
         hop2_double={} seed={seed}",
        good.len(),
        bodies.len(),
        kills.iter().sum::<usize>(),
        kills[0],
        kills[1],
        kills[2],
        published.values().sum::<usize>(),
        lost1.len(),
        double1.len(),
        lost2.len(),
        double2.len(),
    );
    assert!(
        lost1.is_empty() && double1.is_empty() && lost2.is_empty() && double2.is_empty(),
        "hop 1 lost {lost1:?} double {double1:?}; hop 2 lost {lost2:?} double {double2:?} (seed {seed})"
    );
    assert_eq!(kills, [ROUNDS; 3]);
    assert_eq!((drops, restarts), (1, 1));
    hop1.sigkill();
    relay.sigkill();
    hop2.sigkill();
    let _ = std::fs::remove_dir_all(&logs);
}
