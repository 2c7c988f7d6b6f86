//! Shared test setup: settings from the environment and the example's PostgreSQL ledger.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;

use ackstack::postgres::tokio_postgres::Client;

/// The `orders` binary with `args`, its output piped, and none of the variables that would
/// change what it connects to (`REDIS_URL`, `KAFKA_BROKERS`, `DATABASE_URL`) nor `RUST_LOG`.
pub fn orders_command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_orders"));
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("KAFKA_BROKERS")
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// The variable `name`, or `default` when it is unset or blank.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// `DATABASE_URL`, default the local test database.
pub fn database_url() -> String {
    env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
}

/// The example's PostgreSQL ledger of `queue`: `order_id -> count`.
pub async fn pg_charges(client: &Client, queue: &str) -> BTreeMap<String, u64> {
    let rows = client
        .query(
            "SELECT order_id, count FROM ackstack_example_charges WHERE queue = $1",
            &[&queue],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let count: i32 = r.get(1);
            (r.get::<_, String>(0), u64::try_from(count).unwrap())
        })
        .collect()
}
