//! The order example: publishes sample orders to a broker, consumes them through ackstack, and
//! prints what happened to each one: acked, retried (with the delay the retry layer chose) or
//! dead-lettered (with the reason). Each good order is charged once in a ledger, even though one
//! of them is published twice.
//!
//! ```text
//! cargo run -p example-orders                         # in memory, no broker needed
//! cargo run -p example-orders -- --broker rabbitmq    # RabbitMQ on 127.0.0.1:5672
//! cargo run -p example-orders -- --help               # every flag
//! ```
//!
//! This file is the command line and the handler; `memory.rs`, `rabbitmq.rs`, `sqs.rs` and
//! `kafka.rs` each build one broker's source and publisher; `ledger.rs` records the charges.

mod kafka;
mod ledger;
mod memory;
mod rabbitmq;
mod sqs;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack::adapter::Source;
use ackstack::postgres::{InboxTx, PgInbox, PgInboxConfig};
use ackstack::redis::{RedisDedupConfig, RedisDedupError, RedisDedupStore};
use ackstack::{
    Backoff, Consumer, DedupKey, DedupStore, Delivery, HandlerError, MemoryDedupStore, Message,
    Outcome, Publish, Status, Summary, handler_fn,
};
use serde::Deserialize;

use crate::ledger::{Ledger, PgLedger};

/// An error that ends the program with exit code 1 (a broker or configuration failure).
pub type Fatal = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
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
const DEFAULT_IDLE: Duration = Duration::from_secs(3);
/// The longest retry delay.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
/// How long connecting to a broker, Redis or PostgreSQL may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a charge takes (a call to a payment provider, simulated).
const CHARGE_LATENCY: Duration = Duration::from_millis(50);
/// The consumer's name in dead-letter metadata and logs.
pub const CONSUMER_NAME: &str = "example-orders";

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

/// An order, as published.
#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    amount_cents: i64,
    /// Fail (transiently) while the delivery's attempt is at most this.
    #[serde(default)]
    fail_first: Option<u32>,
}

/// The sample orders: good ones, one that fails twice first, one malformed body, and one good
/// order published twice.
fn sample_orders() -> Vec<&'static str> {
    vec![
        r#"{"order_id":"A-1001","amount_cents":1250}"#,
        r#"{"order_id":"A-1002","amount_cents":4999}"#,
        r#"{"order_id":"A-1003","amount_cents":300}"#,
        r#"{"order_id":"A-1004","amount_cents":2000,"fail_first":2}"#,
        "this is not an order",
        r#"{"order_id":"A-1001","amount_cents":1250}"#,
    ]
}

