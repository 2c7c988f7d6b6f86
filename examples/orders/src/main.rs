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
//! This file is the command line and the handler; `memory.rs`, `rabbitmq.rs`, `sqs.rs`,
//! `kafka.rs`, `nats.rs` and `redis_streams.rs` each build one broker's source and publisher;
//! `ledger.rs` records the charges.

mod cli;
mod kafka;
mod ledger;
mod memory;
mod nats;
mod rabbitmq;
mod redis_streams;
mod relay;
mod serve;
mod sqs;
mod startup;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack::adapter::Source;
use ackstack::postgres::{InboxTx, PgInbox, PgInboxConfig};
use ackstack::redis::{RedisDedupConfig, RedisDedupError, RedisDedupStore};
use ackstack::{
    Consumer, DedupKey, DedupStore, Delivery, HandlerError, MemoryDedupStore, Message, Outcome,
    Publish, Status, Summary, handler_fn,
};
use serde::Deserialize;

pub use crate::cli::{BrokerKind, DedupBy, Options, RelayMode};
use crate::cli::{DEFAULT_IDLE, parse_args};
use crate::ledger::{Ledger, PgLedger};
pub use crate::startup::{StartError, until_up};

/// An error that ends the program with exit code 1 (a broker or configuration failure).
pub type Fatal = Box<dyn std::error::Error + Send + Sync>;

/// The longest retry delay.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
/// How long connecting to a broker, Redis or PostgreSQL may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a charge takes (a call to a payment provider, simulated).
const CHARGE_LATENCY: Duration = Duration::from_millis(50);
/// The consumer's name in dead-letter metadata and logs.
pub const CONSUMER_NAME: &str = "example-orders";

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
    // A boxed error is not a `std::error::Error` itself, so `?` needs the explicit kind.
    ledger
        .charge(&order.order_id)
        .await
        .map_err(HandlerError::transient)?;
    Ok(())
}

