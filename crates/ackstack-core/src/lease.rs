//! The lease keeper: extends the leases (visibility timeouts) of in-flight deliveries before
//! they lapse (invariant 6).
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
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::source::Settle;

/// How leases are kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// The fraction of the lease after which it is extended.
    pub extend_at: f64,
    /// The longest a delivery is held in all, counted from receipt.
    #[serde(with = "crate::config::duration")]
    pub max_total: Duration,
}

impl Default for LeaseConfig {
    /// Extend at 70%, hold for at most 1 hour.
    fn default() -> Self {
        LeaseConfig {
            extend_at: 0.7,
            max_total: Duration::from_secs(3600),
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
}

/// Stops keeping a delivery's lease when dropped.
#[derive(Debug)]
pub struct LeaseGuard<T> {
    id: u64,
    state: LeaseState,
    tx: mpsc::UnboundedSender<Command<T>>,
}

impl<T> LeaseGuard<T> {
    /// The delivery's lease state.
    pub fn state(&self) -> &LeaseState {
        &self.state
    }
}

impl<T> Drop for LeaseGuard<T> {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Drop(self.id));
    }
}

/// The handle to the lease-keeping task.
#[derive(Debug)]
pub struct LeaseKeeper<T> {
    tx: mpsc::UnboundedSender<Command<T>>,
    next_id: std::sync::atomic::AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl<T> std::fmt::Debug for Command<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Hold { id, .. } => write!(f, "Hold({id})"),
            Command::Drop(id) => write!(f, "Drop({id})"),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> LeaseKeeper<T> {
    /// Starts keeping leases of length `lease` through `settler`.
    pub fn spawn<S: Settle<Token = T>>(settler: S, lease: Duration, config: LeaseConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(settler, lease, config, rx));
        LeaseKeeper {
            tx,
            next_id: std::sync::atomic::AtomicU64::new(0),
            task,
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
    cancel: CancellationToken,
    state: LeaseState,
    extending: bool,
}

enum Extended {
    Ok,
    Lost,
    Failed,
}

async fn run<S: Settle>(
    settler: S,
    lease: Duration,
    config: LeaseConfig,
    mut rx: mpsc::UnboundedReceiver<Command<S::Token>>,
) {
    let extend_after = lease.mul_f64(config.extend_at.clamp(0.1, 0.95));
    let mut held: HashMap<u64, Held<S::Token>> = HashMap::new();
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut calls: JoinSet<(u64, Instant, Extended)> = JoinSet::new();
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Hold { id, token, received, cancel, state }) => {
                    let expires = later(received, lease);
                    held.insert(id, Held { token, received, expires, cancel, state, extending: false });
                    due.push(Reverse((later(received, extend_after), id)));
                }
                Some(Command::Drop(id)) => {
                    held.remove(&id);
                }
                None => break,
            },
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                let Ok((id, started, result)) = done else { continue };
                let Some(h) = held.get_mut(&id) else { continue };
                h.extending = false;
                match result {
                    Extended::Ok => {
                        metrics::counter!(crate::metrics::LEASE_EXTENSIONS).increment(1);
                        h.expires = later(started, lease);
                        due.push(Reverse((later(started, extend_after), id)));
                    }
                    Extended::Lost => lose(h),
                    Extended::Failed => {
                        // Try again soon, while the current lease still runs.
                        let retry_at = Instant::now() + (h.expires.saturating_duration_since(Instant::now()) / 4).max(Duration::from_millis(20));
                        due.push(Reverse((retry_at.min(h.expires), id)));
                    }
                }
            },
            _ = sleep_until(next), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((at, id))) = due.peek().copied() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    let Some(h) = held.get_mut(&id) else { continue };
                    if h.state.is_lost() || h.extending {
                        continue;
                    }
                    if now >= h.expires {
                        lose(h);
                        continue;
                    }
                    if now.duration_since(h.received).saturating_add(lease) > config.max_total {
                        // No more extensions: the lease lapses at `expires`.
                        due.push(Reverse((h.expires, id)));
                        continue;
                    }
                    h.extending = true;
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

fn lose<T>(h: &mut Held<T>) {
    if !h.state.is_lost() {
        h.state.mark_lost();
        h.cancel.cancel();
        metrics::counter!(crate::metrics::LEASES_LOST).increment(1);
        tracing::warn!("lease lost; the delivery's work is cancelled and it will not be acked");
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
