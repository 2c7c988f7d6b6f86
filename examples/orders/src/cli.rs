//! The command line: flags, environment variables, and what they ask for.

use std::time::Duration;

use ackstack::Backoff;

use crate::MAX_RETRY_DELAY;

pub(crate) const USAGE: &str = "\
orders: publishes sample orders, consumes them reliably, and prints what happened to each.

USAGE:
    orders [OPTIONS]

OPTIONS:
    --broker NAME          memory | rabbitmq | sqs | kafka (default memory)
    --queue NAME           queue (Kafka: topic) to use; dead letters go to NAME-dlq (default orders)
    --consume-only         publish nothing; consume what is already on the queue
    --exit-when-idle SECS  exit once nothing was received and nothing was in flight for SECS
                           (default: 3 when publishing; never with --consume-only)
    --concurrency N        handlers running at once (default 8)
    --max-attempts N       attempts before a failing order is dead-lettered (default 4)
    --base-delay-ms N      retry backoff base in ms; doubles per attempt, equal jitter,
                           capped at 10 s (default 200)
    --amqp-url URL         RabbitMQ (env AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f)
    --sqs-endpoint URL     SQS endpoint (env SQS_ENDPOINT, default http://127.0.0.1:4566)
    --kafka-brokers LIST   Kafka bootstrap servers (env KAFKA_BROKERS; unset: an in-process
                           mock cluster is started)
    --redis-url URL        Redis for deduplication and the charge ledger (env REDIS_URL; unset:
                           both are kept in memory)
    --database-url URL     PostgreSQL for a transactional inbox and the charge ledger, each
                           charge committed with its inbox row (env DATABASE_URL; wins over
                           --redis-url when both are given)
    --connect-timeout SECS give up (exit 1) when the broker, Redis or PostgreSQL has not
                           answered within SECS of starting (default: wait for ever, retrying
                           with backoff)
    -h, --help             print this help

OUTPUT (stdout, one line per event):
    published order_id=ID
    acked order_id=ID attempt=N
    retried order_id=ID attempt=N delay_ms=MS error=\"...\"
    dead_lettered order_id=ID attempt=N reason=\"...\"
    released order_id=ID attempt=N    (stopped while it waited for Redis; given back)
    summary received=N acked=N retried=N dead_lettered=N deduplicated=N ...
    ledger order_id=ID count=N
    (order_id=- when the body is not an order)

EXIT CODES:
    0 normal exit (idle, Ctrl-C or SIGTERM), 1 configuration error or --connect-timeout ran
    out, 2 bad arguments. An unreachable broker, Redis or PostgreSQL is waited for, not an
    error.

Logs go to stderr; set RUST_LOG (default warn).
";

/// How long a publishing run waits with nothing to do before it exits, unless told otherwise.
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(3);

/// Which broker to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// The in-process broker of `ackstack::memory`.
    Memory,
    /// RabbitMQ.
    Rabbitmq,
    /// Amazon SQS (or an emulator).
    Sqs,
    /// Apache Kafka (or an in-process mock cluster).
    Kafka,
}

/// What the command line and the environment asked for. Not `Debug`: URLs may hold passwords.
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
    /// Redis URL; `None`: in-memory dedup store and ledger.
    pub redis_url: Option<String>,
    /// PostgreSQL URL: the inbox and the ledger there instead (wins over `redis_url`).
    pub database_url: Option<String>,
    /// How long start-up may wait for the broker, Redis and PostgreSQL; `None`: for ever.
    pub connect_timeout: Option<Duration>,
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
}

/// The outcome of parsing the command line.
pub(crate) enum Parsed {
    Run(Box<Options>),
    Help,
}

