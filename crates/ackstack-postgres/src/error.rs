//! The inbox's errors.

use std::time::Duration;

/// What went wrong talking to PostgreSQL.
///
/// Like any error, every variant becomes a transient
/// [`HandlerError`](ackstack_core::HandlerError) through `?` in a handler (the message is
/// retried with backoff, then dead-lettered after the attempt limit); to dead-letter at once
/// on a particular SQL error, check [`InboxError::code`] and return `HandlerError::permanent`
/// yourself, or use `Consumer::classify`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The configuration cannot work (a bad URL or table name).
    #[error("invalid inbox configuration: {0}")]
    Config(String),
    /// No connection could be had from the pool: the database is unreachable, refuses us, or
    /// every connection stayed busy for too long.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    /// TLS to the database failed: the server does not offer it where `sslmode` requires
    /// it, or its certificate did not pass the check `sslmode` asks for. A setting to fix,
    /// not an outage to wait out (handlers still get it as a transient error).
    #[error("TLS to the database failed: {0}")]
    Tls(String),
    /// A statement failed (an SQL error, or the connection broke while it ran).
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// A call did not finish in time. The connection is closed, not reused.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// A statement failed inside the transaction and the handler carried on as if it had not;
    /// PostgreSQL had aborted the transaction, so nothing was committed (rolled back).
    #[error(
        "a statement failed inside the inbox transaction, so nothing was committed (rolled back)"
    )]
    Aborted(#[source] tokio_postgres::Error),
    /// The commit's answer was lost (the connection broke or timed out during `COMMIT`). The
    /// transaction may or may not have committed; either way a retry is safe: if it committed,
    /// the redelivery finds its inbox row and is acknowledged as a duplicate.
    #[error("the outcome of COMMIT is unknown: {0}")]
    CommitUnknown(String),
    /// The shared transaction of a commit group ([`PgInboxConfig::commit_group`]) was not
    /// committed: another member panicked or was cancelled, the connection broke, or the
    /// commit failed or its answer was lost. Nothing of this delivery was acknowledged; the
    /// retry is safe (a committed row makes it a duplicate).
    ///
    /// [`PgInboxConfig::commit_group`]: crate::PgInboxConfig::commit_group
    #[error("the commit group's transaction was not committed: {0}")]
    Group(String),
    /// The transaction handle was used after its transaction had ended (a clone kept past the
    /// handler's return), or after its connection broke.
    #[error("the inbox transaction has already ended")]
    Ended,
}

impl InboxError {
    /// The SQLSTATE code of a database error, e.g. `"23505"` for a unique violation.
    pub fn code(&self) -> Option<&str> {
        match self {
            InboxError::Database(e) | InboxError::Aborted(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// `err` and its sources, each not already in the text, joined by ": " (tokio-postgres's
/// errors show only their kind, such as "error performing TLS handshake", and keep the
/// reason in their source).
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
