//! The command line: flags, environment variables, and what they ask for.
//!
//! The flags are parsed by clap; the environment fallbacks (`AMQP_URL`, `SQS_ENDPOINT`,
//! `KAFKA_BROKERS`, `REDIS_URL`, `DATABASE_URL`) are applied afterwards, so that a variable set
//! to an empty string counts as unset. The flags, their defaults, the output lines and the exit
//! codes are a contract that scripts drive: `tests/cli.rs` checks them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::time::Duration;

use ackstack::Backoff;
use clap::builder::RangedU64ValueParser;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};

use crate::MAX_RETRY_DELAY;

/// The help page's layout: clap fills in the usage line and the options.
const HELP_TEMPLATE: &str = "\
{about}

USAGE:
    {usage}

OPTIONS:
{options}

{after-help}
";

/// What follows the options on the help page.
const AFTER_HELP: &str = "\
OUTPUT (stdout, one line per event):
    note ...                          (worth knowing: an in-process Kafka mock started; on
                                       SQS, dead letters going to the queue's redrive target)
    serving metrics=URL health=URL    (with --metrics-addr)
    published order_id=ID
    acked order_id=ID attempt=N
    retried order_id=ID attempt=N delay_ms=MS error=\"...\"
    dead_lettered order_id=ID attempt=N reason=\"...\"
    released order_id=ID attempt=N    (stopped while it waited for Redis; given back)
    summary received=N acked=N retried=N dead_lettered=N deduplicated=N ...
    ledger order_id=ID count=N
    (order_id=- when the body is not an order)

ENVIRONMENT (besides the variables named above):
    KAFKA_PROPERTIES  librdkafka properties for the Kafka clients, name=value;name=value or
                      one per line (security.protocol, sasl.*, ssl.*: a TLS or SASL cluster)
    KAFKA_GROUP       the consumer group to join [default: QUEUE-example-orders]; a group
                      with committed offsets continues from them

EXIT CODES:
    0 normal exit (idle, Ctrl-C or SIGTERM), 1 configuration error or --connect-timeout ran
    out, 2 bad arguments. An unreachable broker, Redis or PostgreSQL is waited for, not an
    error.

Logs go to stderr; set RUST_LOG (default warn).";

/// How long a publishing run waits with nothing to do before it exits, unless told otherwise.
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(3);

/// Which broker to use. (Plain comments on the variants: doc comments would become a second,
/// long form of the help page.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[allow(missing_docs)]
pub enum BrokerKind {
    // The in-process broker of `ackstack::memory`.
    Memory,
    // RabbitMQ.
    Rabbitmq,
    // Amazon SQS (or an emulator).
    Sqs,
    // Apache Kafka (or an in-process mock cluster).
    Kafka,
    // NATS JetStream.
    Nats,
    // Redis Streams.
    RedisStreams,
}

/// Where the outbox relay runs (with `--emit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[allow(missing_docs)]
pub enum RelayMode {
    // In this process, beside the consumer.
    On,
    // Not here: another process relays.
    Off,
    // Only the relay: no consumer, nothing published.
    Only,
}

/// The flags as clap parses them; [`Options`] adds the environment's fallbacks.
#[derive(Parser)]
#[command(
    name = "orders",
    about = "orders: publishes sample orders, consumes them reliably, and prints what happened to each.",
    help_template = HELP_TEMPLATE,
    after_help = AFTER_HELP,
    disable_version_flag = true,
    hide_possible_values = true,
    max_term_width = 100
)]
struct Args {
    /// memory | rabbitmq | sqs | kafka | nats | redis-streams
    #[arg(long, value_enum, value_name = "NAME", default_value = "memory")]
    broker: BrokerKind,
    /// Queue (Kafka: topic) to use; dead letters go to NAME-dlq
    #[arg(long, value_name = "NAME", default_value = "orders", value_parser = queue_name)]
    queue: String,
    /// Publish nothing; consume what is already on the queue
    #[arg(long)]
    consume_only: bool,
    /// Exit once nothing was received and nothing was in flight for SECS [default: 3 when
    /// publishing; never with --consume-only]
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    exit_when_idle: Option<Duration>,
    /// Handlers running at once
    #[arg(long, value_name = "N", default_value = "8",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    concurrency: usize,
    /// Attempts before a failing order is dead-lettered
    #[arg(long, value_name = "N", default_value = "4",
          value_parser = RangedU64ValueParser::<u32>::new().range(1..=1_000))]
    max_attempts: u32,
    /// Retry backoff base in ms; doubles per attempt, equal jitter, capped at 10 s
    #[arg(long, value_name = "N", default_value = "200",
          value_parser = RangedU64ValueParser::<u64>::new().range(1..=3_600_000))]
    base_delay_ms: u64,
    /// RabbitMQ [env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, value_name = "URL", value_parser = non_blank)]
    amqp_url: Option<String>,
    /// SQS endpoint [env SQS_ENDPOINT; default http://127.0.0.1:4566]
    #[arg(long, value_name = "URL", value_parser = non_blank)]
    sqs_endpoint: Option<String>,
    /// Kafka bootstrap servers [env KAFKA_BROKERS; unset: an in-process mock cluster is
    /// started]
    #[arg(long, value_name = "LIST", value_parser = non_blank)]
    kafka_brokers: Option<String>,
    /// NATS with JetStream [env NATS_URL; default nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL", value_parser = non_blank)]
    nats_url: Option<String>,
    /// Redis for deduplication and the charge ledger, and the stream of --broker
    /// redis-streams [env REDIS_URL; unset: dedup and ledger are kept in memory, the stream
    /// is at redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL", value_parser = non_blank)]
    redis_url: Option<String>,
    /// PostgreSQL for a transactional inbox and the charge ledger, each charge committed with
    /// its inbox row [env DATABASE_URL; wins over --redis-url when both are given]
    #[arg(long, value_name = "URL", value_parser = non_blank)]
    database_url: Option<String>,
    /// Give up (exit 1) when the broker, Redis or PostgreSQL has not answered within SECS of
    /// starting [default: wait for ever, retrying with backoff]
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    connect_timeout: Option<Duration>,
    /// Serve Prometheus metrics at /metrics and the consumer's health at /health (200, or 503
    /// while unhealthy or starting) on HOST:PORT
    #[arg(long, value_name = "HOST:PORT", value_parser = non_blank)]
    metrics_addr: Option<String>,
    /// With --database-url: each charge also emits an event to NAME through the transactional
    /// outbox, committed with the charge; a relay publishes it
    #[arg(long, value_name = "NAME", value_parser = queue_name)]
    emit: Option<String>,
    /// The broker the events go to [default: --broker]
    #[arg(long, value_enum, value_name = "NAME")]
    emit_broker: Option<BrokerKind>,
    /// on | off | only: run the outbox relay in this process, elsewhere, or alone (no
    /// consumer) [default: on]
    #[arg(long, value_enum, value_name = "MODE", default_value = "on")]
    relay: RelayMode,
    /// order-id | message-id: what makes two deliveries the same order for deduplication
    /// and the inbox [default: order-id]
    #[arg(long, value_enum, value_name = "KEY", default_value = "order-id")]
    dedup_key: DedupBy,
}

