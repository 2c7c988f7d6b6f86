//! The inbox's settings.

use std::time::Duration;

use crate::error::InboxError;

/// The default inbox table.
pub const DEFAULT_TABLE: &str = "ackstack_inbox";

/// Settings of a [`PgInbox`](crate::PgInbox).
///
/// ```
/// use std::time::Duration;
/// use ackstack_postgres::PgInboxConfig;
///
/// let config = PgInboxConfig::new("charges")
///     .table("billing.ackstack_inbox")
///     .retention(Duration::from_secs(3 * 24 * 3600))
///     .statement_timeout(Duration::from_secs(5));
/// assert_eq!(config.consumer, "charges");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PgInboxConfig {
    /// The consumer's name: the first column of the inbox key. Consumers with different
    /// names keep separate records in one table (the same key may be processed once by each).
    pub consumer: String,
    /// The inbox table, optionally schema-qualified (`schema.table`): lower-case letters,
    /// digits and `_`, starting with a letter or `_`, at most 47 characters for the table
    /// part. Default `ackstack_inbox`.
    pub table: String,
    /// How long a processed key is remembered: the sweeper deletes older rows, after which a
    /// late duplicate would run again. Default 7 days. Keep it longer than the broker can
    /// redeliver a message (its retention, retry schedule and dead-letter replays).
    pub retention: Duration,
    /// The longest any statement may run, on the server (`statement_timeout` of each inbox
    /// transaction) and in the client (a little longer, so that the server's clean error
    /// comes first). Default 10 s.
    pub statement_timeout: Duration,
    /// The longest connecting may take (pools made by [`PgInbox::new`](crate::PgInbox::new)),
    /// and how long a delivery waits for a free connection on top of `statement_timeout`.
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// The most connections a pool made by [`PgInbox::new`](crate::PgInbox::new) opens. Each
    /// running handler holds one for its transaction: match the consumer's concurrency.
    /// Default 16.
    pub max_connections: usize,
    /// Rows deleted per sweeper statement. Default 1000.
    pub sweep_batch: u32,
    /// The most deliveries that share one transaction (a *commit group*); 1 to 64, default 1
    /// (a transaction per delivery).
    ///
    /// Above 1, deliveries handled at the same time join an open transaction, each in a
    /// savepoint of its own, and the transaction commits once when the last member is done;
    /// every member is acknowledged only after that commit. A member whose handler fails is
    /// rolled back to its savepoint alone. What it costs: the members of a group run **one
    /// after another** on the group's connection (a slow handler delays the others), and a
    /// panic, a cancelled handler or a failed commit fails every member of the group (each is
    /// retried; none is acknowledged). Pick it for short handlers whose effects are
    /// statements, when commits per second are the limit.
    pub commit_group: usize,
    /// The outbox table ([`InboxTx::outbox`](crate::InboxTx::outbox)), optionally
    /// schema-qualified, under the same rules as `table`. Default `ackstack_outbox`.
    pub outbox_table: String,
    /// Whether each transaction that sends through the outbox notifies the relays
    /// (`pg_notify` on the channel named as the outbox table), so that they publish at once
    /// rather than at their next poll. Default on. PostgreSQL serializes the commits of
    /// notifying transactions on one lock; with many small transactions per second and
    /// relays that poll often enough, turning it off can raise the commit rate.
    pub outbox_notify: bool,
}

/// The largest commit group: PostgreSQL keeps up to 64 subtransactions per backend in its
/// fast cache; beyond that every snapshot gets slower.
pub(crate) const MAX_COMMIT_GROUP: usize = 64;

impl PgInboxConfig {
    /// The defaults, for the consumer named `consumer`.
    pub fn new(consumer: impl Into<String>) -> Self {
        PgInboxConfig {
            consumer: consumer.into(),
            table: DEFAULT_TABLE.to_string(),
            retention: Duration::from_secs(7 * 24 * 3600),
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 16,
            sweep_batch: 1000,
            commit_group: 1,
            outbox_table: crate::outbox::DEFAULT_OUTBOX_TABLE.to_string(),
            outbox_notify: true,
        }
    }

