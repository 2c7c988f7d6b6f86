//! The outbox: messages a handler sends inside its inbox transaction ([`InboxTx::outbox`]),
//! the table they wait in, and what operators can see of it.

use std::time::{Duration, SystemTime};

use ackstack_core::{Headers, Message};
use bytes::Bytes;
use tokio_postgres::Row;

use crate::error::InboxError;
use crate::tx::InboxTx;

/// The outbox table's DDL, version 1, exactly as [`PgInbox::migrate`](crate::PgInbox::migrate)
/// runs it for the default table `ackstack_outbox` (the file `migrations/0002_outbox.sql` of
/// this crate). For your own migration tool: copy it, or use
/// [`PgInbox::outbox_migration_sql`](crate::PgInbox::outbox_migration_sql) for another table.
pub const MIGRATION_0002: &str = include_str!("../migrations/0002_outbox.sql");

/// The default outbox table.
pub const DEFAULT_OUTBOX_TABLE: &str = "ackstack_outbox";

/// The statements of one outbox table, built once per inbox.
#[derive(Debug)]
pub(crate) struct OutboxSql {
    /// The table, as configured (`schema.table` or `table`).
    pub(crate) table: String,
    /// The `LISTEN`/`NOTIFY` channel: the table's name.
    pub(crate) channel: String,
    pub(crate) insert: String,
    pub(crate) claim: String,
    pub(crate) mark_sent: String,
    pub(crate) delete_sent: String,
    pub(crate) failed: String,
    pub(crate) park: String,
    pub(crate) sweep: String,
    pub(crate) status: String,
    pub(crate) pending_for: String,
    pub(crate) parked: String,
    pub(crate) retry: String,
    pub(crate) retry_all: String,
    pub(crate) migration: String,
}

impl OutboxSql {
    pub(crate) fn new(table: &str, name: &str, notify: bool) -> OutboxSql {
        // PostgreSQL takes channel names of at most 63 bytes (table names are ASCII).
        let channel = table[..table.len().min(63)].to_string();
        let insert_row = format!(
            "INSERT INTO {table} (destination, message_id, key, payload, header_names, header_values) \
             VALUES ($1, COALESCE(NULLIF($2, ''), gen_random_uuid()::text), $3, $4, $5, $6) RETURNING message_id"
        );
        // One round trip: the row, and a notification the relays get when the transaction
        // commits (PostgreSQL folds a transaction's identical notifications into one).
        let insert = if notify {
            format!(
                "WITH row AS ({insert_row}) SELECT message_id, pg_notify('{channel}', '') FROM row"
            )
        } else {
            insert_row
        };
        // The pending rows that are due and not behind an older row of their key waiting for
        // its retry, oldest first, locked (rows other relays hold are skipped); of those, the
        // ones with no older pending row of the same destination and key outside this claim
        // (held by another relay). Rows held back by a retry are left out before the LIMIT,
        // so a key stuck on a failing row does not take every round's places.
        let claim = format!(
            "WITH claim AS MATERIALIZED (\
                SELECT id FROM {table} c \
                WHERE sent_at IS NULL AND parked_at IS NULL AND next_attempt_at <= now() \
                  AND destination = ANY($2) \
                  AND (c.key IS NULL OR NOT EXISTS (\
                    SELECT 1 FROM {table} w \
                    WHERE w.destination = c.destination AND w.key = c.key AND w.id < c.id \
                      AND w.sent_at IS NULL AND w.parked_at IS NULL AND w.next_attempt_at > now())) \
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             SELECT o.id, o.destination, o.message_id, o.key, o.payload, o.header_names, \
                    o.header_values, o.attempts \
             FROM {table} o JOIN claim USING (id) \
             WHERE o.key IS NULL OR NOT EXISTS (\
                SELECT 1 FROM {table} p \
                WHERE p.destination = o.destination AND p.key = o.key AND p.id < o.id \
                  AND p.sent_at IS NULL AND p.parked_at IS NULL \
                  AND p.id NOT IN (SELECT id FROM claim)) \
             ORDER BY o.id"
        );
        let mark_sent = format!("UPDATE {table} SET sent_at = now() WHERE id = ANY($1)");
        let delete_sent = format!("DELETE FROM {table} WHERE id = ANY($1)");
        // $3: the seconds to wait before the next attempt (equal jitter applied here); $4: the
        // attempt limit (0: none). Returns the rows the limit parked.
        let failed = format!(
            "WITH failed AS (\
                UPDATE {table} o SET attempts = o.attempts + 1, last_error = f.error, \
                    next_attempt_at = now() + make_interval(secs => f.wait * (0.5 + random() / 2)), \
                    parked_at = CASE WHEN $4::int > 0 AND o.attempts + 1 >= $4::int THEN now() END \
                FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, wait) \
                WHERE o.id = f.id \
                RETURNING o.id, o.destination, o.parked_at) \
             SELECT id, destination FROM failed WHERE parked_at IS NOT NULL"
        );
        let park = format!(
            "UPDATE {table} o SET attempts = o.attempts + 1, last_error = f.error, parked_at = now() \
             FROM unnest($1::bigint[], $2::text[]) AS f(id, error) WHERE o.id = f.id"
        );
        let sweep = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
                SELECT ctid FROM {table} \
                WHERE sent_at < now() - make_interval(secs => $1) LIMIT $2))"
        );
        let status = format!(
            "SELECT count(*) FILTER (WHERE parked_at IS NULL), \
                    count(*) FILTER (WHERE parked_at IS NOT NULL), \
                    EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL))::float8 \
             FROM {table} WHERE sent_at IS NULL"
        );
        let pending_for = format!(
            "SELECT count(*) FROM {table} \
             WHERE sent_at IS NULL AND parked_at IS NULL AND destination = ANY($1)"
        );
        let parked = format!(
            "SELECT id, destination, message_id, key, attempts, last_error, created_at, parked_at \
             FROM {table} WHERE parked_at IS NOT NULL AND sent_at IS NULL ORDER BY id LIMIT $1"
        );
        let retry_set = "SET parked_at = NULL, attempts = 0, next_attempt_at = now()";
        let retry = format!(
            "UPDATE {table} {retry_set} WHERE id = ANY($1) AND parked_at IS NOT NULL AND sent_at IS NULL"
        );
        let retry_all =
            format!("UPDATE {table} {retry_set} WHERE parked_at IS NOT NULL AND sent_at IS NULL");
        OutboxSql {
            table: table.to_string(),
            channel,
            insert,
            claim,
            mark_sent,
            delete_sent,
            failed,
            park,
            sweep,
            status,
            pending_for,
            parked,
            retry,
            retry_all,
            migration: migration_sql(table, name),
        }
    }
}

