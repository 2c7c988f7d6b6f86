//! RabbitMQ: lapin by hand (ack each; ack multiple=true every 50) against ackstack's
//! RabbitSource under the consumer (no layers; all layers with in-memory and Redis dedup).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::Source;
use ackstack_rabbitmq::{RabbitConfig, RabbitSource};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::common::{
    Counts, Dedup, LoopEnd, Progress, Sample, budget, host_port, measure, payload, run_ackstack,
    tcp_reachable, unique,
};
use crate::driver::{Loop, LoopStore, Store, interleave, store_rows};
use crate::memory::{bare_config, full_config};
use crate::report::{Role, Series};
use crate::{Options, Stores};

/// Prefetch of every loop (as in the reference measurement).
const PREFETCH: u16 = 200;
/// Handlers at once in ackstack's consumer.
const CONCURRENCY: usize = 64;
/// The tuned raw loop acks `multiple=true` every this many messages.
const ACK_EVERY: u64 = 50;

fn short(s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|e| format!("bad AMQP name {s:?}: {e}"))
}

fn err(context: &str) -> impl Fn(lapin::Error) -> String + '_ {
    move |e| format!("{context}: {e}")
}

struct Admin {
    uri: String,
    channel: Channel,
    _connection: Connection,
}

impl Admin {
    async fn connect(uri: &str) -> Result<Self, String> {
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(uri, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| "connecting to RabbitMQ timed out".to_string())?
        .map_err(err("connecting to RabbitMQ"))?;
        let channel = connection.create_channel().await.map_err(err("channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("confirm.select"))?;
        Ok(Admin {
            uri: uri.to_string(),
            channel,
            _connection: connection,
        })
    }

    /// Declares `queue` as the adapter does (classic, durable, no arguments) and publishes `n`
    /// persistent payloads with confirms, pipelined.
    async fn fill(&self, queue: &str, n: u64) -> Result<(), String> {
        self.channel
            .queue_declare(
                short(queue)?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err("queue.declare"))?;
        let mut pending = Vec::with_capacity(1000);
        for i in 0..n {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(short(&format!("{queue}-{i}"))?);
            let confirm = self
                .channel
                .basic_publish(
                    short("")?,
                    short(queue)?,
                    BasicPublishOptions::default(),
                    payload(i).as_bytes(),
                    props,
                )
                .await
                .map_err(err("basic.publish"))?;
            pending.push(confirm);
            if pending.len() >= 1000 || i + 1 == n {
                for c in pending.drain(..) {
                    let confirmation = tokio::time::timeout(Duration::from_secs(30), c)
                        .await
                        .map_err(|_| "publisher confirm timed out".to_string())?
                        .map_err(err("publisher confirm"))?;
                    if !confirmation.is_ack() {
                        return Err("publish nacked".into());
                    }
                }
            }
        }
        Ok(())
    }

    async fn message_count(&self, queue: &str) -> Result<u32, String> {
        let q = self
            .channel
            .queue_declare(
                short(queue)?,
                QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(err("queue.declare passive"))?;
        Ok(q.message_count())
    }

    async fn delete(&self, config: &RabbitConfig) {
        for name in config.declared_queues() {
            if let Ok(name) = short(&name) {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.channel
                        .queue_delete(name, QueueDeleteOptions::default()),
                )
                .await;
            }
        }
    }
}

async fn raw(
    uri: &str,
    queue: &str,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .map_err(err("connect"))?;
    let channel = connection.create_channel().await.map_err(err("channel"))?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(err("basic.qos"))?;
    let mut consumer = channel
        .basic_consume(
            short(queue)?,
            short("")?,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err("basic.consume"))?;
    let mut calls = 0u64;
    let mut unacked = 0u64;
    while !progress.is_done() {
        let next = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| format!("no delivery for 10 s after {}", progress.handled()))?;
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(format!("consumer: {e}")),
            None => return Err("consumer stream ended".into()),
        };
        progress
            .process(&delivery.data, false)
            .map_err(|e| e.to_string())?;
        if tuned {
            unacked += 1;
            if unacked >= ACK_EVERY || progress.is_done() {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(err("basic.ack"))?;
                calls += 1;
                unacked = 0;
            }
        } else {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(err("basic.ack"))?;
            calls += 1;
        }
    }
    let end = Instant::now();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        connection.close(200, short("done")?),
    )
    .await;
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(calls),
            ..Counts::default()
        },
    })
}