/// The handler with the PostgreSQL inbox: the same, but the charge is a statement in the
/// delivery's inbox transaction, committed with its inbox row after this returns `Ok`. With
/// `--emit`, the event "order charged" is written to the outbox in the same transaction.
async fn handle_in_inbox(
    delivery: Delivery,
    tx: InboxTx,
    ledger: PgLedger,
    emit: Option<Arc<str>>,
) -> Result<(), HandlerError> {
    let order = order_to_charge(&delivery).await?;
    ledger.charge(&tx, &order.order_id).await?;
    if let Some(destination) = emit {
        // An order-shaped body, so that this example can consume the events too.
        let event = serde_json::json!({
            "event": "order-charged",
            "order_id": order.order_id,
            "amount_cents": order.amount_cents,
        });
        let message = Message::new(event.to_string()).key(order.order_id.clone());
        tx.outbox().send(&destination, message).await?;
    }
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
        /// Where each charge emits an event (`--emit`).
        emit: Option<Arc<str>>,
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

/// The dedup key `--dedup-key` asks for.
fn dedup_key(by: DedupBy) -> DedupKey {
    match by {
        DedupBy::OrderId => DedupKey::from_fn(order_id_of),
        DedupBy::MessageId => DedupKey::MessageId,
    }
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
        other => println!("{} order_id={id} attempt={attempt}", other.as_str()),
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
    health: Option<serve::Health>,
    relay: Option<relay::Relay>,
) -> Result<(), Fatal> {
    if let (Some(health), Some(relay)) = (&health, &relay) {
        health.serve_relay(relay.relay.clone());
    }
    let relay = relay.map(relay::Relay::spawn);
    if !opts.consume_only {
        for (i, body) in sample_orders().into_iter().enumerate() {
            let mut message = Message::new(body);
            if opts.dedup_key == DedupBy::MessageId {
                // Deduplicated by message id: the twice-published order gets one id twice.
                let id = serde_json::from_str::<Order>(body).map_or_else(
                    |_| format!("sample-{i}"),
                    |o| format!("sample-{}", o.order_id),
                );
                message = message.message_id(id);
            }
            publisher.publish(message).await?;
            let id = serde_json::from_str::<Order>(body)
                .map_or_else(|_| "-".to_string(), |o| o.order_id);
            println!("published order_id={id}");
        }
    }
    let consumer = Consumer::new(source)
        .name(CONSUMER_NAME)
        .concurrency(opts.concurrency)
        .backoff(opts.backoff())
        .max_attempts(opts.max_attempts)
        .shutdown_deadline(Duration::from_secs(10))
        .inspect(print_outcome);
    if let Some(health) = health {
        health.serve(consumer.status());
    }
    let idle = match (opts.exit_when_idle, opts.consume_only) {
        (Some(period), _) => Some(period),
        (None, false) => Some(DEFAULT_IDLE),
        (None, true) => None,
    };
    let stop = stop_signal(consumer.status(), idle);
    let (summary, entries) = match effects {
        Effects::Dedup { store, ledger } => {
            let consumer = consumer.dedup_shared(store, dedup_key(opts.dedup_key));
            let handler_ledger = ledger.clone();
            let handler = handler_fn(move |delivery, _cx| handle(delivery, handler_ledger.clone()));
            let summary = consumer.run_until(handler, stop).await?;
            (summary, ledger.entries().await?)
        }
        Effects::Inbox {
            inbox,
            ledger,
            emit,
        } => {
            // The inbox is the dedup: keyed by the order id, like the dedup store.
            let handler_ledger = ledger.clone();
            let handler = inbox.handler(dedup_key(opts.dedup_key), move |delivery, tx, _cx| {
                handle_in_inbox(delivery, tx, handler_ledger.clone(), emit.clone())
            });
            let summary = consumer.run_until(handler, stop).await?;
            (summary, ledger.entries().await?)
        }
    };
    print_summary(&summary);
    if let Some(relay) = relay {
        relay.finish().await;
    }
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
        // The example's `acked` (its output is a contract): what the stack decided to ack,
        // duplicates included.
        s.succeeded + s.deduplicated,
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
    // First, so that the recorder is installed before the consumer registers its metrics and
    // /health answers (503, starting) while the broker, Redis or PostgreSQL is waited for.
    let health = match &opts.metrics_addr {
        Some(addr) => Some(serve::start(addr).await?),
        None => None,
    };
    // Kept for the whole run: forgets inbox rows past their retention.
    let mut _sweeper = None;
    let (effects, store) = match (&opts.database_url, &opts.redis_url) {
        (Some(url), _) => {
            // One more connection for the outbox relay of `--emit`.
            let relay = usize::from(opts.emit.is_some() && opts.relay != RelayMode::Off);
            let config = PgInboxConfig::new(format!("{CONSUMER_NAME}:{}", opts.queue))
                .max_connections(opts.concurrency.clamp(1, 32) + relay);
            let inbox = PgInbox::new(url, config).map_err(|e| format!("PostgreSQL inbox: {e}"))?;
            let ledger = PgLedger::new(&inbox, &opts.queue);
            until_up("PostgreSQL", started, opts.connect_timeout, || {
                ledger.set_up(&inbox)
            })
            .await?;
            _sweeper = Some(inbox.spawn_sweeper(Duration::from_secs(3600)));
            let emit = opts.emit.as_deref().map(Arc::from);
            (
                Effects::Inbox {
                    inbox,
                    ledger,
                    emit,
                },
                "postgres",
            )
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
    let name = broker_name(opts.broker);
    let relay = match (&effects, &opts.emit) {
        (Effects::Inbox { inbox, .. }, Some(_)) if opts.relay != RelayMode::Off => {
            Some(relay::connect(&opts, inbox, started).await?)
        }
        _ => None,
    };
    let emitting = match &opts.emit {
        Some(emit) => format!(
            " emit={} emit_broker={} relay={}",
            shown(emit),
            broker_name(opts.emit_broker),
            relay_name(opts.relay)
        ),
        None => String::new(),
    };
    let relay = match (relay, opts.relay) {
        (Some(relay), RelayMode::Only) => {
            if let Some(health) = &health {
                health.serve_relay(relay.relay.clone());
            }
            println!("start{emitting}");
            relay.run_alone(opts.exit_when_idle).await;
            return Ok(());
        }
        (relay, RelayMode::On) => relay,
        (None, RelayMode::Only) => {
            return Err("--relay only needs --emit and --database-url".into());
        }
        (_, RelayMode::Off) => None,
    };
    println!(
        "start broker={name} queue={} dlq={} dedup={store} ledger={store}{emitting}",
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
            publish_and_consume(&opts, source, publisher, effects, health, relay).await
        }
        BrokerKind::Rabbitmq => {
            let (source, publisher) = until_up("RabbitMQ", started, opts.connect_timeout, || {
                rabbitmq::connect(&opts)
            })
            .await?;
            publish_and_consume(&opts, source, publisher, effects, health, relay).await
        }
        BrokerKind::Sqs => {
            let (source, publisher) =
                until_up("SQS", started, opts.connect_timeout, || sqs::connect(&opts)).await?;
            publish_and_consume(&opts, source, publisher, effects, health, relay).await
        }
        BrokerKind::Nats => {
            let (source, publisher) = until_up("NATS", started, opts.connect_timeout, || {
                nats::connect(&opts)
            })
            .await?;
            publish_and_consume(&opts, source, publisher, effects, health, relay).await
        }
        BrokerKind::RedisStreams => {
            let (source, publisher) =
                until_up("Redis Streams", started, opts.connect_timeout, || {
                    redis_streams::connect(&opts)
                })
                .await?;
            publish_and_consume(&opts, source, publisher, effects, health, relay).await
        }
        BrokerKind::Kafka => {
            let kafka::Connected {
                source,
                publisher,
                mock,
            } = kafka::connect(&opts).await?;
            let result =
                publish_and_consume(&opts, source, publisher, effects, health, relay).await;
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

/// The broker's name as `--broker` takes it.
fn broker_name(broker: BrokerKind) -> &'static str {
    match broker {
        BrokerKind::Memory => "memory",
        BrokerKind::Rabbitmq => "rabbitmq",
        BrokerKind::Sqs => "sqs",
        BrokerKind::Kafka => "kafka",
        BrokerKind::Nats => "nats",
        BrokerKind::RedisStreams => "redis-streams",
    }
}

/// The relay mode as `--relay` takes it.
fn relay_name(mode: RelayMode) -> &'static str {
    match mode {
        RelayMode::On => "on",
        RelayMode::Off => "off",
        RelayMode::Only => "only",
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let opts = match parse_args(std::env::args_os().skip(1), env) {
        Ok(opts) => opts,
        Err(e) if e.use_stderr() => {
            eprint!("orders: {e}");
            return ExitCode::from(2);
        }
        Err(help) => {
            print!("{help}");
            return ExitCode::SUCCESS;
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