/// Parses the arguments (without the program name); `env` reads an environment variable.
pub(crate) fn parse_args(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Parsed, String> {
    let mut opts = Options {
        broker: BrokerKind::Memory,
        queue: "orders".to_string(),
        consume_only: false,
        exit_when_idle: None,
        concurrency: 8,
        max_attempts: 4,
        base_delay: Duration::from_millis(200),
        amqp_url: env("AMQP_URL")
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
        sqs_endpoint: env("SQS_ENDPOINT").unwrap_or_else(|| "http://127.0.0.1:4566".to_string()),
        kafka_brokers: env("KAFKA_BROKERS"),
        redis_url: env("REDIS_URL"),
        database_url: env("DATABASE_URL"),
        connect_timeout: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // `--flag=value` and `--flag value` are both accepted.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        let switch = |inline: Option<String>| match inline {
            Some(_) => Err(format!("{flag} takes no value")),
            None => Ok(()),
        };
        match flag.as_str() {
            "-h" | "--help" => {
                switch(inline)?;
                return Ok(Parsed::Help);
            }
            "--consume-only" => {
                switch(inline)?;
                opts.consume_only = true;
            }
            "--broker" => {
                opts.broker = match value(&flag, inline, &mut args)?.as_str() {
                    "memory" => BrokerKind::Memory,
                    "rabbitmq" => BrokerKind::Rabbitmq,
                    "sqs" => BrokerKind::Sqs,
                    "kafka" => BrokerKind::Kafka,
                    other => {
                        return Err(format!(
                            "--broker: unknown broker {other:?} (expected memory, rabbitmq, sqs or kafka)"
                        ));
                    }
                }
            }
            "--queue" => opts.queue = queue_name(&value(&flag, inline, &mut args)?)?,
            "--exit-when-idle" => {
                opts.exit_when_idle = Some(seconds(&flag, &value(&flag, inline, &mut args)?)?)
            }
            "--concurrency" => {
                opts.concurrency = number(&flag, &value(&flag, inline, &mut args)?, 10_000)?
            }
            "--max-attempts" => {
                opts.max_attempts = number(&flag, &value(&flag, inline, &mut args)?, 1_000)?
            }
            "--base-delay-ms" => {
                let ms: u64 = number(&flag, &value(&flag, inline, &mut args)?, 3_600_000)?;
                opts.base_delay = Duration::from_millis(ms);
            }
            "--amqp-url" => opts.amqp_url = value(&flag, inline, &mut args)?,
            "--sqs-endpoint" => opts.sqs_endpoint = value(&flag, inline, &mut args)?,
            "--kafka-brokers" => opts.kafka_brokers = Some(value(&flag, inline, &mut args)?),
            "--redis-url" => opts.redis_url = Some(value(&flag, inline, &mut args)?),
            "--database-url" => opts.database_url = Some(value(&flag, inline, &mut args)?),
            "--connect-timeout" => {
                opts.connect_timeout = Some(seconds(&flag, &value(&flag, inline, &mut args)?)?)
            }
            other if other.starts_with('-') => return Err(format!("unknown flag {other:?}")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Parsed::Run(Box::new(opts)))
}

/// The flag's value: the inline `=value`, or the next argument.
fn value(
    flag: &str,
    inline: Option<String>,
    args: &mut impl Iterator<Item = String>,
) -> Result<String, String> {
    let value = inline
        .or_else(|| args.next())
        .ok_or_else(|| format!("{flag} needs a value"))?;
    if value.trim().is_empty() {
        return Err(format!("{flag}: the value is empty"));
    }
    Ok(value)
}

/// A whole number from 1 to `max`.
fn number<T: TryFrom<u64>>(flag: &str, text: &str, max: u64) -> Result<T, String> {
    let bad = || format!("{flag}: expected a whole number from 1 to {max}, got {text:?}");
    let n: u64 = text.trim().parse().map_err(|_| bad())?;
    if n == 0 || n > max {
        return Err(bad());
    }
    T::try_from(n).map_err(|_| bad())
}

/// A positive number of seconds (fractions allowed), at most a day.
fn seconds(flag: &str, text: &str) -> Result<Duration, String> {
    let bad = || format!("{flag}: expected a number of seconds above 0, got {text:?}");
    let secs: f64 = text.trim().parse().map_err(|_| bad())?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
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
            "--queue: {name:?} is not a valid name (1 to 76 characters of A-Z a-z 0-9 . _ -)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shown;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()), |_| None)
    }

    #[test]
    fn defaults_and_flags() {
        let Ok(Parsed::Run(o)) = parse(&[]) else {
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
        let Ok(Parsed::Run(o)) = parse(&[
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
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
    }

    #[test]
    fn bad_arguments_are_errors() {
        for bad in [
            &["--bogus"][..],
            &["--broker", "nats"],
            &["--broker"],
            &["--queue", "has space"],
            &["--queue", ""],
            &["--concurrency", "0"],
            &["--max-attempts", "-1"],
            &["--base-delay-ms", "fast"],
            &["--exit-when-idle", "0"],
            &["--exit-when-idle", "NaN"],
            &["--connect-timeout", "0"],
            &["--database-url"],
            &["--database-url", " "],
            &["--consume-only=yes"],
            &["stray"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn order_ids_are_shown_safely() {
        assert_eq!(shown("A-1001"), "A-1001");
        assert_eq!(shown("a b"), "\"a b\"");
        assert_eq!(shown(""), "\"\"");
    }
}
