//! [`RedisStreamsStats`]: the commands the adapter sent to Redis, for benchmarks and
//! diagnostics.

use ackstack_core::adapter::Counter;

/// A snapshot of a source's counters (shared with its settler). Each count is one command
/// (a script is one `EVALSHA`), so their sum is the adapter's round trips.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStreamsStats {
    /// `XREADGROUP` calls.
    pub reads: u64,
    /// Entries received (new and taken over).
    pub received: u64,
    /// `XAUTOCLAIM` scans (the reclaim script).
    pub reclaims: u64,
    /// Runs of the script that moves due copies back.
    pub moves: u64,
    /// `XACK` calls (one per ack batch).
    pub ack_calls: u64,
    /// Settling scripts: delayed copies, dead letters, lease renewals and releases.
    pub settle_scripts: u64,
}

/// The live counts behind [`RedisStreamsStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: Counter,
    pub(crate) received: Counter,
    pub(crate) reclaims: Counter,
    pub(crate) moves: Counter,
    pub(crate) ack_calls: Counter,
    pub(crate) settle_scripts: Counter,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> RedisStreamsStats {
        RedisStreamsStats {
            reads: self.reads.get(),
            received: self.received.get(),
            reclaims: self.reclaims.get(),
            moves: self.moves.get(),
            ack_calls: self.ack_calls.get(),
            settle_scripts: self.settle_scripts.get(),
        }
    }
}
