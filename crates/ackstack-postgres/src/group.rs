//! Commit groups: deliveries handled at the same time share one transaction, a savepoint each,
//! and one `COMMIT` (see [`PgInboxConfig::commit_group`](crate::PgInboxConfig::commit_group)).
//!
//! ```text
//! BEGIN                                   the first member opens the group
//!   SAVEPOINT m; INSERT key1 ...          member 1 (one round trip), then its statements
//!   RELEASE SAVEPOINT m; SAVEPOINT m;     member 2, after member 1 (members take turns): member
//!     INSERT key2 ...                       1's release goes out with member 2's first round trip
//!   ...
//!   RELEASE SAVEPOINT m                   the last member's release, before the commit
//! COMMIT                                  by the last member to finish; then every member returns
//! ```
//!
//! A member whose handler returned `Ok` has its savepoint released by whoever comes next, not
//! by a round trip of its own (a member costs one round trip besides its handler's
//! statements). That release fails only when one of its statements failed and the handler
//! carried on (PostgreSQL had aborted the transaction): the next member then rolls back to
//! that savepoint (undoing that member alone), tells that member through its `Verdict`
//! (it fails with [`InboxError::Aborted`]), and opens its own. A member whose handler failed
//! rolls back to its savepoint during its own turn, and one whose key was a duplicate ran
//! nothing to release; the savepoints they leave open nest (PostgreSQL keeps a savepoint of
//! the same name below a new one, and `RELEASE` and `ROLLBACK TO` act on the newest).
//!
//! A member joins the open group unless it is full or closed; the group closes when every
//! member that joined has had its turn, so a lone delivery commits at once and a burst fills
//! the group without a timer. No member returns `Ok` before the commit succeeded, so "ack
//! after commit" holds for each of them. A member interrupted during its turn (a panic, a
//! cancelled future) leaves the transaction in an unknown state: the group is poisoned, the
//! others fail with [`InboxError::Group`] and the connection is closed, which rolls back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use ackstack_core::dedup::StoreHooks;
use ackstack_core::{Context, Delivery, HandlerError};
use tokio::sync::watch;

use crate::error::InboxError;
use crate::inbox::PgInbox;
use crate::tx::InboxTx;

/// The savepoint every member runs in (members take turns, so one name suffices).
const SAVEPOINT: &str = "SAVEPOINT ackstack_member";
const RELEASE: &str = "RELEASE SAVEPOINT ackstack_member";
/// The member before's release and this member's savepoint, in one round trip.
const RELEASE_AND_OPEN: &str = "RELEASE SAVEPOINT ackstack_member; SAVEPOINT ackstack_member";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT ackstack_member";

/// The group open for new members, if any. Held weakly: a group's connection goes back to
/// the pool as soon as its members are done.
#[derive(Default)]
pub(crate) struct Groups {
    open: tokio::sync::Mutex<Weak<Group>>,
}

/// One shared transaction and its members.
struct Group {
    tx: InboxTx,
    /// Held by the member whose statements run now; inside, the member whose savepoint is
    /// still to be released.
    turn: tokio::sync::Mutex<Option<Arc<Verdict>>>,
    members: Mutex<Members>,
    /// `Some` once the transaction ended: `Ok` when it committed.
    outcome: watch::Sender<Option<Result<(), String>>>,
}

#[derive(Default)]
struct Members {
    joined: usize,
    finished: usize,
    /// Set by the member that finished last: no one joins any more.
    closed: bool,
    /// Why the transaction can no longer commit.
    poisoned: Option<String>,
}

