//! The attempt gate: where a suspect runs alone among handler *attempts* rather than among
//! deliveries in flight ([`Alone::Attempts`](crate::Alone::Attempts)).
//!
//! Every attempt passes the gate shared (a read lock), taken by the retry layer around one
//! run of the inner stack and given back before a retry's wait. A suspect takes it exclusive
//! (the write lock) before it is armed: it then waits only for the attempts executing now,
//! not for deliveries sleeping between in-place retries, and nothing else starts an attempt
//! until it gives the gate back. It does so once it is settled, or, when an attempt of its is
//! retried in place, for the retry's wait, in both cases only after the adapter recorded
//! durably that a crash from then on is not its own ([`Settle::step_aside`]); it takes the
//! gate again before its next attempt, armed again. The lock is fair: attempts that come
//! after a waiting suspect wait behind it. Only the runner's own retry layer passes the gate
//! (a retry layer nested inside it would wait behind a suspect that waits for it).
//!
//! [`Settle::step_aside`]: crate::Settle::step_aside

use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Records durably where a suspect's crash window starts or ends; `true` when it did (see
/// [`Settle::step_aside`](crate::Settle::step_aside) and [`Settle::arm`](crate::Settle::arm)).
pub(crate) type Marking = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// The gate every handler attempt of one run passes.
#[derive(Clone, Debug, Default)]
pub(crate) struct AttemptGate(Arc<RwLock<()>>);

impl AttemptGate {
    /// Waits until no attempt runs, then keeps any from starting until the guard is dropped.
    pub(crate) async fn exclusive(&self) -> OwnedRwLockWriteGuard<()> {
        self.0.clone().write_owned().await
    }

    /// Waits until no suspect holds the gate, for one attempt.
    pub(crate) async fn shared(&self) -> OwnedRwLockReadGuard<()> {
        self.0.clone().read_owned().await
    }
}

/// A suspect's hold on the gate, carried by its [`Context`](crate::Context): from before it
/// is armed until it steps aside, and again for each of its later attempts.
pub(crate) struct Seat {
    gate: AttemptGate,
    alone: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    hooks: Mutex<Option<Hooks>>,
}

/// What stepping aside and coming back record first.
struct Hooks {
    step_aside: Marking,
    rejoin: Marking,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat")
            .field("alone", &self.holds_alone())
            .finish_non_exhaustive()
    }
}

impl Seat {
    /// A seat at `gate`, holding nothing yet.
    pub(crate) fn new(gate: AttemptGate) -> Self {
        Seat {
            gate,
            alone: Mutex::new(None),
            hooks: Mutex::new(None),
        }
    }

    /// Keeps the gate exclusive for this delivery with `guard` (from
    /// [`AttemptGate::exclusive`]) until it steps aside.
    pub(crate) fn hold(&self, guard: OwnedRwLockWriteGuard<()>) {
        *lock(&self.alone) = Some(guard);
    }

    /// Sets what stepping aside records first (the end of a run alone), and what coming back
    /// for a later attempt records first (its start), once the suspect is armed.
    pub(crate) fn on_marks(&self, step_aside: Marking, rejoin: Marking) {
        *lock(&self.hooks) = Some(Hooks { step_aside, rejoin });
    }

    /// Whether this delivery holds the gate exclusive.
    pub(crate) fn holds_alone(&self) -> bool {
        lock(&self.alone).is_some()
    }

    /// Gives the exclusive gate back once the adapter recorded that a crash from now on is
    /// not this delivery's. With `force`, gives it back even when that failed (a warning
    /// says so); otherwise keeps it then, so that the next attempt runs alone too. Returns
    /// whether the gate was given back (or never held).
    pub(crate) async fn step_aside(&self, force: bool) -> bool {
        if !self.holds_alone() {
            return true;
        }
        let step = lock(&self.hooks).as_ref().map(|h| h.step_aside.clone());
        let recorded = match step {
            Some(step) => step().await,
            None => true,
        };
        if !recorded {
            if !force {
                tracing::warn!(
                    "could not record the end of a suspect's run alone; its retry runs alone too"
                );
                return false;
            }
            tracing::warn!(
                "could not record the end of a suspect's run alone; a crash from now on may \
                 be counted against it"
            );
        }
        *lock(&self.alone) = None;
        true
    }

    /// Before a later attempt of a suspect that stepped aside: takes the gate exclusive again
    /// (waiting for the attempts running now) and has the adapter mark the run alone again, so
    /// that a crash in any of its attempts is counted. Returns `false` when `cancel` fired
    /// first.
    pub(crate) async fn rejoin(&self, cancel: &crate::cancel::Cancel) -> bool {
        if self.holds_alone() {
            return true;
        }
        let guard = tokio::select! {
            biased;
            _ = cancel.cancelled() => return false,
            guard = self.gate.exclusive() => guard,
        };
        self.hold(guard);
        let rejoin = lock(&self.hooks).as_ref().map(|h| h.rejoin.clone());
        if let Some(rejoin) = rejoin
            && !rejoin().await
        {
            tracing::warn!(
                "could not record a suspect's run alone again; a crash during its retry is not \
                 counted"
            );
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
