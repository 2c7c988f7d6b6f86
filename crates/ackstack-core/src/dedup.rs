//! Deduplication: a store protocol that marks a key done only after success (invariant 5), the
//! layer that applies it, key extractors, and an in-memory store.
//!
//! Per delivery with a key:
//!
//! 1. **claim** the key with a lease and a fresh token (`SET key token NX PX lease`);
//!    - already **done**: ack without calling the handler;
//!    - **busy** (claimed by another worker): retry later, never drop;
//!    - store unreachable: retry later without calling the handler (fail-closed, the default),
//!      or call the handler anyway (fail-open, by option).
//! 2. run the handler, **extending** the claim while it runs;
//! 3. on ack, **complete**: replace the claim by a done marker with a TTL (only if the token
//!    still matches); on retry or dead-letter, **release** the claim (compare-and-delete).
//!
//! Marking a key before the handler runs would lose every message whose first attempt fails;
//! this protocol never does that.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, as the object-safe [`DedupStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours until the lease runs out or we complete or release it.
    Acquired,
    /// The key was already processed: ack without calling the handler.
    Done,
    /// Another worker holds the key; its claim lapses within `expires_in` at most.
    Busy {
        /// How long the other claim has left, when the store knows.
        expires_in: Option<Duration>,
    },
}

/// A dedup store failed to answer.
#[derive(Debug, thiserror::Error)]
#[error("dedup store error: {0}")]
pub struct DedupError(#[source] pub crate::BoxError);

/// A shared store of claimed and done keys.
///
/// Object-safe (methods return boxed futures), so the runner holds any store as
/// `Arc<dyn DedupStore>`; the boxing costs one small allocation next to a network round trip.
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for `lease` with `token`, unless it is done or claimed.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>>;

    /// Marks `key` done for `ttl`, if `token` still holds its claim. Returns whether it did (a
    /// `false` means the claim had lapsed; the key is then left as it is).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>>;

    /// Deletes the claim on `key` if `token` still holds it.
    fn release<'a>(&'a self, key: &'a str, token: &'a str)
    -> BoxFuture<'a, Result<(), DedupError>>;

    /// Extends the claim on `key` to `lease` from now, if `token` still holds it. Returns whether
    /// it did.
    fn extend<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>>;
}
