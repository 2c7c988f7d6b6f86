//! [`NatsStats`]: what the adapter sent to the server, for benchmarks and diagnostics.

use ackstack_core::adapter::Counter;

/// A snapshot of a source's counters (shared with its settler).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsStats {
    /// Fetch requests (one per receive).
    pub fetches: u64,
    /// Messages received.
    pub received: u64,
    /// Frames sent to ack subjects: `+ACK`, `-NAK`, `+WPI`, `+TERM`.
    pub ack_frames: u64,
    /// Flushes awaited (one per ack batch and per single settlement).
    pub flushes: u64,
    /// Dead-letter copies published and confirmed.
    pub dead_letters: u64,
}

/// The live counts behind [`NatsStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fetches: Counter,
    pub(crate) received: Counter,
    pub(crate) ack_frames: Counter,
    pub(crate) flushes: Counter,
    pub(crate) dead_letters: Counter,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> NatsStats {
        NatsStats {
            fetches: self.fetches.get(),
            received: self.received.get(),
            ack_frames: self.ack_frames.get(),
            flushes: self.flushes.get(),
            dead_letters: self.dead_letters.get(),
        }
    }
}
