//! The in-memory broker: hand-driven source loops, the bare runner and all layers, with a
//! no-op handler (ackstack's own overhead); the RSS scaling runs; the callgrind runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::memory::MemorySource;
use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, DedupKey, DedupStore, MemoryBroker, MemoryDedupStore,
    Message, Settle, Source,
};

use crate::common::{
    BenchHandler, Counts, Dedup, LoopEnd, Progress, acked_all, budget, measure, payload,
    run_ackstack, unique,
};
use crate::driver::{Loop, LoopStore, Store, interleave, store_rows};
use crate::report::{Role, Series};
use crate::{Options, Stores};

const QUEUE: &str = "bench";
/// Handlers at once in every runner loop on the memory broker.
pub const CONCURRENCY: usize = 64;

fn fill(n: u64) -> MemoryBroker {
    let broker = MemoryBroker::new();
    let run = unique("m");
    for i in 0..n {
        broker.publish(
            QUEUE,
            Message::new(payload(i)).message_id(format!("{run}-{i}")),
        );
    }
    broker
}

/// The settings of the "all layers" runs: retry with backoff and a dead-letter limit, batch
/// acks up to the broker's limit, the lease keeper (the memory source has leases), and dedup.
pub fn full_config(concurrency: usize, receive_batch: usize) -> ConsumerConfig {
    let mut config = bare_config(concurrency, receive_batch);
    config.ack_batch = None;
    config.dedup.done_ttl = Duration::from_secs(600);
    config.retry.backoff =
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30)).full_jitter();
    config.retry.max_attempts = 5;
    config
}

/// The settings of the bare runner: defaults, no dedup.
pub fn bare_config(concurrency: usize, receive_batch: usize) -> ConsumerConfig {
    let mut config = ConsumerConfig::default();
    config.concurrency = concurrency;
    config.receive_batch = receive_batch;
    config
}

async fn raw(
    source: MemorySource,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let mut source = source.poll_wait(Duration::from_millis(50));
    let settler = source.settler();
    let mut ack_calls = 0u64;
    while !progress.is_done() {
        let batch = source.receive(64).await.map_err(|e| e.to_string())?;
        let mut tokens = Vec::with_capacity(batch.len());
        for r in batch {
            progress
                .process(&r.delivery.payload, true)
                .map_err(|e| e.to_string())?;
            if tuned {
                tokens.push(r.token);
            } else {
                ack_calls += 1;
                let report = settler.ack(vec![r.token]).await;
                if !report.failed.is_empty() {
                    return Err("ack refused".into());
                }
            }
        }
        if tuned && !tokens.is_empty() {
            ack_calls += 1;
            let report = settler.ack(tokens).await;
            if !report.failed.is_empty() {
                return Err("ack refused".into());
            }
        }
    }
    Ok(LoopEnd {
        end: Instant::now(),
        counts: Counts {
            calls: Some(ack_calls),
            ..Counts::default()
        },
    })
}

/// Runs ackstack's consumer on the memory broker until `progress` is done.
pub async fn run_consumer(
    broker: &MemoryBroker,
    progress: Arc<Progress>,
    config: ConsumerConfig,
    dedup: impl Into<Dedup>,
) -> Result<LoopEnd, String> {
    let source = broker.source(QUEUE).poll_wait(Duration::from_millis(50));
    let end = run_ackstack(source, config, dedup, &progress, true).await?;
    Ok(LoopEnd {
        end,
        counts: Counts::default(),
    })
}

/// Runs ackstack's consumer with a no-op batch handler (batches of half the concurrency) on
/// the memory broker until `progress` is done.
async fn run_batches(
    broker: &MemoryBroker,
    progress: Arc<Progress>,
    config: ConsumerConfig,
) -> Result<LoopEnd, String> {
    let source = broker.source(QUEUE).poll_wait(Duration::from_millis(50));
    let batches = ackstack_core::batch::BatchConfig {
        max_size: (config.concurrency / 2).max(1),
        max_wait: Duration::from_millis(5),
    };
    let consumer = ackstack_core::Consumer::new(source).config(config);
    let p = progress.clone();
    let handler = ackstack_core::batch::batch_handler_fn(move |batch: ackstack_core::Batch| {
        let results: ackstack_core::BatchResults = batch
            .deliveries()
            .map(|d| {
                p.process(&d.payload, true)
                    .map_err(ackstack_core::HandlerError::permanent)
            })
            .collect();
        std::future::ready(Ok(results))
    });
    let done = progress.clone();
    let summary = consumer
        .run_batches_until(handler, batches, async move { done.wait_done().await })
        .await
        .map_err(|e| e.to_string())?;
    Ok(LoopEnd {
        end: acked_all(&summary, &progress)?,
        counts: Counts::default(),
    })
}

