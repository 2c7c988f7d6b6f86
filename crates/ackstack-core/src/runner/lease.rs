//! The lease keeper: extends the leases (visibility timeouts) of in-flight deliveries before
//! they lapse (invariant 6 in docs/CONTRACT.md).
//!
//! One task schedules every in-flight delivery, not a timer per message. Each lease is
//! extended at [`LeaseConfig::extend_at`] (70% by default) of its length, up to
//! [`LeaseConfig::max_total`] since receipt. When an extension fails because the lease is lost,
//! or the lease runs out without one (the total was reached, or the broker kept failing), the
//! delivery's cancellation token fires and it is marked lost: the runner never acks it.

use crate::config::later;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::context::RunStats;
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

/// Whether a delivery's lease was lost; shared between the keeper and the runner.
#[derive(Clone, Debug, Default)]
pub struct LeaseState {
    lost: Arc<AtomicBool>,
}

impl LeaseState {
    /// Whether the lease was lost (the delivery must not be acked).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

enum Command<T> {
    Hold {
        id: u64,
        token: T,
        received: Instant,
        cancel: CancellationToken,
        state: LeaseState,
    },
    Drop(u64),
    /// Stop keeping the lease; answer once no extension of it is in flight any more.
    Release(u64, oneshot::Sender<()>),
}

/// Stops keeping a delivery's lease when dropped, or when [released](LeaseGuard::release).
#[derive(Debug)]
pub struct LeaseGuard<T> {
    id: u64,
    state: LeaseState,
    tx: mpsc::UnboundedSender<Command<T>>,
    /// How long [`LeaseGuard::release`] waits for an extension in flight, at most.
    settle_wait: Duration,
    released: bool,
    /// The last moment the lease is sure to be kept: `max_total` after receipt, less one
    /// lease (the keeper stops extending once an extension would pass `max_total`).
    deadline: Instant,
}

impl<T> LeaseGuard<T> {
    /// The last moment the lease is sure to be kept (see `LeaseConfig::max_total`).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The delivery's lease state.
    pub fn state(&self) -> &LeaseState {
        &self.state
    }

    /// Stops keeping the lease and waits until no extension of it is in flight, so that the
    /// settlement that follows (a retry delay, a release) is the last word on the delivery's
    /// visibility: an extension never lands after it (invariant 6 in docs/CONTRACT.md). An extension that does not
    /// finish within the lease's length is given up on (adapters bound their calls).
    pub async fn release(mut self) {
        self.released = true;
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Release(self.id, done)).is_err() {
            return;
        }
        if tokio::time::timeout(self.settle_wait, wait).await.is_err() {
            tracing::warn!(
                "a lease extension is still in flight after a full lease; settling anyway"
            );
        }
    }
}

impl<T> Drop for LeaseGuard<T> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.tx.send(Command::Drop(self.id));
        }
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
}

impl<T> std::fmt::Debug for Command<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Hold { id, .. } => write!(f, "Hold({id})"),
            Command::Drop(id) => write!(f, "Drop({id})"),
            Command::Release(id, _) => write!(f, "Release({id})"),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> LeaseKeeper<T> {
    /// Starts keeping leases of length `lease` through `settler`.
    pub fn spawn<S: Settle<Token = T>>(
        settler: S,
        lease: Duration,
        config: LeaseConfig,
        watch: Watch,
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
        }
    }

    /// Keeps the lease of the delivery behind `token`, received at `received`, until the guard
    /// is dropped. `cancel` fires if the lease is lost.
    pub fn hold(&self, token: T, received: Instant, cancel: CancellationToken) -> LeaseGuard<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = LeaseState::default();
        let _ = self.tx.send(Command::Hold {
            id,
            token,
            received,
            cancel,
            state: state.clone(),
        });
        LeaseGuard {
            id,
            state,
            tx: self.tx.clone(),
            settle_wait: self.lease,
            released: false,
            deadline: later(received, self.max_total.saturating_sub(self.lease)),
        }
    }

    /// Stops the task (leases still held simply lapse).
    pub fn shutdown(self) {
        self.task.abort();
    }
}

struct Held<T> {
    token: T,
    received: Instant,
    expires: Instant,
    /// When the next extension is due (entries in the heap for other times are stale).
    extend_at: Instant,
    cancel: CancellationToken,
    state: LeaseState,
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
    let mut calls: JoinSet<(u64, Instant, Extended)> = JoinSet::new();
    // One timer, moved when the earliest due time changes: a new sleep per turn of the loop
    // would register and cancel a timer for every command (two per delivery).
    let timer = tokio::time::sleep_until(far_future(Instant::now()));
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(at);
            }
            armed = next;
        }
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let mut schedule = Schedule { held: &mut held, due: &mut due, lease, extend_after };
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
                while let Some(Reverse((at, id))) = due.peek().copied() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    let Some(h) = held.get_mut(&id) else { continue };
                    if h.state.is_lost() {
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
                    if now.duration_since(h.received).saturating_add(lease) > config.max_total {
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
                    let token = h.token.clone();
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
    if !h.state.is_lost() {
        h.state.mark_lost();
        h.cancel.cancel();
        watch.metrics.leases_lost.increment(1);
        tracing::warn!("lease lost; the delivery's work is cancelled and it will not be acked");
    }
}

fn far_future(now: Instant) -> Instant {
    later(now, Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Commands applied in one turn of the keeper's loop at most.
const DRAIN_MAX: usize = 1024;

/// Hashes the keeper's ids (unique, sequential `u64`s made here, never from outside) with one
/// multiplication instead of SipHash: two map operations per delivery.
type IdHash = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing: spreads sequential ids over the high bits the map's control
        // bytes use.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The keeper's schedule, as a command changes it.
struct Schedule<'a, T> {
    held: &'a mut HashMap<u64, Held<T>, IdHash>,
    due: &'a mut BinaryHeap<Reverse<(Instant, u64)>>,
    lease: Duration,
    extend_after: Duration,
}

impl<T> Schedule<'_, T> {
    fn apply(&mut self, cmd: Command<T>) {
        match cmd {
            Command::Hold {
                id,
                token,
                received,
                cancel,
                state,
            } => {
                let expires = later(received, self.lease);
                let extend_at = later(received, self.extend_after);
                self.held.insert(
                    id,
                    Held {
                        token,
                        received,
                        expires,
                        extend_at,
                        cancel,
                        state,
                        extending: false,
                        released: None,
                    },
                );
                self.due.push(Reverse((extend_at, id)));
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
