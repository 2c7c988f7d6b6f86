//! The lease keeper: extends the leases (visibility timeouts) of in-flight deliveries before
//! they lapse (invariant 6 in docs/CONTRACT.md).
//!
//! One task schedules every in-flight delivery, not a timer per message. Each lease is
//! extended at [`LeaseConfig::extend_at`] (70% by default) of its length, up to
//! [`LeaseConfig::max_total`] since receipt. When an extension fails because the lease is lost,
//! or the lease runs out without one (the total was reached, or the broker kept failing), the
//! delivery's cancellation fires and it is marked lost: the runner never acks it.
//!
//! Leases are handed over a batch at a time ([`LeaseKeeper::hold_batch`]): one message to the
//! keeper per receive, and a slot per delivery that its guard marks done when dropped. The
//! keeper looks at a batch only when its first extension is due; most deliveries are done by
//! then and cost the keeper nothing. Those still in flight are then kept one by one, and from
//! then on their guards tell the keeper when they are done.

use crate::config::later;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cancel::{Cancel, HardStop, Lazy, SlotSource};
use crate::context::RunStats;
use crate::id_hash::IdHash;
use crate::metrics::Metrics;
use crate::source::Settle;

/// How leases are kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// The fraction of the lease after which it is extended.
    pub extend_at: f64,
    /// The longest a delivery is held in all, counted from receipt.
    #[serde(with = "crate::config::duration")]
    pub max_total: Duration,
    /// Whether a handler whose lease is lost is stopped at once (its future dropped at its
    /// next `.await`) instead of being told through [`Context::cancelled`] and left to stop by
    /// itself. Off by default: cancellation is cooperative, and a handler that ignores it runs
    /// to its end (its delivery is still never acked). Turn it on for handlers that are safe
    /// to drop at any `.await` (no half-done effect the redelivery cannot repair). A dedup done
    /// mark being written when the lease is lost is dropped too: the redelivery then runs the
    /// handler again once the claim lapses.
    ///
    /// [`Context::cancelled`]: crate::Context::cancelled
    pub abort_on_loss: bool,
}

impl Default for LeaseConfig {
    /// Extend at 70%, hold for at most 1 hour, cancel cooperatively.
    fn default() -> Self {
        LeaseConfig {
            extend_at: 0.7,
            max_total: Duration::from_secs(3600),
            abort_on_loss: false,
        }
    }
}

/// A slot not looked at by the keeper yet.
const HELD: u8 = 0;
/// Its guard was dropped or released before the keeper looked: nothing to keep.
const DONE: u8 = 1;
/// Kept by the keeper one by one (its id: the batch's first id plus its index).
const KEPT: u8 = 2;
/// Lost: the delivery must not be acked.
const LOST: u8 = 3;

/// One delivery of a batch: its token, its cancellation (fired when its lease is lost), and
/// its state.
#[derive(Debug)]
struct Slot<T> {
    token: T,
    cancel: Lazy,
    state: AtomicU8,
}

/// The leases of one receive, shared by the keeper and the deliveries' guards.
#[derive(Debug)]
struct Batch<T> {
    first_id: u64,
    received: Instant,
    slots: Vec<Slot<T>>,
    /// Deliveries whose guard is not done yet; the last one tells the keeper to forget the
    /// batch, so that a finished batch does not wait for its first extension in memory.
    unfinished: AtomicUsize,
    /// How long [`LeaseGuard::release`] waits for an extension in flight, at most: one lease.
    settle_wait: Duration,
    /// The last moment the leases are sure to be kept: `max_total` after receipt, less one
    /// lease (the keeper stops extending once an extension would pass `max_total`).
    deadline: Instant,
    /// The run's hard stop, which cancels every delivery's work (see `cancel.rs`).
    hard_stop: Arc<HardStop>,
}

/// The batch holds its deliveries' cancellations too: they cost no allocation of their own.
impl<T: Send + Sync> SlotSource for Batch<T> {
    fn cancel_slot(&self, index: usize) -> Option<&Lazy> {
        self.slots.get(index).map(|s| &s.cancel)
    }

    fn hard_stop(&self) -> &HardStop {
        &self.hard_stop
    }
}

impl<T> Batch<T> {
    fn slot(&self, index: usize) -> Option<&Slot<T>> {
        self.slots.get(index)
    }

    /// Counts `n` deliveries done; the last tells the keeper through `tx`.
    fn finished(&self, n: usize, tx: &mpsc::UnboundedSender<Command<T>>) {
        if n > 0 && self.unfinished.fetch_sub(n, Ordering::AcqRel) == n {
            let _ = tx.send(Command::Forget(self.first_id));
        }
    }
}