/// The handler: decode, maybe fail on purpose, charge. Returning `Ok` acks the delivery.
async fn handle(delivery: Delivery, ledger: Ledger) -> Result<(), HandlerError> {
    let order = order_to_charge(&delivery).await?;
    ledger
        .charge(&order.order_id)
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// The handler with the PostgreSQL inbox: the same, but the charge is a statement in the
/// delivery's inbox transaction, committed with its inbox row after this returns `Ok`.
async fn handle_in_inbox(
    delivery: Delivery,
    tx: InboxTx,
    ledger: PgLedger,
) -> Result<(), HandlerError> {
    let order = order_to_charge(&delivery).await?;
    ledger.charge(&tx, &order.order_id).await?;
    Ok(())
}

/// Decodes the order, fails on purpose while it asks to, and waits for the payment provider.
async fn order_to_charge(delivery: &Delivery) -> Result<Order, HandlerError> {
    // A body that is not an order fails permanently: it is dead-lettered at once.
    let order: Order = ackstack::decode::json(delivery)?;
    if let Some(fail_first) = order.fail_first
        && delivery.attempt <= fail_first
    {
        return Err(HandlerError::transient(format!(
            "payment provider unavailable (this order fails its first {fail_first} attempts)"
        )));
    }
    tokio::time::sleep(CHARGE_LATENCY).await;
    tracing::debug!(order_id = %order.order_id, amount_cents = order.amount_cents, "charging");
    Ok(order)
}

/// How duplicates are recognised and where charges go.
#[derive(Clone)]
pub enum Effects {
    /// A dedup store in front of the handler (claim before, done marker after), and a ledger
    /// the handler charges.
    Dedup {
        /// The dedup store (Redis or in memory).
        store: Arc<dyn DedupStore>,
        /// The ledger (Redis or in memory).
        ledger: Ledger,
    },
    /// The PostgreSQL inbox: each delivery's inbox row and its charge in one transaction.
    Inbox {
        /// The inbox.
        inbox: PgInbox,
        /// The ledger, in the same database.
        ledger: PgLedger,
    },
}

/// The dedup key: the body's `order_id` (a body without one is not deduplicated).
fn order_id_of(delivery: &Delivery) -> Option<String> {
    #[derive(Deserialize)]
    struct Key {
        order_id: String,
    }
    serde_json::from_slice::<Key>(&delivery.payload)
        .ok()
        .map(|k| k.order_id)
}

/// Prints one outcome, as the retry and dedup layers decided it, before it is settled.
fn print_outcome(delivery: &Delivery, outcome: &Outcome) {
    let id = order_id_of(delivery).map_or_else(|| "-".to_string(), |id| shown(&id));
    let attempt = delivery.attempt;
    match outcome {
        Outcome::Ack => println!("acked order_id={id} attempt={attempt}"),
        Outcome::Retry { after, failure } => println!(
            "retried order_id={id} attempt={attempt} delay_ms={} error={:?}",
            after.as_millis(),
            failure.to_string()
        ),
        Outcome::DeadLetter(failure) => println!(
            "dead_lettered order_id={id} attempt={attempt} reason={:?}",
            failure.to_string()
        ),
        Outcome::Release => println!("released order_id={id} attempt={attempt}"),
    }
}

/// `s` as is when it is a plain token, else quoted and escaped (order ids come from messages).
pub fn shown(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if plain {
        s.to_string()
    } else {
        format!("{s:?}")
    }
}

/// Publishes the samples (unless consume-only), consumes until idle or interrupted, and prints
/// the summary and the ledger.
async fn publish_and_consume<S: Source, P: Publish>(
    opts: &Options,
    source: S,
    publisher: P,
    effects: Effects,
) -> Result<(), Fatal> {
    if !opts.consume_only {
        for body in sample_orders() {
            publisher.publish(Message::new(body)).await?;
            let id = serde_json::from_str::<Order>(body)
                .map_or_else(|_| "-".to_string(), |o| o.order_id);
            println!("published order_id={id}");
        }
    }
    let consumer = Consumer::new(source)
        .name(CONSUMER_NAME)
        .concurrency(opts.concurrency)
        .retry(opts.backoff())
        .max_attempts(opts.max_attempts)
        .shutdown_deadline(Duration::from_secs(10))
        .inspect(print_outcome);
    let idle = match (opts.exit_when_idle, opts.consume_only) {
        (Some(period), _) => Some(period),
        (None, false) => Some(DEFAULT_IDLE),
        (None, true) => None,
    };
    let stop = stop_signal(consumer.status(), idle);
    let (summary, entries) = match effects {
        Effects::Dedup { store, ledger } => {
            let consumer = consumer.dedup_shared(store, DedupKey::from_fn(order_id_of));
            let handler_ledger = ledger.clone();
            let handler = handler_fn(move |delivery, _cx| handle(delivery, handler_ledger.clone()));
            let summary = consumer.run_until(handler, stop).await?;
            (summary, ledger.entries().await?)
        }
        Effects::Inbox { inbox, ledger } => {
            // The inbox is the dedup: keyed by the order id, like the dedup store.
            let handler_ledger = ledger.clone();
            let handler = inbox
                .handler(DedupKey::from_fn(order_id_of), move |delivery, tx, _cx| {
                    handle_in_inbox(delivery, tx, handler_ledger.clone())
                });
            let summary = consumer.run_until(handler, stop).await?;
            (summary, ledger.entries().await?)
        }
    };
    print_summary(&summary);
    for (order_id, count) in entries {
        println!("ledger order_id={} count={count}", shown(&order_id));
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    println!(
        "summary received={} acked={} retried={} dead_lettered={} deduplicated={} \
         broker_acks={} ack_failures={} settle_failures={} leases_lost={} abandoned={}",
        s.received,
        s.succeeded,
        s.retried,
        s.dead_lettered,
        s.deduplicated,
        s.acked,
        s.ack_failures,
        s.settle_failures,
        s.leases_lost,
        s.abandoned,
    );
}

/// Completes when the consumer has been idle for `idle` (if given), or on Ctrl-C or SIGTERM.
async fn stop_signal(status: Status, idle: Option<Duration>) {
    let idle = async {
        match idle {
            Some(period) => status.idle(period).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = idle => {}
        () = interrupted() => eprintln!("orders: interrupted; finishing in-flight orders"),
    }
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM; never if no handler can be installed.
async fn interrupted() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                () = ctrl_c => {}
                _ = term.recv() => {}
            },
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Why a start-up step did not succeed.
pub enum StartError {
    /// The configuration is wrong: give up at once (exit 1).
    Config(Fatal),
    /// The broker, Redis or PostgreSQL did not answer: wait and try again.
    Unreachable(Fatal),
}

/// Runs `step` until it succeeds. While what it connects to is unreachable, waits with
/// backoff (logging each failure) for ever, or until `limit` (`--connect-timeout`) has passed
/// since `started`; a configuration error ends it at once. Each try is bounded too.
pub async fn until_up<T, Fut>(
    what: &str,
    started: Instant,
    limit: Option<Duration>,
    mut step: impl FnMut() -> Fut,
) -> Result<T, Fatal>
where
    Fut: Future<Output = Result<T, StartError>>,
{
    let backoff =
        Backoff::exponential(Duration::from_millis(200), Duration::from_secs(5)).equal_jitter();
    let remaining = || limit.map(|l| l.saturating_sub(started.elapsed()));
    let mut failures = 0u32;
    let mut last_error: Option<Fatal> = None;
    loop {
        let try_limit = remaining().map_or(CONNECT_TIMEOUT, |r| r.min(CONNECT_TIMEOUT));
        if let (Some(limit), Some(error)) = (limit, &last_error)
            && try_limit < Duration::from_millis(10)
        {
            return Err(
                format!("not reachable within --connect-timeout {limit:?}: {error}").into(),
            );
        }
        let error: Fatal = match tokio::time::timeout(try_limit, step()).await {
            Ok(Ok(value)) => {
                if failures > 0 {
                    tracing::warn!("{what} answered after {failures} failed tries");
                }
                return Ok(value);
            }
            Ok(Err(StartError::Config(e))) => return Err(e),
            Ok(Err(StartError::Unreachable(e))) => e,
            Err(_) => format!("{what}: no answer within {try_limit:?}").into(),
        };
        failures = failures.saturating_add(1);
        let left = remaining();
        let wait = left.map_or(backoff.delay(failures), |l| l.min(backoff.delay(failures)));
        tracing::warn!(error = %error, retry_in = ?wait, "waiting for {what}");
        last_error = Some(error);
        tokio::time::sleep(wait).await;
    }
}

/// Sets up deduplication and the ledger, connects to the broker, and runs. Ctrl-C or SIGTERM
/// while it still waits for the broker, Redis or PostgreSQL ends it normally.
async fn run(opts: Options) -> Result<(), Fatal> {
    tokio::select! {
        result = start_and_run(opts) => result,
        () = interrupted() => {
            eprintln!("orders: interrupted");
            Ok(())
        }
    }
}

async fn start_and_run(opts: Options) -> Result<(), Fatal> {
    let started = Instant::now();
    // Kept for the whole run: forgets inbox rows past their retention.
    let mut _sweeper = None;
    let (effects, store) = match (&opts.database_url, &opts.redis_url) {
        (Some(url), _) => {
            let config = PgInboxConfig::new(format!("{CONSUMER_NAME}:{}", opts.queue))
                .max_connections(opts.concurrency.clamp(1, 32));
            let inbox = PgInbox::new(url, config).map_err(|e| format!("PostgreSQL inbox: {e}"))?;
            let ledger = PgLedger::new(&inbox, &opts.queue);
            until_up("PostgreSQL", started, opts.connect_timeout, || {
                ledger.set_up(&inbox)
            })
            .await?;
            _sweeper = Some(inbox.spawn_sweeper(Duration::from_secs(3600)));
            (Effects::Inbox { inbox, ledger }, "postgres")
        }
        (None, Some(url)) => {
            let config = RedisDedupConfig::new(url.clone())
                .key_prefix(format!("{}:dedup:", opts.queue))
                .connect_timeout(CONNECT_TIMEOUT);
            let store = until_up("Redis", started, opts.connect_timeout, || {
                let config = config.clone();
                async move {
                    RedisDedupStore::connect(config).await.map_err(|e| match e {
                        RedisDedupError::Config(_) => {
                            StartError::Config(format!("Redis dedup store: {e}").into())
                        }
                        other => {
                            StartError::Unreachable(format!("Redis dedup store: {other}").into())
                        }
                    })
                }
            })
            .await?;
            let store: Arc<dyn DedupStore> = Arc::new(store);
            let ledger = Ledger::redis(url, &opts.queue)?;
            (Effects::Dedup { store, ledger }, "redis")
        }
        (None, None) => {
            let store: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::new());
            let ledger = Ledger::in_memory();
            (Effects::Dedup { store, ledger }, "memory")
        }
    };
    let name = match opts.broker {
        BrokerKind::Memory => "memory",
        BrokerKind::Rabbitmq => "rabbitmq",
        BrokerKind::Sqs => "sqs",
        BrokerKind::Kafka => "kafka",
    };
    println!(
        "start broker={name} queue={} dlq={} dedup={store} ledger={store}",
        shown(&opts.queue),
        shown(&opts.dlq())
    );
    match opts.broker {
        BrokerKind::Memory => {
            if opts.consume_only {
                println!(
                    "note the memory broker lives in this process: there is nothing to consume"
                );
            }
            let (source, publisher) = memory::connect(&opts);
            publish_and_consume(&opts, source, publisher, effects).await
        }
        BrokerKind::Rabbitmq => {
            let (source, publisher) = until_up("RabbitMQ", started, opts.connect_timeout, || {
                rabbitmq::connect(&opts)
            })
            .await?;
            publish_and_consume(&opts, source, publisher, effects).await
        }
        BrokerKind::Sqs => {
            let (source, publisher) =
                until_up("SQS", started, opts.connect_timeout, || sqs::connect(&opts)).await?;
            publish_and_consume(&opts, source, publisher, effects).await
        }
        BrokerKind::Kafka => {
            let kafka::Connected {
                source,
                publisher,
                mock,
            } = kafka::connect(&opts).await?;
            let result = publish_and_consume(&opts, source, publisher, effects).await;
            // The consumer closes (leaves its group) on its own thread once the run is over;
            // give it a moment before a mock cluster goes away under it.
            if mock.is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(mock);
            result
        }
    }
}

/// The outcome of parsing the command line.
enum Parsed {
    Run(Box<Options>),
    Help,
}

/// Parses the arguments (without the program name); `env` reads an environment variable.
fn parse_args(
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

#[tokio::main]
async fn main() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let opts = match parse_args(std::env::args().skip(1), env) {
        Ok(Parsed::Run(opts)) => *opts,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("orders: {message}\nRun `orders --help` for the flags.");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("orders: error: {err}");
            // Exit now, without tearing down the runtime under a broker client's background
            // thread that may still be connecting (it would report its cancelled task as a
            // panic on stderr).
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
