//! [`PgInbox`]: the pool, the table, migrations and the retention sweeper.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::config::{DEFAULT_TABLE, PgInboxConfig};
use crate::error::{InboxError, describe};
use crate::outbox::{OutboxSql, OutboxStatus, ParkedRow};
use crate::tls::{SslMode, TlsParams};
use crate::tx::InboxTx;
use crate::tx::TxShared;
use ackstack_core::Context;
use ackstack_core::dedup::StoreHooks;

/// The inbox table's DDL, version 1, exactly as [`PgInbox::migrate`] runs it for the default
/// table `ackstack_inbox` (it is the file `migrations/0001_inbox.sql` of this crate). For your
/// own migration tool: copy it, or use [`PgInbox::migration_sql`] for another table name.
pub const MIGRATION_0001: &str = include_str!("../migrations/0001_inbox.sql");

/// A transactional inbox in PostgreSQL: records which messages a consumer has applied, in
/// the same transaction as their effects.
///
/// Cheap to clone (the pool and settings are shared). See the [crate docs](crate) for the
/// protocol and an example.
#[derive(Clone)]
pub struct PgInbox {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: PgInboxConfig,
    insert_sql: String,
    sweep_sql: String,
    migration_sql: String,
    shared: Arc<TxShared>,
    /// How to open a connection of our own (for `LISTEN`): known when the inbox made its
    /// pool from a URL.
    listen: Option<Listen>,
    transactions: AtomicU64,
    duplicates: AtomicU64,
}

/// The settings of a connection outside the pool.
#[derive(Clone)]
pub(crate) struct Listen {
    pub(crate) pg: tokio_postgres::Config,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) tls: TlsParams,
}

/// What an inbox has done since it was made (see [`PgInbox::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboxStats {
    /// Transactions begun (one per delivery handled, plus `contains`, sweeps and migrations).
    pub transactions: u64,
    /// Statements and commits sent to the server (each a round trip; a statement prepared on
    /// a connection's first use of it adds one more, not counted). Like `transactions`, it
    /// includes what an [`OutboxRelay`](crate::OutboxRelay) of this inbox does: its rounds
    /// (one a poll interval when idle), status queries and sweeps.
    pub round_trips: u64,
    /// Deliveries found already applied and acked without calling the handler.
    pub duplicates: u64,
}

impl std::fmt::Debug for PgInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInbox")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The pool's connection manager: plaintext, or TLS as `tls` says.
fn manager(pg: tokio_postgres::Config, tls: &TlsParams) -> Result<Manager, InboxError> {
    let config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    if tls.mode == SslMode::Disable {
        return Ok(Manager::from_config(pg, tokio_postgres::NoTls, config));
    }
    #[cfg(feature = "tls")]
    {
        Ok(Manager::from_config(
            pg,
            crate::tls::connector(tls)?,
            config,
        ))
    }
    #[cfg(not(feature = "tls"))]
    {
        if tls.mode.requires_tls() {
            return Err(InboxError::Config(format!(
                "sslmode={} needs TLS, which this build lacks: enable the `tls` feature of \
                 ackstack-postgres (`postgres-tls` of ackstack)",
                tls.mode
            )));
        }
        Ok(Manager::from_config(pg, tokio_postgres::NoTls, config))
    }
}

