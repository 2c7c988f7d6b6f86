//! A delivery's cancellation, made a [`CancellationToken`] only when something waits for it.
//!
//! Every delivery can be cancelled: its lease lost, the dedup claim of its work lost, the
//! shutdown deadline passed. A `CancellationToken` per delivery (a child of the run's hard
//! stop) costs an allocation and two locks of the parent's mutex, and each clone and drop of
//! it another lock, while most deliveries finish without anything waiting for their
//! cancellation. Here a delivery's cancellation is a flag in a slot of its receive batch: in
//! the lease keeper's batch where the broker has leases (no allocation of its own), else in a
//! [`Slots`] made per batch. The token, a child of the hard stop, is made the first time
//! something waits for it or asks for it ([`Context::token`](crate::Context::token)), and from
//! then on the flag and the token agree: firing the flag cancels the token, and a token
//! cancelled by its holder counts as fired.
//!
//! A context keeps its batch's slots alive (an `Arc`): a handler that hands its context to a
//! detached task keeps one receive batch's slots (and, with leases, its broker tokens) in
//! memory until that task lets go of it.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// A flag that fires once, and the token made for it on demand.
#[derive(Debug, Default)]
pub(crate) struct Lazy {
    fired: AtomicBool,
    token: OnceLock<CancellationToken>,
}

impl Lazy {
    /// Fires the flag (and the token, if one was made).
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        // Paired with the fence in `token`: either this sees the token made there, or that
        // sees the flag set here (a token is never left uncancelled after a fire).
        fence(Ordering::SeqCst);
        if let Some(token) = self.token.get() {
            token.cancel();
        }
    }

    fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
            || self
                .token
                .get()
                .is_some_and(CancellationToken::is_cancelled)
    }

    /// The token, made by `make` the first time.
    fn token(&self, make: impl FnOnce() -> CancellationToken) -> &CancellationToken {
        let token = self.token.get_or_init(make);
        fence(Ordering::SeqCst);
        if self.fired.load(Ordering::SeqCst) {
            token.cancel();
        }
        token
    }
}

/// The run's hard stop (the shutdown deadline): a token for what waits for it, and a flag read
/// without the token's lock (a `CancellationToken` locks a mutex to say whether it is
/// cancelled).
#[derive(Debug)]
pub(crate) struct HardStop {
    fired: AtomicBool,
    token: CancellationToken,
    /// Handed out for a slot that does not exist (never, by construction: see
    /// [`Cancel::token`]); a child, so the hard stop still cancels it.
    spare: CancellationToken,
}

impl Default for HardStop {
    fn default() -> Self {
        let token = CancellationToken::new();
        HardStop {
            fired: AtomicBool::new(false),
            spare: token.child_token(),
            token,
        }
    }
}

impl HardStop {
    /// Stops every delivery's work.
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Whether it fired.
    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// The token, cancelled when the hard stop fires.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// What holds the cancellation slots of one receive batch: [`Slots`], or the lease keeper's
/// batch.
pub(crate) trait SlotSource: Send + Sync {
    /// The slot of the batch's delivery `index`.
    fn cancel_slot(&self, index: usize) -> Option<&Lazy>;
    /// The run's hard stop, which cancels every slot.
    fn hard_stop(&self) -> &HardStop;
}

/// The cancellation slots of one receive batch, one per delivery, under the run's hard stop.
#[derive(Debug)]
pub(crate) struct Slots {
    hard_stop: Arc<HardStop>,
    slots: Box<[Lazy]>,
}

impl Slots {
    /// One [`Cancel`] per delivery of a batch of `n`, each also cancelled by `hard_stop`.
    pub(crate) fn batch(
        hard_stop: &Arc<HardStop>,
        n: usize,
    ) -> impl Iterator<Item = Cancel> + use<> {
        let slots: Arc<dyn SlotSource> = Arc::new(Slots {
            hard_stop: hard_stop.clone(),
            slots: (0..n).map(|_| Lazy::default()).collect(),
        });
        (0..n).map(move |index| Cancel::Slot(slots.clone(), index))
    }
}

impl std::fmt::Debug for dyn SlotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotSource")
    }
}

impl SlotSource for Slots {
    fn cancel_slot(&self, index: usize) -> Option<&Lazy> {
        self.slots.get(index)
    }

    fn hard_stop(&self) -> &HardStop {
        &self.hard_stop
    }
}

/// What cancels a piece of work (see the module docs).
#[derive(Clone, Debug)]
pub(crate) enum Cancel {
    /// A token of its own.
    Token(CancellationToken),
    /// A delivery of a receive batch: its slot, or the batch's hard stop.
    Slot(Arc<dyn SlotSource>, usize),
    /// Nested work: cancelled on its own, or with its parent.
    Child(Arc<Child>),
}

