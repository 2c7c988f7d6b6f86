//! The attempt gate: where a suspect runs alone among handler *attempts* rather than among
//! deliveries in flight ([`Alone::Attempts`](crate::Alone::Attempts)).
//!
//! Every attempt passes the gate shared (a read lock), taken by the retry layer around one
//! run of the inner stack and given back before a retry's wait. A suspect takes it exclusive
//! (the write lock) before it is armed: it then waits only for the attempts executing now,
//! not for deliveries sleeping between in-place retries, and nothing else starts an attempt
//! until it gives the gate back. It does so once its first attempt is settled, or, when that
//! attempt is retried in place, before the retry's wait, in both cases only after the adapter
//! recorded durably that a crash from then on is not its own ([`Settle::step_aside`]). The
//! lock is fair: attempts that come after a waiting suspect wait behind it.
//!
//! [`Settle::step_aside`]: crate::Settle::step_aside

use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Records durably that a suspect's crash window ended; `true` when it did (see
/// [`Settle::step_aside`](crate::Settle::step_aside)).
pub(crate) type StepAside = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

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
/// is armed until it steps aside.
#[derive(Default)]
pub(crate) struct Seat {
    alone: Mutex<Option<Alone>>,
}

struct Alone {
    _guard: OwnedRwLockWriteGuard<()>,
    step_aside: Option<StepAside>,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat")
            .field("alone", &self.holds_alone())
            .finish_non_exhaustive()
    }
}

impl Seat {
    /// Keeps the gate exclusive for this delivery with `guard` (from
    /// [`AttemptGate::exclusive`]) until it steps aside.
    pub(crate) fn hold(&self, guard: OwnedRwLockWriteGuard<()>) {
        *self.lock() = Some(Alone {
            _guard: guard,
            step_aside: None,
        });
    }

    /// Sets what stepping aside records first (once the suspect is armed).
    pub(crate) fn on_step_aside(&self, f: StepAside) {
        if let Some(alone) = self.lock().as_mut() {
            alone.step_aside = Some(f);
        }
    }

    /// Whether this delivery holds the gate exclusive.
    pub(crate) fn holds_alone(&self) -> bool {
        self.lock().is_some()
    }

    /// Gives the exclusive gate back once the adapter recorded that a crash from now on is
    /// not this delivery's. With `force`, gives it back even when that failed (a warning
    /// says so); otherwise keeps it then, so that the next attempt runs alone too. Returns
    /// whether the gate was given back (or never held).
    pub(crate) async fn step_aside(&self, force: bool) -> bool {
        let step = match self.lock().as_ref() {
            None => return true,
            Some(alone) => alone.step_aside.clone(),
        };
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
        *self.lock() = None;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Alone>> {
        self.alone.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