    /// With this inbox table.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// With this retention.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// With this statement timeout.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// With this connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// With at most `n` connections.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// With `n` rows deleted per sweeper statement.
    pub fn sweep_batch(mut self, n: u32) -> Self {
        self.sweep_batch = n;
        self
    }

    /// With up to `n` deliveries committed in one transaction (see
    /// [`PgInboxConfig::commit_group`]).
    pub fn commit_group(mut self, n: usize) -> Self {
        self.commit_group = n;
        self
    }

    /// With this outbox table.
    pub fn outbox_table(mut self, table: impl Into<String>) -> Self {
        self.outbox_table = table.into();
        self
    }

    /// With outbox notifications on or off (see [`PgInboxConfig::outbox_notify`]).
    pub fn outbox_notify(mut self, on: bool) -> Self {
        self.outbox_notify = on;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), InboxError> {
        validate_table(&self.table)?;
        validate_table(&self.outbox_table)?;
        if self.outbox_table == self.table {
            return Err(InboxError::Config(
                "the outbox table must not be the inbox table".into(),
            ));
        }
        if self.statement_timeout.is_zero() {
            return Err(InboxError::Config(
                "statement_timeout must not be zero".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(InboxError::Config(
                "connect_timeout must not be zero".into(),
            ));
        }
        if self.retention.is_zero() {
            return Err(InboxError::Config("retention must not be zero".into()));
        }
        if self.max_connections == 0 {
            return Err(InboxError::Config(
                "max_connections must be at least 1".into(),
            ));
        }
        if !(1..=MAX_COMMIT_GROUP).contains(&self.commit_group) {
            return Err(InboxError::Config(format!(
                "commit_group must be between 1 and {MAX_COMMIT_GROUP}"
            )));
        }
        if self.sweep_batch == 0 {
            return Err(InboxError::Config("sweep_batch must be at least 1".into()));
        }
        Ok(())
    }

    /// The table part of [`PgInboxConfig::table`] (without its schema).
    pub(crate) fn table_name(&self) -> &str {
        self.table.rsplit('.').next().unwrap_or(&self.table)
    }

    /// The table part of [`PgInboxConfig::outbox_table`].
    pub(crate) fn outbox_table_name(&self) -> &str {
        self.outbox_table
            .rsplit('.')
            .next()
            .unwrap_or(&self.outbox_table)
    }

    /// The bound of one statement in the client.
    pub(crate) fn call_timeout(&self) -> Duration {
        self.statement_timeout + Duration::from_secs(1)
    }
}

/// The longest table part: the index name adds `_received_at_idx` (16) within PostgreSQL's 63.
const MAX_TABLE_LEN: usize = 47;

fn validate_table(table: &str) -> Result<(), InboxError> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(InboxError::Config(format!(
            "table {table:?}: at most one schema qualifier"
        )));
    }
    for (i, part) in parts.iter().enumerate() {
        let max = if i + 1 == parts.len() {
            MAX_TABLE_LEN
        } else {
            63
        };
        let mut chars = part.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok || part.len() > max {
            return Err(InboxError::Config(format!(
                "table {table:?}: each part must be lower-case letters, digits and _, \
                 starting with a letter or _, the table at most {MAX_TABLE_LEN} characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        for ok in ["ackstack_inbox", "billing.ackstack_inbox", "_t1", "s_1.t_2"] {
            assert!(validate_table(ok).is_ok(), "{ok}");
        }
        let long = "t".repeat(48);
        for bad in [
            "",
            "Inbox",
            "1inbox",
            "a.b.c",
            "inbox; drop table x",
            "\"quoted\"",
            ".inbox",
            "inbox.",
            long.as_str(),
        ] {
            assert!(validate_table(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_settings_are_refused() {
        assert!(PgInboxConfig::new("c").validate().is_ok());
        assert!(
            PgInboxConfig::new("c")
                .statement_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(PgInboxConfig::new("c").sweep_batch(0).validate().is_err());
        assert!(
            PgInboxConfig::new("c")
                .max_connections(0)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn table_part_drops_the_schema() {
        assert_eq!(PgInboxConfig::new("c").table("s.t").table_name(), "t");
        assert_eq!(PgInboxConfig::new("c").table_name(), "ackstack_inbox");
    }
}
