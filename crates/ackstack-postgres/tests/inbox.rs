//! The inbox against a real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test uses its own tables, so runs do not
//! collide and need no clean database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ackstack_core::{
    Backoff, Consumer, Context, DedupKey, Delivery, ErrorKind, Handler, HandlerError, MemoryBroker,
    Message, Origin, Summary,
};
use ackstack_postgres::{InboxError, InboxTx, PgInbox, PgInboxConfig};
use ackstack_testkit::unique_identifier;
use futures::FutureExt;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A table name no other test or run uses.
fn unique(name: &str) -> String {
    unique_identifier(&format!("t_{name}"))
}

/// An inbox on its own table, migrated, and an effects table `<table>_fx (key text)` with no
/// unique constraint, so that a repeated effect shows as a second row.
struct Setup {
    inbox: PgInbox,
    fx: Arc<str>,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        Setup::with(name, |c| c).await
    }

    async fn with(name: &str, tune: impl FnOnce(PgInboxConfig) -> PgInboxConfig) -> Setup {
        let table = unique(name);
        let config = tune(PgInboxConfig::new("test-consumer").table(table.clone()));
        let inbox = PgInbox::new(&database_url(), config).unwrap();
        inbox.migrate().await.unwrap();
        let fx: Arc<str> = format!("{table}_fx").into();
        sql(&inbox, &format!("CREATE TABLE {fx} (key text)")).await;
        Setup { inbox, fx }
    }

    async fn effects(&self) -> i64 {
        count(&self.inbox, &format!("SELECT count(*) FROM {}", self.fx)).await
    }

    async fn inbox_rows(&self) -> i64 {
        count(
            &self.inbox,
            &format!("SELECT count(*) FROM {}", self.inbox.config().table),
        )
        .await
    }

    async fn drop_tables(self) {
        sql(
            &self.inbox,
            &format!(
                "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}",
                self.fx,
                self.inbox.config().table
            ),
        )
        .await;
    }
}

async fn sql(inbox: &PgInbox, sql: &str) {
    let client = inbox.pool().get().await.unwrap();
    client.batch_execute(sql).await.unwrap();
}