enum Command<T> {
    /// A batch to look at once its first extension is due.
    Hold(Arc<Batch<T>>),
    /// Every delivery of the batch is done: nothing of it is left to look at.
    Forget(u64),
    Drop(u64),
    /// Stop keeping the lease; answer once no extension of it is in flight any more.
    Release(u64, oneshot::Sender<()>),
}

/// Stops keeping a delivery's lease when dropped, or when [released](LeaseGuard::release).
#[derive(Debug)]
pub struct LeaseGuard<T> {
    batch: Arc<Batch<T>>,
    index: usize,
    tx: mpsc::UnboundedSender<Command<T>>,
    released: bool,
}

impl<T> LeaseGuard<T> {
    /// The last moment the lease is sure to be kept (see `LeaseConfig::max_total`).
    pub fn deadline(&self) -> Instant {
        self.batch.deadline
    }

    /// Whether the lease was lost (the delivery must not be acked).
    pub fn is_lost(&self) -> bool {
        self.state() == LOST
    }

    /// The delivery's cancellation, fired when the lease is lost.
    pub(crate) fn cancel(&self) -> Cancel
    where
        T: Send + Sync + 'static,
    {
        Cancel::Slot(self.batch.clone(), self.index)
    }

    fn state(&self) -> u8 {
        self.batch
            .slot(self.index)
            .map_or(DONE, |s| s.state.load(Ordering::Acquire))
    }

    fn id(&self) -> u64 {
        self.batch.first_id + self.index as u64
    }

