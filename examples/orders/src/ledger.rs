//! The ledger of charges: the handler's side effect, counted per order id.
//!
//! In memory by default; with Redis, each charge is `HINCRBY <queue>:charges <order_id> 1`, so
//! the counts survive the process and several consumers share them. With PostgreSQL
//! ([`PgLedger`]), each charge is an upsert into `ackstack_example_charges` made in the
//! delivery's inbox transaction.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack::postgres::deadpool_postgres::Pool;
use ackstack::postgres::tokio_postgres;
use ackstack::postgres::{InboxError, InboxTx, PgInbox};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{CONNECT_TIMEOUT, Fatal, StartError};

/// How long one Redis command (or ledger read) may take before the charge counts as failed (and is retried).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where charges are recorded. Cloning shares the same ledger.
#[derive(Clone)]
pub enum Ledger {
    /// A map in this process.
    Memory(Arc<Mutex<BTreeMap<String, i64>>>),
    /// A Redis hash.
    Redis {
        /// The connection (reconnects by itself).
        conn: ConnectionManager,
        /// The hash: `<queue>:charges`.
        key: String,
    },
}

impl Ledger {
    /// An empty in-memory ledger.
    pub fn in_memory() -> Self {
        Ledger::Memory(Arc::default())
    }

    /// The Redis hash `<queue>:charges` at `url`. Connects on first use (and again whenever
    /// the connection drops): a charge while Redis is down fails, and is retried.
    pub fn redis(url: &str, queue: &str) -> Result<Self, Fatal> {
        let client = redis::Client::open(url).map_err(|e| format!("Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("Redis: {e}"))?;
        Ok(Ledger::Redis {
            conn,
            key: format!("{queue}:charges"),
        })
    }

    /// Records one charge of `order_id`.
    pub async fn charge(&self, order_id: &str) -> Result<(), Fatal> {
        match self {
            Ledger::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                *map.entry(order_id.to_string()).or_insert(0) += 1;
                Ok(())
            }
            Ledger::Redis { conn, key } => {
                let mut conn = conn.clone();
                let mut incr = redis::cmd("HINCRBY");
                incr.arg(key).arg(order_id).arg(1);
                tokio::time::timeout(COMMAND_TIMEOUT, incr.query_async::<i64>(&mut conn))
                    .await
                    .map_err(|_| "Redis HINCRBY timed out")??;
                Ok(())
            }
        }
    }

    /// Every order id with its number of charges, sorted by order id.
    pub async fn entries(&self) -> Result<Vec<(String, i64)>, Fatal> {
        match self {
            Ledger::Memory(map) => {
                let map = map.lock().unwrap_or_else(|e| e.into_inner());
                Ok(map.iter().map(|(k, v)| (k.clone(), *v)).collect())
            }
            Ledger::Redis { conn, key } => {
                // A connection that broke since the last command (a Redis restart) fails the
                // next one and is then remade: try a few times before giving up.
                let mut tries = 0;
                let all = loop {
                    tries += 1;
                    let mut conn = conn.clone();
                    let mut hgetall = redis::cmd("HGETALL");
                    hgetall.arg(key);
                    let read = hgetall.query_async::<BTreeMap<String, i64>>(&mut conn);
                    let error = match tokio::time::timeout(COMMAND_TIMEOUT, read).await {
                        Ok(Ok(all)) => break all,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timed out".to_string(),
                    };
                    if tries >= 5 {
                        return Err(format!("reading the ledger {key}: {error}").into());
                    }
                    tracing::warn!(error = %error, "reading the ledger failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                };
                Ok(all.into_iter().collect())
            }
        }
    }
}

/// The ledger in PostgreSQL: one row per `(queue, order_id)` in [`PG_TABLE`], incremented in
/// the inbox transaction of the delivery that charges it, so a charge and the inbox record of
/// its message commit together or not at all.
#[derive(Clone)]
pub struct PgLedger {
    /// The inbox's pool (the ledger lives in the same database).
    pool: Pool,
    /// The rows of this queue.
    queue: String,
}

/// The PostgreSQL ledger table.
pub const PG_TABLE: &str = "ackstack_example_charges";

impl PgLedger {
    /// The rows of `queue` in the database of `inbox`.
    pub fn new(inbox: &PgInbox, queue: &str) -> Self {
        PgLedger {
            pool: inbox.pool().clone(),
            queue: queue.to_string(),
        }
    }

    /// Creates the inbox table and the ledger table if they are missing. Safe to run from
    /// several processes at once: an advisory lock orders the `CREATE TABLE`s.
    pub async fn set_up(&self, inbox: &PgInbox) -> Result<(), StartError> {
        inbox.migrate().await.map_err(start_error)?;
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StartError::Unreachable(format!("PostgreSQL: {e}").into()))?;
        let tx = client.transaction().await.map_err(db_start_error)?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock(hashtext('{PG_TABLE}'));
             CREATE TABLE IF NOT EXISTS {PG_TABLE} (
                 queue text NOT NULL,
                 order_id text NOT NULL,
                 count int NOT NULL,
                 PRIMARY KEY (queue, order_id)
             );"
        ))
        .await
        .map_err(db_start_error)?;
        tx.commit().await.map_err(db_start_error)
    }