async fn count(inbox: &PgInbox, sql: &str) -> i64 {
    let client = inbox.pool().get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Inserts the delivery's message id (or `-` without one) into `fx`.
async fn record_effect(tx: &InboxTx, fx: &str, delivery: &Delivery) -> Result<(), InboxError> {
    let key = delivery.message_id.clone().unwrap_or_else(|| "-".into());
    tx.execute(&format!("INSERT INTO {fx} (key) VALUES ($1)"), &[&key])
        .await?;
    Ok(())
}

fn delivery(id: Option<&str>, attempt: u32) -> Delivery {
    let mut d = Delivery::new("{}", Origin::new("memory", "q", "test"));
    d.message_id = id.map(str::to_string);
    d.attempt = attempt;
    d
}

fn fast_retry() -> Backoff {
    Backoff::exponential(Duration::from_millis(20), Duration::from_millis(50)).no_jitter()
}

async fn run_until_idle<H: Handler>(
    broker: &MemoryBroker,
    queue: &str,
    handler: H,
    concurrency: usize,
) -> Summary {
    // A short poll, so that a retried message is received soon after its delay.
    let source = broker.source(queue).poll_wait(Duration::from_millis(50));
    let consumer = Consumer::new(source)
        .concurrency(concurrency)
        .backoff(fast_retry())
        .max_attempts(5);
    let status = consumer.status();
    consumer
        .run_until(handler, async move {
            status.idle(Duration::from_millis(400)).await
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn duplicate_deliveries_run_the_handler_once() {
    let s = Setup::new("dups").await;
    let broker = MemoryBroker::new();
    for round in 0..3 {
        for i in 0..10 {
            broker.publish(
                "q",
                Message::new(format!("{round}")).message_id(format!("m-{i}")),
            );
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let (fx, c) = (s.fx.clone(), calls.clone());
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let (fx, calls) = (fx.clone(), c.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                record_effect(&tx, &fx, &delivery).await?;
                Ok(())
            }
        });
    let summary = run_until_idle(&broker, "q", handler, 8).await;
    assert_eq!(summary.acked, 30, "{summary:?}");
    assert_eq!(summary.deduplicated, 20, "{summary:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    let stats = s.inbox.stats();
    assert_eq!(stats.duplicates, 20, "{stats:?}");
    assert!(stats.transactions >= 30, "one per delivery: {stats:?}");
    assert_eq!(s.effects().await, 10);
    assert_eq!(
        count(
            &s.inbox,
            &format!("SELECT count(DISTINCT key) FROM {}", s.fx)
        )
        .await,
        10
    );
    assert_eq!(s.inbox_rows().await, 10);
    assert!(broker.is_empty("q"));
    s.drop_tables().await;
}

#[tokio::test]
async fn two_consumers_racing_on_one_key_apply_the_effect_once() {
    let s = Setup::new("race").await;
    let broker = MemoryBroker::new();
    for queue in ["a", "b"] {
        for i in 0..5 {
            broker.publish(queue, Message::new("{}").message_id(format!("k-{i}")));
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let make = |inbox: &PgInbox| {
        let (fx, c) = (s.fx.clone(), calls.clone());
        inbox.handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let (fx, calls) = (fx.clone(), c.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                record_effect(&tx, &fx, &delivery).await?;
                // Hold the transaction open so that the other consumer's insert of the same
                // key has to wait for it.
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok(())
            }
        })
    };
    // Two inboxes (two pools, as two processes would have) under the same consumer name.
    let other = PgInbox::new(&database_url(), s.inbox.config().clone()).unwrap();
    let (a, b) = tokio::join!(
        run_until_idle(&broker, "a", make(&s.inbox), 5),
        run_until_idle(&broker, "b", make(&other), 5)
    );
    assert_eq!(a.acked + b.acked, 10, "{a:?} {b:?}");
    assert_eq!(a.deduplicated + b.deduplicated, 5, "{a:?} {b:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(s.effects().await, 5);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_user_error_rolls_back_and_the_retry_applies_once() {
    let s = Setup::new("err").await;
    let calls = Arc::new(AtomicU32::new(0));
    let (fx, c) = (s.fx.clone(), calls.clone());
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let (fx, calls) = (fx.clone(), c.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                record_effect(&tx, &fx, &delivery).await?;
                if delivery.attempt == 1 {
                    return Err(HandlerError::transient("downstream said no"));
                }
                Ok(())
            }
        });
    let cx = Context::new();
    let err = handler
        .handle(&delivery(Some("e-1"), 1), &cx)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().contains("downstream said no"));
    assert!(!s.inbox.contains(b"e-1").await.unwrap(), "no inbox row");
    assert_eq!(s.effects().await, 0, "no effect row");

    handler
        .handle(&delivery(Some("e-1"), 2), &cx)
        .await
        .unwrap();
    assert!(s.inbox.contains(b"e-1").await.unwrap());
    assert_eq!(s.effects().await, 1);

    // A later duplicate is acked without calling the function.
    handler
        .handle(&delivery(Some("e-1"), 3), &cx)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(s.effects().await, 1);

    // Through the consumer: the failed first attempt is retried at the broker, applied once.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").message_id("e-2"));
    let summary = run_until_idle(&broker, "q", handler, 2).await;
    assert_eq!(summary.retried, 1, "{summary:?}");
    assert_eq!(summary.acked, 1, "{summary:?}");
    assert_eq!(s.effects().await, 2);
    assert_eq!(s.inbox_rows().await, 2);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_panic_rolls_back_and_the_connection_is_not_reused() {
    // One connection: if the panicked transaction's connection went back to the pool still
    // open, the next delivery would run inside it.
    let s = Setup::with("panic", |c| c.max_connections(1)).await;
    let fx = s.fx.clone();
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let fx = fx.clone();
            async move {
                record_effect(&tx, &fx, &delivery).await?;
                if delivery.attempt == 1 {
                    panic!("handler bug");
                }
                Ok(())
            }
        });
    let cx = Context::new();
    let first = delivery(Some("p-1"), 1);
    let run = std::panic::AssertUnwindSafe(handler.handle(&first, &cx));
    assert!(run.catch_unwind().await.is_err());
    assert!(!s.inbox.contains(b"p-1").await.unwrap());
    assert_eq!(s.effects().await, 0);

    handler
        .handle(&delivery(Some("p-1"), 2), &cx)
        .await
        .unwrap();
    assert_eq!(s.effects().await, 1);
    assert!(s.inbox.contains(b"p-1").await.unwrap());

    // Through the consumer: the panic is caught by the runner and retried.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").message_id("p-2"));
    let summary = run_until_idle(&broker, "q", handler, 1).await;
    assert_eq!(summary.retried, 1, "{summary:?}");
    assert_eq!(summary.acked, 1, "{summary:?}");
    assert_eq!(s.effects().await, 2);
    s.drop_tables().await;
}

#[tokio::test]
async fn migrate_twice_and_concurrently_is_fine() {
    let s = Setup::new("migrate").await;
    s.inbox.migrate().await.unwrap();
    let table = unique("migrate2");
    let inboxes: Vec<PgInbox> = (0..3)
        .map(|_| {
            PgInbox::new(
                &database_url(),
                PgInboxConfig::new("c").table(table.clone()),
            )
            .unwrap()
        })
        .collect();
    let results = futures::future::join_all(inboxes.iter().map(|i| i.migrate())).await;
    for r in results {
        r.unwrap();
    }
    let index = count(
        &s.inbox,
        &format!(
            "SELECT count(*) FROM pg_indexes WHERE tablename = '{table}' \
             AND indexname = '{table}_received_at_idx'"
        ),
    )
    .await;
    assert_eq!(index, 1);
    sql(&s.inbox, &format!("DROP TABLE {table}")).await;
    s.drop_tables().await;
}

#[tokio::test]
async fn the_sweeper_deletes_old_rows_only() {
    let s = Setup::with("sweep", |c| {
        c.sweep_batch(2).retention(Duration::from_secs(24 * 3600))
    })
    .await;
    let table = s.inbox.config().table.clone();
    let insert = |consumer: &str, key: &str, age: &str| {
        format!(
            "INSERT INTO {table} (consumer, key, received_at) \
             VALUES ('{consumer}', '{key}'::bytea, now() - interval '{age}');"
        )
    };
    let mut rows = String::new();
    for i in 0..5 {
        rows += &insert("test-consumer", &format!("old-{i}"), "2 days");
    }
    for i in 0..3 {
        rows += &insert("test-consumer", &format!("new-{i}"), "1 minute");
    }
    for i in 0..2 {
        rows += &insert("someone-else", &format!("old-{i}"), "2 days");
    }
    sql(&s.inbox, &rows).await;

    let deleted = s
        .inbox
        .sweep_once(Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert_eq!(deleted, 5, "in batches of 2");
    assert_eq!(s.inbox_rows().await, 5);
    assert!(s.inbox.contains(b"new-0").await.unwrap());
    assert!(!s.inbox.contains(b"old-0").await.unwrap());
    let others = count(
        &s.inbox,
        &format!("SELECT count(*) FROM {table} WHERE consumer = 'someone-else'"),
    )
    .await;
    assert_eq!(others, 2, "another consumer's rows are its own to sweep");

    // The periodic sweeper, with the configured retention, until its handle is dropped.
    sql(&s.inbox, &insert("test-consumer", "old-again", "3 days")).await;
    let sweeper = s.inbox.spawn_sweeper(Duration::from_millis(50));
    let start = Instant::now();
    while s.inbox.contains(b"old-again").await.unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sweeper did not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sweeper);
    tokio::time::sleep(Duration::from_millis(100)).await;
    sql(&s.inbox, &insert("test-consumer", "after-stop", "3 days")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.inbox.contains(b"after-stop").await.unwrap(),
        "stopped on drop"
    );
    assert_eq!(s.inbox_rows().await, 6);
    s.drop_tables().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_transient_failure() {
    // Port 1 refuses connections.
    let inbox = PgInbox::new(
        "postgres://postgres@127.0.0.1:1/test",
        PgInboxConfig::new("c").connect_timeout(Duration::from_secs(1)),
    )
    .unwrap();
    let handler = inbox.handler(DedupKey::MessageId, |_d, _tx, _cx| async move {
        panic!("must not run without a transaction")
    });
    let started = Instant::now();
    let err = handler
        .handle(&delivery(Some("u-1"), 1), &Context::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().contains("database unreachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The consumer keeps running and never acks.
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("{}").message_id("u-2"));
    let summary = Consumer::new(broker.source("q"))
        .backoff(fast_retry())
        .max_attempts(1000)
        .run_until(handler, tokio::time::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(summary.acked, 0, "{summary:?}");
    assert!(summary.retried >= 1, "{summary:?}");
    assert_eq!(broker.len("q"), 1);
}

#[tokio::test]
async fn a_keyless_delivery_runs_in_a_transaction_without_an_inbox_row() {
    let s = Setup::new("keyless").await;
    let fx = s.fx.clone();
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let fx = fx.clone();
            async move {
                record_effect(&tx, &fx, &delivery).await?;
                if delivery.attempt == 1 {
                    return Err(HandlerError::transient("no"));
                }
                Ok(())
            }
        });
    let cx = Context::new();
    handler.handle(&delivery(None, 1), &cx).await.unwrap_err();
    assert_eq!(s.effects().await, 0, "rolled back");
    handler.handle(&delivery(None, 2), &cx).await.unwrap();
    handler.handle(&delivery(None, 2), &cx).await.unwrap();
    assert_eq!(s.effects().await, 2, "not deduplicated");
    assert_eq!(s.inbox_rows().await, 0);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_swallowed_sql_error_is_never_committed() {
    let s = Setup::new("swallow").await;
    let fx = s.fx.clone();
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let fx = fx.clone();
            async move {
                let _ = tx
                    .execute("INSERT INTO no_such_table VALUES (1)", &[])
                    .await;
                let _ = record_effect(&tx, &fx, &delivery).await;
                Ok(())
            }
        });
    let err = handler
        .handle(&delivery(Some("s-1"), 1), &Context::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().contains("nothing was committed"), "{err}");
    assert!(!s.inbox.contains(b"s-1").await.unwrap());
    assert_eq!(s.effects().await, 0);
    s.drop_tables().await;
}

#[tokio::test]
async fn statements_are_bounded_by_the_statement_timeout() {
    let s = Setup::with("timeout", |c| {
        c.statement_timeout(Duration::from_millis(300))
    })
    .await;
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, |_delivery, tx, _cx| async move {
            tx.execute("SELECT pg_sleep(5)", &[]).await?;
            Ok(())
        });
    let started = Instant::now();
    let err = handler
        .handle(&delivery(Some("t-1"), 1), &Context::new())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    let inner = err.inner().downcast_ref::<InboxError>().unwrap();
    assert_eq!(inner.code(), Some("57014"), "query_canceled: {inner}");
    assert!(!s.inbox.contains(b"t-1").await.unwrap());
    s.drop_tables().await;
}

#[tokio::test]
async fn consumers_with_different_names_each_apply_a_key_once() {
    let s = Setup::new("names").await;
    // The same table, another consumer name.
    let mut config = s.inbox.config().clone();
    config.consumer = "second-consumer".into();
    let second = PgInbox::new(&database_url(), config).unwrap();
    let make = |inbox: &PgInbox| {
        let fx = s.fx.clone();
        inbox.handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let fx = fx.clone();
            async move {
                record_effect(&tx, &fx, &delivery).await?;
                Ok(())
            }
        })
    };
    let cx = Context::new();
    for _ in 0..2 {
        make(&s.inbox)
            .handle(&delivery(Some("n-1"), 1), &cx)
            .await
            .unwrap();
        make(&second)
            .handle(&delivery(Some("n-1"), 1), &cx)
            .await
            .unwrap();
    }
    assert_eq!(s.effects().await, 2);
    assert_eq!(s.inbox_rows().await, 2);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_handle_kept_past_the_handler_is_refused() {
    let s = Setup::new("leak").await;
    let kept = Arc::new(std::sync::Mutex::new(None::<InboxTx>));
    let k = kept.clone();
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |_delivery, tx, _cx| {
            let kept = k.clone();
            async move {
                *kept.lock().unwrap() = Some(tx);
                Ok(())
            }
        });
    handler
        .handle(&delivery(Some("l-1"), 1), &Context::new())
        .await
        .unwrap();
    let tx = kept.lock().unwrap().take().unwrap();
    assert!(!tx.is_open());
    let err = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(err, InboxError::Ended), "{err}");
    assert!(s.inbox.contains(b"l-1").await.unwrap());
    s.drop_tables().await;
}