/// What makes two deliveries duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[allow(missing_docs)]
pub enum DedupBy {
    // The body's `order_id`.
    OrderId,
    // The message id the publisher gave (the outbox relay gives every event one).
    MessageId,
}

/// What the command line and the environment asked for. Not `Debug`: URLs may hold passwords.
#[derive(Clone)]
pub struct Options {
    /// The broker.
    pub broker: BrokerKind,
    /// The queue (Kafka: topic); dead letters go to `<queue>-dlq`.
    pub queue: String,
    /// Publish nothing.
    pub consume_only: bool,
    /// Exit after this long idle; `None`: run until interrupted.
    pub exit_when_idle: Option<Duration>,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// The retry backoff base.
    pub base_delay: Duration,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// SQS endpoint.
    pub sqs_endpoint: String,
    /// Kafka bootstrap servers; `None`: start a mock cluster.
    pub kafka_brokers: Option<String>,
    /// librdkafka properties for every Kafka client (`KAFKA_PROPERTIES`): TLS, SASL.
    pub kafka_properties: BTreeMap<String, String>,
    /// The consumer group to join (`KAFKA_GROUP`); `None`: `<queue>-example-orders`.
    pub kafka_group: Option<String>,
    /// NATS URL.
    pub nats_url: String,
    /// Redis URL; `None`: in-memory dedup store and ledger.
    pub redis_url: Option<String>,
    /// PostgreSQL URL: the inbox and the ledger there instead (wins over `redis_url`).
    pub database_url: Option<String>,
    /// How long start-up may wait for the broker, Redis and PostgreSQL; `None`: for ever.
    pub connect_timeout: Option<Duration>,
    /// Where to serve `/metrics` and `/health`; `None`: not served.
    pub metrics_addr: Option<String>,
    /// Where each charge emits an event (through the outbox); `None`: no events.
    pub emit: Option<String>,
    /// The broker of `emit`.
    pub emit_broker: BrokerKind,
    /// Where the outbox relay runs.
    pub relay: RelayMode,
    /// What makes two deliveries duplicates.
    pub dedup_key: DedupBy,
}

