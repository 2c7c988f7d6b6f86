//! The crash suite (issue 8): the `orders` binary, a real OS process in `--consume-only` mode
//! with Redis deduplication and a Redis charge ledger, is killed with SIGKILL at random points
//! and restarted, has its broker connection dropped once and its Redis restarted once, while it
//! works through orders the test published: good ones, duplicate publishes, orders that fail
//! transiently, and malformed bodies. Afterwards the ledger and the dead-letter queue are
//! audited:
//!
//! - **lost** (a good order never charged) must be 0;
//! - **double-charged** orders are reported and explained: a SIGKILL that lands between a
//!   charge (`HINCRBY`) and the dedup done marker lets the redelivery charge again once the
//!   killed process's claim lapses. Right after each kill the suite records the orders it
//!   caught that way (charged, dedup key still claimed: `window_hits_per_kill`); each of them
//!   must be charged once more, and no order more than once per kill (or Redis restart). One kill can catch several handlers at once, up to
//!   `--concurrency` of them; every double-charged order must have been caught at a kill,
//!   or have been in flight (claimed) right before or right after the Redis restart
//!   (`double_charged_per_kill` is reported);
//! - every malformed body is in the DLQ byte for byte, with its original header and the
//!   `x-ackstack-dl-*` metadata (SQS: the `ackstack-dead-letter` attribute). A kill (or the
//!   connection drop) between the DLQ publish and the ack of the original makes a second copy:
//!   reported (`dead_lettered` counts copies), at most one per body per such event;
//! - nothing is left on the work queue (nor, on RabbitMQ, its delay queues).
//!
//! Each broker prints one figures line, e.g.
//! `crash-suite broker=rabbitmq store=redis orders=200 good=190 malformed=10
//! duplicates_injected=19 kills=4 connection_drops=1 redis_restarts=1 lost=0 double_charged=0
//! dead_lettered=10 seed=...`.
//!
//! The `*_with_inbox` variants run the same plan with the PostgreSQL transactional inbox
//! (`--database-url`, `DATABASE_URL` or `postgres://postgres@127.0.0.1:5432/test`) instead of
//! Redis, and audit the `ackstack_example_charges` rows of the queue: the charge commits with
//! the inbox row, so **every good order must be charged exactly once** (`double_charged=0`,
//! no window to explain). Nothing but the consumer is restarted there (and, on RabbitMQ, its
//! connection dropped); the figures line says `store=postgres`.
//!
//! Brokers: RabbitMQ, SQS and Kafka, the brokers that outlive the consumer process (the memory
//! broker dies with its process). Kafka runs against `KAFKA_BROKERS` when set, else against
//! librdkafka's mock cluster hosted in this test process, whose bootstrap servers the `orders`
//! child processes are given. On SQS and Kafka there is no connection the test can drop from outside
//! (SQS is plain HTTPS requests; a Kafka client talks to many brokers), so those runs only kill
//! and restart the consumer and Redis (`connection_drops=0`).
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`) with `rabbitmqctl` on the PATH, an SQS
//! endpoint such as moto on 127.0.0.1:4566 (or `SQS_ENDPOINT`) and `redis-server` on the PATH
//! (the suite starts a Redis of its own per broker). Knobs: `ACKSTACK_CRASH_ORDERS` (default
//! 200), `ACKSTACK_CRASH_KILLS` (default 4), `ACKSTACK_CRASH_SEED` (default: from the clock;
//! always printed, so a run's plan and kill points can be replayed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ackstack::kafka::{KafkaPublisher, read_topic};
use ackstack::nats::{NatsConfig, NatsPublisher, NatsSource};
use ackstack::rabbitmq::lapin::{self, options::QueueDeleteOptions};
use ackstack::rabbitmq::{RabbitConfig, RabbitPublisher};
use ackstack::redis_streams::RedisStreamsPublisher;
use ackstack::sqs::testing::TestQueue;
use ackstack::sqs::{Client, DeadLetterRecord, SqsPublisher, resolve_queue_url};
use ackstack::{Message, Publish};
use ackstack_testkit::unique_name;
use common::{Rng, close_rabbit_connections, database_url, env_or, pg_charges, rabbitmqctl};

mod common;

/// Orders per broker unless `ACKSTACK_CRASH_ORDERS` says otherwise.
const DEFAULT_ORDERS: usize = 200;
/// SIGKILLs per broker unless `ACKSTACK_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 4;
/// The header every published message carries: the order's index in the plan. Dead-letter
/// copies must keep it (original headers travel byte for byte).
const INDEX_HEADER: &str = "crash-index";
/// Handlers running at once in the consumer (the example's default).
const CONCURRENCY: &str = "8";
/// The attempt limit passed to the consumer. Deliberately out of reach: in a crash test a good
/// order's attempt count grows with things that are not failures of the order (SQS counts every
/// receive, kills included; the dedup layer's 1 s "busy" retries, while a killed process's 30 s
/// claim lapses, are redeliveries with a higher attempt on every broker), so a transient charge
/// failure during the Redis restart could otherwise push a good order past the example's
/// default of 4 and into the DLQ. The orders that fail on purpose fail at most twice.
const MAX_ATTEMPTS: &str = "200";
/// How long a killed run may take to reach its kill point before it is killed anyway.
const KILL_POINT_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for a broker or Redis to be ready.
const READY_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Settings and the seeded random number generator
// ---------------------------------------------------------------------------------------------

struct Settings {
    orders: usize,
    kills: usize,
    seed: u64,
}

fn settings() -> Settings {
    let number = |name: &str, default: u64| -> u64 {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
            _ => default,
        }
    };
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    Settings {
        orders: usize::try_from(number("ACKSTACK_CRASH_ORDERS", DEFAULT_ORDERS as u64))
            .unwrap()
            .max(20),
        kills: usize::try_from(number("ACKSTACK_CRASH_KILLS", DEFAULT_KILLS as u64)).unwrap(),
        seed: number("ACKSTACK_CRASH_SEED", clock),
    }
}