/// 60 distinct keys published twice each, handled 32 at a time in groups of up to 16.
async fn run_grouped<F, Fut>(s: &Setup, f: F) -> Summary
where
    F: Fn(Delivery, InboxTx, Context) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send,
{
    let broker = MemoryBroker::new();
    for _ in 0..2 {
        for i in 0..60 {
            broker.publish("q", Message::new("{}").message_id(format!("g-{i}")));
        }
    }
    let handler = s.inbox.handler(DedupKey::MessageId, f);
    run_until_idle(&broker, "q", handler, 32).await
}

#[tokio::test]
async fn a_commit_group_applies_each_key_once_with_fewer_commits() {
    let s = Setup::with("group", |c| c.commit_group(16)).await;
    let fx = s.fx.clone();
    let summary = run_grouped(&s, move |delivery, tx, _cx| {
        let fx = fx.clone();
        async move {
            record_effect(&tx, &fx, &delivery).await?;
            Ok(())
        }
    })
    .await;
    assert_eq!(summary.acked, 120, "{summary:?}");
    assert_eq!(summary.deduplicated, 60, "{summary:?}");
    assert_eq!(s.effects().await, 60, "each key applied once");
    assert_eq!(s.inbox_rows().await, 60);
    let stats = s.inbox.stats();
    // With a transaction per delivery this would be 120 (plus the test's own queries).
    assert!(
        stats.transactions < 60,
        "deliveries share commits: {stats:?}"
    );
    s.drop_tables().await;
}

