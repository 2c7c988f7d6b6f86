//! The transactional outbox and its relay against a real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), publishing to the in-memory broker or to
//! publishers that fail on purpose. Each test uses its own tables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ackstack_core::{
    Backoff, Consumer, DedupKey, HandlerError, MemoryBroker, Message, Publish, PublishError,
};
use ackstack_postgres::{OutboxRelay, PgInbox, PgInboxConfig, RelayConfig};
use ackstack_testkit::unique_identifier;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// An inbox and outbox on tables of their own, migrated.
async fn inbox_with(url: &str, name: &str, notify: bool) -> PgInbox {
    let table = unique_identifier(&format!("t_{name}"));
    let config = PgInboxConfig::new("outbox-test")
        .table(format!("{table}_in"))
        .outbox_table(format!("{table}_out"))
        .outbox_notify(notify);
    let inbox = PgInbox::new(url, config).unwrap();
    inbox.migrate().await.unwrap();
    inbox
}

async fn inbox(name: &str) -> PgInbox {
    inbox_with(&database_url(), name, true).await
}

async fn drop_tables(inbox: &PgInbox) {
    let client = inbox.pool().get().await.unwrap();
    let c = inbox.config();
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}",
            c.table, c.outbox_table
        ))
        .await
        .unwrap();
}

async fn count(inbox: &PgInbox, filter: &str) -> i64 {
    let client = inbox.pool().get().await.unwrap();
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {filter}",
        inbox.config().outbox_table
    );
    client.query_one(sql.as_str(), &[]).await.unwrap().get(0)
}

/// Writes `messages` as outbox rows of one committed transaction (through a consumer with
/// the inbox handler, as an application would).
async fn write(inbox: &PgInbox, destination: &'static str, messages: Vec<Message>) {
    let broker = MemoryBroker::new();
    let n = messages.len();
    broker.publish("in", Message::new("go").message_id(unique_identifier("go")));
    let messages = Arc::new(messages);
    let handler = inbox.handler(DedupKey::MessageId, move |_delivery, tx, _cx| {
        let messages = messages.clone();
        async move {
            for m in messages.iter() {
                tx.outbox().send(destination, m.clone()).await?;
            }
            Ok(())
        }
    });
    let summary = consume(&broker, "in", handler, 4).await;
    assert_eq!(summary.acked, 1, "writing {n} rows");
}

fn keyed(key: &str, seq: usize) -> Message {
    Message::new(format!("{key}:{seq}")).key(key.to_string())
}

/// Runs a consumer of `queue` with `handler` until it has been idle for 300 ms.
async fn consume<H: ackstack_core::Handler>(
    broker: &MemoryBroker,
    queue: &str,
    handler: H,
    max_attempts: u32,
) -> ackstack_core::Summary {
    let consumer = Consumer::new(broker.source(queue).poll_wait(Duration::from_millis(20)))
        .max_attempts(max_attempts);
    let status = consumer.status();
    consumer
        .run_until(handler, async move {
            status.idle(Duration::from_millis(300)).await
        })
        .await
        .unwrap()
}

