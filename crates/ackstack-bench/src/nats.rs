//! NATS JetStream: async-nats pull consumers by hand (`+ACK` per message; `AckPolicy::All`
//! with one cumulative ack per fetched batch) against ackstack's NatsSource under the
//! consumer.
//!
//! Each loop gets a stream of its own, filled before the loop starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::Source;

use ackstack_nats::async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use ackstack_nats::async_nats::{self, Client};
use ackstack_nats::{NatsConfig, NatsSource};
use futures::StreamExt;

use crate::common::{
    Counts, Dedup, LoopEnd, Progress, Sample, host_port, payload, run_ackstack, tcp_reachable,
    unique,
};
use crate::driver::{Loop, Store, interleave, run_loop, store_rows};
use crate::memory::{bare_config, full_config};
use crate::report::{Role, Series};
use crate::{Options, Stores};

/// Handlers at once in ackstack's consumer, and messages one fetch asks for in every loop.
const CONCURRENCY: usize = 64;
/// Messages one raw fetch asks for.
const FETCH: usize = 64;

fn err(context: &str) -> impl Fn(&dyn std::fmt::Display) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// A stream of `n` messages (subject = its name), with its dead-letter stream.
async fn fill(client: &Client, n: u64) -> Result<String, String> {
    let name = unique("ackstack-bench").replace('.', "_");
    let js = jetstream::new(client.clone());
    for (stream, subject) in [
        (name.clone(), name.clone()),
        (format!("{name}-dlq"), format!("{name}.dlq")),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: stream,
            subjects: vec![subject],
            ..Default::default()
        })
        .await
        .map_err(|e| err("create stream")(&e))?;
    }
    // Published in windows of confirms, so that filling is quick but bounded.
    let mut pending = Vec::with_capacity(256);
    for i in 0..n {
        let ack = js
            .publish(name.clone(), payload(i).into())
            .await
            .map_err(|e| err("publish")(&e))?;
        pending.push(ack);
        if pending.len() == 256 || i + 1 == n {
            for ack in pending.drain(..) {
                ack.await.map_err(|e| err("publish ack")(&e))?;
            }
        }
    }
    Ok(name)
}

async fn raw(
    client: &Client,
    stream: &str,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let js = jetstream::new(client.clone());
    let consumer = js
        .get_stream(stream)
        .await
        .map_err(|e| err("get stream")(&e))?
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: if tuned {
                AckPolicy::All
            } else {
                AckPolicy::Explicit
            },
            ..Default::default()
        })
        .await
        .map_err(|e| err("create consumer")(&e))?;
    let mut calls = 0u64;
    while !progress.is_done() {
        let mut batch = consumer
            .fetch()
            .max_messages(FETCH)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| err("fetch")(&e))?;
        calls += 1;
        let mut last = None;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| err("fetch")(&*e))?;
            progress
                .process(&message.payload, false)
                .map_err(|e| e.to_string())?;
            if tuned {
                last = Some(message);
            } else {
                message.ack().await.map_err(|e| err("ack")(&*e))?;
                calls += 1;
            }
        }
        if let Some(message) = last {
            message.ack().await.map_err(|e| err("ack")(&*e))?;
            calls += 1;
        }
    }
    // The acks are on the wire once flushed.
    client.flush().await.map_err(|e| err("flush")(&e))?;
    Ok(LoopEnd {
        end: Instant::now(),
        counts: Counts {
            calls: Some(calls),
            ..Counts::default()
        },
    })
}

async fn adapter(
    client: &Client,
    stream: &str,
    progress: Arc<Progress>,
    full: bool,
    dedup: Dedup,
) -> Result<LoopEnd, String> {
    let mut config = NatsConfig::new("", stream);
    config.fetch_wait = Duration::from_millis(500);
    let source = NatsSource::from_client(client.clone(), config)
        .await
        .map_err(|e| format!("NatsSource: {e}"))?;
    let settler = source.settler();
    let consumer_config = if full {
        full_config(CONCURRENCY, FETCH)
    } else {
        bare_config(CONCURRENCY, FETCH)
    };
    let end = run_ackstack(source, consumer_config, dedup, &progress, false).await?;
    let s = settler.stats();
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(s.fetches + s.ack_frames + s.dead_letters),
            ..Counts::default()
        },
    })
}

async fn one(
    client: &Client,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let stream = fill(client, n).await?;
    let s = stream.as_str();
    let measured = run_loop(kind, n, opts, stores, CONCURRENCY, |p, dedup| async move {
        match kind {
            Loop::RawNaive => raw(client, s, p, false).await,
            Loop::RawTuned => raw(client, s, p, true).await,
            Loop::Bare | Loop::Batches => adapter(client, s, p, false, dedup).await,
            Loop::Full(_) | Loop::Serial(_) => adapter(client, s, p, true, dedup).await,
        }
    })
    .await;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}-dlq")).await;
    measured
}

/// The NATS rows, rounds interleaved; an error when the server does not answer.
pub async fn run(opts: &Options, stores: &Stores) -> Result<Vec<Series>, String> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let hp = host_port(&url, 4222).ok_or("cannot parse NATS_URL")?;
    tcp_reachable(&hp).map_err(|e| format!("NATS at {url} unavailable ({e})"))?;
    let client = async_nats::connect(&url)
        .await
        .map_err(|e| err("connect")(&e))?;
    let n = opts.messages.unwrap_or(20_000);
    let what = "fetch requests + ack frames (+ACK, -NAK, +WPI, +TERM) + dead-letter publishes";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "nats",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                format!(
                    "async-nats: pull consumer (AckPolicy::Explicit), fetch {FETCH} (1 s expiry), decode, +ACK per message, sequential"
                ),
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "nats",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                format!(
                    "async-nats: AckPolicy::All, fetch {FETCH}, decode, one cumulative +ACK per fetched batch"
                ),
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "nats",
                "ackstack adapter",
                Role::Ackstack,
                what,
                n,
                format!(
                    "NatsSource + Consumer defaults (concurrency {CONCURRENCY}, +ACK per delivery flushed per batch, lease keeper built in), decode; no dedup"
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "nats",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers (retry/dead-letter, batch ack, lease keeper) + dedup in MemoryDedupStore",
            ),
        ),
    ];
    loops.extend(store_rows("nats", what, n, stores, false));
    let client = &client;
    Ok(interleave(opts, "nats", loops, |kind| {
        one(client, kind, n, opts, stores)
    })
    .await)
}