/// How long one broker call may take before the test fails (instead of hanging).
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test when it takes longer than [`CALL_LIMIT`].
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_LIMIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no answer within {CALL_LIMIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: what is published
// ---------------------------------------------------------------------------------------------

/// One publish: the body and the order's index (sent as [`INDEX_HEADER`]).
#[derive(Clone)]
struct Publication {
    body: String,
    index: usize,
}

struct Plan {
    /// Good order ids, each to be charged once.
    good: BTreeSet<String>,
    /// Malformed bodies by index, each to be dead-lettered.
    malformed: BTreeMap<usize, String>,
    /// Orders that fail transiently first (`fail_first` 1 or 2).
    flaky: usize,
    /// Extra publishes of good orders.
    duplicates: usize,
    /// Everything to publish, shuffled.
    publications: Vec<Publication>,
}

impl Plan {
    /// `n` orders: ~5% malformed, ~10% failing transiently first, the rest plain; ~10% of the
    /// good ones published twice; all shuffled.
    fn new(n: usize, rng: &mut Rng) -> Plan {
        #[derive(Clone, Copy)]
        enum Kind {
            Plain,
            Flaky,
            Malformed,
        }
        let malformed_count = (n / 20).max(1);
        let flaky_count = (n / 10).max(1);
        let mut kinds = vec![Kind::Malformed; malformed_count];
        kinds.extend(vec![Kind::Flaky; flaky_count]);
        kinds.resize(n, Kind::Plain);
        rng.shuffle(&mut kinds);

        let mut plan = Plan {
            good: BTreeSet::new(),
            malformed: BTreeMap::new(),
            flaky: flaky_count,
            duplicates: 0,
            publications: Vec::new(),
        };
        let mut good_publications = Vec::new();
        for (index, kind) in kinds.into_iter().enumerate() {
            let id = format!("C-{index:05}");
            let amount = 100 + rng.below(99_900);
            let body = match kind {
                Kind::Plain => format!(r#"{{"order_id":"{id}","amount_cents":{amount}}}"#),
                Kind::Flaky => format!(
                    r#"{{"order_id":"{id}","amount_cents":{amount},"fail_first":{}}}"#,
                    1 + rng.below(2)
                ),
                Kind::Malformed => {
                    let body = malformed_body(index, rng.below(6));
                    plan.malformed.insert(index, body.clone());
                    plan.publications.push(Publication { body, index });
                    continue;
                }
            };
            plan.good.insert(id);
            let publication = Publication { body, index };
            good_publications.push(publication.clone());
            plan.publications.push(publication);
        }
        // Duplicate publishes of distinct good orders, byte for byte the same message.
        rng.shuffle(&mut good_publications);
        plan.duplicates = (plan.good.len() / 10).max(1);
        plan.publications
            .extend(good_publications.into_iter().take(plan.duplicates));
        rng.shuffle(&mut plan.publications);
        plan
    }

    /// The publications in `parts` consecutive waves of nearly equal size.
    fn waves(&self, parts: usize) -> Vec<Vec<Publication>> {
        let total = self.publications.len();
        (0..parts)
            .map(|p| self.publications[total * p / parts..total * (p + 1) / parts].to_vec())
            .collect()
    }
}

/// A body that is not a valid order, unique per index (several shapes: not JSON, truncated
/// JSON, an id but a bad amount, no id, trailing garbage, non-ASCII text). All valid UTF-8,
/// because SQS bodies must be text.
fn malformed_body(index: usize, shape: usize) -> String {
    match shape {
        0 => format!("this is not an order #{index}"),
        1 => format!(r#"{{"order_id":"M-{index}","amount_cents":"twelve"}}"#),
        2 => format!(r#"{{"order_id":"M-{index}","amount_cents":1"#),
        3 => format!(r#"{{"amount_cents":{index}}}"#),
        4 => format!("{{\"order_id\":\"M-{index}\",\"amount_cents\":1}} trailing\tgarbage"),
        _ => format!("[{index}, \"Bestellung ungültig ✗ 注文\"]"),
    }
}

// ---------------------------------------------------------------------------------------------
// The test's own Redis
// ---------------------------------------------------------------------------------------------

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(name));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child process of the test's own on a free port, killed on drop.
///
/// It persists with `--appendonly yes --appendfsync always` in its own directory: the suite
/// restarts it mid-run to prove that the consumer's dedup store (and ledger) reconnect, and the
/// ledger under audit lives in this Redis too. Without persistence the restart would wipe the
/// ledger and the dedup markers, and the audit would count every order charged before the
/// restart as lost (and every duplicate after it as a double charge). With an fsync before
/// every reply, every write the consumer saw acknowledged survives the restart.
struct OwnRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(dir: &Path) -> OwnRedis {
        assert!(
            Command::new("redis-server")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the crash suite needs `redis-server` on the PATH"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until it answers PING (after loading its append-only file).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "redis-server on port {} exited: {status}; log:\n{}",
                    self.port,
                    tail(&self.dir.join("redis.log"), 30)
                );
            }
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not ready after {READY_WAIT:?}: {pong:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it with SIGTERM (it fsyncs and exits; clients see their connections close) and
    /// starts it again on the same port and directory. Returns how long it was down.
    fn restart(&mut self) -> Duration {
        let down = Instant::now();
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.spawn();
        down.elapsed()
    }

    /// Sends `signal` (`"STOP"`: frozen, connections open but nothing answered; `"CONT"`).
    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill -{signal}");
        }
    }

    fn connection(&self) -> redis::Connection {
        let conn = redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("CONT");
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer process
// ---------------------------------------------------------------------------------------------

/// One run of `orders`; SIGKILLed and reaped on drop if still running.
struct OrdersProcess {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_log: PathBuf,
    /// Outcome lines (`acked`, `retried`, `dead_lettered`) seen so far.
    outcomes: usize,
}

impl OrdersProcess {
    fn spawn(args: &[String], stderr_log: &Path, label: &str) -> OrdersProcess {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_log)
            .unwrap();
        writeln!(log, "=== {label}: orders {}", args.join(" ")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("KAFKA_BROKERS")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let keep = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                keep.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        OrdersProcess {
            child,
            lines,
            stdout,
            stderr_log: stderr_log.to_path_buf(),
            outcomes: 0,
        }
    }

    /// Waits until the run has printed `target` outcome lines in all, or `limit` passed.
    /// Returns whether the target was reached. Panics if the process ends: a consume-only run
    /// without `--exit-when-idle` must not stop by itself.
    fn wait_outcomes(&mut self, target: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.outcomes < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if is_outcome(&line) {
                        self.outcomes += 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    panic!(
                        "orders exited unexpectedly ({status}):\n{}",
                        self.diagnostics()
                    );
                }
            }
        }
        true
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap it.
    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit by itself within `limit`; SIGKILLs it and panics if not.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines (it ends at end of file).
                let drained = Instant::now() + Duration::from_secs(5);
                while let Ok(_) | Err(RecvTimeoutError::Timeout) = self
                    .lines
                    .recv_timeout(drained.saturating_duration_since(Instant::now()))
                {
                    if Instant::now() > drained {
                        break;
                    }
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the final run did not finish within {limit:?}:\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn diagnostics(&self) -> String {
        let out = self.stdout_lines();
        let from = out.len().saturating_sub(40);
        format!(
            "--- last stdout lines\n{}\n--- stderr (all runs, tail)\n{}",
            out[from..].join("\n"),
            tail(&self.stderr_log, 60)
        )
    }
}

impl Drop for OrdersProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_outcome(line: &str) -> bool {
    line.starts_with("acked ") || line.starts_with("retried ") || line.starts_with("dead_lettered ")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The brokers, as the test sees them
// ---------------------------------------------------------------------------------------------

/// A dead-letter copy: its body, its headers (original ones and the `x-ackstack-dl-*`
/// metadata, by name).
struct DeadCopy {
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

enum Broker {
    Rabbit {
        url: String,
        /// Boxed: it is much larger than the other variants.
        publisher: Box<RabbitPublisher>,
    },
    Sqs {
        endpoint: String,
        client: Client,
        queue: TestQueue,
        publisher: SqsPublisher,
    },
    Kafka {
        brokers: String,
        publisher: KafkaPublisher,
        /// The mock cluster this test hosts (none with `KAFKA_BROKERS`): it outlives every
        /// `orders` process the suite kills, as a real cluster would.
        _mock: Option<
            rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        >,
    },
    Nats {
        url: String,
        client: ackstack::nats::async_nats::Client,
        /// Boxed: it is much larger than the other variants.
        publisher: Box<NatsPublisher>,
    },
    RedisStreams {
        url: String,
        publisher: RedisStreamsPublisher,
    },
}

impl Broker {
    async fn rabbitmq(queue: &str) -> Broker {
        let url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        // The example declares the topology (its delay buckets follow its flags); the test's
        // publisher only publishes and reads, once the example has declared the queues.
        let mut config = RabbitConfig::new(url.clone(), queue.to_string());
        config.declare_topology = ackstack::rabbitmq::Topology::Never;
        let publisher = bounded("RabbitMQ connect", RabbitPublisher::connect(config))
            .await
            .expect("RabbitMQ: is it running on 127.0.0.1:5672 (or AMQP_URL)?");
        Broker::Rabbit {
            url,
            publisher: Box::new(publisher),
        }
    }

    async fn sqs(queue: &str) -> Broker {
        let endpoint = ackstack::sqs::testing::endpoint();
        let addr = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        assert!(
            std::net::TcpStream::connect(&addr).is_ok(),
            "no SQS endpoint at {endpoint}: start moto with `moto_server -H 127.0.0.1 -p 4566`"
        );
        let client = ackstack::sqs::testing::client().await;
        // Created as the example creates them (plain CreateQueue), so both agree.
        let dlq_name = format!("{queue}-dlq");
        let url = bounded("SQS CreateQueue", resolve_queue_url(&client, queue, true))
            .await
            .unwrap();
        let dlq_url = bounded(
            "SQS CreateQueue",
            resolve_queue_url(&client, &dlq_name, true),
        )
        .await
        .unwrap();
        let publisher = SqsPublisher::new(client.clone(), url.clone());
        Broker::Sqs {
            endpoint,
            client,
            queue: TestQueue {
                name: queue.to_string(),
                url,
                dlq_name,
                dlq_url,
            },
            publisher,
        }
    }

    /// A real cluster from `KAFKA_BROKERS`, or a mock cluster hosted here whose bootstrap
    /// servers the `orders` child processes are pointed at.
    async fn kafka(brokers: &str, queue: &str) -> Broker {
        let dlq = format!("{queue}-dlq");
        if brokers.is_empty() {
            let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
            // The mock does not serve CreateTopics; its own call does the same.
            mock.create_topic(queue, 3, 1).unwrap();
            mock.create_topic(&dlq, 1, 1).unwrap();
            let brokers = mock.bootstrap_servers();
            return Broker::Kafka {
                publisher: KafkaPublisher::new(&brokers, queue).unwrap(),
                brokers,
                _mock: Some(mock),
            };
        }
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let topics = [
            NewTopic::new(queue, 3, TopicReplication::Fixed(1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
        ];
        let options = AdminOptions::new().operation_timeout(Some(READY_WAIT));
        tokio::time::timeout(READY_WAIT, admin.create_topics(&topics, &options))
            .await
            .expect("Kafka: creating the topics timed out")
            .expect("Kafka: creating the topics failed");
        Broker::Kafka {
            brokers: brokers.to_string(),
            publisher: KafkaPublisher::new(brokers, queue).unwrap(),
            _mock: None,
        }
    }

    /// The stream `queue`, its dead-letter stream and the durable consumer, created as the
    /// example creates them (it adopts them), so that nothing published is missed.
    async fn nats(queue: &str) -> Broker {
        let url = env_or("NATS_URL", "nats://127.0.0.1:4222");
        let client = bounded("NATS connect", ackstack::nats::async_nats::connect(&url))
            .await
            .expect("NATS: is it running on 127.0.0.1:4222 (or NATS_URL)?");
        let mut config = NatsConfig::new(url.clone(), queue);
        config.consumer = "example-orders".into();
        config.dlq_stream = Some(format!("{queue}-dlq"));
        bounded(
            "NATS streams",
            NatsSource::from_client(client.clone(), config),
        )
        .await
        .unwrap();
        Broker::Nats {
            url,
            publisher: Box::new(NatsPublisher::new(client.clone(), queue)),
            client,
        }
    }

    /// The stream lives in `url`: the test's own Redis when the store is Redis too (it is
    /// restarted in the last run, the stream with it), else the shared one.
    fn redis_streams(url: String, queue: &str) -> Broker {
        Broker::RedisStreams {
            publisher: RedisStreamsPublisher::connect(&url, queue).unwrap(),
            url,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Broker::Rabbit { .. } => "rabbitmq",
            Broker::Sqs { .. } => "sqs",
            Broker::Kafka { .. } => "kafka",
            Broker::Nats { .. } => "nats",
            Broker::RedisStreams { .. } => "redis-streams",
        }
    }

    /// The flags that point `orders` at this broker.
    fn flags(&self) -> Vec<String> {
        let (flag, value) = match self {
            Broker::Rabbit { url, .. } => ("--amqp-url", url),
            Broker::Sqs { endpoint, .. } => ("--sqs-endpoint", endpoint),
            Broker::Kafka { brokers, .. } => ("--kafka-brokers", brokers),
            Broker::Nats { url, .. } => ("--nats-url", url),
            Broker::RedisStreams { url, .. } => ("--redis-url", url),
        };
        vec![
            "--broker".into(),
            self.name().into(),
            flag.into(),
            value.clone(),
        ]
    }

    /// How long the final run waits idle before it exits: longer than anything can stay out of
    /// sight. RabbitMQ: the largest delay bucket (10 s) plus margin. SQS: messages in flight at
    /// the last kill stay invisible for the visibility timeout (30 s), plus margin. Kafka: the
    /// group's session timeout (6 s) and rebalance, plus margin.
    fn final_idle_secs(&self) -> &'static str {
        match self {
            Broker::Rabbit { .. } => "12",
            Broker::Sqs { .. } => "35",
            Broker::Kafka { .. } => "15",
            // Entries a killed run held come back once idle for the lease (30 s).
            Broker::Nats { .. } | Broker::RedisStreams { .. } => "35",
        }
    }

    /// Waits until the example has declared the queues (RabbitMQ; the others exist already).
    async fn wait_ready(&self, queue: &str) {
        if let Broker::Rabbit { publisher, .. } = self {
            let deadline = Instant::now() + READY_WAIT;
            while bounded("RabbitMQ queue.declare", publisher.queue_len(queue))
                .await
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "the example did not declare {queue} within {READY_WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn publish(&self, queue: &str, wave: &[Publication]) {
        for p in wave {
            let message = Message::new(p.body.clone()).header(INDEX_HEADER, p.index.to_string());
            match self {
                Broker::Rabbit { publisher, .. } => {
                    bounded("RabbitMQ publish", publisher.publish_to(queue, message))
                        .await
                        .unwrap()
                }
                Broker::Sqs { publisher, .. } => bounded("SQS publish", publisher.publish(message))
                    .await
                    .unwrap(),
                Broker::Kafka { publisher, .. } => {
                    bounded("Kafka publish", publisher.publish(message))
                        .await
                        .unwrap()
                }
                Broker::Nats { publisher, .. } => {
                    bounded("NATS publish", publisher.publish(message))
                        .await
                        .unwrap()
                }
                Broker::RedisStreams { publisher, .. } => {
                    bounded("XADD", publisher.publish(message)).await.unwrap()
                }
            }
        }
    }

    /// Whether the test can drop the consumer's broker connection from outside.
    fn can_drop_connection(&self) -> bool {
        matches!(self, Broker::Rabbit { .. })
    }

    /// RabbitMQ: closes every connection of the example on `queue` (its consumer and its
    /// publisher, named `example-orders-<queue>-*`) with `rabbitmqctl close_connection`.
    /// Returns how many were closed.
    fn drop_connection(&self, queue: &str) -> usize {
        close_rabbit_connections(queue)
    }

    /// Takes every message from the dead-letter queue.
    async fn read_dead_letters(&self, queue: &str, expected: usize) -> Vec<DeadCopy> {
        let mut copies = Vec::new();
        match self {
            Broker::Rabbit { publisher, .. } => {
                let dlq = format!("{queue}-dlq");
                while let Some(m) = bounded("RabbitMQ basic.get", publisher.get(&dlq))
                    .await
                    .unwrap()
                {
                    let headers = m
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    copies.push(DeadCopy {
                        payload: m.payload.to_vec(),
                        headers,
                    });
                    assert!(copies.len() < 100_000);
                }
            }
            Broker::Sqs { client, queue, .. } => {
                // The consumer is gone: the DLQ is settled, and all of it is visible. Ask for
                // more than expected so that extra copies are read too; this polls for the
                // whole deadline only when there are none.
                let want = expected * 2 + 10;
                let drain = ackstack::sqs::testing::drain(
                    client,
                    &queue.dlq_url,
                    want,
                    Duration::from_secs(5),
                );
                let messages = bounded("SQS read DLQ", drain).await.unwrap();
                for m in messages {
                    let attrs = m.message_attributes().cloned().unwrap_or_default();
                    let mut headers: BTreeMap<String, String> = BTreeMap::new();
                    if let Some(record) = DeadLetterRecord::from_attributes(&attrs) {
                        headers.extend(record.metadata.header_pairs());
                    }
                    for (name, value) in &attrs {
                        if let Some(text) = value.string_value() {
                            headers.insert(name.clone(), text.to_string());
                        }
                    }
                    copies.push(DeadCopy {
                        payload: m.body().unwrap_or_default().as_bytes().to_vec(),
                        headers,
                    });
                }
            }
            Broker::Nats { client, .. } => {
                copies = bounded("NATS read DLQ", nats_dead_letters(client, queue)).await;
            }
            Broker::RedisStreams { url, .. } => {
                let entries: Vec<(String, Vec<Field>)> = redis::cmd("XRANGE")
                    .arg(format!("{queue}-dlq"))
                    .arg("-")
                    .arg("+")
                    .query(&mut redis_connection(url))
                    .unwrap();
                for (_, fields) in entries {
                    let mut copy = DeadCopy {
                        payload: Vec::new(),
                        headers: BTreeMap::new(),
                    };
                    for (name, value) in fields {
                        if name == b"payload" {
                            copy.payload = value;
                        } else {
                            copy.headers.insert(
                                String::from_utf8_lossy(&name).into_owned(),
                                String::from_utf8_lossy(&value).into_owned(),
                            );
                        }
                    }
                    copies.push(copy);
                }
            }
            Broker::Kafka { brokers, .. } => {
                let dlq = format!("{queue}-dlq");
                let want = expected * 2 + 10;
                let read = read_topic(brokers, &dlq, want, Duration::from_secs(20));
                let records = bounded("Kafka read DLQ", read).await.unwrap();
                for d in records {
                    let headers = d
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    copies.push(DeadCopy {
                        payload: d.payload.to_vec(),
                        headers,
                    });
                }
            }
        }
        copies
    }

    /// Messages still on the work queue (RabbitMQ: and its delay and run-alone queues; SQS: visible, in
    /// flight or delayed; Kafka: the group's lag).
    async fn leftover(&self, queue: &str) -> u64 {
        match self {
            Broker::Rabbit { .. } => rabbit_queues(queue)
                .into_iter()
                .filter(|(name, _)| !name.ends_with("-dlq"))
                .map(|(_, n)| n)
                .sum(),
            Broker::Sqs { client, queue, .. } => {
                bounded("SQS queue attributes", queue.approximate_count(client))
                    .await
                    .unwrap()
            }
            Broker::Kafka { brokers, .. } => kafka_lag(brokers, queue),
            Broker::Nats { client, .. } => {
                let js = ackstack::nats::async_nats::jetstream::new(client.clone());
                let info = async {
                    let stream = js.get_stream(queue).await.unwrap();
                    let mut consumer = stream
                        .get_consumer::<ackstack::nats::async_nats::jetstream::consumer::pull::Config>(
                            "example-orders",
                        )
                        .await
                        .unwrap();
                    consumer.info().await.unwrap().clone()
                };
                let info = bounded("NATS consumer info", info).await;
                info.num_pending + info.num_ack_pending as u64
            }
            Broker::RedisStreams { url, .. } => {
                let mut conn = redis_connection(url);
                let groups: Vec<BTreeMap<String, redis::Value>> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(queue)
                    .query(&mut conn)
                    .unwrap();
                let field = |g: &BTreeMap<String, redis::Value>, name: &str| match g.get(name) {
                    Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                let delayed: u64 = redis::cmd("ZCARD")
                    .arg(format!("{queue}:delayed"))
                    .query(&mut conn)
                    .unwrap();
                groups
                    .iter()
                    .map(|g| field(g, "pending") + field(g, "lag"))
                    .sum::<u64>()
                    + delayed
            }
        }
    }

    /// Deletes the queues this run made (Kafka topics are left on the external cluster);
    /// best effort, within [`CALL_LIMIT`].
    async fn cleanup(&self, queue: &str) {
        let _ = tokio::time::timeout(CALL_LIMIT, self.delete_queues(queue)).await;
    }

    async fn delete_queues(&self, queue: &str) {
        match self {
            Broker::Rabbit { url, .. } => {
                let Ok(conn) =
                    lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
                else {
                    return;
                };
                if let Ok(channel) = conn.create_channel().await {
                    for (name, _) in rabbit_queues(queue) {
                        let _ = channel
                            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "done".into()).await;
            }
            Broker::Sqs { client, queue, .. } => queue.delete(client).await,
            Broker::Kafka { .. } => {}
            Broker::Nats { client, .. } => {
                let js = ackstack::nats::async_nats::jetstream::new(client.clone());
                let _ = js.delete_stream(queue).await;
                let _ = js.delete_stream(format!("{queue}-dlq")).await;
            }
            Broker::RedisStreams { url, .. } => {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(queue)
                    .arg(format!("{queue}-dlq"))
                    .arg(format!("{queue}:delayed"))
                    .query(&mut redis_connection(url));
            }
        }
    }
}

/// A stream entry's field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// A blocking connection to the Redis at `url`.
fn redis_connection(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(CALL_LIMIT))
        .unwrap()
}

/// Every dead letter of `queue` on NATS: the stream `<queue>-dlq` read from its start by an
/// ephemeral consumer.
async fn nats_dead_letters(
    client: &ackstack::nats::async_nats::Client,
    queue: &str,
) -> Vec<DeadCopy> {
    use ackstack::nats::async_nats::jetstream::{self, consumer::pull};
    use futures::StreamExt;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(format!("{queue}-dlq")).await.unwrap();
    let reader = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut copies = Vec::new();
    loop {
        let mut batch = reader
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let before = copies.len();
        while let Some(Ok(message)) = batch.next().await {
            let mut headers = BTreeMap::new();
            if let Some(map) = &message.headers {
                for (name, values) in map.iter() {
                    if let Some(value) = values.first() {
                        headers.insert(name.to_string(), value.as_str().to_string());
                    }
                }
            }
            copies.push(DeadCopy {
                payload: message.payload.to_vec(),
                headers,
            });
        }
        if copies.len() == before {
            return copies;
        }
    }
}

/// `(name, messages)` of the work queue, its delay queues (`<queue>.delay.<ms>`), the queue of
/// suspects waiting to run alone (`<queue>.ackstack-alone`) and its DLQ, from `rabbitmqctl
/// list_queues`.
fn rabbit_queues(queue: &str) -> Vec<(String, u64)> {
    let listing = rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--no-table-headers",
        "-q",
    ]);
    let dlq = format!("{queue}-dlq");
    let delay = format!("{queue}.delay.");
    let alone = format!("{queue}.ackstack-alone");
    listing
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(name, _)| {
            *name == queue || *name == dlq || *name == alone || name.starts_with(&delay)
        })
        .map(|(name, n)| (name.to_string(), n.trim().parse().unwrap_or(u64::MAX)))
        .collect()
}

/// The example's consumer group's lag on `topic`: high watermarks minus committed offsets.
fn kafka_lag(brokers: &str, topic: &str) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-example-orders"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(list, timeout).unwrap();
    let mut lag = 0;
    for p in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, timeout).unwrap();
        let done = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        lag += u64::try_from(high - done).unwrap_or(0);
    }
    lag
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

/// Right after a kill: the orders the kill caught between their charge and their done marker,
/// i.e. charged (ledger count at least 1) while their dedup key still holds a claim of the
/// dead process. Each of them will be charged once more when its claim lapses and the
/// redelivery runs. `seen` remembers the count at which an order was last caught, so that an
/// order still waiting for its claim to lapse at the next kill is not counted twice.
fn window_hits(redis: &OwnRedis, queue: &str, seen: &mut BTreeMap<String, u64>) -> usize {
    let mut conn = redis.connection();
    let charges: BTreeMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{queue}:charges"))
        .query(&mut conn)
        .unwrap();
    let mut hits = 0;
    for (order_id, count) in charges {
        if is_claimed(&mut conn, queue, &order_id) && seen.get(&order_id) != Some(&count) {
            seen.insert(order_id, count);
            hits += 1;
        }
    }
    hits
}

/// Of `orders`, those whose dedup key holds a claim (not the done marker): in flight, or
/// left by a process that died.
fn claimed(redis: &OwnRedis, queue: &str, orders: &BTreeSet<String>) -> Vec<String> {
    let mut conn = redis.connection();
    orders
        .iter()
        .filter(|order_id| is_claimed(&mut conn, queue, order_id))
        .cloned()
        .collect()
}

/// Whether `order_id`'s dedup key holds a claim rather than the done marker (or nothing).
fn is_claimed(conn: &mut redis::Connection, queue: &str, order_id: &str) -> bool {
    let key = ackstack::redis::redis_key(&format!("{queue}:dedup:"), order_id.as_bytes());
    let state: Option<String> = redis::cmd("GET").arg(&key).query(conn).unwrap();
    state.is_some_and(|v| v != ackstack::redis::DONE_MARKER)
}

enum Event {
    RestartRedis,
    DropConnection,
}

/// Where the consumer deduplicates and keeps its ledger.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    /// The test's own Redis (`--redis-url`): dedup marks after the charge, so a kill between
    /// the two can charge again.
    Redis,
    /// PostgreSQL (`--database-url`): the inbox row and the charge commit together, so no
    /// kill can charge twice.
    Postgres,
}

/// A connection to the test database.
async fn pg_client() -> ackstack::postgres::tokio_postgres::Client {
    use ackstack::postgres::tokio_postgres;
    let (client, connection) = bounded(
        "connecting to PostgreSQL",
        tokio_postgres::connect(&database_url(), tokio_postgres::NoTls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// The PostgreSQL ledger of `queue`: `order_id -> count`.
async fn pg_ledger(queue: &str) -> BTreeMap<String, u64> {
    pg_charges(&pg_client().await, queue).await
}

/// Deletes the ledger rows and inbox rows of `queue`.
async fn pg_cleanup(queue: &str) {
    let client = pg_client().await;
    client
        .execute(
            "DELETE FROM ackstack_example_charges WHERE queue = $1",
            &[&queue],
        )
        .await
        .unwrap();
    client
        .execute(
            "DELETE FROM ackstack_inbox WHERE consumer = $1",
            &[&format!("example-orders:{queue}")],
        )
        .await
        .unwrap();
}

fn crash_suite(broker_name: &str, store: Store) {
    let settings = settings();
    let started = Instant::now();
    let mut rng = Rng(settings.seed);
    let queue = unique_name(&format!("orders-crash-{broker_name}"));
    let tmp = TempDir::new(&format!("ackstack-crash-{broker_name}"));
    let stderr_log = tmp.0.join("orders.stderr.log");
    let redis_dir = tmp.0.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let mut redis = (store == Store::Redis).then(|| OwnRedis::start(&redis_dir));
    let store_name = match store {
        Store::Redis => "redis",
        Store::Postgres => "postgres",
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = rt.block_on(async {
        match broker_name {
            "rabbitmq" => Broker::rabbitmq(&queue).await,
            "sqs" => Broker::sqs(&queue).await,
            "kafka" => Broker::kafka(&env_or("KAFKA_BROKERS", ""), &queue).await,
            "nats" => Broker::nats(&queue).await,
            "redis-streams" => {
                let url = match &redis {
                    Some(redis) => redis.url(),
                    None => env_or("REDIS_URL", "redis://127.0.0.1:6379"),
                };
                Broker::redis_streams(url, &queue)
            }
            other => panic!("unknown broker {other}"),
        }
    });
    let plan = Plan::new(settings.orders, &mut rng);
    println!(
        "crash-suite broker={broker_name} store={store_name} queue={queue} seed={} plan: orders={} good={} \
         malformed={} fail_first={} duplicates={} publishes={} kills={}",
        settings.seed,
        settings.orders,
        plan.good.len(),
        plan.malformed.len(),
        plan.flaky,
        plan.duplicates,
        plan.publications.len(),
        settings.kills
    );

    let mut args = broker.flags();
    match &redis {
        // Redis Streams in the store's Redis: `--redis-url` says both.
        Some(_) if matches!(broker, Broker::RedisStreams { .. }) => {}
        Some(redis) => args.extend(["--redis-url".to_string(), redis.url()]),
        None => args.extend(["--database-url".to_string(), database_url()]),
    }
    args.extend(
        [
            "--queue",
            &queue,
            "--consume-only",
            "--concurrency",
            CONCURRENCY,
            "--max-attempts",
            MAX_ATTEMPTS,
        ]
        .map(String::from),
    );

    // The publications go out in waves, one at the start of each run, so that every killed
    // run has work in hand when the kill comes. Run k is SIGKILLed once it has printed a
    // random number of outcomes (up to its wave's size), plus a random 0-40 ms; the last run
    // is not killed: it gets the Redis restart and the connection drop at random points, and
    // must then finish everything and exit on its own when idle.
    let waves = plan.waves(settings.kills + 1);
    let mut kills = 0;
    let mut hits_per_kill: Vec<usize> = Vec::new();
    let mut window_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut kills_at_time_limit = 0;
    let mut connection_drops = 0;
    let mut redis_restarts = 0;
    let mut restart_seen: BTreeSet<String> = BTreeSet::new();
    let mut redis_downtime = Duration::ZERO;
    let mut final_stdout = Vec::new();
    for (run, wave) in waves.iter().enumerate() {
        let last = run == settings.kills;
        let mut run_args = args.clone();
        if last {
            run_args.extend([
                "--exit-when-idle".to_string(),
                broker.final_idle_secs().into(),
            ]);
        }
        let mut process = OrdersProcess::spawn(&run_args, &stderr_log, &format!("run {run}"));
        if run == 0 {
            rt.block_on(broker.wait_ready(&queue));
        }
        rt.block_on(broker.publish(&queue, wave));
        if !last {
            let target = rng.between(1, wave.len().max(1));
            if !process.wait_outcomes(target, KILL_POINT_WAIT) {
                kills_at_time_limit += 1;
            }
            std::thread::sleep(Duration::from_millis(rng.below(41) as u64));
            process.sigkill();
            kills += 1;
            // (With the inbox no kill can leave a charge without its inbox row.)
            if let Some(redis) = &redis {
                let hits = window_hits(redis, &queue, &mut window_seen);
                hits_per_kill.push(hits);
            }
            continue;
        }
        let half = (wave.len() / 2).max(1);
        let mut events = Vec::new();
        if redis.is_some() {
            events.push((rng.between(1, half), Event::RestartRedis));
        }
        if broker.can_drop_connection() {
            events.push((rng.between(1, half), Event::DropConnection));
        }
        events.sort_by_key(|(at, _)| *at);
        for (at, event) in events {
            process.wait_outcomes(at, KILL_POINT_WAIT);
            match event {
                Event::RestartRedis => {
                    if let Some(redis) = &mut redis {
                        // The orders in flight around the restart: claimed right before it,
                        // or still claimed right after (a charge applied whose reply the
                        // restart lost is retried, after a backoff, and charged again).
                        restart_seen.extend(claimed(redis, &queue, &plan.good));
                        redis_downtime = redis.restart();
                        restart_seen.extend(claimed(redis, &queue, &plan.good));
                        redis_restarts += 1;
                    }
                }
                Event::DropConnection => {
                    broker.drop_connection(&queue);
                    connection_drops += 1;
                }
            }
        }
        let limit = Duration::from_secs(150 + settings.orders as u64 / 10);
        let status = process.wait_exit(limit);
        assert!(
            status.success(),
            "the final run failed ({status}):\n{}",
            process.diagnostics()
        );
        final_stdout = process.stdout_lines();
    }

    // The audit. The ledger: HGETALL <queue>:charges in the test's Redis, or the queue's rows
    // of ackstack_example_charges in PostgreSQL.
    let charges: BTreeMap<String, u64> = match &redis {
        Some(redis) => redis::cmd("HGETALL")
            .arg(format!("{queue}:charges"))
            .query(&mut redis.connection())
            .unwrap(),
        None => rt.block_on(pg_ledger(&queue)),
    };
    let lost: Vec<&String> = plan
        .good
        .iter()
        .filter(|id| charges.get(*id).copied().unwrap_or(0) == 0)
        .collect();
    let double: BTreeMap<&String, &u64> = charges.iter().filter(|(_, n)| **n > 1).collect();
    let extra_charges: u64 = charges.values().map(|n| n.saturating_sub(1)).sum();
    let strangers: Vec<&String> = charges
        .keys()
        .filter(|id| !plan.good.contains(*id))
        .collect();

    // The dead-letter queue: every malformed body, byte for byte, with its metadata.
    let copies = rt.block_on(broker.read_dead_letters(&queue, plan.malformed.len()));
    let mut per_body: BTreeMap<usize, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for copy in &copies {
        let index = copy
            .headers
            .get(INDEX_HEADER)
            .and_then(|i| i.parse::<usize>().ok());
        let Some((index, body)) = index.and_then(|i| plan.malformed.get_key_value(&i)) else {
            problems.push(format!(
                "a dead letter that is not a malformed order: {:?} headers {:?}",
                String::from_utf8_lossy(&copy.payload),
                copy.headers
            ));
            continue;
        };
        if copy.payload != body.as_bytes() {
            problems.push(format!(
                "dead letter {index} differs from what was published: {:?} != {body:?}",
                String::from_utf8_lossy(&copy.payload)
            ));
        }
        let meta = |name: &str| copy.headers.get(&format!("x-ackstack-dl-{name}")).cloned();
        let expected = [
            ("reason", "permanent".to_string()),
            ("error-kind", "permanent".to_string()),
            ("broker", broker_name.to_string()),
            ("queue", queue.clone()),
            ("consumer", "example-orders".to_string()),
        ];
        for (name, want) in expected {
            if meta(name).as_deref() != Some(want.as_str()) {
                problems.push(format!(
                    "dead letter {index}: x-ackstack-dl-{name} is {:?}, expected {want:?}",
                    meta(name)
                ));
            }
        }
        let attempts_ok = meta("attempts")
            .and_then(|a| a.parse::<u32>().ok())
            .is_some_and(|a| a >= 1);
        let message_ok = meta("error-message").is_some_and(|m| m.contains("not a valid Order"));
        let time_ok = meta("last-failure-ms")
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|t| t > 0);
        if !(attempts_ok && message_ok && time_ok) {
            problems.push(format!(
                "dead letter {index}: bad attempts/error-message/last-failure-ms in {:?}",
                copy.headers
            ));
        }
        *per_body.entry(*index).or_default() += 1;
    }
    let missing_dead: Vec<usize> = plan
        .malformed
        .keys()
        .filter(|i| !per_body.contains_key(i))
        .copied()
        .collect();
    let extra_dead: usize = per_body.values().map(|n| n - 1).sum();
    let leftover = rt.block_on(broker.leftover(&queue));
    let summary = final_stdout
        .iter()
        .find(|l| l.starts_with("summary "))
        .cloned()
        .unwrap_or_default();

    let window_hits_total: usize = hits_per_kill.iter().sum();
    println!(
        "crash-suite broker={broker_name} store={store_name} orders={} good={} malformed={} \
         duplicates_injected={} \
         kills={kills} connection_drops={connection_drops} redis_restarts={redis_restarts} \
         lost={} double_charged={} double_charged_per_kill={:.2} dead_lettered={} seed={}",
        settings.orders,
        plan.good.len(),
        plan.malformed.len(),
        plan.duplicates,
        lost.len(),
        double.len(),
        double.len() as f64 / kills.max(1) as f64,
        copies.len(),
        settings.seed
    );
    println!(
        "crash-suite-detail broker={broker_name} store={store_name} extra_charges={extra_charges} \
         window_hits_per_kill={hits_per_kill:?} double_charged_ids={double:?} \
         dlq_extra_copies={extra_dead} leftover={leftover} \
         kills_at_time_limit={kills_at_time_limit} redis_down_ms={} elapsed_s={:.1} \
         final_run: {summary}",
        redis_downtime.as_millis(),
        started.elapsed().as_secs_f64()
    );

    let diagnostics = || format!("stderr (all runs):\n{}", tail(&stderr_log, 80));
    assert!(lost.is_empty(), "lost orders {lost:?}; {}", diagnostics());
    assert!(
        strangers.is_empty(),
        "charges for orders never published as good ones: {strangers:?}"
    );
    // With the inbox, a charge commits with its inbox row or not at all: whatever was killed
    // when, every good order is charged exactly once.
    if store == Store::Postgres {
        assert!(
            double.is_empty(),
            "orders charged more than once with the inbox: {double:?}; {}",
            diagnostics()
        );
    }
    // A kill (or the Redis restart, whose last replies can be lost after the write) can land
    // between an order's charge and its done marker at most once per order: each such event
    // allows one extra charge of the orders it catches, and no more.
    let events = (kills + redis_restarts) as u64;
    let most = charges.values().copied().max().unwrap_or(0);
    assert!(
        most <= 1 + events,
        "an order charged {most} times for {kills} kills and {redis_restarts} Redis restarts \
         ({double:?}); {}",
        diagnostics()
    );
    // A kill catches only handlers in flight: at most `--concurrency` orders between their
    // charge and their done marker. (How many it catches depends on when it lands: handlers
    // that started together charge together, and each `HINCRBY` waits for an fsync. That
    // the done mark is written right after the charge, not with the ack, is pinned by the
    // core test `dedup_done_marks_are_written_when_the_handler_succeeds_and_before_the_ack`.)
    let concurrency: usize = CONCURRENCY.parse().unwrap();
    assert!(
        hits_per_kill.iter().all(|hits| *hits <= concurrency),
        "a kill caught more orders between charge and done marker than handlers run at once \
         ({hits_per_kill:?}, concurrency {concurrency}); {}",
        diagnostics()
    );
    // Every double charge is explained: the order was caught in the window at a kill, or it
    // was in flight at the Redis restart (whose last replies can be lost after the write).
    let unexplained: Vec<&&String> = double
        .keys()
        .filter(|id| !window_seen.contains_key(**id) && !restart_seen.contains(**id))
        .collect();
    assert!(
        unexplained.is_empty(),
        "orders double-charged though no kill caught them between charge and done marker \
         and they were not in flight at the Redis restart: {unexplained:?}; {}",
        diagnostics()
    );
    // Every extra charge a kill explains was seen at that kill: charged, done marker missing.
    // (An extra charge beyond those comes from the Redis restart: reported, bounded above.)
    assert!(
        extra_charges >= window_hits_total as u64,
        "{window_hits_total} orders were caught charged but not done at kills, yet only \
         {extra_charges} extra charges happened: a redelivery was lost; {}",
        diagnostics()
    );
    assert!(problems.is_empty(), "dead letters: {problems:#?}");
    assert!(
        missing_dead.is_empty(),
        "malformed orders not dead-lettered: {missing_dead:?}"
    );
    // A second copy of a body needs a kill (or the connection drop) between its DLQ publish
    // and the ack of the original, so each body has at most one extra copy per such event.
    // One event can catch several bodies at once (acks are batched, up to 50 ms), so the total
    // is reported, not bounded.
    let most_copies = per_body.values().copied().max().unwrap_or(0);
    assert!(
        most_copies <= 1 + kills + connection_drops,
        "a body dead-lettered {most_copies} times for {kills} kills and {connection_drops} drops"
    );
    assert_eq!(
        leftover,
        0,
        "messages left on the work queue; {}",
        diagnostics()
    );

    rt.block_on(broker.cleanup(&queue));
    if store == Store::Postgres {
        rt.block_on(pg_cleanup(&queue));
    }
}

#[test]
fn rabbitmq_crash_suite() {
    crash_suite("rabbitmq", Store::Redis);
}

#[test]
fn sqs_crash_suite() {
    crash_suite("sqs", Store::Redis);
}

/// Against `KAFKA_BROKERS`, or else a mock cluster hosted by this test process (so that it
/// outlives the `orders` processes the suite kills).
#[test]
fn kafka_crash_suite() {
    crash_suite("kafka", Store::Redis);
}

/// The suite with the PostgreSQL inbox (`--database-url`) instead of Redis: the same kills
/// and connection drop (no Redis to restart); no order may be charged twice.
#[test]
fn nats_crash_suite() {
    crash_suite("nats", Store::Redis);
}

#[test]
fn redis_streams_crash_suite() {
    crash_suite("redis-streams", Store::Redis);
}

#[test]
fn rabbitmq_crash_suite_with_inbox() {
    crash_suite("rabbitmq", Store::Postgres);
}

#[test]
fn sqs_crash_suite_with_inbox() {
    crash_suite("sqs", Store::Postgres);
}

/// Kafka on `KAFKA_BROKERS` or the test-hosted mock cluster, like `kafka_crash_suite`.
#[test]
fn kafka_crash_suite_with_inbox() {
    crash_suite("kafka", Store::Postgres);
}

/// A replica started while its Redis answers nothing (SIGSTOP) waits for it, logging, instead
/// of exiting; once Redis answers, it consumes everything and exits 0.
#[test]
fn a_replica_started_while_redis_is_frozen_waits_and_then_consumes_everything() {
    let dir = TempDir::new("frozen-start");
    let redis = OwnRedis::start(&dir.0);
    let queue = unique_name("frozen-start");
    redis.signal("STOP");
    let args: Vec<String> = [
        "--broker",
        "memory",
        "--queue",
        &queue,
        "--redis-url",
        &redis.url(),
        "--exit-when-idle",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.0.join("orders.log");
    let mut orders = OrdersProcess::spawn(&args, &log, "frozen redis at start");
    std::thread::sleep(Duration::from_secs(20));
    assert!(
        orders.child.try_wait().unwrap().is_none(),
        "exited while Redis was frozen:\n{}",
        orders.diagnostics()
    );
    redis.signal("CONT");
    let status = orders.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{status}:\n{}", orders.diagnostics());
    let lines = orders.stdout_lines();
    let summary = lines
        .iter()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_else(|| panic!("no summary:\n{}", orders.diagnostics()));
    assert!(summary.contains(" acked=5 "), "{summary}");
    assert!(summary.contains(" dead_lettered=1 "), "{summary}");
    for id in ["A-1001", "A-1002", "A-1003", "A-1004"] {
        assert!(
            lines.contains(&format!("ledger order_id={id} count=1")),
            "{id} charged once:\n{}",
            orders.diagnostics()
        );
    }
    assert!(
        tail(&log, 200).contains("waiting for Redis"),
        "the wait is logged:\n{}",
        orders.diagnostics()
    );
}

/// With `--connect-timeout`, a Redis that stays frozen ends the run with exit code 1.
#[test]
fn connect_timeout_gives_up_on_a_frozen_redis_with_exit_code_1() {
    let dir = TempDir::new("frozen-timeout");
    let redis = OwnRedis::start(&dir.0);
    redis.signal("STOP");
    let args: Vec<String> = [
        "--broker",
        "memory",
        "--queue",
        &unique_name("frozen-timeout"),
        "--redis-url",
        &redis.url(),
        "--connect-timeout",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.0.join("orders.log");
    let mut orders = OrdersProcess::spawn(&args, &log, "frozen redis, connect timeout");
    let status = orders.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", orders.diagnostics());
    assert!(
        tail(&log, 50).contains("not reachable within --connect-timeout 3s: Redis"),
        "{}",
        orders.diagnostics()
    );
}

#[test]
fn plans_have_the_promised_shape() {
    let plan = Plan::new(200, &mut Rng(7));
    assert_eq!(plan.malformed.len(), 10);
    assert_eq!(plan.good.len(), 190);
    assert_eq!(plan.flaky, 20);
    assert_eq!(plan.duplicates, 19);
    assert_eq!(plan.publications.len(), 219);
    let waves = plan.waves(5);
    assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), 219);
    // Same seed, same plan.
    let again = Plan::new(200, &mut Rng(7));
    let bodies =
        |p: &Plan| -> Vec<String> { p.publications.iter().map(|x| x.body.clone()).collect() };
    assert_eq!(bodies(&plan), bodies(&again));
}