#[tokio::test]
async fn a_failing_member_is_rolled_back_alone() {
    let s = Setup::with("group_err", |c| c.commit_group(16)).await;
    let fx = s.fx.clone();
    let summary = run_grouped(&s, move |delivery, tx, _cx| {
        let fx = fx.clone();
        async move {
            record_effect(&tx, &fx, &delivery).await?;
            let id = delivery.message_id.clone().unwrap_or_default();
            if id.ends_with('7') {
                // Its effect is in the shared transaction: it must be rolled back alone.
                return Err(HandlerError::permanent("refused"));
            }
            if id.ends_with('3') {
                // A swallowed SQL error aborts this member's savepoint only (and fails it,
                // every attempt).
                let _ = tx
                    .execute("INSERT INTO no_such_table VALUES (1)", &[])
                    .await;
            }
            Ok(())
        }
    })
    .await;
    // g-3, g-7, g-13, ..., g-57: twelve keys, each delivered twice, dead-lettered each time.
    assert_eq!(summary.dead_lettered, 24, "{summary:?}");
    let failed = count(
        &s.inbox,
        &format!(
            "SELECT count(*) FROM {} WHERE key LIKE '%7' OR key LIKE '%3'",
            s.fx
        ),
    )
    .await;
    assert_eq!(failed, 0, "a failed member's effect was committed");
    assert_eq!(s.effects().await, 48, "every other key applied once");
    assert_eq!(s.inbox_rows().await, 48);
    s.drop_tables().await;
}