impl Options {
    /// The retry policy: exponential from `--base-delay-ms`, equal jitter, capped at 10 s.
    pub fn backoff(&self) -> Backoff {
        Backoff::exponential(self.base_delay, MAX_RETRY_DELAY).equal_jitter()
    }

    /// The dead-letter queue (or topic).
    pub fn dlq(&self) -> String {
        format!("{}-dlq", self.queue)
    }

    /// The Redis that holds the stream of `--broker redis-streams`.
    pub fn stream_redis_url(&self) -> String {
        self.redis_url
            .clone()
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string())
    }
}

/// Parses the arguments (without the program name); `env` reads an environment variable and
/// returns `None` for one that is unset or blank.
///
/// `Err` is clap's error: for `--help` it holds the help page (print it to stdout, exit 0), for
/// a bad argument the message (stderr, exit 2); [`clap::Error::use_stderr`] tells which.
pub(crate) fn parse_args<I>(
    args: I,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Options, clap::Error>
where
    I: IntoIterator,
    I::Item: Into<OsString> + Clone,
{
    let program = std::iter::once(OsString::from("orders"));
    let args = Args::try_parse_from(program.chain(args.into_iter().map(Into::into)))?;
    let database_url = args.database_url.or_else(|| env("DATABASE_URL"));
    let refuse = |message: &str| Err(Args::command().error(ErrorKind::ArgumentConflict, message));
    if args.emit.is_some() && database_url.is_none() {
        return refuse(
            "--emit needs --database-url (or DATABASE_URL): the outbox is in PostgreSQL",
        );
    }
    if args.emit.is_none() && (args.relay == RelayMode::Only || args.emit_broker.is_some()) {
        return refuse("--relay only and --emit-broker need --emit NAME");
    }
    Ok(Options {
        emit_broker: args.emit_broker.unwrap_or(args.broker),
        emit: args.emit,
        relay: args.relay,
        dedup_key: args.dedup_key,
        broker: args.broker,
        queue: args.queue,
        consume_only: args.consume_only,
        exit_when_idle: args.exit_when_idle,
        concurrency: args.concurrency,
        max_attempts: args.max_attempts,
        base_delay: Duration::from_millis(args.base_delay_ms),
        amqp_url: args
            .amqp_url
            .or_else(|| env("AMQP_URL"))
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
        sqs_endpoint: args
            .sqs_endpoint
            .or_else(|| env("SQS_ENDPOINT"))
            .unwrap_or_else(|| "http://127.0.0.1:4566".to_string()),
        kafka_brokers: args.kafka_brokers.or_else(|| env("KAFKA_BROKERS")),
        kafka_properties: match env("KAFKA_PROPERTIES").as_deref().map(kafka_properties) {
            None => BTreeMap::new(),
            Some(Ok(properties)) => properties,
            Some(Err(why)) => return refuse(&why),
        },
        kafka_group: env("KAFKA_GROUP"),
        nats_url: args
            .nats_url
            .or_else(|| env("NATS_URL"))
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string()),
        redis_url: args.redis_url.or_else(|| env("REDIS_URL")),
        database_url,
        connect_timeout: args.connect_timeout,
        metrics_addr: args.metrics_addr,
    })
}

