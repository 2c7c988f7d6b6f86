//! [`RabbitStats`]: counters of what the adapter sent.

use std::sync::atomic::AtomicU64;

/// Counters of what the adapter sent, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitStats {
    /// `basic.ack` frames sent (cumulative and individual).
    pub ack_frames: u64,
    /// Of those, `multiple=true` frames.
    pub multiple_ack_frames: u64,
    /// Negative acknowledgements sent for releases: `basic.reject requeue=true` frames (the
    /// name predates the switch from `basic.nack`, see [`Settle::release`]).
    ///
    /// [`Settle::release`]: ackstack_core::Settle::release
    pub nack_frames: u64,
    /// Completed deliveries acked at the broker, each counted once, when the frame that acks
    /// it was sent (not when it was queued or held back behind an unfinished delivery).
    pub acked_tokens: u64,
    /// Settlements refused because the token's channel is gone (no frame sent).
    pub lease_lost: u64,
    /// Connections opened by the source (1 + reconnects).
    pub connects: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) ack_frames: AtomicU64,
    pub(crate) multiple_ack_frames: AtomicU64,
    pub(crate) nack_frames: AtomicU64,
    pub(crate) acked_tokens: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) connects: AtomicU64,
}