async fn adapter(
    config: RabbitConfig,
    progress: Arc<Progress>,
    full: bool,
    dedup: impl Into<Dedup>,
) -> Result<LoopEnd, String> {
    let source = RabbitSource::connect(config)
        .await
        .map_err(|e| format!("RabbitSource: {e}"))?;
    let settler = source.settler();
    let consumer_config = if full {
        full_config(CONCURRENCY, 64)
    } else {
        bare_config(CONCURRENCY, 64)
    };
    let end = run_ackstack(source, consumer_config, dedup, &progress, false).await?;
    let stats = settler.stats();
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(stats.ack_frames + stats.nack_frames),
            ..Counts::default()
        },
    })
}

async fn one(
    admin: &Admin,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let queue = unique("ackstack-bench");
    let mut config = RabbitConfig::new(admin.uri.clone(), queue.clone());
    config.prefetch = PREFETCH;
    config.delay_buckets = vec![Duration::from_secs(1)];
    config.poll_interval = Duration::from_millis(200);
    config.connection_name = Some(queue.clone());
    let result = one_inner(admin, &config, kind, n, opts, stores).await;
    admin.delete(&config).await;
    result
}

async fn one_inner(
    admin: &Admin,
    config: &RabbitConfig,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    admin.fill(&config.queue, n).await?;
    let store = LoopStore::open(kind, stores, CONCURRENCY).await?;
    let dedup = store.dedup();
    let progress = Progress::new(n);
    let p = progress.clone();
    let uri = admin.uri.clone();
    let queue = config.queue.clone();
    let config_queue = config.queue.clone();
    let config = config.clone();
    let mut sample = measure(&progress, budget(n, opts.timeout_secs), async move {
        match kind {
            Loop::RawNaive => raw(&uri, &queue, p, false).await,
            Loop::RawTuned => raw(&uri, &queue, p, true).await,
            Loop::Bare | Loop::Batches => adapter(config, p, false, dedup).await,
            Loop::Full(_) | Loop::Serial(_) => adapter(config, p, true, dedup).await,
        }
    })
    .await;
    store.finish(&mut sample).await;
    let sample = sample?;
    let left = admin.message_count(&config_queue).await?;
    if left > 0 {
        return Err(format!("{left} messages left in the queue after the loop"));
    }
    Ok(sample)
}

/// The RabbitMQ rows, rounds interleaved; an error when RabbitMQ does not answer.
pub async fn run(opts: &Options, stores: &Stores) -> Result<Vec<Series>, String> {
    let uri = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let hp = host_port(&uri, 5672).ok_or("cannot parse AMQP_URL")?;
    tcp_reachable(&hp).map_err(|e| format!("RabbitMQ unavailable: {e}"))?;
    let admin = Admin::connect(&uri).await?;
    let n = opts.messages.unwrap_or(20_000);
    let what = "basic.ack frames (deliveries are pushed; no receive calls)";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "rabbitmq",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                format!("lapin, prefetch {PREFETCH}, decode, basic.ack per message"),
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "rabbitmq",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                format!(
                    "lapin, prefetch {PREFETCH}, decode, basic.ack multiple=true every {ACK_EVERY}"
                ),
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "rabbitmq",
                "ackstack adapter",
                Role::Ackstack,
                what,
                n,
                format!(
                    "RabbitSource + Consumer defaults, prefetch {PREFETCH}, concurrency {CONCURRENCY}, decode; no dedup"
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "rabbitmq",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers (retry/dead-letter, batch ack, lease keeper if the adapter reports a lease) + dedup in MemoryDedupStore",
            ),
        ),
    ];
    loops.extend(store_rows("rabbitmq", what, n, stores, true));
    let admin = &admin;
    Ok(interleave(opts, "rabbitmq", loops, |kind| {
        one(admin, kind, n, opts, stores)
    })
    .await)
}