    /// Records one charge of `order_id` in the delivery's inbox transaction.
    pub async fn charge(&self, tx: &InboxTx, order_id: &str) -> Result<(), InboxError> {
        // Prepared once per connection: one round trip per charge after that.
        let upsert = tx
            .prepare_cached(
                "INSERT INTO ackstack_example_charges (queue, order_id, count) \
                 VALUES ($1, $2, 1) ON CONFLICT (queue, order_id) \
                 DO UPDATE SET count = ackstack_example_charges.count + 1",
            )
            .await?;
        tx.execute(&upsert, &[&self.queue, &order_id]).await?;
        Ok(())
    }

    /// Every order id of the queue with its number of charges, sorted by order id.
    pub async fn entries(&self) -> Result<Vec<(String, i64)>, Fatal> {
        let mut tries = 0;
        loop {
            tries += 1;
            let error = match tokio::time::timeout(COMMAND_TIMEOUT, self.read()).await {
                Ok(Ok(all)) => return Ok(all),
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_string(),
            };
            if tries >= 5 {
                return Err(format!("reading the ledger {PG_TABLE}: {error}").into());
            }
            tracing::warn!(error = %error, "reading the ledger failed; trying again");
            tokio::time::sleep(Duration::from_millis(200 * tries)).await;
        }
    }

    async fn read(&self) -> Result<Vec<(String, i64)>, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT order_id, count FROM ackstack_example_charges WHERE queue = $1 \
                 ORDER BY order_id",
                &[&self.queue],
            )
            .await
            .map_err(|e| e.to_string())?;
        rows.iter()
            .map(|row| {
                let order_id: String = row.try_get(0).map_err(|e| e.to_string())?;
                let count: i32 = row.try_get(1).map_err(|e| e.to_string())?;
                Ok((order_id, i64::from(count)))
            })
            .collect()
    }
}

/// An inbox error at start-up: a bad configuration, failed TLS or an SQL error gives up, anything else
/// (no connection, a timeout, a broken connection) is waited out.
fn start_error(e: InboxError) -> StartError {
    match e {
        InboxError::Config(_) | InboxError::Tls(_) => {
            StartError::Config(format!("PostgreSQL inbox: {e}").into())
        }
        InboxError::Database(db) => db_start_error(db),
        other => StartError::Unreachable(format!("PostgreSQL inbox: {other}").into()),
    }
}

/// A database error at start-up: one with an SQLSTATE is a refusal (permissions, a clash
/// with an existing table), except the connection and shutdown classes (`08`, `57P`).
fn db_start_error(e: tokio_postgres::Error) -> StartError {
    let transient = e
        .code()
        .is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("57P"));
    if transient {
        StartError::Unreachable(format!("PostgreSQL: {e}").into())
    } else {
        StartError::Config(format!("PostgreSQL: {e}").into())
    }
}