/// Eight deliveries handled at once by `handler`, so that they share commit groups; each
/// one's result by its message id `m-0` .. `m-7`.
async fn handle_eight<H: Handler>(handler: &H) -> Vec<Result<(), HandlerError>> {
    let cx = Context::new();
    let deliveries: Vec<Delivery> = (0..8)
        .map(|i| delivery(Some(&format!("m-{i}")), 1))
        .collect();
    futures::future::join_all(deliveries.iter().map(|d| handler.handle(d, &cx))).await
}

#[tokio::test]
async fn a_member_costs_one_round_trip_besides_its_handlers_statements() {
    let s = Setup::with("group_trips", |c| c.commit_group(16)).await;
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, |_delivery, _tx, _cx| async { Ok(()) });
    let before = s.inbox.stats();
    for result in handle_eight(&handler).await {
        result.unwrap();
    }
    let after = s.inbox.stats();
    let transactions = after.transactions - before.transactions;
    let round_trips = after.round_trips - before.round_trips;
    assert!(transactions < 8, "the deliveries shared commits: {after:?}");
    // Per member two statements sent together (the release of the member before with its
    // savepoint, and its inbox row); per transaction BEGIN, the last release and COMMIT. (A
    // release awaited by each member itself made it 3 per member and 2 per transaction.)
    assert_eq!(
        round_trips,
        2 * 8 + 3 * transactions,
        "{before:?} -> {after:?}"
    );
    assert_eq!(s.inbox_rows().await, 8);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_swallowed_sql_error_found_by_the_next_release_fails_that_member_alone() {
    // m-2 (a member with others after it) and m-7 (the last member of its group, released
    // before the commit) swallow a failed statement and return Ok.
    let s = Setup::with("group_swallow", |c| c.commit_group(16)).await;
    let fx = s.fx.clone();
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let fx = fx.clone();
            async move {
                record_effect(&tx, &fx, &delivery).await?;
                if matches!(delivery.message_id.as_deref(), Some("m-2" | "m-7")) {
                    let _ = tx
                        .execute("INSERT INTO no_such_table VALUES (1)", &[])
                        .await;
                }
                Ok(())
            }
        });
    let results = handle_eight(&handler).await;
    for (i, result) in results.iter().enumerate() {
        if i == 2 || i == 7 {
            let err = result.as_ref().unwrap_err();
            assert!(
                err.to_string().contains("nothing was committed"),
                "m-{i}: {err}"
            );
        } else {
            assert!(result.is_ok(), "m-{i}: {result:?}");
        }
    }
    let failed = count(
        &s.inbox,
        &format!("SELECT count(*) FROM {} WHERE key IN ('m-2', 'm-7')", s.fx),
    )
    .await;
    assert_eq!(failed, 0, "a rolled-back member's effect was committed");
    assert_eq!(s.effects().await, 6);
    assert_eq!(s.inbox_rows().await, 6);
    assert!(
        s.inbox.stats().transactions < 8,
        "the deliveries shared commits"
    );
    s.drop_tables().await;
}