    /// Marks the slot done if the keeper has not looked at it yet; `false` when the keeper
    /// keeps it (or lost it) and must be told.
    fn finish_unkept(&self) -> bool {
        self.batch.slot(self.index).is_none_or(|s| {
            s.state
                .compare_exchange(HELD, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// Stops keeping the lease and waits until no extension of it is in flight, so that the
    /// settlement that follows (a retry delay, a release) is the last word on the delivery's
    /// visibility: an extension never lands after it (invariant 6 in docs/CONTRACT.md). An extension that does not
    /// finish within the lease's length is given up on (adapters bound their calls).
    pub async fn release(mut self) {
        self.released = true;
        if self.finish_unkept() {
            // Never extended: no extension can be in flight.
            self.batch.finished(1, &self.tx);
            return;
        }
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Command::Release(self.id(), done)).is_ok();
        self.batch.finished(1, &self.tx);
        if !sent {
            return;
        }
        if tokio::time::timeout(self.batch.settle_wait, wait)
            .await
            .is_err()
        {
            tracing::warn!(
                "a lease extension is still in flight after a full lease; settling anyway"
            );
        }
    }
}

impl<T> Drop for LeaseGuard<T> {
    fn drop(&mut self) {
        if !self.released {
            if !self.finish_unkept() {
                let _ = self.tx.send(Command::Drop(self.id()));
            }
            self.batch.finished(1, &self.tx);
        }
    }
}

/// The guards of one batch, in the order of its deliveries ([`LeaseKeeper::hold_batch`]).
/// Those not taken when it is dropped are done: their leases are not kept.
#[derive(Debug)]
pub struct Guards<T> {
    batch: Arc<Batch<T>>,
    next: usize,
    tx: mpsc::UnboundedSender<Command<T>>,
}

impl<T> Iterator for Guards<T> {
    type Item = LeaseGuard<T>;

    fn next(&mut self) -> Option<LeaseGuard<T>> {
        if self.next >= self.batch.slots.len() {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(LeaseGuard {
            batch: self.batch.clone(),
            index,
            tx: self.tx.clone(),
            released: false,
        })
    }
}

impl<T> Drop for Guards<T> {
    fn drop(&mut self) {
        for slot in self.batch.slots.iter().skip(self.next) {
            let _ = slot
                .state
                .compare_exchange(HELD, DONE, Ordering::AcqRel, Ordering::Acquire);
        }
        let untaken = self.batch.slots.len().saturating_sub(self.next);
        self.batch.finished(untaken, &self.tx);
    }
}

/// The handle to the lease-keeping task.
#[derive(Debug)]
pub struct LeaseKeeper<T> {
    tx: mpsc::UnboundedSender<Command<T>>,
    next_id: std::sync::atomic::AtomicU64,
    task: tokio::task::JoinHandle<()>,
    lease: Duration,
    max_total: Duration,
    hard_stop: Arc<HardStop>,
}

impl<T> Held<T> {
    fn slot(&self) -> Option<&Slot<T>> {
        self.batch.slot(self.index)
    }

    fn is_lost(&self) -> bool {
        self.slot()
            .is_none_or(|s| s.state.load(Ordering::Acquire) == LOST)
    }
}

impl<T> std::fmt::Debug for Command<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Hold(batch) => write!(f, "Hold({}..)", batch.first_id),
            Command::Forget(id) => write!(f, "Forget({id}..)"),
            Command::Drop(id) => write!(f, "Drop({id})"),
            Command::Release(id, _) => write!(f, "Release({id})"),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> LeaseKeeper<T> {
    /// Starts keeping leases of length `lease` through `settler`; the deliveries' work is
    /// also cancelled by `hard_stop`.
    pub fn spawn<S: Settle<Token = T>>(
        settler: S,
        lease: Duration,
        config: LeaseConfig,
        watch: Watch,
        hard_stop: Arc<HardStop>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let max_total = config.max_total;
        let task = tokio::spawn(run(settler, lease, config, rx, watch));
        LeaseKeeper {
            tx,
            next_id: std::sync::atomic::AtomicU64::new(0),
            task,
            lease,
            max_total,
            hard_stop,
        }
    }

    /// Keeps the leases of the deliveries behind `held`, received at `received`: one guard per
    /// delivery, in order, each keeping its lease until dropped and holding the delivery's
    /// cancellation ([`LeaseGuard::cancel`]).
    pub fn hold_batch(&self, received: Instant, held: impl IntoIterator<Item = T>) -> Guards<T> {
        let slots: Vec<Slot<T>> = held
            .into_iter()
            .map(|token| Slot {
                token,
                cancel: Lazy::default(),
                state: AtomicU8::new(HELD),
            })
            .collect();
        let n = slots.len();
        let first_id = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        let batch = Arc::new(Batch {
            first_id,
            received,
            slots,
            unfinished: AtomicUsize::new(n),
            settle_wait: self.lease,
            deadline: later(received, self.max_total.saturating_sub(self.lease)),
            hard_stop: self.hard_stop.clone(),
        });
        if n > 0 {
            let _ = self.tx.send(Command::Hold(batch.clone()));
        }
        Guards {
            batch,
            next: 0,
            tx: self.tx.clone(),
        }
    }

    /// Stops the task (leases still held simply lapse).
    pub fn shutdown(self) {
        self.task.abort();
    }
}

struct Held<T> {
    batch: Arc<Batch<T>>,
    index: usize,
    expires: Instant,
    /// When the next extension is due (entries in the heap for other times are stale).
    extend_at: Instant,
    extending: bool,
    /// Released while an extension was in flight: answer once it finishes.
    released: Option<oneshot::Sender<()>>,
}

#[derive(PartialEq, Eq)]
enum Extended {
    Ok,
    Lost,
    Failed,
}

/// Where the keeper reports: the consumer's metrics, and whether extensions are failing (for
/// [`Status::health`](crate::Status::health)).
pub(super) struct Watch {
    pub(super) metrics: Arc<Metrics>,
    pub(super) stats: Arc<RunStats>,
}

async fn run<S: Settle>(
    settler: S,
    lease: Duration,
    config: LeaseConfig,
    mut rx: mpsc::UnboundedReceiver<Command<S::Token>>,
    watch: Watch,
) {
    // `extend_at` is validated in (0, 1) with the consumer's config; clamp anyway so that a
    // keeper built by hand cannot spin or overflow.
    let fraction = if config.extend_at.is_finite() {
        config.extend_at.clamp(0.05, 0.95)
    } else {
        0.7
    };
    let extend_after = lease.mul_f64(fraction);
    let mut held: HashMap<u64, Held<S::Token>, IdHash> = HashMap::default();
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    // Batches by first id: in the order received, so in the order their first extension is
    // due; a batch whose deliveries are all done is taken out wherever it is.
    let mut batches: BTreeMap<u64, Arc<Batch<S::Token>>> = BTreeMap::new();
    let mut calls: JoinSet<(u64, Instant, Extended)> = JoinSet::new();
    // One timer, moved when the earliest due time changes: a new sleep per turn of the loop
    // would register and cancel a timer for every command (two per delivery).
    let timer = tokio::time::sleep_until(far_future(Instant::now()));
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        let first_batch = batches
            .first_key_value()
            .map(|(_, b)| later(b.received, extend_after));
        let next = match (due.peek().map(|Reverse((at, _))| *at), first_batch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(at);
            }
            armed = next;
        }
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let mut schedule = Schedule { held: &mut held, batches: &mut batches };
                schedule.apply(cmd);
                // What is already queued, without a turn of the loop each; bounded, so that
                // extensions and lapses are looked at between bursts.
                for _ in 0..DRAIN_MAX {
                    let Ok(cmd) = rx.try_recv() else { break };
                    schedule.apply(cmd);
                }
            },
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                let Ok((id, started, result)) = done else { continue };
                let Some(h) = held.get_mut(&id) else { continue };
                h.extending = false;
                if let Some(released) = h.released.take() {
                    held.remove(&id);
                    let _ = released.send(());
                    continue;
                }
                watch.stats.leases.set(result == Extended::Failed);
                match result {
                    Extended::Ok => {
                        watch.metrics.lease_extensions.increment(1);
                        tracing::debug!(by = ?lease, "lease extended");
                        h.expires = later(started, lease);
                        h.extend_at = later(started, extend_after);
                        due.push(Reverse((h.extend_at, id)));
                    }
                    Extended::Lost => lose(h, &watch),
                    Extended::Failed => {
                        watch.metrics.lease_extension_failures.increment(1);
                        // Try again soon, while the current lease still runs.
                        let now = Instant::now();
                        let retry_at = now + (h.expires.saturating_duration_since(now) / 4).max(Duration::from_millis(20));
                        h.extend_at = retry_at.min(h.expires);
                        due.push(Reverse((h.extend_at, id)));
                    }
                }
            },
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                let now = Instant::now();
                // Batches whose first extension is due: what is still in flight is kept one by
                // one from now on; the rest is done and dropped here.
                while let Some((_, batch)) = batches.first_key_value() {
                    let extend_at = later(batch.received, extend_after);
                    if extend_at > now {
                        break;
                    }
                    let expires = later(batch.received, lease);
                    for (index, slot) in batch.slots.iter().enumerate() {
                        if slot
                            .state
                            .compare_exchange(HELD, KEPT, Ordering::AcqRel, Ordering::Acquire)
                            .is_err()
                        {
                            continue;
                        }
                        let id = batch.first_id + index as u64;
                        held.insert(
                            id,
                            Held {
                                batch: batch.clone(),
                                index,
                                expires,
                                extend_at,
                                extending: false,
                                released: None,
                            },
                        );
                        due.push(Reverse((extend_at, id)));
                    }
                    batches.pop_first();
                }
                while let Some(Reverse((at, id))) = due.peek().copied() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    let Some(h) = held.get_mut(&id) else { continue };
                    if h.is_lost() {
                        continue;
                    }
                    if now >= h.expires {
                        // Lapsed, even if an extension is still on its way: it may land too
                        // late, after another consumer received the message.
                        lose(h, &watch);
                        continue;
                    }
                    if h.extending || now < h.extend_at {
                        continue;
                    }
                    if now.duration_since(h.batch.received).saturating_add(lease) > config.max_total {
                        // No more extensions: the lease lapses at `expires`.
                        tracing::info!(
                            max_total = ?config.max_total,
                            "lease held for its longest allowed time; it will not be extended again"
                        );
                        h.extend_at = far_future(now);
                        due.push(Reverse((h.expires, id)));
                        continue;
                    }
                    h.extending = true;
                    // Check for a lapse at expiry while the call is in flight.
                    due.push(Reverse((h.expires, id)));
                    let Some(token) = h.slot().map(|s| s.token.clone()) else { continue };
                    let settler = settler.clone();
                    calls.spawn(async move {
                        let started = Instant::now();
                        let result = match settler.extend(&token, lease).await {
                            Ok(()) => Extended::Ok,
                            Err(e) if e.is_lease_lost() => Extended::Lost,
                            Err(e) => {
                                tracing::warn!(error = %e, "lease extension failed; will try again");
                                Extended::Failed
                            }
                        };
                        (id, started, result)
                    });
                }
            }
        }
    }
}

