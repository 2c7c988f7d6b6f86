//! The driver every broker shares: which loops run, the store each loop deduplicates in
//! (made before the loop, read and cleaned up after it), the store rows, and the interleaved
//! rounds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{MemoryBroker, MemoryDedupStore};
use ackstack_postgres::{OutboxRelay, PgInbox, PgInboxConfig, RelayConfig};
use ackstack_redis::{RedisDedupConfig, RedisDedupStore};

use crate::common::{
    Dedup, EVENTS, InboxEffect, LoopEnd, Progress, Sample, budget, measure, unique,
};
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
    /// The PostgreSQL inbox, the handler writing one outbox row per delivery, and a relay in
    /// the process publishing them (to the in-memory broker).
    InboxOutbox,
    /// As `InboxOutbox`, without notifications: the relay polls every 5 ms.
    InboxOutboxPolled,
    /// The PostgreSQL inbox, the handler publishing one message per delivery itself (to the
    /// in-memory broker) inside the transaction: the at-least-once way the outbox replaces.
    InboxPublish,
}

/// Deliveries per transaction in the "commit groups" inbox rows.
pub const COMMIT_GROUP: usize = 16;

/// The inbox table of the benchmark.
const INBOX_TABLE: &str = "ackstack_bench_inbox";
/// The outbox table of the benchmark.
const OUTBOX_TABLE: &str = "ackstack_bench_outbox";

/// The store of one loop: made before it, read and cleaned up after it.
pub struct LoopStore {
    dedup: Dedup,
    redis: Option<Arc<RedisDedupStore>>,
    inbox: Option<PgInbox>,
    /// The relay of the outbox row, running until the loop's store is finished.
    relay: Option<(Arc<tokio::sync::Notify>, tokio::task::JoinHandle<()>)>,
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
            relay: None,
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
            Some(kind) => {
                let group = if kind == Store::InboxGrouped {
                    COMMIT_GROUP
                } else {
                    1
                };
                // The relay takes a connection of the pool besides the handlers'.
                let config = PgInboxConfig::new(unique("ackstack-bench"))
                    .table(INBOX_TABLE)
                    .outbox_table(OUTBOX_TABLE)
                    .outbox_notify(kind != Store::InboxOutboxPolled)
                    .max_connections(concurrency.max(1) + 1)
                    .commit_group(group);
                let inbox =
                    PgInbox::new(&stores.postgres.usable()?, config).map_err(|e| e.to_string())?;
                inbox
                    .migrate()
                    .await
                    .map_err(|e| format!("postgres: {e}"))?;
                let events = MemoryBroker::new();
                let effect = match kind {
                    Store::InboxOutbox | Store::InboxOutboxPolled => {
                        let relay_config = if kind == Store::InboxOutbox {
                            RelayConfig::default()
                        } else {
                            RelayConfig::default()
                                .listen(false)
                                .poll_interval(Duration::from_millis(5))
                        };
                        let relay = OutboxRelay::new(&inbox, relay_config)
                            .map_err(|e| e.to_string())?
                            .route(EVENTS, events.publisher(EVENTS));
                        let stop = Arc::new(tokio::sync::Notify::new());
                        let (running, stopped) = (relay.clone(), stop.clone());
                        let task = tokio::spawn(async move {
                            running
                                .run_until(async move { stopped.notified().await })
                                .await;
                        });
                        store.relay = Some((stop, task));
                        InboxEffect::Outbox(relay)
                    }
                    Store::InboxPublish => InboxEffect::Publish(events.publisher(EVENTS)),
                    _ => InboxEffect::None,
                };
                store.dedup = Dedup::Inbox(inbox.clone(), effect);
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
            sample.counts.pg_round_trips = self.inbox.as_ref().map(|i| i.stats().round_trips);
        }
        if let Some((stop, task)) = &self.relay {
            stop.notify_one();
            task.abort();
        }
        if let Some(inbox) = &self.inbox {
            if let Err(e) = inbox.sweep_once(Duration::ZERO).await {
                eprintln!("  could not delete the benchmark's inbox rows: {e}");
            }
            // Rows a loop that failed left unsent would count for the next loop's relay.
            let left = match inbox.pool().get().await {
                Ok(client) => client
                    .execute(&format!("DELETE FROM {OUTBOX_TABLE}"), &[])
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = left {
                eprintln!("  could not delete the benchmark's outbox rows: {e}");
            }
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
                INBOX_MODE,
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
        rows.push((
            Loop::Full(Store::InboxPublish),
            Series::new(
                broker,
                "ackstack full + PostgreSQL inbox, direct publish",
                Role::Ackstack,
                what,
                n,
                "as the inbox row, the handler publishing one message per delivery itself (in-memory broker) before its commit: at least once, what the outbox replaces",
            )
            .compared_to(INBOX_MODE),
        ));
        rows.push((
            Loop::Full(Store::InboxOutbox),
            Series::new(
                broker,
                "ackstack full + PostgreSQL inbox + outbox",
                Role::Ackstack,
                what,
                n,
                "as the inbox row, the handler writing one outbox row per delivery in its transaction; an OutboxRelay in the process publishes them (in-memory broker); the loop ends when all are sent",
            )
            .compared_to(INBOX_MODE),
        ));
        rows.push((
            Loop::Full(Store::InboxOutboxPolled),
            Series::new(
                broker,
                "ackstack full + PostgreSQL inbox + outbox, polled",
                Role::Ackstack,
                what,
                n,
                "as the outbox row with PgInboxConfig::outbox_notify(false): no NOTIFY in the handlers' transactions, the relay polls every 5 ms",
            )
            .compared_to(INBOX_MODE),
        ));
    }
    rows
}

/// The row of the inbox alone, which the outbox rows are compared with.
const INBOX_MODE: &str = "ackstack full + PostgreSQL inbox";

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
