//! The driver every broker shares: which loops run, the store each loop deduplicates in
//! (made before the loop, read and cleaned up after it), the store rows, and the interleaved
//! rounds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ackstack_core::MemoryDedupStore;
use ackstack_postgres::{PgInbox, PgInboxConfig};
use ackstack_redis::{RedisDedupConfig, RedisDedupStore};

use crate::common::{Dedup, LoopEnd, Progress, Sample, budget, measure, unique};
use crate::report::{Role, Series};

/// The loops every broker runs (the in-memory broker adds its concurrency-1 rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loop {
    /// The naive raw client loop.
    RawNaive,
    /// The hand-tuned raw client loop.
    RawTuned,
    /// ackstack's consumer with its defaults, no dedup.
    Bare,
    /// All layers, deduplicating in this store.
    Full(Store),
    /// One handler at a time: the bare runner (`None`) or all layers deduplicating in this
    /// store (in-memory broker).
    Serial(Option<Store>),
    /// The bare runner with a no-op batch handler (in-memory broker; elsewhere as `Bare`).
    Batches,
}

impl Loop {
    /// Where the loop deduplicates, if it does.
    pub fn store(self) -> Option<Store> {
        match self {
            Loop::RawNaive | Loop::RawTuned | Loop::Bare | Loop::Batches => None,
            Loop::Full(store) | Loop::Serial(Some(store)) => Some(store),
            Loop::Serial(None) => None,
        }
    }
}

/// Where an "all layers" loop deduplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// `MemoryDedupStore`.
    Memory,
    /// `RedisDedupStore`.
    Redis,
    /// The PostgreSQL inbox, a transaction per delivery.
    Inbox,
    /// The PostgreSQL inbox with commit groups of [`COMMIT_GROUP`].
    InboxGrouped,
}

/// Deliveries per transaction in the "commit groups" inbox rows.
pub const COMMIT_GROUP: usize = 16;

/// The inbox table of the benchmark.
const INBOX_TABLE: &str = "ackstack_bench_inbox";

/// The store of one loop: made before it, read and cleaned up after it.
pub struct LoopStore {
    dedup: Dedup,
    redis: Option<Arc<RedisDedupStore>>,
    inbox: Option<PgInbox>,
}

impl LoopStore {
    /// The store `kind` needs (a Redis prefix or an inbox consumer of its own), for a consumer
    /// running `concurrency` handlers.
    pub async fn open(
        kind: Loop,
        stores: &crate::Stores,
        concurrency: usize,
    ) -> Result<Self, String> {
        let mut store = LoopStore {
            dedup: Dedup::None,
            redis: None,
            inbox: None,
        };
        match kind.store() {
            None => {}
            Some(Store::Memory) => {
                store.dedup = Dedup::Store(Arc::new(MemoryDedupStore::with_capacity(100_000)));
            }
            Some(Store::Redis) => {
                let config = RedisDedupConfig::new(stores.redis.usable()?)
                    .key_prefix(format!("{}:", unique("ackstack-bench")));
                let redis = RedisDedupStore::connect(config)
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
                let redis = Arc::new(redis);
                store.dedup = Dedup::Store(redis.clone());
                store.redis = Some(redis);
            }
            Some(inbox @ (Store::Inbox | Store::InboxGrouped)) => {
                let group = if inbox == Store::Inbox {
                    1
                } else {
                    COMMIT_GROUP
                };
                let config = PgInboxConfig::new(unique("ackstack-bench"))
                    .table(INBOX_TABLE)
                    .max_connections(concurrency.max(1))
                    .commit_group(group);
                let inbox =
                    PgInbox::new(&stores.postgres.usable()?, config).map_err(|e| e.to_string())?;
                inbox
                    .migrate()
                    .await
                    .map_err(|e| format!("postgres: {e}"))?;
                store.dedup = Dedup::Inbox(inbox.clone());
                store.inbox = Some(inbox);
            }
        }
        Ok(store)
    }