fn lose<T>(h: &mut Held<T>, watch: &Watch) {
    let Some(slot) = h.slot() else { return };
    if slot.state.swap(LOST, Ordering::AcqRel) != LOST {
        slot.cancel.fire();
        watch.metrics.leases_lost.increment(1);
        tracing::warn!("lease lost; the delivery's work is cancelled and it will not be acked");
    }
}

fn far_future(now: Instant) -> Instant {
    later(now, Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Commands applied in one turn of the keeper's loop at most.
const DRAIN_MAX: usize = 1024;

/// The keeper's schedule, as a command changes it.
struct Schedule<'a, T> {
    held: &'a mut HashMap<u64, Held<T>, IdHash>,
    batches: &'a mut BTreeMap<u64, Arc<Batch<T>>>,
}

impl<T> Schedule<'_, T> {
    fn apply(&mut self, cmd: Command<T>) {
        match cmd {
            Command::Hold(batch) => {
                self.batches.insert(batch.first_id, batch);
            }
            Command::Forget(id) => {
                self.batches.remove(&id);
            }
            Command::Drop(id) => {
                self.held.remove(&id);
            }
            Command::Release(id, done) => match self.held.get_mut(&id) {
                Some(h) if h.extending => h.released = Some(done),
                _ => {
                    self.held.remove(&id);
                    let _ = done.send(());
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;