/// A relay running in the background until `stop` is notified.
struct Running {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

fn spawn(relay: &OutboxRelay) -> Running {
    let stop = Arc::new(tokio::sync::Notify::new());
    let (relay, stopped) = (relay.clone(), stop.clone());
    let task = tokio::spawn(async move {
        relay
            .run_until(async move { stopped.notified().await })
            .await
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.notify_one();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Waits (up to 20 s) until `done` holds; `what` explains a timeout.
async fn wait_for(what: impl Fn() -> String, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rounds until nothing is claimed.
async fn drain(relay: &OutboxRelay) {
    for _ in 0..1000 {
        if relay.relay_once().await.unwrap().claimed == 0 {
            return;
        }
    }
    panic!("the relay never ran dry");
}

#[tokio::test]
async fn rows_commit_with_the_handler_and_carry_stable_ids() {
    let inbox = inbox("commit").await;
    let broker = MemoryBroker::new();
    // Three deliveries: one sends and succeeds, one sends and then fails for good (its row
    // rolls back), one duplicate of the first (the inbox acks it without running again).
    broker.publish("in", Message::new("ok").message_id("m-1"));
    broker.publish("in", Message::new("fail").message_id("m-2"));
    broker.publish("in", Message::new("ok").message_id("m-1"));
    let handler = inbox.handler(DedupKey::MessageId, |delivery, tx, _cx| async move {
        let id = delivery.message_id.clone().unwrap_or_default();
        tx.outbox()
            .send("events", Message::new(format!("event of {id}")).key(id))
            .await?;
        if delivery.payload.as_ref() == b"fail" {
            return Err(HandlerError::permanent("refused"));
        }
        Ok(())
    });
    consume(&broker, "in", handler, 4).await;
    assert_eq!(
        count(&inbox, "true").await,
        1,
        "only the committed send is a row"
    );

    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("events", broker.publisher("events"));
    let status = inbox.outbox_status().await.unwrap();
    assert_eq!((status.pending, status.parked), (1, 0));
    assert!(status.oldest_pending.is_some());
    drain(&relay).await;
    let sent = broker.peek_all("events");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload.as_ref(), b"event of m-1");
    assert_eq!(sent[0].key.as_deref(), Some(&b"m-1"[..]));
    let id = sent[0].message_id.clone().expect("a message id");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        count(&inbox, "true").await,
        0,
        "sent rows are deleted by default"
    );
    assert_eq!(relay.stats().sent, 1);
    let status = inbox.outbox_status().await.unwrap();
    assert_eq!((status.pending, status.oldest_pending), (0, None));
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn a_message_id_of_its_own_and_headers_are_kept() {
    let inbox = inbox("own_id").await;
    write(
        &inbox,
        "events",
        vec![
            Message::new("x")
                .message_id("mine-1")
                .header("h", "v")
                .header("trace", "t-1"),
        ],
    )
    .await;
    let broker = MemoryBroker::new();
    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("events", broker.publisher("events"));
    drain(&relay).await;
    let sent = broker.peek_all("events");
    assert_eq!(sent[0].message_id.as_deref(), Some("mine-1"));
    assert_eq!(sent[0].headers.get_str("h"), Some("v"));
    assert_eq!(sent[0].headers.get_str("trace"), Some("t-1"));
    drop_tables(&inbox).await;
}

/// A publisher that records what it confirmed, fails when told to, and refuses payloads that
/// start with `poison`.
#[derive(Clone, Default)]
struct Flaky {
    confirmed: Arc<Mutex<Vec<Message>>>,
    /// Fail every call whose number (from 1) is in this set.
    fail_calls: Arc<Mutex<Vec<u32>>>,
    calls: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
}

impl Publish for Flaky {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_micros(200)).await;
        if self.down.load(Ordering::SeqCst) || self.fail_calls.lock().unwrap().contains(&call) {
            return Err(PublishError::new("broker unavailable"));
        }
        if message.payload.starts_with(b"poison") {
            return Err(PublishError::refused("message too large"));
        }
        self.confirmed.lock().unwrap().push(message);
        Ok(())
    }
}

impl Flaky {
    fn sequences(&self) -> BTreeMap<String, Vec<usize>> {
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for m in self.confirmed.lock().unwrap().iter() {
            let text = String::from_utf8(m.payload.to_vec()).unwrap();
            let (key, seq) = text.split_once(':').unwrap();
            out.entry(key.to_string())
                .or_default()
                .push(seq.parse().unwrap());
        }
        out
    }
}

fn quick_retry() -> Backoff {
    Backoff::exponential(Duration::from_millis(1), Duration::from_millis(5)).no_jitter()
}

#[tokio::test]
async fn per_key_order_holds_through_failures() {
    let inbox = inbox("order").await;
    let mut messages = Vec::new();
    for seq in 0..30 {
        for key in ["a", "b", "c"] {
            messages.push(keyed(key, seq));
        }
    }
    write(&inbox, "events", messages).await;
    let flaky = Flaky::default();
    // Failures scattered through the run: each holds its key back until it is retried.
    *flaky.fail_calls.lock().unwrap() = vec![2, 5, 9, 14, 20, 27, 35, 44, 54];
    let relay = OutboxRelay::new(
        &inbox,
        RelayConfig::default().batch_size(16).backoff(quick_retry()),
    )
    .unwrap()
    .route("events", flaky.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&inbox, "true").await > 0 {
        assert!(
            Instant::now() < deadline,
            "rows left: {}",
            count(&inbox, "true").await
        );
        relay.relay_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let expected: Vec<usize> = (0..30).collect();
    for (key, seqs) in flaky.sequences() {
        assert_eq!(seqs, expected, "key {key}: sent once each, in order");
    }
    assert_eq!(relay.stats().failures, 9);
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn relays_in_parallel_send_each_row_once_in_key_order() {
    let inbox = inbox("parallel").await;
    let mut messages = Vec::new();
    for seq in 0..100 {
        for key in 0..8 {
            messages.push(keyed(&format!("k{key}"), seq));
        }
    }
    write(&inbox, "events", messages).await;
    let flaky = Flaky::default();
    let relays: Vec<OutboxRelay> = (0..4)
        .map(|_| {
            OutboxRelay::new(
                &inbox,
                RelayConfig::default()
                    .batch_size(25)
                    .listen(false)
                    .poll_interval(Duration::from_millis(5)),
            )
            .unwrap()
            .route("events", flaky.clone())
        })
        .collect();
    let runs: Vec<Running> = relays.iter().map(spawn).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&inbox, "true").await > 0 {
        assert!(
            Instant::now() < deadline,
            "rows left: {}",
            count(&inbox, "true").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for run in runs {
        run.stop().await;
    }
    let expected: Vec<usize> = (0..100).collect();
    let sequences = flaky.sequences();
    assert_eq!(sequences.len(), 8);
    for (key, seqs) in sequences {
        assert_eq!(seqs, expected, "key {key}");
    }
    let total: u64 = relays.iter().map(|r| r.stats().sent).sum();
    assert_eq!(total, 800);
    assert!(
        relays.iter().filter(|r| r.stats().sent > 0).count() >= 2,
        "the work was shared"
    );
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn refused_rows_are_parked_listed_and_retried() {
    let inbox = inbox("parked").await;
    write(
        &inbox,
        "events",
        vec![
            keyed("a", 0),
            Message::new("poison pill").key("a"),
            keyed("a", 1),
        ],
    )
    .await;
    let flaky = Flaky::default();
    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("events", flaky.clone());
    drain(&relay).await;
    // A parked row does not hold its key back.
    assert_eq!(flaky.sequences()["a"], vec![0, 1]);
    assert_eq!(relay.stats().parked, 1);
    let status = inbox.outbox_status().await.unwrap();
    assert_eq!((status.pending, status.parked), (0, 1));
    let parked = inbox.outbox_parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].destination, "events");
    assert_eq!(parked[0].key.as_deref(), Some(&b"a"[..]));
    assert_eq!(parked[0].attempts, 1);
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("message too large"),
        "{:?}",
        parked[0].last_error
    );

    // Retrying by id puts it back in line; a publisher that takes it now sends it.
    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("events", MemoryBroker::new().publisher("events"));
    assert_eq!(
        inbox
            .outbox_retry(Some(&[parked[0].id + 1000]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(inbox.outbox_retry(Some(&[parked[0].id])).await.unwrap(), 1);
    assert_eq!(inbox.outbox_status().await.unwrap().parked, 0);
    drain(&relay).await;
    assert_eq!(relay.stats().sent, 1);
    assert_eq!(count(&inbox, "true").await, 0);
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn an_outage_delays_rows_and_park_after_parks_the_stubborn() {
    let inbox = inbox("outage").await;
    write(&inbox, "events", (0..5).map(|i| keyed("k", i)).collect()).await;
    let flaky = Flaky::default();
    flaky.down.store(true, Ordering::SeqCst);
    let relay = OutboxRelay::new(&inbox, RelayConfig::default().backoff(quick_retry()))
        .unwrap()
        .route("events", flaky.clone());
    for _ in 0..20 {
        relay.relay_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(6)).await;
    }
    // Only the head of the key was tried; nothing is parked without park_after.
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        relay.stats().failures as u32
    );
    assert_eq!(
        count(&inbox, "parked_at IS NULL AND sent_at IS NULL").await,
        5
    );
    let attempts: i64 = {
        let client = inbox.pool().get().await.unwrap();
        let sql = format!(
            "SELECT max(attempts)::bigint FROM {}",
            inbox.config().outbox_table
        );
        client.query_one(sql.as_str(), &[]).await.unwrap().get(0)
    };
    assert!(attempts >= 10, "the head row was retried: {attempts}");
    // The broker is back: everything goes, in order.
    flaky.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(10)).await;
    drain(&relay).await;
    assert_eq!(flaky.sequences()["k"], vec![0, 1, 2, 3, 4]);

    // With park_after, a row that keeps failing is parked after that many attempts.
    write(&inbox, "events", vec![keyed("p", 0)]).await;
    flaky.down.store(true, Ordering::SeqCst);
    let strict = OutboxRelay::new(
        &inbox,
        RelayConfig::default().backoff(quick_retry()).park_after(3),
    )
    .unwrap()
    .route("events", flaky.clone());
    for _ in 0..10 {
        strict.relay_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(6)).await;
    }
    assert_eq!(strict.stats().failures, 3);
    assert_eq!(strict.stats().parked, 1);
    let parked = inbox.outbox_parked(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 3);
    assert!(
        parked[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("broker unavailable")
    );
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn a_relay_claims_only_its_own_destinations() {
    let inbox = inbox("routes").await;
    write(&inbox, "payments", vec![Message::new("p")]).await;
    write(&inbox, "emails", vec![Message::new("e")]).await;
    let broker = MemoryBroker::new();
    let payments = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("payments", broker.publisher("payments"));
    drain(&payments).await;
    assert_eq!(broker.len("payments"), 1);
    assert_eq!(
        count(&inbox, "destination = 'emails'").await,
        1,
        "left for its relay"
    );
    let emails = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("emails", broker.publisher("emails"));
    drain(&emails).await;
    assert_eq!(broker.len("emails"), 1);
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn a_notification_wakes_the_relay_before_its_poll() {
    let inbox = inbox("notify").await;
    let broker = MemoryBroker::new();
    // A poll interval far longer than the wait below: only the notification can wake it.
    let relay = OutboxRelay::new(
        &inbox,
        RelayConfig::default().poll_interval(Duration::from_secs(600)),
    )
    .unwrap()
    .route("events", broker.publisher("events"));
    let run = spawn(&relay);
    wait_for(
        || format!("never listening: {:?}", relay.stats()),
        || relay.stats().listening,
    )
    .await;
    // The relay is now waiting out its first poll interval.
    tokio::time::sleep(Duration::from_millis(200)).await;
    write(&inbox, "events", vec![Message::new("wake up")]).await;
    wait_for(
        || format!("not woken: {:?}", relay.stats()),
        || broker.len("events") > 0,
    )
    .await;
    run.stop().await;
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn without_notifications_the_relay_polls() {
    let inbox = inbox_with(&database_url(), "poll", false).await;
    let broker = MemoryBroker::new();
    let relay = OutboxRelay::new(
        &inbox,
        RelayConfig::default().poll_interval(Duration::from_millis(50)),
    )
    .unwrap()
    .route("events", broker.publisher("events"));
    let run = spawn(&relay);
    write(&inbox, "events", vec![Message::new("polled")]).await;
    wait_for(
        || format!("never polled: {:?}", relay.stats()),
        || broker.len("events") > 0,
    )
    .await;
    run.stop().await;
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn sent_rows_are_kept_for_the_retention_then_swept() {
    let inbox = inbox("keep").await;
    write(&inbox, "events", vec![Message::new("a"), Message::new("b")]).await;
    let broker = MemoryBroker::new();
    let relay = OutboxRelay::new(
        &inbox,
        RelayConfig::default()
            .keep_sent(Duration::from_millis(300))
            .poll_interval(Duration::from_millis(20))
            .status_interval(Duration::from_millis(50)),
    )
    .unwrap()
    .route("events", broker.publisher("events"));
    drain(&relay).await;
    assert_eq!(
        count(&inbox, "sent_at IS NOT NULL").await,
        2,
        "kept, marked sent"
    );
    assert_eq!(inbox.outbox_status().await.unwrap().pending, 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The running relay sweeps what is past the retention (at most every 60 s; the first
    // sweep runs at start).
    relay
        .run_until(tokio::time::sleep(Duration::from_millis(100)))
        .await;
    assert_eq!(count(&inbox, "true").await, 0);
    assert_eq!(broker.len("events"), 2);
    drop_tables(&inbox).await;
}

/// A publisher that confirms, then kills the relay's database connection before the relay
/// can mark the row sent: a crash between the broker's confirmation and the commit.
#[derive(Clone)]
struct ConfirmThenCut {
    inner: ackstack_core::memory::MemoryPublisher,
    cut: Arc<AtomicBool>,
    application: String,
}

impl Publish for ConfirmThenCut {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        self.inner.publish(message).await?;
        if !self.cut.swap(true, Ordering::SeqCst) {
            let (client, connection) = ackstack_postgres::tokio_postgres::connect(
                &database_url(),
                ackstack_postgres::tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    &[&self.application],
                )
                .await
                .unwrap();
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_lost_commit_resends_with_the_same_id_and_a_deduplicating_consumer_applies_it_once() {
    let application = unique_identifier("relay");
    let url = format!("{}?application_name={application}", database_url());
    let inbox = inbox_with(&url, "resend", true).await;
    write(&inbox, "events", vec![Message::new("charge").key("o-1")]).await;
    let broker = MemoryBroker::new();
    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route(
            "events",
            ConfirmThenCut {
                inner: broker.publisher("events"),
                cut: Arc::default(),
                application,
            },
        );
    assert!(
        relay.relay_once().await.is_err(),
        "the round's commit was cut"
    );
    assert_eq!(count(&inbox, "sent_at IS NULL").await, 1, "still pending");
    drain(&relay).await;
    let sent = broker.peek_all("events");
    assert_eq!(sent.len(), 2, "sent twice");
    assert_eq!(sent[0].message_id, sent[1].message_id, "with one id");

    // Downstream, an inbox keyed by message id applies it once.
    let downstream = inbox_with(&database_url(), "resend_down", true).await;
    let applied = Arc::new(AtomicU32::new(0));
    let counter = applied.clone();
    let handler = downstream.handler(DedupKey::MessageId, move |_d, _tx, _cx| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let summary = consume(&broker, "events", handler, 4).await;
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    assert_eq!(summary.deduplicated, 1);
    drop_tables(&inbox).await;
    drop_tables(&downstream).await;
}

#[tokio::test]
async fn bad_relay_settings_and_destinations_are_refused() {
    let inbox = PgInbox::new(&database_url(), PgInboxConfig::new("c")).unwrap();
    for config in [
        RelayConfig::default().batch_size(0),
        RelayConfig::default().poll_interval(Duration::ZERO),
        RelayConfig::default().send_timeout(Duration::ZERO),
    ] {
        assert!(OutboxRelay::new(&inbox, config).is_err());
    }
    assert!(
        PgInboxConfig::new("c")
            .outbox_table("ackstack_inbox")
            .validate()
            .is_err(),
        "the outbox must not be the inbox"
    );
    assert!(
        PgInboxConfig::new("c")
            .outbox_table("Bad Name")
            .validate()
            .is_err()
    );

    let inbox = inbox_with(&database_url(), "empty_dest", true).await;
    let broker = MemoryBroker::new();
    broker.publish("in", Message::new("x").message_id("e-1"));
    let handler = inbox.handler(DedupKey::MessageId, |_d, tx, _cx| async move {
        tx.outbox().send("", Message::new("nowhere")).await?;
        Ok(())
    });
    let summary = consume(&broker, "in", handler, 1).await;
    assert_eq!(summary.dead_lettered, 1);
    assert_eq!(count(&inbox, "true").await, 0);
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn round_trips_are_counted_per_statement() {
    let inbox = inbox("round_trips").await;
    let broker = MemoryBroker::new();
    broker.publish("in", Message::new("plain").message_id("r-1"));
    let before = inbox.stats().round_trips;
    let handler = inbox.handler(DedupKey::MessageId, |_d, _tx, _cx| async move { Ok(()) });
    consume(&broker, "in", handler, 4).await;
    // BEGIN (with SET LOCAL), the inbox INSERT, COMMIT.
    assert_eq!(inbox.stats().round_trips - before, 3);

    broker.publish("in", Message::new("emits").message_id("r-2"));
    let before = inbox.stats().round_trips;
    let handler = inbox.handler(DedupKey::MessageId, |_d, tx, _cx| async move {
        tx.outbox().send("events", Message::new("e")).await?;
        Ok(())
    });
    consume(&broker, "in", handler, 4).await;
    // One more: the outbox row (and its notification) in one statement.
    assert_eq!(inbox.stats().round_trips - before, 4);
    drop_tables(&inbox).await;
}

#[tokio::test]
async fn a_key_stuck_on_a_failing_row_does_not_hold_back_other_keys() {
    let inbox = inbox("stuck").await;
    // The stuck key first, with more rows behind its head than a round claims.
    let mut messages: Vec<Message> = (0..12).map(|i| keyed("stuck", i)).collect();
    messages.extend((0..3).map(|i| keyed("free", i)));
    write(&inbox, "events", messages).await;
    let flaky = Flaky::default();
    // The first call (the stuck key's head) fails; its retry is far away.
    *flaky.fail_calls.lock().unwrap() = vec![1];
    let relay = OutboxRelay::new(
        &inbox,
        RelayConfig::default()
            .batch_size(8)
            .backoff(Backoff::exponential(
                Duration::from_secs(600),
                Duration::from_secs(600),
            )),
    )
    .unwrap()
    .route("events", flaky.clone());
    for _ in 0..5 {
        relay.relay_once().await.unwrap();
    }
    let sequences = flaky.sequences();
    assert_eq!(sequences.get("free"), Some(&vec![0, 1, 2]), "{sequences:?}");
    assert_eq!(sequences.get("stuck"), None, "held back behind its head");
    drop_tables(&inbox).await;
}