/// `KAFKA_PROPERTIES`: librdkafka properties as `name=value` entries, one per line, or
/// separated by `;` when there is a single line (so a value that holds a `;` needs the lines).
/// Names are trimmed, values are kept as written. A malformed entry is named by its position
/// only (its text may hold a secret).
fn kafka_properties(text: &str) -> Result<BTreeMap<String, String>, String> {
    let separator = if text.contains('\n') { '\n' } else { ';' };
    let mut properties = BTreeMap::new();
    let entries = text
        .split(separator)
        .map(|e| e.strip_suffix('\r').unwrap_or(e))
        .filter(|e| !e.trim().is_empty());
    for (n, entry) in entries.enumerate() {
        match entry.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => {
                properties.insert(name.trim().to_string(), value.to_string());
            }
            _ => {
                return Err(format!(
                    "KAFKA_PROPERTIES: entry {} is not name=value (entries are lines, or \
                     separated by ; on one line)",
                    n + 1
                ));
            }
        }
    }
    Ok(properties)
}

/// A value that is not empty or blank.
fn non_blank(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("the value is empty".to_string())
    } else {
        Ok(value.to_string())
    }
}

/// A duration above 0 and at most a day: with a unit (`"30s"`, `"250ms"`, `"5m"`, the rule of
/// config files), or a number of seconds, the unit the flag's `SECS` names (fractions allowed).
fn seconds(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("expected a duration above 0 such as 30s or 250ms (or SECS), got {text:?}");
    let duration = match text.trim().parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86_400.0 => {
            Duration::try_from_secs_f64(secs).map_err(|_| bad())?
        }
        Ok(_) => return Err(bad()),
        Err(_) => {
            ackstack::adapter::duration::parse(text).map_err(|e| format!("{e}: {}", bad()))?
        }
    };
    if duration.is_zero() || duration > Duration::from_secs(86_400) {
        return Err(bad());
    }
    Ok(duration)
}