    /// What the loop deduplicates with.
    pub fn dedup(&self) -> Dedup {
        self.dedup.clone()
    }

    /// Records the store's round trips or transactions in `sample`, and deletes the loop's
    /// inbox rows (outside the measured interval).
    pub async fn finish(&self, sample: &mut Result<Sample, String>) {
        if let Ok(sample) = sample.as_mut() {
            sample.counts.redis_round_trips = self.redis.as_ref().map(|r| r.stats().round_trips);
            sample.counts.pg_transactions = self.inbox.as_ref().map(|i| i.stats().transactions);
        }
        if let Some(inbox) = &self.inbox
            && let Err(e) = inbox.sweep_once(Duration::ZERO).await
        {
            eprintln!("  could not delete the benchmark's inbox rows: {e}");
        }
    }
}

/// The rows of the stores that answer: Redis dedup, and (`inbox`) the PostgreSQL inbox with
/// and without commit groups.
pub fn store_rows(
    broker: &'static str,
    what: &'static str,
    n: u64,
    stores: &crate::Stores,
    inbox: bool,
) -> Vec<(Loop, Series)> {
    let mut rows = Vec::new();
    let redis_mode = "ackstack full + Redis dedup";
    if stores.redis.available() {
        rows.push((
            Loop::Full(Store::Redis),
            Series::new(
                broker,
                redis_mode,
                Role::Ackstack,
                what,
                n,
                "all layers, dedup in RedisDedupStore (pipelined)",
            )
            .compared_to("ackstack full"),
        ));
    }
    if inbox && stores.postgres.available() {
        rows.push((
            Loop::Full(Store::Inbox),
            Series::new(
                broker,
                "ackstack full + PostgreSQL inbox",
                Role::Ackstack,
                what,
                n,
                "all layers but dedup; the handler runs in a PgInbox transaction (BEGIN, INSERT of the message id, COMMIT before the ack; no statements of its own)",
            )
            .compared_to(redis_mode),
        ));
        rows.push((
            Loop::Full(Store::InboxGrouped),
            Series::new(
                broker,
                "ackstack full + PostgreSQL inbox, commit groups",
                Role::Ackstack,
                what,
                n,
                format!(
                    "as the inbox row, up to {COMMIT_GROUP} deliveries per transaction (PgInboxConfig::commit_group: a savepoint each, acked after the shared commit)"
                ),
            )
            .compared_to(redis_mode),
        ));
    }
    rows
}

/// One measured run of loop `kind` over `n` messages already on the queue: opens the loop's
/// store, runs `body` with the progress and the store's dedup (bounded by the loop budget),
/// and records the store's calls.
pub async fn run_loop<F, Fut>(
    kind: Loop,
    n: u64,
    opts: &crate::Options,
    stores: &crate::Stores,
    concurrency: usize,
    body: F,
) -> Result<Sample, String>
where
    F: FnOnce(Arc<Progress>, Dedup) -> Fut,
    Fut: Future<Output = Result<LoopEnd, String>>,
{
    let store = LoopStore::open(kind, stores, concurrency).await?;
    let progress = Progress::new(n);
    let loop_body = body(progress.clone(), store.dedup());
    let mut measured = measure(&progress, budget(n, opts.timeout_secs), loop_body).await;
    store.finish(&mut measured).await;
    measured
}

/// Runs every loop once per round, rounds interleaved, and returns their series.
pub async fn interleave<F, Fut>(
    opts: &crate::Options,
    broker: &str,
    mut loops: Vec<(Loop, Series)>,
    mut one: F,
) -> Vec<Series>
where
    F: FnMut(Loop) -> Fut,
    Fut: Future<Output = Result<Sample, String>>,
{
    for round in 0..opts.rounds {
        for (kind, series) in loops.iter_mut() {
            eprintln!(
                "{broker} round {}/{}: {}",
                round + 1,
                opts.rounds,
                series.mode
            );
            series.record(one(*kind).await);
        }
    }
    loops.into_iter().map(|(_, s)| s).collect()
}