impl Group {
    fn members(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a member whose handler returned `Ok` learns that its statements were rolled back after
/// its turn (its release failed: see the module docs).
#[derive(Default)]
struct Verdict(Mutex<Option<tokio_postgres::Error>>);

impl Verdict {
    fn rolled_back(&self, err: tokio_postgres::Error) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
    }

    fn take(&self) -> Option<tokio_postgres::Error> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// What one member's turn came to.
enum Turn {
    /// Its statements ran; its savepoint is released by the next turn (or rolled back then,
    /// if one of them had failed: see `Verdict`).
    Applied,
    /// Its key was already in the inbox (committed, or earlier in this transaction).
    Duplicate,
    /// Its handler failed; its savepoint was rolled back, the group goes on.
    Failed(HandlerError),
}

impl Groups {
    /// Joins the open group, or opens a new one (taking a connection and beginning a
    /// transaction) when there is none, or it is full or closed.
    async fn join(&self, inbox: &PgInbox) -> Result<Member, InboxError> {
        let config = inbox.config();
        let max = config.commit_group;
        // Held while a new group begins, so that a burst of deliveries joins one group; the
        // wait for it is bounded like taking a connection (invariant 13 in docs/CONTRACT.md).
        let wait = config.connect_timeout + config.statement_timeout;
        let Ok(mut open) = tokio::time::timeout(wait, self.open.lock()).await else {
            return Err(InboxError::Unreachable(format!(
                "no commit group could be opened within {wait:?}"
            )));
        };
        if let Some(group) = open.upgrade() {
            let mut members = group.members();
            if !members.closed && members.poisoned.is_none() && members.joined < max {
                members.joined += 1;
                drop(members);
                return Ok(Member::new(group.clone()));
            }
        }
        let tx = inbox.begin().await?;
        let (outcome, _) = watch::channel(None);
        let group = Arc::new(Group {
            tx,
            turn: tokio::sync::Mutex::new(None),
            members: Mutex::new(Members {
                joined: 1,
                ..Members::default()
            }),
            outcome,
        });
        *open = Arc::downgrade(&group);
        Ok(Member::new(group))
    }
}

/// A delivery's place in a group, from joining until it has finished its turn. Dropped
/// before that (a panic, a cancelled future), it still counts as finished and ends the group
/// if it was the last (an interrupted turn has poisoned the group already: [`Unfinished`]).
struct Member {
    group: Arc<Group>,
    finished: bool,
}

impl Member {
    fn new(group: Arc<Group>) -> Self {
        Member {
            group,
            finished: false,
        }
    }

    /// Counts this member finished (poisoning the group with `poison`); true when it was the
    /// last one, which must end the transaction.
    fn finish(&mut self, poison: Option<String>) -> bool {
        self.finished = true;
        let mut members = self.group.members();
        if let Some(reason) = poison {
            members.poisoned.get_or_insert(reason);
        }
        members.finished += 1;
        let last = members.finished == members.joined;
        if last {
            members.closed = true;
        }
        last
    }

    fn poisoned(&self) -> Option<String> {
        self.group.members().poisoned.clone()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.finish(None) {
            // The last member cannot await a rollback here: the outcome is a failure, and the
            // connection is closed (rolling back) when the last handle to the group goes.
            let reason = self
                .poisoned()
                .unwrap_or_else(|| "the last member was interrupted before the commit".into());
            self.group.outcome.send_replace(Some(Err(reason)));
        }
    }
}

/// Poisons the group if a member's turn is interrupted (a panic, a cancelled future).
struct Unfinished<'a>(&'a Group, bool);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.members().poisoned.get_or_insert_with(|| {
                "a member's handler panicked or was cancelled during its turn".to_string()
            });
        }
    }
}

/// Sends a failure outcome if the commit of the last member is interrupted (its answer may
/// be lost: the members are retried, and a committed row makes them duplicates).
struct Ending<'a>(&'a Group, bool);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0
                .outcome
                .send_replace(Some(Err("the commit was interrupted".into())));
        }
    }
}

/// Handles one delivery as a member of a commit group: see the module docs.
pub(crate) async fn handle<F, Fut>(
    groups: &Groups,
    inbox: &PgInbox,
    key: Option<&[u8]>,
    f: &F,
    delivery: &Delivery,
    cx: &Context,
) -> Result<(), HandlerError>
where
    F: Fn(Delivery, InboxTx, Context) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    let joined = groups.join(inbox).await;
    // Health: the database answering (or not) for a new transaction.
    cx.note_store(!matches!(
        joined,
        Err(InboxError::Unreachable(_)
            | InboxError::Tls(_)
            | InboxError::Database(_)
            | InboxError::Timeout { .. })
    ));
    let mut member = joined?;
    let group = member.group.clone();
    let verdict = Arc::new(Verdict::default());
    let mut turn = group.turn.lock().await;
    let result = match member.poisoned() {
        Some(reason) => Err(InboxError::Group(reason).into()),
        None => {
            // Declared after `turn`, so dropped before it if this future unwinds or is
            // cancelled mid-turn: the group is poisoned before the next member can take the
            // turn (and commit this member's half-done statements).
            let mut unfinished = Unfinished(&group, true);
            let result =
                run_turn(inbox, &group.tx, &mut turn, &verdict, key, f, delivery, cx).await;
            unfinished.1 = false;
            result
        }
    };
    let (turn_result, poison) = match result {
        Ok(turn) => (Ok(turn), None),
        Err(err) => {
            // The transaction's state is unknown: no member of this group may commit.
            let reason = format!("a member's statements failed: {err}");
            (Err(err), Some(reason))
        }
    };
    let last = member.finish(poison);
    if last {
        // Every member has had its turn: none waits for it any more.
        let mut ending = Ending(&group, false);
        let outcome = end(&group, member.poisoned(), turn.take()).await;
        ending.1 = true;
        group.outcome.send_replace(Some(outcome));
    }
    drop(turn);
    let turn = turn_result?;
    if let Turn::Failed(err) = turn {
        // Rolled back to its savepoint: nothing of it is in the transaction. Its retry need
        // not wait for the others.
        return Err(err);
    }
    let mut outcome = group.outcome.subscribe();
    let committed = match outcome.wait_for(Option::is_some).await {
        Ok(done) => done.clone().unwrap_or(Err("no outcome".into())),
        Err(_) => Err("the group ended without an outcome".into()),
    };
    if let Some(err) = verdict.take() {
        // Its release failed after its turn: it was rolled back alone.
        return Err(InboxError::Aborted(err).into());
    }
    committed.map_err(InboxError::Group)?;
    if let Turn::Duplicate = turn {
        inbox.note_duplicate_delivery(cx, key);
    }
    Ok(())
}