/// Nested work's own flag and its parent's cancellation.
#[derive(Debug)]
pub(crate) struct Child {
    own: Lazy,
    parent: Cancel,
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel::Token(CancellationToken::new())
    }
}

impl Cancel {
    /// Cancelled with this one, and cancellable on its own.
    pub(crate) fn child(&self) -> Cancel {
        Cancel::Child(Arc::new(Child {
            own: Lazy::default(),
            parent: self.clone(),
        }))
    }

    /// Cancels the work (and its children).
    pub(crate) fn cancel(&self) {
        match self {
            Cancel::Token(token) => token.cancel(),
            Cancel::Slot(slots, index) => {
                if let Some(slot) = slots.cancel_slot(*index) {
                    slot.fire();
                }
            }
            Cancel::Child(child) => child.own.fire(),
        }
    }

    /// Whether the work is cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        match self {
            Cancel::Token(token) => token.is_cancelled(),
            Cancel::Slot(slots, index) => {
                slots.cancel_slot(*index).is_some_and(Lazy::is_fired)
                    || slots.hard_stop().is_fired()
            }
            Cancel::Child(child) => child.own.is_fired() || child.parent.is_cancelled(),
        }
    }

    /// The work's token (made now if no one asked for it before), cancelled whenever the work
    /// is; cancelling it cancels the work.
    pub(crate) fn token(&self) -> &CancellationToken {
        match self {
            Cancel::Token(token) => token,
            Cancel::Slot(slots, index) => match slots.cancel_slot(*index) {
                Some(slot) => slot.token(|| slots.hard_stop().token().child_token()),
                // No such slot (never made so): the hard stop's own token would do, but a
                // holder that cancelled it would stop the run; its spare child stands in.
                None => &slots.hard_stop().spare,
            },
            Cancel::Child(child) => child.own.token(|| child.parent.token().child_token()),
        }
    }

    /// Completes once the work is cancelled.
    pub(crate) async fn cancelled(&self) {
        if self.is_cancelled() {
            return;
        }
        self.token().cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn one(hard_stop: &Arc<HardStop>) -> Cancel {
        Slots::batch(hard_stop, 1).next().unwrap_or_default()
    }

    #[tokio::test]
    async fn a_slot_fired_before_its_token_is_made_hands_out_a_cancelled_token() {
        let hard_stop = Arc::<HardStop>::default();
        let cancel = one(&hard_stop);
        assert!(!cancel.is_cancelled());
        cancel.cancel();
        assert!(cancel.is_cancelled());
        assert!(cancel.token().is_cancelled());
        cancel.cancelled().await;
        assert!(
            !hard_stop.is_fired() && !hard_stop.token().is_cancelled(),
            "one delivery's cancel stops only it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_the_slot_fires_later() {
        let cancel = one(&Arc::default());
        let waiter = tokio::spawn({
            let cancel = cancel.clone();
            async move { cancel.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }

    #[tokio::test]
    async fn the_hard_stop_cancels_every_slot_and_its_token() {
        let hard_stop = Arc::<HardStop>::default();
        let cancels: Vec<Cancel> = Slots::batch(&hard_stop, 3).collect();
        let made = cancels[1].token().clone();
        hard_stop.fire();
        assert!(cancels.iter().all(Cancel::is_cancelled));
        assert!(made.is_cancelled());
        cancels[2].cancelled().await;
    }

    #[test]
    fn a_token_cancelled_by_its_holder_cancels_the_work_and_its_children_only() {
        let hard_stop = Arc::<HardStop>::default();
        let cancels: Vec<Cancel> = Slots::batch(&hard_stop, 2).collect();
        let child = cancels[0].child();
        cancels[0].token().cancel();
        assert!(cancels[0].is_cancelled());
        assert!(child.is_cancelled(), "a child is cancelled with its parent");
        assert!(child.token().is_cancelled());
        assert!(!cancels[1].is_cancelled(), "the other delivery goes on");
        assert!(!hard_stop.is_fired() && !hard_stop.token().is_cancelled());
    }

    #[test]
    fn a_child_cancelled_on_its_own_leaves_its_parent() {
        let parent = one(&Arc::default());
        let child = parent.child();
        let grandchild = child.child();
        child.cancel();
        assert!(child.is_cancelled() && grandchild.is_cancelled());
        assert!(!parent.is_cancelled());
        // A token made after the cancel is cancelled too.
        assert!(grandchild.token().is_cancelled());
        assert!(!parent.token().is_cancelled());
    }

    #[test]
    fn a_child_made_before_its_parents_token_follows_the_parent() {
        let parent = one(&Arc::default());
        let child = parent.child();
        let token = child.token().clone();
        parent.cancel();
        assert!(child.is_cancelled());
        assert!(
            token.is_cancelled(),
            "the child's token is a child of the parent's"
        );
    }
}
