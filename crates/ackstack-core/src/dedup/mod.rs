//! Deduplication: a store protocol that marks a key done only after success (invariant 5 in docs/CONTRACT.md), the
//! layer that applies it, key extractors, and an in-memory store.
//!
//! Per delivery with a key:
//!
//! 1. **claim** the key with a lease and a fresh token (`SET key token NX PX lease`);
//!    - already **done**: ack without calling the handler;
//!    - **busy** (claimed by another worker), or the store unreachable (fail-closed, the
//!      default): hold the delivery in process, its lease kept and its concurrency permit held,
//!      and claim again with backoff, **with the same token** (a claim whose reply was lost
//!      after the store applied it is recognised as ours), until the store answers, the lease
//!      is lost or shutdown. Waiting is not a handler attempt: it never moves the message
//!      toward its attempt limit. When the consumer begins to shut down, a held delivery is
//!      released for redelivery ([`Outcome::Release`](crate::Outcome::Release)). Fail-open (by option) calls the
//!      handler without a claim.
//! 2. run the handler, **extending** the claim while it runs;
//! 3. on ack, **complete**: replace the claim by a done marker with a TTL (only if the token
//!    still matches), before the broker hears the ack; on retry or dead-letter, **release**
//!    the claim (compare-and-delete). The mark is written as soon as the handler succeeded,
//!    so a crash leaves at most the marks of that one store round trip unwritten; marks of
//!    deliveries finishing together share a pipeline in a pipelining store (Redis).
//!
//! Keys are bytes, never a lossy string conversion: two binary ids that differ are two keys. A
//! missing or empty key means "not deduplicated" (counted in `ackstack_dedup_keyless_total`).
//!
//! Marking a key before the handler runs would lose every message whose first attempt fails;
//! this protocol never does that.
//!
//! The files: this one has the store protocol ([`DedupStore`], [`Claim`]) and the settings
//! ([`DedupKey`], [`DedupConfig`]); `layer.rs` the layer that runs it; `memory_store.rs` the
//! in-memory store.

mod layer;
mod memory_store;

pub use crate::context::StoreHooks;
pub use layer::{Dedup, DedupLayer};
pub use memory_store::MemoryDedupStore;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delivery::Delivery;

/// A boxed future, as the object-safe [`DedupStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The key is ours until the lease runs out or we complete or release it. Also the answer
    /// to a repeated claim with the token that already holds the key.
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

/// A shared store of claimed and done keys. Keys are raw bytes.
///
/// Object-safe (methods return boxed futures), so the runner holds any store as
/// `Arc<dyn DedupStore>`; the boxing costs one small allocation next to a network round trip.
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for `lease` with `token`, unless it is done or claimed by another token. A
    /// claim by the token that already holds the key refreshes its lease and is
    /// [`Claim::Acquired`].
    fn claim<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>>;

    /// Marks `key` done for `ttl`, if `token` still holds its claim. Returns whether it did (a
    /// `false` means the claim had lapsed; the key is then left as it is).
    fn complete<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>>;

    /// Marks every `(key, token)` of `marks` done for `ttl`, each as
    /// [`complete`](Self::complete) would; one answer per mark, in order. The runner calls it
    /// with the marks of one ack batch, right before the batch is acked. The default completes
    /// them one after another; a store that can send them together overrides it (the Redis
    /// store: one pipeline).
    fn complete_all<'a>(
        &'a self,
        marks: &'a [(&'a [u8], &'a str)],
        ttl: Duration,
    ) -> BoxFuture<'a, Vec<Result<bool, DedupError>>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(marks.len());
            for (key, token) in marks {
                out.push(self.complete(key, token, ttl).await);
            }
            out
        })
    }

    /// Deletes the claim on `key` if `token` still holds it.
    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>>;

    /// Extends the claim on `key` to `lease` from now, if `token` still holds it. Returns whether
    /// it did.
    fn extend<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>>;
}

/// A function computing a delivery's dedup key.
pub type KeyFn = Arc<dyn Fn(&Delivery) -> Option<Vec<u8>> + Send + Sync>;

/// How a delivery's dedup key is found.
#[derive(Clone)]
#[non_exhaustive]
pub enum DedupKey {
    /// The value of this header, as bytes (deliveries without it are not deduplicated).
    Header(String),
    /// The message id.
    MessageId,
    /// A function of the delivery, e.g. a field of the decoded payload.
    Func(KeyFn),
}

impl std::fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DedupKey::Header(h) => write!(f, "Header({h:?})"),
            DedupKey::MessageId => write!(f, "MessageId"),
            DedupKey::Func(_) => write!(f, "Func(..)"),
        }
    }
}

impl DedupKey {
    /// The key of `delivery`, if it has a non-empty one. Header values are taken byte for byte.
    pub fn extract<'d>(&self, delivery: &'d Delivery) -> Option<Cow<'d, [u8]>> {
        let key = match self {
            DedupKey::Header(name) => delivery.headers.get(name).map(|v| Cow::Borrowed(&v[..])),
            DedupKey::MessageId => delivery
                .message_id
                .as_deref()
                .map(|id| Cow::Borrowed(id.as_bytes())),
            DedupKey::Func(f) => f(delivery).map(Cow::Owned),
        };
        key.filter(|k| !k.is_empty())
    }

    /// A key computed by `f` (a `String`, `&str` or `Vec<u8>`; `None` or empty: not
    /// deduplicated).
    pub fn from_fn<K: Into<Vec<u8>>>(
        f: impl Fn(&Delivery) -> Option<K> + Send + Sync + 'static,
    ) -> Self {
        DedupKey::Func(Arc::new(move |d| f(d).map(Into::into)))
    }
}

/// A dedup key for logs: text where it is UTF-8, escaped bytes otherwise.
struct ShowKey<'a>(&'a [u8]);

impl std::fmt::Display for ShowKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

/// What happens when the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnStoreError {
    /// Retry the delivery later without calling the handler (the default): no duplicate
    /// effects, at the price of waiting for the store.
    #[default]
    FailClosed,
    /// Call the handler anyway: no waiting, at the price of possible duplicate effects.
    FailOpen,
}

/// Deduplication settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DedupConfig {
    /// How long a claim lasts before it must be extended (a crashed worker's claim lapses
    /// after this).
    #[serde(with = "crate::config::duration")]
    pub claim_lease: Duration,
    /// How long a done marker is kept: duplicates arriving later are processed again.
    #[serde(with = "crate::config::duration")]
    pub done_ttl: Duration,
    /// Store failures: fail closed (default) or open.
    pub on_store_error: OnStoreError,
    /// When the store is unreachable (fail-closed), the longest pause between claims of a
    /// delivery held in process (the pauses grow from 100 ms up to this).
    #[serde(with = "crate::config::duration")]
    pub store_retry_after: Duration,
    /// When another worker holds the key, the longest pause before claiming again (at most
    /// the other claim's remaining lease).
    #[serde(with = "crate::config::duration")]
    pub busy_retry_after: Duration,
}

impl Default for DedupConfig {
    /// 30 s claims, done kept 24 h, fail-closed, retry after 5 s when the store is down and
    /// after 1 s when the key is busy.
    fn default() -> Self {
        DedupConfig {
            claim_lease: Duration::from_secs(30),
            done_ttl: Duration::from_secs(24 * 3600),
            on_store_error: OnStoreError::FailClosed,
            store_retry_after: Duration::from_secs(5),
            busy_retry_after: Duration::from_secs(1),
        }
    }
}