/// Ends a member's turn for its handle when dropped.
struct TurnOver(Arc<AtomicBool>);

impl Drop for TurnOver {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Ends the group's transaction, by the last member to finish: releases the savepoint still
/// pending (rolling its member back alone if that fails, as the next member would have) and
/// commits, or rolls back a poisoned group.
async fn end(
    group: &Group,
    poisoned: Option<String>,
    pending: Option<Arc<Verdict>>,
) -> Result<(), String> {
    if let Some(reason) = poisoned {
        group.tx.rollback().await;
        return Err(reason);
    }
    if let Some(before) = pending {
        let released = group.tx.batch_execute(RELEASE).await;
        if let Err(err) = after_release(&group.tx, &before, released).await {
            group.tx.rollback().await;
            return Err(err.to_string());
        }
    }
    group.tx.commit().await.map_err(|e| e.to_string())
}

/// What the release of `before`'s savepoint came to (`released`, the statement that carried
/// it): `Ok(true)` released; `Ok(false)` refused because `before` had aborted the transaction,
/// so `before` alone is rolled back and told; `Err`: the transaction's state is unknown.
async fn after_release(
    tx: &InboxTx,
    before: &Verdict,
    released: Result<(), InboxError>,
) -> Result<bool, InboxError> {
    match released {
        Ok(()) => Ok(true),
        Err(InboxError::Database(err)) if aborted_before(&err) => {
            tx.batch_execute(ROLLBACK_TO).await?;
            before.rolled_back(err);
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// Whether `err` says the transaction was aborted before the statement ran (a statement of
/// the member before failed and its handler carried on).
fn aborted_before(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// Opens this member's savepoint, with `record` (its inbox row) pipelined behind it, first
/// releasing the savepoint of the member before if that is pending (see the module docs).
/// `Err`: the transaction's state is unknown.
async fn open_savepoint<R, Fut>(
    tx: &InboxTx,
    pending: &mut Option<Arc<Verdict>>,
    record: R,
) -> Result<Result<bool, InboxError>, InboxError>
where
    R: Fn() -> Fut,
    Fut: Future<Output = Result<bool, InboxError>>,
{
    if let Some(before) = pending.take() {
        let (opened, recorded) = tokio::join!(tx.batch_execute(RELEASE_AND_OPEN), record());
        if after_release(tx, &before, opened).await? {
            return Ok(recorded);
        }
        // The member before was undone alone; this member starts afresh.
    }
    // SAVEPOINT and INSERT go out together (tokio-postgres pipelines them).
    let (opened, recorded) = tokio::join!(tx.batch_execute(SAVEPOINT), record());
    opened?;
    Ok(recorded)
}

/// One member's statements, inside its savepoint. `Err`: the transaction's state is unknown
/// (the group is poisoned); `Ok(Turn::Failed)`: the handler failed and was rolled back alone.
/// A member whose handler returned `Ok` leaves its savepoint to be released by the next turn
/// (`pending`), which tells `verdict` if that release fails.
#[allow(clippy::too_many_arguments)]
async fn run_turn<F, Fut>(
    inbox: &PgInbox,
    tx: &InboxTx,
    pending: &mut Option<Arc<Verdict>>,
    verdict: &Arc<Verdict>,
    key: Option<&[u8]>,
    f: &F,
    delivery: &Delivery,
    cx: &Context,
) -> Result<Turn, HandlerError>
where
    F: Fn(Delivery, InboxTx, Context) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    match key {
        Some(key) => {
            let recorded = open_savepoint(tx, pending, || inbox.record(tx, key)).await?;
            match recorded {
                Ok(true) => {}
                Ok(false) => return Ok(Turn::Duplicate),
                // Waiting for another transaction's row timed out, or a deadlock between two
                // groups was broken: this member alone fails and is retried.
                Err(InboxError::Database(err)) if err.as_db_error().is_some() => {
                    tx.batch_execute(ROLLBACK_TO).await?;
                    return Ok(Turn::Failed(InboxError::Database(err).into()));
                }
                Err(err) => return Err(err.into()),
            }
        }
        None => {
            inbox.note_keyless(cx);
            open_savepoint(tx, pending, || std::future::ready(Ok(true))).await??;
        }
    }
    // The member's own handle: refused once its turn is over (also when `f` unwinds).
    let turn = Arc::new(AtomicBool::new(true));
    let _over = TurnOver(turn.clone());
    let result = f(delivery.clone(), tx.for_turn(turn.clone()), cx.clone()).await;
    turn.store(false, Ordering::Release);
    match result {
        Ok(()) => {
            // Released by whoever comes next (a statement that failed while the handler
            // carried on is found then, and this member alone rolled back).
            *pending = Some(verdict.clone());
            Ok(Turn::Applied)
        }
        Err(err) => {
            tx.batch_execute(ROLLBACK_TO).await?;
            Ok(Turn::Failed(err))
        }
    }
}
