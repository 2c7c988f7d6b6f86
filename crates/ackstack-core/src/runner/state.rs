//! What the receive loop may do now: [`ConsumerState`], and how many deliveries it may take.
//! Shared by [`Control`](super::Control) and the kill switch, which both decide it.

use tokio::time::Instant;

/// Whether a consumer is receiving, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerState {
    /// Receiving.
    Running,
    /// Paused by [`Control::pause`](super::Control::pause).
    Paused,
    /// The kill switch tripped: not receiving until its cooldown is over.
    CircuitOpen,
    /// The kill switch lets a few deliveries through to see whether the failures are over.
    HalfOpen,
}

/// How many deliveries the receive loop may take now.
pub(super) enum Admit {
    /// Up to this many.
    Take(usize),
    /// None; ask again once the control changes or at this instant.
    Wait(Option<Instant>),
}
