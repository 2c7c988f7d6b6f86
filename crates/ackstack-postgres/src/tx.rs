//! [`InboxTx`]: the open transaction a handler applies its effects in.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, ToStatement};

use crate::error::InboxError;
use crate::outbox::{Outbox, OutboxSql};

/// What the transactions of one inbox share: the outbox's statements, and a count of the
/// round trips they made.
#[derive(Debug)]
pub(crate) struct TxShared {
    pub(crate) outbox: OutboxSql,
    pub(crate) round_trips: std::sync::atomic::AtomicU64,
}

/// The transaction is open for statements.
const OPEN: u8 = 0;
/// Commit or rollback was sent; no more statements.
const ENDING: u8 = 1;
/// The transaction ended cleanly: the connection may go back to the pool.
const CLEAN: u8 = 2;
/// The connection's state is unknown (a timeout, a broken connection): it is closed.
const BROKEN: u8 = 3;

/// The open inbox transaction, handed to your handler (see [`PgInbox::handler`](crate::PgInbox::handler)).
///
/// Run your effects through it: they commit together with the delivery's inbox row, or not
/// at all. It is a cheap handle (clones share one transaction on one connection), owned, so
/// the handler's `async move` block can hold it without lifetimes. The inbox commits after
/// the handler returns `Ok` and rolls back after an error, a panic, or a cancelled handler;
/// a clone kept past that gets [`InboxError::Ended`].
///
/// Every call is bounded: by `statement_timeout` on the server, and a second later in the
/// client. A call that fails with an SQL error leaves the transaction aborted (PostgreSQL
/// refuses further statements): return the error (`?`). If the handler returns `Ok` anyway,
/// the inbox notices at commit (in a commit group, at the release of the member's savepoint,
/// sent with the next member's statements), rolls back (that member alone) and reports
/// [`InboxError::Aborted`], so a swallowed failure is never acknowledged. The error it carries
/// is PostgreSQL's answer to that commit or release ("current transaction is aborted"), not
/// the statement that failed first.
///
/// Statements may run concurrently (`tokio::join!`): tokio-postgres pipelines them on the
/// connection.
#[derive(Clone)]
pub struct InboxTx {
    inner: Arc<TxInner>,
    /// In a commit group: whether this member's turn is still on (its handle is refused after).
    turn: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for InboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.inner.state.load(Ordering::Acquire) {
            OPEN => "open",
            ENDING => "ending",
            CLEAN => "ended",
            _ => "broken",
        };
        f.debug_struct("InboxTx").field("state", &state).finish()
    }
}

struct TxInner {
    /// Always `Some` until dropped.
    client: Option<Object>,
    state: AtomicU8,
    timeout: Duration,
    shared: Arc<TxShared>,
}

impl Drop for TxInner {
    fn drop(&mut self) {
        if self.state.load(Ordering::Acquire) != CLEAN
            && let Some(object) = self.client.take()
        {
            // Still inside a transaction (a panic, a cancelled handler) or in an unknown state:
            // never hand this connection to the next user. Closing it makes the server roll
            // the transaction back.
            tracing::debug!("inbox transaction did not end cleanly; closing its connection");
            drop(Object::take(object));
        }
    }
}

