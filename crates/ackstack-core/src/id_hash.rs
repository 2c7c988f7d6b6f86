//! A hasher for ids that ackstack makes itself (unique, sequential `u64`s, never from outside):
//! one multiplication instead of SipHash, for maps that see an insert and a remove per delivery
//! (the lease keeper's schedule, the in-memory broker's messages).

/// A `HashMap` hasher for ackstack's own sequential ids.
pub(crate) type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// See [`IdHash`].
#[derive(Default)]
pub(crate) struct IdHasher(u64);

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
