//! [`RabbitStats`]: counters of what the adapter sent.

use ackstack_core::adapter::Counter;

/// Counters of what the adapter sent, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RabbitStats {
    /// `basic.ack` frames sent (cumulative and individual).
    pub ack_frames: u64,
    /// Of those, `multiple=true` frames.
    pub multiple_ack_frames: u64,
    /// Of the `multiple=false` frames, those sent because tags held above an unfinished
    /// delivery would have reached half the prefetch window (the broker was about to stop
    /// delivering).
    pub pressure_ack_frames: u64,
    /// Of the `multiple=false` frames, those sent because tags held above an unfinished
    /// delivery waited [`RabbitConfig::held_ack_delay`](crate::RabbitConfig::held_ack_delay).
    pub late_ack_frames: u64,
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

/// The live counts behind [`RabbitStats`], shared by the source and its settlers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) ack_frames: Counter,
    pub(crate) multiple_ack_frames: Counter,
    pub(crate) pressure_ack_frames: Counter,
    pub(crate) late_ack_frames: Counter,
    pub(crate) nack_frames: Counter,
    pub(crate) acked_tokens: Counter,
    pub(crate) lease_lost: Counter,
    pub(crate) connects: Counter,
}

impl Counters {
    /// Every count so far.
    pub(crate) fn snapshot(&self) -> RabbitStats {
        RabbitStats {
            ack_frames: self.ack_frames.get(),
            multiple_ack_frames: self.multiple_ack_frames.get(),
            pressure_ack_frames: self.pressure_ack_frames.get(),
            late_ack_frames: self.late_ack_frames.get(),
            nack_frames: self.nack_frames.get(),
            acked_tokens: self.acked_tokens.get(),
            lease_lost: self.lease_lost.get(),
            connects: self.connects.get(),
        }
    }
}