#[tokio::test]
async fn a_panicking_member_fails_its_group_and_nothing_is_lost_or_doubled() {
    let s = Setup::with("group_panic", |c| c.commit_group(16)).await;
    let fx = s.fx.clone();
    let summary = run_grouped(&s, move |delivery, tx, _cx| {
        let fx = fx.clone();
        async move {
            record_effect(&tx, &fx, &delivery).await?;
            if delivery.message_id.as_deref() == Some("g-5") && delivery.attempt == 1 {
                panic!("handler bug");
            }
            Ok(())
        }
    })
    .await;
    assert_eq!(summary.acked, 120, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert!(
        summary.retried >= 1,
        "the panic and its group are retried: {summary:?}"
    );
    assert_eq!(s.effects().await, 60, "each key applied exactly once");
    assert_eq!(s.inbox_rows().await, 60);
    s.drop_tables().await;
}

#[test]
fn a_commit_group_is_between_1_and_64() {
    assert!(PgInboxConfig::new("c").commit_group(0).validate().is_err());
    assert!(PgInboxConfig::new("c").commit_group(65).validate().is_err());
    assert!(PgInboxConfig::new("c").commit_group(64).validate().is_ok());
}

#[tokio::test]
async fn a_member_handle_kept_past_its_turn_is_refused_in_the_next_turn() {
    let s = Setup::with("group_kept", |c| c.commit_group(16)).await;
    let kept: Arc<std::sync::Mutex<Option<InboxTx>>> = Arc::default();
    let late = Arc::new(std::sync::Mutex::new(None::<bool>));
    let (fx, k, l) = (s.fx.clone(), kept.clone(), late.clone());
    let handler = s
        .inbox
        .handler(DedupKey::MessageId, move |delivery, tx, _cx| {
            let (fx, kept, late) = (fx.clone(), k.clone(), l.clone());
            async move {
                record_effect(&tx, &fx, &delivery).await?;
                if delivery.message_id.as_deref() == Some("first") {
                    // Keep the handle, and stay long enough for the second delivery to join
                    // this group.
                    *kept.lock().unwrap() = Some(tx.clone());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                } else {
                    // Running in the second member's turn: the first member's handle must not
                    // run statements inside this member's savepoint.
                    let old = kept.lock().unwrap().clone().expect("first ran first");
                    let sql = format!("INSERT INTO {fx} (key) VALUES ('stray')");
                    let refused =
                        matches!(old.execute(sql.as_str(), &[]).await, Err(InboxError::Ended));
                    *late.lock().unwrap() = Some(refused);
                }
                Ok(())
            }
        });
    let cx = Context::new();
    let (first, second) = (delivery(Some("first"), 1), delivery(Some("second"), 1));
    let (a, b) = tokio::join!(handler.handle(&first, &cx), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        handler.handle(&second, &cx).await
    });
    a.unwrap();
    b.unwrap();
    assert_eq!(
        *late.lock().unwrap(),
        Some(true),
        "the kept handle ran a statement"
    );
    assert_eq!(s.effects().await, 2, "no stray effect");
    assert!(s.inbox.stats().transactions <= 2, "{:?}", s.inbox.stats());
    s.drop_tables().await;
}