/// A queue name every broker accepts: 1 to 76 of `A-Z a-z 0-9 . _ -` (76 leaves room for
/// `-dlq` within SQS's 80).
fn queue_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 76
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1 to 76 characters of A-Z a-z 0-9 . _ -)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shown;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        parse_args(args.iter().copied(), |_| None)
    }

    #[test]
    fn defaults_and_flags() {
        let Ok(o) = parse(&[]) else {
            panic!("defaults should parse")
        };
        assert_eq!(o.broker, BrokerKind::Memory);
        assert_eq!(
            (o.queue.as_str(), o.concurrency, o.max_attempts),
            ("orders", 8, 4)
        );
        assert_eq!(o.base_delay, Duration::from_millis(200));
        assert!(o.kafka_brokers.is_none() && o.redis_url.is_none() && !o.consume_only);
        assert!(o.database_url.is_none());
        assert_eq!(o.connect_timeout, None, "waits for ever by default");
        assert_eq!(o.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(o.sqs_endpoint, "http://127.0.0.1:4566");
        let Ok(o) = parse(&[
            "--broker=kafka",
            "--queue",
            "q-1",
            "--consume-only",
            "--exit-when-idle",
            "1.5",
            "--concurrency=2",
            "--connect-timeout",
            "30",
            "--database-url=postgres://db/x",
        ]) else {
            panic!("flags should parse")
        };
        assert_eq!(o.broker, BrokerKind::Kafka);
        assert_eq!(o.queue, "q-1");
        assert_eq!(o.dlq(), "q-1-dlq");
        assert!(o.consume_only);
        assert_eq!(o.exit_when_idle, Some(Duration::from_millis(1500)));
        assert_eq!(o.concurrency, 2);
        assert_eq!(o.connect_timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.database_url.as_deref(), Some("postgres://db/x"));
        let help = parse(&["--help"])
            .err()
            .map(|e| (e.use_stderr(), e.to_string()));
        let Some((false, page)) = help else {
            panic!("--help should be the help page: {help:?}")
        };
        assert!(page.contains("USAGE") && page.contains("--exit-when-idle"));
    }

    #[test]
    fn kafka_settings_come_from_the_environment() {
        let env = |name: &str| match name {
            "KAFKA_PROPERTIES" => Some(
                "security.protocol=SASL_SSL\n sasl.mechanism=SCRAM-SHA-512\r\nsasl.password=a;b=c "
                    .to_string(),
            ),
            "KAFKA_GROUP" => Some("orders-service".to_string()),
            _ => None,
        };
        let Ok(o) = parse_args(["--broker", "kafka"], env) else {
            panic!("should parse")
        };
        assert_eq!(o.kafka_group.as_deref(), Some("orders-service"));
        assert_eq!(o.kafka_properties.len(), 3);
        assert_eq!(o.kafka_properties["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(
            o.kafka_properties["sasl.password"], "a;b=c ",
            "kept as written"
        );
        let one_line = |name: &str| (name == "KAFKA_PROPERTIES").then(|| "a=1; b=2".to_string());
        let Ok(o) = parse_args(["--broker", "kafka"], one_line) else {
            panic!("should parse")
        };
        assert_eq!(
            (
                o.kafka_properties["a"].as_str(),
                o.kafka_properties["b"].as_str()
            ),
            ("1", "2")
        );
        let bad = |name: &str| (name == "KAFKA_PROPERTIES").then(|| "a=1;s3cret".to_string());
        let Err(error) = parse_args(["--broker", "kafka"], bad) else {
            panic!("a malformed entry is refused")
        };
        let text = error.to_string();
        assert!(
            text.contains("entry 2") && !text.contains("s3cret"),
            "{text}"
        );
    }

    #[test]
    fn durations_take_a_unit_or_the_seconds_their_flag_names() {
        assert_eq!(seconds("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(seconds("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(seconds("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "0s", "-1", "25h", "86401", "soon", "3 days"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_environment_fills_in_what_the_flags_leave_out() {
        let env = |name: &str| match name {
            "AMQP_URL" => Some("amqp://env".to_string()),
            "REDIS_URL" => Some("redis://env".to_string()),
            "KAFKA_BROKERS" => Some("env:9092".to_string()),
            _ => None,
        };
        let Ok(o) = parse_args(["--redis-url", "redis://flag"], env) else {
            panic!("should parse")
        };
        assert_eq!(o.amqp_url, "amqp://env");
        assert_eq!(o.redis_url.as_deref(), Some("redis://flag"), "a flag wins");
        assert_eq!(o.kafka_brokers.as_deref(), Some("env:9092"));
        assert_eq!(o.database_url, None);
    }

    #[test]
    fn emitting_needs_a_database_and_defaults_to_the_same_broker() {
        let Ok(o) = parse(&[
            "--broker",
            "rabbitmq",
            "--emit",
            "events",
            "--database-url",
            "postgres://db/x",
        ]) else {
            panic!("should parse")
        };
        assert_eq!(o.emit.as_deref(), Some("events"));
        assert_eq!(
            (o.emit_broker, o.relay),
            (BrokerKind::Rabbitmq, RelayMode::On)
        );
        let env = |name: &str| (name == "DATABASE_URL").then(|| "postgres://env/x".to_string());
        let Ok(o) = parse_args(
            ["--emit", "e", "--emit-broker", "kafka", "--relay", "only"],
            env,
        ) else {
            panic!("DATABASE_URL counts")
        };
        assert_eq!(
            (o.emit_broker, o.relay),
            (BrokerKind::Kafka, RelayMode::Only)
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        for bad in [
            &["--bogus"][..],
            &["--broker", "pulsar"],
            &["--broker"],
            &["--queue", "has space"],
            &["--queue", ""],
            &["--concurrency", "0"],
            &["--concurrency", "10001"],
            &["--max-attempts", "-1"],
            &["--base-delay-ms", "fast"],
            &["--exit-when-idle", "0"],
            &["--exit-when-idle", "NaN"],
            &["--connect-timeout", "0"],
            &["--database-url"],
            &["--database-url", " "],
            &["--consume-only=yes"],
            &["stray"],
            &["--emit", "events"],
            &["--relay", "only"],
            &["--emit-broker", "kafka"],
            &[
                "--relay",
                "sometimes",
                "--emit",
                "e",
                "--database-url",
                "postgres://db/x",
            ],
            &["--emit", "bad name", "--database-url", "postgres://db/x"],
        ] {
            match parse(bad) {
                Err(e) => assert!(e.use_stderr(), "{bad:?} should be an error, not help"),
                Ok(_) => panic!("{bad:?} should be rejected"),
            }
        }
    }

    #[test]
    fn order_ids_are_shown_safely() {
        assert_eq!(shown("A-1001"), "A-1001");
        assert_eq!(shown("a b"), "\"a b\"");
        assert_eq!(shown(""), "\"\"");
    }
}