async fn one(
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<crate::common::Sample, String> {
    let broker = fill(n);
    let progress = Progress::new(n);
    let budget = budget(n, opts.timeout_secs);
    let concurrency = match kind {
        Loop::Serial(_) => 1,
        _ => opts.concurrency.unwrap_or(CONCURRENCY),
    };
    let store = LoopStore::open(kind, stores, concurrency).await?;
    let p = progress.clone();
    let b = broker.clone();
    let dedup = store.dedup();
    let mut sample = measure(&progress, budget, async move {
        match kind {
            Loop::RawNaive => raw(b.source(QUEUE), p, false).await,
            Loop::RawTuned => raw(b.source(QUEUE), p, true).await,
            Loop::Bare | Loop::Serial(None) => {
                run_consumer(&b, p, bare_config(concurrency, 64), dedup).await
            }
            Loop::Batches => run_batches(&b, p, bare_config(concurrency, 64)).await,
            Loop::Full(_) | Loop::Serial(Some(_)) => {
                run_consumer(&b, p, full_config(concurrency, 64), dedup).await
            }
        }
    })
    .await;
    store.finish(&mut sample).await;
    let mut sample = sample?;
    let stats = broker.stats(QUEUE);
    if stats.acked < n {
        return Err(format!("broker acked {} of {n}", stats.acked));
    }
    sample.counts.calls = Some(stats.ack_calls);
    Ok(sample)
}

/// The memory broker's rows, rounds interleaved.
pub async fn run(opts: &Options, stores: &Stores) -> Vec<Series> {
    let n = opts.messages.unwrap_or(20_000);
    let what = "ack calls to the in-memory broker (no network)";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "memory",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                "MemorySource driven by hand: receive(64), ack each message, no-op handler",
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "memory",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                "MemorySource driven by hand: receive(64), one ack call per received batch, no-op handler",
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "memory",
                "ackstack bare",
                Role::Ackstack,
                what,
                n,
                format!(
                    "Consumer defaults (concurrency {}, batch acker, lease keeper built in), no dedup, no-op handler",
                    opts.concurrency.unwrap_or(CONCURRENCY)
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "memory",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers: retry (exp. backoff, 5 attempts, dead-letter), batch ack, lease keeper, dedup on message id in MemoryDedupStore, no-op handler",
            ),
        ),
    ];
    loops.extend(store_rows("memory", what, n, stores, true));
    loops.push((
        Loop::Batches,
        Series::new(
            "memory",
            "ackstack batches",
            Role::Ackstack,
            what,
            n,
            format!(
                "as ackstack bare with a no-op batch handler: batches of {} (max_wait 5 ms), each delivery still through the whole stack",
                opts.concurrency.unwrap_or(CONCURRENCY) / 2
            ),
        ),
    ));
    loops.push((
        Loop::Serial(None),
        Series::new(
            "memory",
            "ackstack bare, concurrency 1",
            Role::Ackstack,
            what,
            n,
            "as ackstack bare with one handler at a time: the runner's cost per delivery, unhidden by concurrency",
        ),
    ));
    loops.push((
        Loop::Serial(Some(Store::Memory)),
        Series::new(
            "memory",
            "ackstack full, concurrency 1",
            Role::Ackstack,
            what,
            n,
            "as ackstack full with one handler at a time",
        ),
    ));
    if stores.redis.available() {
        loops.push((
            Loop::Serial(Some(Store::Redis)),
            Series::new(
                "memory",
                "ackstack full + Redis dedup, concurrency 1",
                Role::Ackstack,
                what,
                n,
                "as ackstack full + Redis dedup with one handler at a time: claims cannot share a round trip; done marks go together before each ack batch",
            )
            .compared_to("ackstack full, concurrency 1"),
        ));
    }
    interleave(opts, "memory", loops, |kind| one(kind, n, opts, stores)).await
}