/// [`MIGRATION_0002`] for `table` (whose table part is `name`).
pub(crate) fn migration_sql(table: &str, name: &str) -> String {
    const MARK: &str = "\u{0}index\u{0}";
    MIGRATION_0002
        .replace("ackstack_outbox_", MARK)
        .replace(DEFAULT_OUTBOX_TABLE, table)
        .replace(MARK, &format!("{name}_"))
}

/// Messages sent inside an inbox transaction: see [`InboxTx::outbox`].
///
/// A message written here is a row of the outbox table, committed with the handler's other
/// statements and the delivery's inbox row, or not at all. An
/// [`OutboxRelay`](crate::OutboxRelay) publishes it after the commit.
#[derive(Debug)]
pub struct Outbox<'a> {
    pub(crate) tx: &'a InboxTx,
}

impl Outbox<'_> {
    /// Writes `message` for `destination` (a name the relay routes to a publisher: a queue,
    /// topic or stream). Returns the message id it will carry: the message's own
    /// [`message_id`](Message::message_id) when it has one, else a new UUID stored in the row,
    /// so that every send of it (a relay's rare second send after a crash) carries the same id
    /// and a deduplicating consumer downstream applies it once.
    ///
    /// Rows of one destination with the same [`key`](Message::key) are published in the order
    /// they were written.
    pub async fn send(&self, destination: &str, message: Message) -> Result<String, InboxError> {
        if destination.is_empty() {
            return Err(InboxError::Config(
                "an outbox destination must not be empty".into(),
            ));
        }
        let (names, values): (Vec<&str>, Vec<&[u8]>) = message
            .headers
            .iter()
            .map(|(name, value)| (name, value.as_ref()))
            .unzip();
        let key = message.key.as_deref();
        let payload: &[u8] = &message.payload;
        let insert = self.tx.prepare_cached(&self.tx.outbox_sql().insert).await?;
        let row = self
            .tx
            .query_one(
                &insert,
                &[
                    &destination,
                    &message.message_id,
                    &key,
                    &payload,
                    &names,
                    &values,
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// A pending row claimed by a relay.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) destination: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) attempts: i32,
    /// The message, or why the row cannot be one.
    pub(crate) message: Result<Message, String>,
}

impl Claimed {
    pub(crate) fn from_row(row: &Row) -> Result<Claimed, InboxError> {
        let key: Option<Vec<u8>> = row.try_get(3)?;
        let payload: Vec<u8> = row.try_get(4)?;
        let names: Vec<String> = row.try_get(5)?;
        let values: Vec<Option<Vec<u8>>> = row.try_get(6)?;
        let message_id: String = row.try_get(2)?;
        let message = if names.len() == values.len() {
            let mut headers = Headers::new();
            let mut complete = true;
            for (name, value) in names.into_iter().zip(values) {
                match value {
                    Some(value) => headers.insert(name, value),
                    None => complete = false,
                }
            }
            if complete {
                Ok(Message {
                    payload: Bytes::from(payload),
                    headers,
                    key: key.clone().map(Bytes::from),
                    message_id: Some(message_id),
                })
            } else {
                Err("a header value is NULL".to_string())
            }
        } else {
            Err("header_names and header_values differ in length".to_string())
        };
        Ok(Claimed {
            id: row.try_get(0)?,
            destination: row.try_get(1)?,
            key,
            attempts: row.try_get(7)?,
            message,
        })
    }
}

/// How far behind an outbox is (see [`PgInbox::outbox_status`](crate::PgInbox::outbox_status)).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows written and not yet sent (parked rows not included).
    pub pending: u64,
    /// How long the oldest pending row has waited (`None`: nothing is pending).
    pub oldest_pending: Option<Duration>,
    /// Rows parked: refused for good by the broker, or past the attempt limit; they wait for
    /// an operator (`ackstack outbox retry`).
    pub parked: u64,
}

impl OutboxStatus {
    pub(crate) fn from_row(row: &Row) -> Result<OutboxStatus, InboxError> {
        let pending: i64 = row.try_get(0)?;
        let parked: i64 = row.try_get(1)?;
        let oldest: Option<f64> = row.try_get(2)?;
        Ok(OutboxStatus {
            pending: u64::try_from(pending).unwrap_or(0),
            parked: u64::try_from(parked).unwrap_or(0),
            oldest_pending: oldest
                .filter(|s| s.is_finite())
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }
}

/// A parked outbox row, as [`PgInbox::outbox_parked`](crate::PgInbox::outbox_parked) lists it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ParkedRow {
    /// The row id (what `ackstack outbox retry --id` takes).
    pub id: i64,
    /// The destination it was written for.
    pub destination: String,
    /// The message id it carries.
    pub message_id: String,
    /// Its ordering key.
    pub key: Option<Vec<u8>>,
    /// Attempts made.
    pub attempts: i32,
    /// Why it was parked: the broker's refusal or the last failure.
    pub last_error: Option<String>,
    /// When the handler's transaction wrote it.
    pub created_at: SystemTime,
    /// When it was parked.
    pub parked_at: SystemTime,
}

impl ParkedRow {
    pub(crate) fn from_row(row: &Row) -> Result<ParkedRow, InboxError> {
        Ok(ParkedRow {
            id: row.try_get(0)?,
            destination: row.try_get(1)?,
            message_id: row.try_get(2)?,
            key: row.try_get(3)?,
            attempts: row.try_get(4)?,
            last_error: row.try_get(5)?,
            created_at: row.try_get(6)?,
            parked_at: row.try_get(7)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_migration_is_the_file() {
        assert_eq!(
            migration_sql(DEFAULT_OUTBOX_TABLE, DEFAULT_OUTBOX_TABLE),
            MIGRATION_0002
        );
    }

    #[test]
    fn another_table_renames_table_and_indexes() {
        let sql = migration_sql("billing.events_out", "events_out");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS billing.events_out ("));
        assert!(sql.contains(
            "CREATE INDEX IF NOT EXISTS events_out_pending_idx ON billing.events_out (id)"
        ));
        assert!(sql.contains("events_out_key_idx ON billing.events_out (destination, key, id)"));
        assert!(sql.contains("events_out_sent_at_idx ON billing.events_out (sent_at)"));
        assert!(!sql.contains("ackstack_outbox"));
    }

    #[test]
    fn the_channel_fits_postgresql_limit() {
        let table = format!("{}.{}", "s".repeat(63), "t".repeat(47));
        let sql = OutboxSql::new(&table, &"t".repeat(47), true);
        assert_eq!(sql.channel.len(), 63);
        assert!(
            sql.insert
                .contains(&format!("pg_notify('{}', '')", sql.channel))
        );
    }

    #[test]
    fn without_notify_the_insert_is_a_plain_insert() {
        let with = OutboxSql::new("t", "t", true);
        assert!(with.insert.contains("pg_notify('t', '')"));
        let without = OutboxSql::new("t", "t", false);
        assert!(!without.insert.contains("pg_notify"));
        assert!(without.insert.starts_with("INSERT INTO t "));
    }
}
