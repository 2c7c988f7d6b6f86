//! A transactional inbox in PostgreSQL for ackstack: a message's effects are applied
//! **exactly once**, however often the broker delivers it.
//!
//! Deduplication in a separate store (Redis) marks a key done *after* the handler's effects:
//! a crash between the two repeats the effect. When the effects live in PostgreSQL, the inbox
//! closes that gap: the record "this message was applied" is a row written **in the same
//! transaction** as the effects, so both commit or neither does.
//!
//! ```text
//! BEGIN
//! INSERT INTO ackstack_inbox (consumer, key) VALUES ($1, $2) ON CONFLICT DO NOTHING
//!   0 rows -> a duplicate: ROLLBACK, ack without calling the handler
//!   1 row  -> your handler runs its statements in this transaction
//!             Ok  -> COMMIT, then the consumer acks
//!             Err -> ROLLBACK, retried or dead-lettered as usual
//! ```
//!
//! Two workers given the same message at once (a redelivery after a lost lease, a duplicate
//! publish) serialize on the primary key: the second `INSERT` waits until the first
//! transaction ends, then finds the row (a duplicate) or, if the first rolled back, proceeds.
//! A crash anywhere before `COMMIT` leaves nothing behind; a crash after it leaves the row,
//! so the redelivery is acked as a duplicate.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use ackstack_core::{Consumer, DedupKey, HandlerError, MemoryBroker, Message};
//! use ackstack_postgres::{PgInbox, PgInboxConfig};
//!
//! #[derive(serde::Deserialize)]
//! struct Charge { order_id: String, amount_cents: i64 }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let inbox = PgInbox::new(
//!     "postgres://postgres@127.0.0.1:5432/test",
//!     PgInboxConfig::new("charges"),
//! )?;
//! inbox.migrate().await?; // or run migrations/0001_inbox.sql with your own tool
//! let _sweeper = inbox.spawn_sweeper(Duration::from_secs(600)); // forgets keys after 7 days
//!
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new(r#"{"order_id":"A-1","amount_cents":1250}"#).message_id("m-1"));
//!
//! let handler = inbox.handler(DedupKey::MessageId, |delivery, tx, _cx| async move {
//!     let charge: Charge = ackstack_core::decode::json(&delivery)?;
//!     // Runs in the inbox transaction: committed together with the inbox row, or not at all.
//!     tx.execute(
//!         "INSERT INTO charges (order_id, amount_cents) VALUES ($1, $2)",
//!         &[&charge.order_id, &charge.amount_cents],
//!     )
//!     .await?;
//!     Ok(())
//! });
//!
//! Consumer::new(broker.source("orders"))
//!     .run_until(handler, tokio::time::sleep(Duration::from_secs(1)))
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! The handler gets an owned [`InboxTx`] (a handle to the open transaction), so the usual
//! `async move` block works without lifetimes; the inbox commits or rolls back after the block
//! returns.
//!
//! # Exactly once, and what is not
//!
//! Only statements run through the [`InboxTx`] are exactly-once. Other side effects of the
//! handler (HTTP calls, publishing) are at-least-once: a failed commit repeats them. The
//! guarantee lasts as long as the inbox keeps the key ([`PgInboxConfig::retention`], 7 days by
//! default): keep that longer than any redelivery (broker retention, retry schedule, replays
//! of dead letters). A delivery without a key is processed in a transaction but not
//! deduplicated.
//!
//! The inbox replaces the dedup layer for these handlers: do not also give the consumer a
//! dedup store for the same key.
//!
//! # Failures and bounds
//!
//! - The database unreachable, a broken connection, a timeout: the delivery fails with a
//!   transient error (retried with the consumer's backoff); the consumer keeps running and
//!   the pool reconnects on the next delivery.
//! - Every statement is bounded: `statement_timeout` (default 10 s) is set for each inbox
//!   transaction (`SET LOCAL`) and on each connection of a pool the inbox made, and the
//!   client gives up a second later. A connection whose state is unknown after a timeout,
//!   a panic or a cancelled handler is closed, never returned to the pool.
//! - An SQL error inside the handler aborts the transaction; a handler that swallows it and
//!   returns `Ok` gets [`InboxError::Aborted`] at commit instead of a silent rollback.
//!
//! # What it costs, and commit groups
//!
//! A delivery costs a transaction: `BEGIN`, the `INSERT`, your statements, `COMMIT` (about
//! three round trips and a WAL flush of its own). On a small machine that caps a consumer at
//! what PostgreSQL commits per second (about 12,000 per second in the benchmark's run of
//! 2026-12-07 on two cores; docs/PERFORMANCE.md has the table). [`PgInboxConfig::commit_group`]
//! lets deliveries handled at the same time share one transaction, a savepoint each:
//!
//! ```text
//! BEGIN
//!   SAVEPOINT m; INSERT key1 ...; <handler 1's statements>
//!   RELEASE SAVEPOINT m; SAVEPOINT m; INSERT key2 ...; <handler 2's statements>   (a failure: ROLLBACK TO SAVEPOINT m)
//!   RELEASE SAVEPOINT m
//! COMMIT          then every member of the group is acknowledged
//! ```
//!
//! The handlers of a group run one after another on its connection, so it suits short
//! handlers whose effects are statements; a panic or a failed commit fails the whole group
//! (each member is retried, none is acknowledged, nothing is applied twice).
//!
//! # The outbox: messages sent with the effects
//!
//! A handler that also sends messages writes them into the same transaction with
//! [`InboxTx::outbox`]: each is a row of the outbox table, committed with the handler's
//! statements and its inbox row, or rolled back with them. An [`OutboxRelay`] publishes the
//! committed rows through ackstack publishers (any [`Publish`](ackstack_core::Publish):
//! RabbitMQ with confirms, SQS, Kafka with delivery reports, NATS, the in-memory broker) and
//! marks them sent after the broker confirmed:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use ackstack_core::{Consumer, DedupKey, MemoryBroker, Message};
//! use ackstack_postgres::{OutboxRelay, PgInbox, PgInboxConfig, RelayConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let inbox = PgInbox::new("postgres://postgres@127.0.0.1/test", PgInboxConfig::new("orders"))?;
//! inbox.migrate().await?; // the inbox and the outbox tables
//! let broker = MemoryBroker::new();
//!
//! // Publishes committed rows for "payments"; several relays may run at once.
//! let relay = OutboxRelay::new(&inbox, RelayConfig::default())?
//!     .route("payments", broker.publisher("payments"));
//! let stop = tokio::time::sleep(Duration::from_secs(1));
//! let relaying = tokio::spawn({
//!     let relay = relay.clone();
//!     async move { relay.run_until(tokio::time::sleep(Duration::from_secs(2))).await }
//! });
//!
//! let handler = inbox.handler(DedupKey::MessageId, |delivery, tx, _cx| async move {
//!     tx.execute("UPDATE orders SET paid = true WHERE id = $1", &[&delivery.message_id])
//!         .await?;
//!     // Committed with the UPDATE, or not at all; published after the commit.
//!     tx.outbox()
//!         .send("payments", Message::new(delivery.payload.clone()).key("order-1"))
//!         .await?;
//!     Ok(())
//! });
//! Consumer::new(broker.source("orders")).run_until(handler, stop).await?;
//! relaying.await?;
//! # Ok(())
//! # }
//! ```
//!
//! Every message carries a stable message id (its own, else a UUID stored in the row), so the
//! relay's rare second send (a crash between the broker's confirmation and the relay's
//! commit) is a duplicate that a deduplicating consumer downstream applies once. Rows of one
//! destination and key are published in the order they were written. A message the broker
//! refuses for good is parked: counted ([`OUTBOX_METRICS`]), listed by
//! [`PgInbox::outbox_parked`] and `ackstack outbox parked`, and put back in line by
//! [`PgInbox::outbox_retry`]. The relay wakes on the `NOTIFY` each sending transaction makes
//! and polls besides. [`MIGRATION_0002`] is the table's DDL (PostgreSQL 13 or later).
//!
//! # TLS
//!
//! With the `tls` feature (`postgres-tls` in `ackstack`), [`PgInbox::new`] honours the URL's
//! `sslmode` and `sslrootcert` as libpq does, through rustls: `prefer` (the default) and
//! `require` encrypt without checking the certificate (`require` with `sslrootcert` checks
//! the chain), `verify-ca` checks the chain, `verify-full` the host name too; the roots are
//! `sslrootcert`'s, else the system's. For RDS, for example:
//! `postgres://app@db.xxxx.rds.amazonaws.com/app?sslmode=verify-full&sslrootcert=/etc/rds/global-bundle.pem`.
//! Without the feature, `require` and the `verify-*` modes are refused with
//! [`InboxError::Config`] rather than connecting in plaintext. A pool of your own
//! ([`PgInbox::from_pool`]) keeps whatever TLS it was built with.
//!
//! # The table
//!
//! [`PgInbox::migrate`] runs [`MIGRATION_0001`] (`migrations/0001_inbox.sql`, the same file)
//! for the configured table: `(consumer text, key bytea, received_at timestamptz, primary key
//! (consumer, key))` and an index on `received_at` for the sweeper. [`PgInbox::sweep_once`]
//! deletes a consumer's rows older than a given age in short batches;
//! [`PgInbox::spawn_sweeper`] runs it periodically with the configured retention.

#![cfg_attr(docsrs, feature(doc_cfg))]
mod config;
mod error;
mod group;
mod handler;
mod inbox;
mod listen;
mod outbox;
mod relay;
mod tls;
mod tx;

pub use config::{DEFAULT_TABLE, PgInboxConfig};
pub use error::InboxError;
pub use handler::{TxHandler, tx_handler_fn};
pub use inbox::{InboxStats, MIGRATION_0001, PgInbox, SweeperHandle};
pub use outbox::{DEFAULT_OUTBOX_TABLE, MIGRATION_0002, Outbox, OutboxStatus, ParkedRow};
pub use relay::{
    OUTBOX_METRICS, OUTBOX_OLDEST_PENDING_SECONDS, OUTBOX_PARKED, OUTBOX_PARKED_TOTAL,
    OUTBOX_PENDING, OUTBOX_SEND_FAILURES, OUTBOX_SENT, OutboxRelay, RelayConfig, RelayStats,
    RoundReport,
};
pub use tx::InboxTx;

/// The PostgreSQL client and pool crates this one is built on, for your own pool
/// ([`PgInbox::from_pool`]) and types ([`tokio_postgres::types::ToSql`], rows).
pub use deadpool_postgres;
pub use tokio_postgres;