/// One child run of `--rss-scaling`: `n` messages through all layers with a bounded dedup
/// store, published while consuming with a bounded backlog. Prints `VmHWM` and more.
pub async fn rss_child(n: u64) -> Result<String, String> {
    let broker = MemoryBroker::new();
    let dedup_capacity = 10_000;
    let store = Arc::new(MemoryDedupStore::with_capacity(dedup_capacity));
    let progress = Progress::new(n);
    let producer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while i < n {
                if broker.len(QUEUE) < 5_000 {
                    let end = (i + 1_000).min(n);
                    while i < end {
                        broker
                            .publish(QUEUE, Message::new(payload(i)).message_id(format!("m-{i}")));
                        i += 1;
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let started = Instant::now();
    let shared: Arc<dyn DedupStore> = store.clone();
    let budget = Duration::from_secs(600);
    let result = tokio::time::timeout(
        budget,
        run_consumer_with_visibility(&broker, progress.clone(), shared),
    )
    .await;
    producer.abort();
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(format!("timed out with {} handled", progress.handled())),
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "n={n} vmhwm_kib={} vmrss_kib={} dedup_keys={} secs={secs:.2}",
        crate::common::peak_rss_kib().unwrap_or(0),
        crate::common::rss_kib().unwrap_or(0),
        store.len(),
    ))
}

async fn run_consumer_with_visibility(
    broker: &MemoryBroker,
    progress: Arc<Progress>,
    store: Arc<dyn DedupStore>,
) -> Result<(), String> {
    // Both the broker's visibility heap and the lease keeper's schedule keep an entry per
    // delivery until its lease time comes (acked or not), so what they hold is bounded by
    // throughput × lease, not by the message count. A 1 s lease makes that window shorter than
    // every run but the smallest; the lease keeper still runs (it would extend at 0.7 s, which
    // a no-op handler never reaches).
    let source = broker
        .source(QUEUE)
        .poll_wait(Duration::from_millis(50))
        .visibility_timeout(Duration::from_secs(1));
    let consumer = Consumer::new(source)
        .config(full_config(CONCURRENCY, 64))
        .dedup_shared(store, DedupKey::MessageId);
    let handler = BenchHandler::new(progress.clone(), true);
    let done = progress.clone();
    let summary = consumer
        .run_until(handler, async move { done.wait_done().await })
        .await
        .map_err(|e| e.to_string())?;
    if summary.acked < progress.handled() {
        return Err(format!("only {} acked: {summary:?}", summary.acked));
    }
    Ok(())
}

/// The bare runner with the benchmark's handler behind `tower::Service` (`service_handler`).
async fn run_tower(broker: &MemoryBroker, progress: &Arc<Progress>) -> Result<(), String> {
    let source = broker.source(QUEUE).poll_wait(Duration::from_millis(50));
    let counter = progress.clone();
    let service = tower::service_fn(move |delivery: ackstack_core::Delivery| {
        let result = counter
            .process(&delivery.payload, true)
            .map_err(ackstack_core::HandlerError::permanent);
        std::future::ready(result)
    });
    let done = progress.clone();
    Consumer::new(source)
        .config(bare_config(CONCURRENCY, 64))
        .run_until(ackstack_core::tower::service_handler(service), async move {
            done.wait_done().await
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// `--callgrind MODE`: `publish` only fills the broker; `bare`, `serial` (the bare runner
/// with one handler at a time), `full` and `redis` (all layers, dedup in Redis) also consume
/// everything with the bare runner or all layers. Returns a one-line summary.
pub async fn callgrind(mode: &str, n: u64) -> Result<String, String> {
    let broker = fill(n);
    let progress = Progress::new(n);
    // Allocations of the consuming run only (the broker is filled before).
    let region = stats_alloc::Region::new(crate::GLOBAL);
    let consume = match mode {
        "publish" => None,
        "tower" => {
            run_tower(&broker, &progress).await?;
            None
        }
        "bare" => Some((bare_config(CONCURRENCY, 64), Dedup::None)),
        // The bare runner with one handler at a time.
        "serial" => Some((bare_config(1, 64), Dedup::None)),
        "full" => {
            let store: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::with_capacity(100_000));
            Some((full_config(CONCURRENCY, 64), Dedup::Store(store)))
        }
        "redis" => {
            // All layers with dedup in Redis (REDIS_URL, else the local server): where the
            // client-side cost of the Redis path goes.
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let config = ackstack_redis::RedisDedupConfig::new(url)
                .key_prefix(format!("{}:", unique("ackstack-callgrind")));
            let store = ackstack_redis::RedisDedupStore::connect(config)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            let store: Arc<dyn DedupStore> = Arc::new(store);
            Some((full_config(CONCURRENCY, 64), Dedup::Store(store)))
        }
        other => {
            return Err(format!(
                "unknown --callgrind mode {other:?} (publish|bare|serial|full|redis|tower)"
            ));
        }
    };
    if let Some((config, dedup)) = consume {
        run_consumer(&broker, progress.clone(), config, dedup).await?;
    }
    let allocations = region.change().allocations as f64;
    Ok(format!(
        "callgrind mode={mode} messages={n} handled={} acked={} allocs_per_msg={:.2}",
        progress.handled(),
        broker.stats(QUEUE).acked,
        allocations / n.max(1) as f64
    ))
}
