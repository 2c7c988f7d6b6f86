//! Redis Streams: redis-rs by hand (`XREADGROUP` then `XACK` per entry; one `XACK` of the
//! whole read) against ackstack's RedisStreamsSource under the consumer.
//!
//! Each loop gets a stream of its own, filled (pipelined `XADD`s) before the loop starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::Source;

use ackstack_redis_streams::redis::{self, Value, aio::ConnectionManager};
use ackstack_redis_streams::{RedisStreamsConfig, RedisStreamsSource};

use crate::common::{Counts, Dedup, LoopEnd, Progress, Sample, payload, run_ackstack, unique};
use crate::driver::{Loop, Store, interleave, run_loop, store_rows};
use crate::memory::{bare_config, full_config};
use crate::report::{Role, Series};
use crate::{Options, Stores};

/// Handlers at once in ackstack's consumer.
const CONCURRENCY: usize = 64;
/// Entries one read asks for in every loop.
const READ: usize = 64;
/// The group every loop reads with.
const GROUP: &str = "bench";

fn err(context: &str) -> impl Fn(redis::RedisError) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// A stream of `n` entries (field `payload`) and its group, from the start.
async fn fill(conn: &ConnectionManager, n: u64) -> Result<String, String> {
    let stream = unique("ackstack-bench");
    let mut conn = conn.clone();
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + 500).min(n) {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("payload")
                .arg(payload(j))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(err("XADD"))?;
        i = (i + 500).min(n);
    }
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .map_err(err("XGROUP CREATE"))?;
    Ok(stream)
}

/// `(id, payload)` of each entry of an `XREADGROUP` reply.
fn entries(reply: &Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(parts) = stream else {
            continue;
        };
        let Some(Value::Array(items)) = parts.get(1) else {
            continue;
        };
        for item in items {
            let Value::Array(entry) = item else { continue };
            let (Some(Value::BulkString(id)), Some(Value::Array(fields))) =
                (entry.first(), entry.get(1))
            else {
                continue;
            };
            if let Some(Value::BulkString(p)) = fields.get(1) {
                out.push((id.clone(), p.clone()));
            }
        }
    }
    out
}

async fn raw(
    conn: &ConnectionManager,
    stream: &str,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let mut conn = conn.clone();
    let mut calls = 0u64;
    while !progress.is_done() {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("raw")
            .arg("COUNT")
            .arg(READ)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .map_err(err("XREADGROUP"))?;
        calls += 1;
        let got = entries(&reply);
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(GROUP);
        for (id, body) in &got {
            progress.process(body, false).map_err(|e| e.to_string())?;
            if tuned {
                ack.arg(id);
            } else {
                redis::cmd("XACK")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(id)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map_err(err("XACK"))?;
                calls += 1;
            }
        }
        if tuned && !got.is_empty() {
            ack.query_async::<i64>(&mut conn)
                .await
                .map_err(err("XACK"))?;
            calls += 1;
        }
    }
    Ok(LoopEnd {
        end: Instant::now(),
        counts: Counts {
            calls: Some(calls),
            ..Counts::default()
        },
    })
}

async fn adapter(
    url: &str,
    stream: &str,
    progress: Arc<Progress>,
    full: bool,
    dedup: Dedup,
) -> Result<LoopEnd, String> {
    let mut config = RedisStreamsConfig::new(url, stream);
    config.group = GROUP.into();
    config.block = Duration::from_millis(500);
    let source = RedisStreamsSource::connect(config)
        .await
        .map_err(|e| format!("RedisStreamsSource: {e}"))?;
    let settler = source.settler();
    let consumer_config = if full {
        full_config(CONCURRENCY, READ)
    } else {
        bare_config(CONCURRENCY, READ)
    };
    let end = run_ackstack(source, consumer_config, dedup, &progress, false).await?;
    let s = settler.stats();
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(s.reads + s.reclaims + s.moves + s.ack_calls + s.settle_scripts),
            ..Counts::default()
        },
    })
}

async fn one(
    conn: &ConnectionManager,
    url: &str,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let stream = fill(conn, n).await?;
    let s = stream.as_str();
    let measured = run_loop(kind, n, opts, stores, CONCURRENCY, |p, dedup| async move {
        match kind {
            Loop::RawNaive => raw(conn, s, p, false).await,
            Loop::RawTuned => raw(conn, s, p, true).await,
            Loop::Bare | Loop::Batches => adapter(url, s, p, false, dedup).await,
            Loop::Full(_) | Loop::Serial(_) => adapter(url, s, p, true, dedup).await,
        }
    })
    .await;
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn.clone())
        .await;
    measured
}

/// The Redis Streams rows, rounds interleaved; an error when Redis does not answer.
pub async fn run(opts: &Options, stores: &Stores) -> Result<Vec<Series>, String> {
    let url = stores.redis.usable()?;
    let conn = redis::Client::open(url.as_str())
        .map_err(err("redis url"))?
        .get_connection_manager()
        .await
        .map_err(err("connect"))?;
    let n = opts.messages.unwrap_or(20_000);
    let what = "Redis commands: XREADGROUP, XACK, scripts (reclaim, due copies, settling)";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "redis-streams",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                format!(
                    "redis-rs: XREADGROUP COUNT {READ} (1 s block), decode, XACK per entry, sequential"
                ),
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "redis-streams",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                format!("redis-rs: XREADGROUP COUNT {READ}, decode, one XACK of the whole read"),
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "redis-streams",
                "ackstack adapter",
                Role::Ackstack,
                what,
                n,
                format!(
                    "RedisStreamsSource + Consumer defaults (concurrency {CONCURRENCY}, XACK per ack batch, reclaim and due-copy scans, lease keeper built in), decode; no dedup"
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "redis-streams",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers (retry/dead-letter, batch ack, lease keeper) + dedup in MemoryDedupStore",
            ),
        ),
    ];
    loops.extend(store_rows("redis-streams", what, n, stores, false));
    let (conn, url) = (&conn, url.as_str());
    Ok(interleave(opts, "redis-streams", loops, |kind| {
        one(conn, url, kind, n, opts, stores)
    })
    .await)
}