impl PgInbox {
    /// An inbox on the database at `url` (`postgres://user:password@host:port/db`, or the
    /// `key=value` form), through a pool of its own. Connects lazily: a database that is
    /// down at start-up is not an error here; handlers then fail with transient errors (the
    /// messages are retried) until it answers.
    ///
    /// Each connection has `statement_timeout`, `connect_timeout` and a TCP user timeout
    /// from `config`, and `application_name` `ackstack` unless the URL names one.
    ///
    /// TLS follows the URL's `sslmode` and `sslrootcert` as libpq reads them (`verify-full`
    /// for RDS or Cloud SQL with their CA bundle as `sslrootcert`); it needs this crate's
    /// `tls` feature (`postgres-tls` in `ackstack`). Without it, a mode that requires TLS
    /// is refused here with [`InboxError::Config`], and `prefer` (the default) connects in
    /// plaintext.
    pub fn new(url: &str, config: PgInboxConfig) -> Result<PgInbox, InboxError> {
        config.validate()?;
        let (url, tls) = TlsParams::take(url)?;
        // The parse error may quote the URL: keep it out of the message.
        let mut pg = tokio_postgres::Config::from_str(&url)
            .map_err(|_| InboxError::Config("the database URL does not parse".into()))?;
        pg.ssl_mode(tls.mode.for_client());
        let timeout = format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis().max(1)
        );
        let options = match pg.get_options() {
            Some(own) if !own.is_empty() => format!("{own} {timeout}"),
            _ => timeout,
        };
        pg.options(options);
        if pg.get_application_name().is_none() {
            pg.application_name("ackstack");
        }
        pg.connect_timeout(config.connect_timeout);
        pg.tcp_user_timeout(config.call_timeout());
        pg.keepalives_idle(Duration::from_secs(30));
        let listen = Listen {
            pg: pg.clone(),
            tls: tls.clone(),
        };
        let manager = manager(pg, &tls)?;
        let pool = Pool::builder(manager)
            .max_size(config.max_connections)
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| InboxError::Config(format!("could not build the pool: {e}")))?;
        Ok(PgInbox::build(pool, config, Some(listen)))
    }

    /// An inbox using your pool (e.g. the one your service already has). Every inbox
    /// transaction sets its own `statement_timeout` (`SET LOCAL`), so the pool's sessions
    /// are not changed.
    pub fn from_pool(pool: Pool, config: PgInboxConfig) -> Result<PgInbox, InboxError> {
        config.validate()?;
        Ok(PgInbox::build(pool, config, None))
    }

    fn build(pool: Pool, config: PgInboxConfig, listen: Option<Listen>) -> PgInbox {
        let table = &config.table;
        let insert_sql =
            format!("INSERT INTO {table} (consumer, key) VALUES ($1, $2) ON CONFLICT DO NOTHING");
        let sweep_sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
                SELECT ctid FROM {table} \
                WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2) \
                LIMIT $3))"
        );
        let migration_sql = migration_sql(table, config.table_name());
        let shared = Arc::new(TxShared {
            outbox: OutboxSql::new(
                &config.outbox_table,
                config.outbox_table_name(),
                config.outbox_notify,
            ),
            round_trips: AtomicU64::new(0),
        });
        PgInbox {
            inner: Arc::new(Inner {
                pool,
                config,
                insert_sql,
                sweep_sql,
                migration_sql,
                shared,
                listen,
                transactions: AtomicU64::new(0),
                duplicates: AtomicU64::new(0),
            }),
        }
    }

    /// Counts of transactions and duplicates so far (for benchmarks and dashboards).
    pub fn stats(&self) -> InboxStats {
        InboxStats {
            transactions: self.inner.transactions.load(Ordering::Relaxed),
            round_trips: self.inner.shared.round_trips.load(Ordering::Relaxed),
            duplicates: self.inner.duplicates.load(Ordering::Relaxed),
        }
    }

    /// Counts a delivery found already applied (acked without calling the handler).
    pub(crate) fn note_duplicate_delivery(&self, cx: &Context, key: Option<&[u8]>) {
        self.inner.duplicates.fetch_add(1, Ordering::Relaxed);
        cx.note_deduplicated();
        if let Some(key) = key {
            tracing::debug!(key = %key.escape_ascii(), "already in the inbox; acking without calling the handler");
        }
    }

    /// Counts a delivery without a key (run in a transaction, not deduplicated).
    pub(crate) fn note_keyless(&self, cx: &Context) {
        cx.note_keyless();
        tracing::debug!("no inbox key; running the handler in a transaction without an inbox row");
    }

    /// The settings.
    pub fn config(&self) -> &PgInboxConfig {
        &self.inner.config
    }

    /// The pool the inbox takes its connections from.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The DDL [`PgInbox::migrate`] runs: [`MIGRATION_0001`] for this inbox's table.
    pub fn migration_sql(&self) -> &str {
        &self.inner.migration_sql
    }

    /// The DDL of the outbox table: [`MIGRATION_0002`](crate::MIGRATION_0002) for this
    /// inbox's [`outbox_table`](PgInboxConfig::outbox_table).
    pub fn outbox_migration_sql(&self) -> &str {
        &self.inner.shared.outbox.migration
    }

    /// Creates the inbox and outbox tables and their indexes if they do not exist.
    /// Idempotent, and safe to run from several processes at once (an advisory lock orders
    /// them).
    pub async fn migrate(&self) -> Result<(), InboxError> {
        let tx = self.begin().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(1633906548, hashtext($1))",
            &[&self.inner.config.table],
        )
        .await?;
        tx.batch_execute(&self.inner.migration_sql).await?;
        tx.batch_execute(&self.inner.shared.outbox.migration)
            .await?;
        tx.commit().await
    }

    pub(crate) fn outbox_sql(&self) -> &OutboxSql {
        &self.inner.shared.outbox
    }

    pub(crate) fn listen_params(&self) -> Option<&Listen> {
        self.inner.listen.as_ref()
    }

    /// How far behind the outbox is: rows pending, the oldest one's age, rows parked. One
    /// query (a scan of the unsent rows).
    pub async fn outbox_status(&self) -> Result<OutboxStatus, InboxError> {
        let tx = self.begin().await?;
        let row = tx
            .query_one(self.inner.shared.outbox.status.as_str(), &[])
            .await?;
        tx.commit().await?;
        OutboxStatus::from_row(&row)
    }

    /// The parked outbox rows, oldest first, at most `limit`.
    pub async fn outbox_parked(&self, limit: usize) -> Result<Vec<ParkedRow>, InboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let tx = self.begin().await?;
        let rows = tx
            .query(self.inner.shared.outbox.parked.as_str(), &[&limit])
            .await?;
        tx.commit().await?;
        rows.iter().map(ParkedRow::from_row).collect()
    }

    /// Puts parked rows back in line (attempts reset, due now): those of `ids`, or every
    /// parked row when `ids` is `None`. Returns how many. A retried row is published after the
    /// rows of its key that were sent while it was parked.
    pub async fn outbox_retry(&self, ids: Option<&[i64]>) -> Result<u64, InboxError> {
        let tx = self.begin().await?;
        let n = match ids {
            Some(ids) => {
                tx.execute(self.inner.shared.outbox.retry.as_str(), &[&ids])
                    .await?
            }
            None => {
                tx.execute(self.inner.shared.outbox.retry_all.as_str(), &[])
                    .await?
            }
        };
        tx.commit().await?;
        Ok(n)
    }

    /// Takes a connection and opens a transaction on it.
    pub(crate) async fn begin(&self) -> Result<InboxTx, InboxError> {
        self.inner.transactions.fetch_add(1, Ordering::Relaxed);
        let config = &self.inner.config;
        let wait = config.connect_timeout + config.statement_timeout;
        let client = match tokio::time::timeout(wait, self.inner.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                let why = describe(&err);
                // tokio-postgres gives no kind accessor; this is its text for `Kind::Tls`.
                return Err(if why.contains("error performing TLS handshake") {
                    InboxError::Tls(why)
                } else {
                    InboxError::Unreachable(why)
                });
            }
            Err(_) => {
                return Err(InboxError::Unreachable(format!(
                    "no connection within {wait:?}"
                )));
            }
        };
        InboxTx::begin(
            client,
            config.statement_timeout,
            config.call_timeout(),
            self.inner.shared.clone(),
        )
        .await
    }

    /// Inserts the inbox row of `key` in `tx`. `false`: the key was committed before (a
    /// duplicate). A concurrent transaction holding the same key makes this wait until that
    /// transaction ends, up to `statement_timeout`.
    pub(crate) async fn record(&self, tx: &InboxTx, key: &[u8]) -> Result<bool, InboxError> {
        let insert = tx.prepare_cached(&self.inner.insert_sql).await?;
        let rows = tx
            .execute(&insert, &[&self.inner.config.consumer, &key])
            .await?;
        Ok(rows == 1)
    }

    /// Whether `key` is recorded for this consumer (committed).
    pub async fn contains(&self, key: &[u8]) -> Result<bool, InboxError> {
        let tx = self.begin().await?;
        let sql = format!(
            "SELECT 1 FROM {} WHERE consumer = $1 AND key = $2",
            self.inner.config.table
        );
        let row = tx
            .query_opt(sql.as_str(), &[&self.inner.config.consumer, &key])
            .await?;
        tx.commit().await?;
        Ok(row.is_some())
    }

    /// Deletes this consumer's rows older than `older_than`, in batches of
    /// [`PgInboxConfig::sweep_batch`] (one short transaction each, so the table is never
    /// locked for long). Returns how many rows it deleted.
    pub async fn sweep_once(&self, older_than: Duration) -> Result<u64, InboxError> {
        let config = &self.inner.config;
        let secs = older_than.as_secs_f64();
        let batch = i64::from(config.sweep_batch);
        let mut total = 0u64;
        loop {
            let tx = self.begin().await?;
            let deleted = tx
                .execute(
                    self.inner.sweep_sql.as_str(),
                    &[&config.consumer, &secs, &batch],
                )
                .await?;
            tx.commit().await?;
            total += deleted;
            if deleted < u64::from(config.sweep_batch) {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Runs [`PgInbox::sweep_once`] with [`PgInboxConfig::retention`] now and then every
    /// `interval`, until the returned handle is dropped. Failures are logged and tried again
    /// at the next interval. Must be called within a Tokio runtime.
    pub fn spawn_sweeper(&self, interval: Duration) -> SweeperHandle {
        let inbox = self.clone();
        let interval = interval.max(Duration::from_millis(10));
        let task = tokio::spawn(async move {
            let retention = inbox.inner.config.retention;
            loop {
                match inbox.sweep_once(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(deleted = n, "inbox sweeper deleted expired rows"),
                    Err(err) => {
                        tracing::warn!(error = %err, "inbox sweep failed; trying again later")
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        SweeperHandle { task }
    }
}

/// The running sweeper of [`PgInbox::spawn_sweeper`]: stops when dropped.
#[derive(Debug)]
pub struct SweeperHandle {
    task: tokio::task::JoinHandle<()>,
}

impl SweeperHandle {
    /// Stops the sweeper (as dropping the handle does).
    pub fn stop(self) {}
}

impl Drop for SweeperHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// [`MIGRATION_0001`] for `table` (whose table part is `name`).
fn migration_sql(table: &str, name: &str) -> String {
    const INDEX: &str = "ackstack_inbox_received_at_idx";
    const MARK: &str = "\u{0}index\u{0}";
    MIGRATION_0001
        .replace(INDEX, MARK)
        .replace(DEFAULT_TABLE, table)
        .replace(MARK, &format!("{name}_received_at_idx"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "tls"))]
    #[test]
    fn a_mode_that_requires_tls_is_refused_without_the_feature() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let url = format!("postgres://postgres@127.0.0.1/test?sslmode={mode}");
            match PgInbox::new(&url, PgInboxConfig::new("t")) {
                Err(InboxError::Config(why)) => {
                    assert!(why.contains("`tls` feature"), "{why}");
                    assert!(why.contains(mode), "{why}");
                }
                other => panic!("{mode}: {other:?}"),
            }
        }
        // `prefer` (the default) and `disable` connect in plaintext.
        assert!(
            PgInbox::new(
                "postgres://postgres@127.0.0.1/test",
                PgInboxConfig::new("t")
            )
            .is_ok()
        );
    }

    #[test]
    fn the_default_migration_is_the_file() {
        assert_eq!(migration_sql(DEFAULT_TABLE, DEFAULT_TABLE), MIGRATION_0001);
    }

    #[test]
    fn another_table_renames_table_and_index() {
        let sql = migration_sql("billing.inbox_x", "inbox_x");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS billing.inbox_x ("));
        assert!(sql.contains(
            "CREATE INDEX IF NOT EXISTS inbox_x_received_at_idx ON billing.inbox_x (received_at)"
        ));
        assert!(!sql.contains("ackstack_inbox ("));
    }
}
