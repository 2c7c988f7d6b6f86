//! The ledger of charges: the handler's side effect, counted per order id.
//!
//! In memory by default; with Redis, each charge is `HINCRBY <queue>:charges <order_id> 1`, so
//! the counts survive the process and several consumers share them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{CONNECT_TIMEOUT, Fatal};

/// How long one Redis command may take before the charge counts as failed (and is retried).
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
