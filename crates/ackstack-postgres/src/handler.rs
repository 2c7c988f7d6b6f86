//! [`TxHandler`]: a [`Handler`] that applies a delivery's effects exactly once.

use std::future::Future;
use std::sync::Arc;

use ackstack_core::dedup::StoreHooks;
use ackstack_core::{Context, DedupKey, Delivery, Handler, HandlerError};

use crate::group::Groups;
use crate::inbox::PgInbox;
use crate::tx::InboxTx;

/// A [`Handler`] running your function inside an inbox transaction; see [`tx_handler_fn`].
#[derive(Clone)]
pub struct TxHandler<F> {
    inbox: PgInbox,
    key: DedupKey,
    f: F,
    /// The open commit group of this handler's deliveries (shared by its clones).
    groups: Arc<Groups>,
}

impl<F> std::fmt::Debug for TxHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxHandler")
            .field("inbox", &self.inbox)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Makes a handler that applies each delivery's effects exactly once, in one PostgreSQL
/// transaction with the delivery's inbox row.
///
/// `f` is `Fn(Delivery, InboxTx, Context) -> impl Future<Output = Result<(), HandlerError>>`:
/// it gets owned values, so an `async move` block needs no lifetimes. Per delivery:
///
/// 1. the key is [`DedupKey::extract`]ed (bytes); a transaction begins;
/// 2. `INSERT INTO inbox (consumer, key) VALUES (..) ON CONFLICT DO NOTHING`:
///    - no row inserted: the key was committed before, a **duplicate**: roll back, count it
///      (`StoreHooks::note_deduplicated`, `ackstack_deduplicated_total`) and return `Ok`, so it is
///      acked without calling `f`;
///    - another transaction holds the same key right now: the insert waits for it to end (no
///      polling, no lease), then is a duplicate (it committed) or proceeds (it rolled back);
///      a wait longer than `statement_timeout` fails as a transient error (retried);
/// 3. `f` runs with the open transaction ([`InboxTx`]);
/// 4. `Ok`: **commit**, then return `Ok` (the consumer acks after the commit); `Err`: roll
///    back and return the error (retried or dead-lettered as usual); a panic or a cancelled
///    handler: the connection is closed, which rolls back, and the runner counts the panic as
///    a transient failure.
///
/// With [`PgInboxConfig::commit_group`](crate::PgInboxConfig::commit_group) above 1,
/// deliveries handled at the same time share a transaction: steps 2 and 3 run in a savepoint
/// per delivery, one delivery after another, and step 4 is one commit for all of them (a
/// failed `f` rolls back to its own savepoint; every delivery returns `Ok` only after the
/// commit).
///
/// A delivery without a key (or with an empty one) runs `f` in a transaction without an inbox
/// row: it is not deduplicated (counted in `ackstack_dedup_keyless_total` and logged at
/// debug).
///
/// When the database is unreachable, each delivery fails with a transient
/// [`InboxError::Unreachable`](crate::InboxError::Unreachable) and is retried with the
/// consumer's backoff; the consumer keeps running.
///
/// Only effects made through the [`InboxTx`] are exactly-once. Anything else `f` does (an
/// HTTP call, a publish) happens at least once: it may repeat when the commit fails.
pub fn tx_handler_fn<F, Fut>(inbox: PgInbox, key: DedupKey, f: F) -> TxHandler<F>
where
    F: Fn(Delivery, InboxTx, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    TxHandler {
        inbox,
        key,
        f,
        groups: Arc::default(),
    }
}

impl<F, Fut> Handler for TxHandler<F>
where
    F: Fn(Delivery, InboxTx, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, delivery: &Delivery, cx: &Context) -> Result<(), HandlerError> {
        let key = self.key.extract(delivery);
        if self.inbox.config().commit_group > 1 {
            return crate::group::handle(
                &self.groups,
                &self.inbox,
                key.as_deref(),
                &self.f,
                delivery,
                cx,
            )
            .await;
        }
        let tx = self.inbox.begin().await;
        // Health: whether the database answered.
        cx.note_store(tx.is_ok());
        let tx = tx?;
        match &key {
            Some(key) => match self.inbox.record(&tx, key).await {
                Ok(true) => {}
                Ok(false) => {
                    tx.rollback().await;
                    self.inbox.note_duplicate_delivery(cx, Some(key));
                    return Ok(());
                }
                Err(err) => {
                    tx.rollback().await;
                    return Err(err.into());
                }
            },
            None => self.inbox.note_keyless(cx),
        }
        match (self.f)(delivery.clone(), tx.clone(), cx.clone()).await {
            Ok(()) => {
                tx.commit().await?;
                Ok(())
            }
            Err(err) => {
                tx.rollback().await;
                Err(err)
            }
        }
    }
}

impl PgInbox {
    /// A handler that runs `f` inside an inbox transaction: see [`tx_handler_fn`].
    pub fn handler<F, Fut>(&self, key: DedupKey, f: F) -> TxHandler<F>
    where
        F: Fn(Delivery, InboxTx, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send,
    {
        tx_handler_fn(self.clone(), key, f)
    }
}
