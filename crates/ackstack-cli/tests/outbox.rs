//! `ackstack outbox` against a real PostgreSQL (`DATABASE_URL`, default the local test
//! database): status, the parked rows, and retrying them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use ackstack_core::{Consumer, DedupKey, MemoryBroker, Message, Publish, PublishError};
use ackstack_postgres::{OutboxRelay, PgInbox, PgInboxConfig, RelayConfig};
use ackstack_testkit::unique_identifier;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Refuses payloads starting with `poison`, takes the rest.
struct Picky(ackstack_core::memory::MemoryPublisher);

impl Publish for Picky {
    async fn publish(&self, message: Message) -> Result<(), PublishError> {
        if message.payload.starts_with(b"poison") {
            return Err(PublishError::refused("message too large for the topic"));
        }
        self.0.publish(message).await
    }
}

fn ackstack(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ackstack"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_parked_and_retry() {
    let table = unique_identifier("t_cli_outbox");
    let config = PgInboxConfig::new("cli-test")
        .table(format!("{table}_in"))
        .outbox_table(table.clone());
    let inbox = PgInbox::new(&database_url(), config).unwrap();
    inbox.migrate().await.unwrap();

    // A handler writes three events; the relay sends two and parks the poisoned one.
    let broker = MemoryBroker::new();
    broker.publish("in", Message::new("go").message_id("go-1"));
    let handler = inbox.handler(DedupKey::MessageId, |_d, tx, _cx| async move {
        for body in ["ok 1", "poison pill", "ok 2"] {
            tx.outbox()
                .send("events", Message::new(body).key("k"))
                .await?;
        }
        Ok(())
    });
    let consumer = Consumer::new(broker.source("in").poll_wait(Duration::from_millis(20)));
    let status = consumer.status();
    consumer
        .run_until(handler, async move {
            status.idle(Duration::from_millis(300)).await
        })
        .await
        .unwrap();
    let url = database_url();
    let target = ["--database-url", url.as_str(), "--table", table.as_str()];
    let with = |cmd: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(target.iter().map(|s| s.to_string()));
        args
    };
    let run = |cmd: &[&str]| {
        let args = with(cmd);
        ackstack(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, out, err) = run(&["outbox", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("outbox={table} pending=3 oldest_pending=")),
        "{out}"
    );
    assert!(out.trim_end().ends_with("parked=0"), "{out}");

    let relay = OutboxRelay::new(&inbox, RelayConfig::default())
        .unwrap()
        .route("events", Picky(broker.publisher("events")));
    while relay.relay_once().await.unwrap().claimed > 0 {}
    assert_eq!(broker.len("events"), 2);

    let (code, out, err) = run(&["outbox", "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["pending"], 0);
    assert_eq!(status["parked"], 1);
    assert!(status["oldest_pending_seconds"].is_null());

    let (code, out, err) = run(&["outbox", "parked", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["destination"], "events");
    assert_eq!(rows[0]["key"], "k");
    assert_eq!(rows[0]["attempts"], 1);
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("message too large for the topic")
    );
    let id = rows[0]["id"].as_i64().unwrap();

    let (code, out, _) = run(&["outbox", "parked"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("message too large for the topic") && out.contains("1 parked row(s)"),
        "{out}"
    );

    // No ids and no --all is a usage error; an id that is not parked retries nothing.
    let (code, _, err) = run(&["outbox", "retry"]);
    assert_eq!(code, 2, "{err}");
    let missing = (id + 1000).to_string();
    let (code, out, _) = run(&["outbox", "retry", "--id", &missing]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("retried 0 parked row(s) in {table}").as_str())
    );
    let id = id.to_string();
    let (code, out, _) = run(&["outbox", "retry", "--id", &id]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("retried 1 parked row(s) in {table}").as_str())
    );
    let (_, out, _) = run(&["outbox", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (status["pending"].as_i64(), status["parked"].as_i64()),
        (Some(1), Some(0))
    );

    // A database that is not there: exit 1 with the reason.
    let (code, _, err) = ackstack(&[
        "outbox",
        "status",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/test",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("outbox status"), "{err}");

    let client = inbox.pool().get().await.unwrap();
    client
        .batch_execute(&format!("DROP TABLE {table}; DROP TABLE {table}_in"))
        .await
        .unwrap();
}