impl InboxTx {
    /// Starts a transaction on `client`, with `statement_timeout` set for it.
    pub(crate) async fn begin(
        client: Object,
        statement_timeout: Duration,
        timeout: Duration,
        shared: Arc<TxShared>,
    ) -> Result<InboxTx, InboxError> {
        let tx = InboxTx {
            turn: None,
            inner: Arc::new(TxInner {
                client: Some(client),
                state: AtomicU8::new(OPEN),
                timeout,
                shared,
            }),
        };
        let begin = format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            statement_timeout.as_millis().max(1)
        );
        tx.bounded("BEGIN", tx.raw()?.batch_execute(&begin)).await?;
        Ok(tx)
    }

    fn raw(&self) -> Result<&deadpool_postgres::ClientWrapper, InboxError> {
        match &self.inner.client {
            Some(client) => Ok(client),
            None => Err(InboxError::Ended),
        }
    }

    /// The connection, if the transaction is still open (and, in a commit group, this
    /// member's turn is not over).
    fn open(&self) -> Result<&deadpool_postgres::ClientWrapper, InboxError> {
        if !self.is_open() {
            return Err(InboxError::Ended);
        }
        self.raw()
    }

    /// A handle for one member of a commit group, refused once `turn` is set to false (a clone
    /// kept past the member's turn must not run statements inside a later member's savepoint).
    pub(crate) fn for_turn(&self, turn: Arc<AtomicBool>) -> InboxTx {
        InboxTx {
            inner: self.inner.clone(),
            turn: Some(turn),
        }
    }

    fn mark(&self, state: u8) {
        self.inner.state.store(state, Ordering::Release);
    }

    /// Runs `call` with the client-side bound. A timeout or a broken connection marks the
    /// connection broken (closed when the handle goes); an SQL error leaves it usable.
    async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, InboxError> {
        if what != "prepare" {
            // A prepare is answered from the connection's cache after its first use.
            self.inner
                .shared
                .round_trips
                .fetch_add(1, Ordering::Relaxed);
        }
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if err.as_db_error().is_none() {
                    self.mark(BROKEN);
                }
                Err(InboxError::Database(err))
            }
            Err(_) => {
                self.mark(BROKEN);
                Err(InboxError::Timeout {
                    what,
                    after: self.inner.timeout,
                })
            }
        }
    }

    /// Executes a statement, returning the number of rows it changed.
    pub async fn execute<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, InboxError>
    where
        T: ?Sized + ToStatement + Sync,
    {
        let client = self.open()?;
        self.bounded("statement", client.execute(statement, params))
            .await
    }

    /// Runs a query, returning its rows.
    pub async fn query<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, InboxError>
    where
        T: ?Sized + ToStatement + Sync,
    {
        let client = self.open()?;
        self.bounded("query", client.query(statement, params)).await
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, InboxError>
    where
        T: ?Sized + ToStatement + Sync,
    {
        let client = self.open()?;
        self.bounded("query", client.query_one(statement, params))
            .await
    }

    /// Runs a query that returns at most one row.
    pub async fn query_opt<T>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, InboxError>
    where
        T: ?Sized + ToStatement + Sync,
    {
        let client = self.open()?;
        self.bounded("query", client.query_opt(statement, params))
            .await
    }

    /// Runs statements separated by `;`, without parameters (the simple query protocol).
    pub async fn batch_execute(&self, sql: &str) -> Result<(), InboxError> {
        let client = self.open()?;
        self.bounded("statement", client.batch_execute(sql)).await
    }

    /// Prepares `sql` once per connection and reuses it afterwards (the statement cache of
    /// deadpool-postgres). For statements a handler runs on every message; do not use it for
    /// SQL text that varies (the cache keeps every distinct text).
    pub async fn prepare_cached(&self, sql: &str) -> Result<Statement, InboxError> {
        let client = self.open()?;
        self.bounded("prepare", client.prepare_cached(sql)).await
    }

    /// The underlying client, for calls this handle does not wrap (e.g. `copy_in`). Calls
    /// made through it are not bounded by the client-side timeout (the server's
    /// `statement_timeout` still applies), and must not end the transaction
    /// (`COMMIT`/`ROLLBACK`): the inbox does that.
    pub fn client(&self) -> Result<&tokio_postgres::Client, InboxError> {
        Ok(self.open()?)
    }

    /// The outbox of this transaction: messages sent through it are rows committed with the
    /// transaction, published by an [`OutboxRelay`](crate::OutboxRelay) afterwards.
    ///
    /// ```no_run
    /// # async fn f(tx: ackstack_postgres::InboxTx) -> Result<(), ackstack_postgres::InboxError> {
    /// use ackstack_core::Message;
    ///
    /// tx.execute("UPDATE orders SET state = 'paid' WHERE id = $1", &[&"A-1"]).await?;
    /// tx.outbox()
    ///     .send("payments", Message::new(r#"{"order_id":"A-1"}"#).key("A-1"))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox { tx: self }
    }

    pub(crate) fn outbox_sql(&self) -> &OutboxSql {
        &self.inner.shared.outbox
    }

    /// Whether the transaction is still open for statements.
    pub fn is_open(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == OPEN
            && self
                .turn
                .as_ref()
                .is_none_or(|turn| turn.load(Ordering::Acquire))
    }

    /// Commits. `SELECT 1` goes first in the same round trip: PostgreSQL answers a `COMMIT`
    /// of an aborted transaction with a silent rollback, and the `SELECT` turns that into an
    /// error we see.
    pub(crate) async fn commit(&self) -> Result<(), InboxError> {
        if self
            .inner
            .state
            .compare_exchange(OPEN, ENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(InboxError::Ended);
        }
        let client = self.raw()?;
        match self
            .bounded("COMMIT", client.batch_execute("SELECT 1; COMMIT"))
            .await
        {
            Ok(()) => {
                self.mark(CLEAN);
                Ok(())
            }
            Err(InboxError::Database(err)) if err.as_db_error().is_some() => {
                // Either the transaction was aborted before (the SELECT failed) or the commit
                // itself failed (a serialization failure, a deferred constraint): nothing was
                // committed. End it on our side too.
                self.end_with_rollback().await;
                let aborted =
                    err.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION);
                if aborted {
                    Err(InboxError::Aborted(err))
                } else {
                    Err(InboxError::Database(err))
                }
            }
            Err(err) => Err(InboxError::CommitUnknown(err.to_string())),
        }
    }

    /// Rolls back (unless the connection is broken, when closing it does the same).
    pub(crate) async fn rollback(&self) {
        let state = self.inner.state.load(Ordering::Acquire);
        if state == BROKEN || state == CLEAN {
            return;
        }
        self.mark(ENDING);
        self.end_with_rollback().await;
    }

    async fn end_with_rollback(&self) {
        let Ok(client) = self.raw() else { return };
        match self
            .bounded("ROLLBACK", client.batch_execute("ROLLBACK"))
            .await
        {
            Ok(()) => self.mark(CLEAN),
            Err(err) => {
                tracing::debug!(error = %err, "ROLLBACK failed; closing the connection");
                self.mark(BROKEN);
            }
        }
    }
}
