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
//!      released for redelivery ([`Outcome::Release`]). Fail-open (by option) calls the
//!      handler without a claim.
//! 2. run the handler, **extending** the claim while it runs;
//! 3. on ack, **complete**: replace the claim by a done marker with a TTL (only if the token
//!    still matches); on retry or dead-letter, **release** the claim (compare-and-delete).
//!
//! Keys are bytes, never a lossy string conversion: two binary ids that differ are two keys. A
//! missing or empty key means "not deduplicated" (counted in `ackstack_dedup_keyless_total`).
//!
//! Marking a key before the handler runs would lose every message whose first attempt fails;
//! this protocol never does that.

use crate::config::later;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, as the object-safe [`DedupStore`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::delivery::Delivery;
use crate::error::{ErrorKind, Failure};
use crate::handler::{Context, Layer, Process};
use crate::outcome::Outcome;

/// A function computing a delivery's dedup key.
pub type KeyFn = Arc<dyn Fn(&Delivery) -> Option<Vec<u8>> + Send + Sync>;

/// How a delivery's dedup key is found.
#[derive(Clone)]
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

/// The deduplication layer: see the module docs for the protocol.
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    key: DedupKey,
    config: DedupConfig,
}

impl std::fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupLayer")
            .field("key", &self.key)
            .field("config", &self.config)
            .finish()
    }
}

impl DedupLayer {
    /// Deduplicates by `key` in `store` with the default config.
    pub fn new(store: impl DedupStore, key: DedupKey) -> Self {
        DedupLayer::shared(Arc::new(store), key)
    }

    /// Deduplicates by `key` in a shared `store`.
    pub fn shared(store: Arc<dyn DedupStore>, key: DedupKey) -> Self {
        DedupLayer {
            store,
            key,
            config: DedupConfig::default(),
        }
    }

    /// With this config.
    pub fn config(mut self, config: DedupConfig) -> Self {
        self.config = config;
        self
    }
}

impl<P: Process> Layer<P> for DedupLayer {
    type Process = Dedup<P>;
    fn layer(&self, inner: P) -> Dedup<P> {
        Dedup {
            inner,
            store: self.store.clone(),
            key: self.key.clone(),
            config: self.config,
        }
    }
}

/// The process a [`DedupLayer`] makes.
pub struct Dedup<P> {
    inner: P,
    store: Arc<dyn DedupStore>,
    key: DedupKey,
    config: DedupConfig,
}

/// How a claim ended.
enum Claimed {
    /// Ours: run the handler.
    Acquired,
    /// Already processed.
    Done,
    /// The store failed and the policy is fail-open: run the handler without a claim.
    Open,
    /// The delivery's work was cancelled while it waited.
    Cancelled,
    /// The consumer began to shut down while the delivery waited.
    Stopping,
}

impl<P: Process> Dedup<P> {
    /// Claims `key`, holding the delivery in process while the key is busy or the store is
    /// unreachable (fail-closed). Every claim uses the same `token`.
    async fn claim(&self, key: &[u8], token: &str, cx: &Context) -> Claimed {
        let store_backoff =
            Backoff::exponential(Duration::from_millis(100), self.config.store_retry_after)
                .equal_jitter();
        let mut failures = 0u32;
        // Counts this delivery as waiting for the store (in `Status`) while it is held.
        let mut held = None;
        loop {
            let wait = match self.store.claim(key, token, self.config.claim_lease).await {
                Ok(Claim::Acquired) => return Claimed::Acquired,
                Ok(Claim::Done) => return Claimed::Done,
                Ok(Claim::Busy { expires_in }) => {
                    failures = 0;
                    if held.is_none() {
                        tracing::debug!(key = %ShowKey(key), "dedup key busy; holding the delivery until it is free");
                    }
                    expires_in
                        .unwrap_or(self.config.claim_lease)
                        .min(self.config.busy_retry_after)
                        .max(Duration::from_millis(10))
                }
                Err(err) => {
                    if self.config.on_store_error == OnStoreError::FailOpen {
                        tracing::warn!(error = %err, "dedup store unavailable; failing open");
                        return Claimed::Open;
                    }
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %err, "dedup store unavailable; holding the delivery until it answers");
                    } else {
                        tracing::debug!(error = %err, failures, "dedup store still unavailable");
                    }
                    store_backoff.delay(failures)
                }
            };
            if held.is_none() {
                metrics::counter!(crate::metrics::DEDUP_HELD).increment(1);
                held = Some(cx.stats().hold());
            }
            tokio::select! {
                biased;
                _ = cx.cancelled() => return Claimed::Cancelled,
                _ = cx.stopping() => return Claimed::Stopping,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the inner process while extending the claim at half its lease.
    async fn run_claimed(
        &self,
        key: &[u8],
        token: &str,
        delivery: &Delivery,
        cx: &Context,
    ) -> Outcome {
        // The inner process gets its own token: losing the claim cancels this delivery's work
        // without touching the runner's lease bookkeeping.
        let inner_cx = cx.child();
        let run = self.inner.process(delivery, &inner_cx);
        tokio::pin!(run);
        let lease = self.config.claim_lease;
        let every = (lease / 2).max(Duration::from_millis(10));
        let mut held_until = later(Instant::now(), lease);
        let mut next = later(Instant::now(), every);
        let mut lost = false;
        loop {
            tokio::select! {
                outcome = &mut run => {
                    if lost {
                        // Another worker may have processed the key meanwhile: do not ack; the
                        // redelivery finds the key done, or claims it again.
                        return Outcome::Retry {
                            after: Duration::ZERO,
                            failure: Failure::new(ErrorKind::Transient, "dedup claim lost while the handler ran"),
                        };
                    }
                    return outcome;
                }
                _ = tokio::time::sleep_until(next), if !lost => {
                    let asked = Instant::now();
                    match self.store.extend(key, token, lease).await {
                        Ok(true) => {
                            held_until = later(asked, lease);
                            next = later(Instant::now(), every);
                        }
                        Ok(false) => lost = true,
                        Err(err) => {
                            tracing::warn!(error = %err, key = %ShowKey(key), "could not extend the dedup claim");
                            lost = Instant::now() >= held_until;
                            next = later(Instant::now(), every / 4);
                        }
                    }
                    if lost {
                        tracing::warn!(key = %ShowKey(key), "dedup claim lost while the handler ran; cancelling it");
                        inner_cx.token().cancel();
                    }
                }
            }
        }
    }
}

impl<P: Process> Process for Dedup<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let Some(key) = self.key.extract(delivery) else {
            metrics::counter!(crate::metrics::DEDUP_KEYLESS).increment(1);
            cx.note_keyless();
            return self.inner.process(delivery, cx).await;
        };
        let key = &key[..];
        let token = claim_token();
        match self.claim(key, &token, cx).await {
            Claimed::Acquired => {}
            Claimed::Done => {
                metrics::counter!(crate::metrics::DEDUPLICATED).increment(1);
                cx.note_deduplicated();
                tracing::debug!(key = %ShowKey(key), "already processed; acking without calling the handler");
                return Outcome::Ack;
            }
            Claimed::Open => return self.inner.process(delivery, cx).await,
            // Never claimed, never attempted: give it back at once.
            Claimed::Stopping => return Outcome::Release,
            Claimed::Cancelled => {
                // Not settled by the runner (the lease is lost or the deadline passed).
                return Outcome::Retry {
                    after: Duration::ZERO,
                    failure: Failure::new(
                        ErrorKind::Transient,
                        "cancelled while waiting for the dedup store",
                    ),
                };
            }
        }
        let outcome = self.run_claimed(key, &token, delivery, cx).await;
        match &outcome {
            Outcome::Ack => match self.store.complete(key, &token, self.config.done_ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %ShowKey(key), "dedup claim had lapsed before completion")
                }
                // The effect happened: acking is right; a later duplicate may run again.
                Err(err) => {
                    tracing::warn!(error = %err, key = %ShowKey(key), "could not mark the dedup key done")
                }
            },
            _ => {
                if let Err(err) = self.store.release(key, &token).await {
                    tracing::warn!(error = %err, key = %ShowKey(key), "could not release the dedup claim; it lapses with its lease");
                }
            }
        }
        outcome
    }
}

fn claim_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// An in-process [`DedupStore`]: for tests, examples and single-process consumers.
///
/// Bounded: done markers beyond `capacity` are evicted oldest first (a duplicate of an evicted
/// key is processed again), and expired entries are swept as new ones arrive.
#[derive(Debug)]
pub struct MemoryDedupStore {
    state: Mutex<MemoryDedupState>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct MemoryDedupState {
    entries: HashMap<Vec<u8>, Entry>,
    done_order: VecDeque<(Instant, Vec<u8>)>,
    claims_since_sweep: usize,
}

#[derive(Debug)]
enum Entry {
    Claimed { token: String, expires: Instant },
    Done { expires: Instant },
}

impl Default for MemoryDedupStore {
    fn default() -> Self {
        MemoryDedupStore::with_capacity(1_000_000)
    }
}

impl MemoryDedupStore {
    /// A store keeping at most one million done keys.
    pub fn new() -> Self {
        MemoryDedupStore::default()
    }

    /// A store keeping at most `capacity` done keys.
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryDedupStore {
            state: Mutex::new(MemoryDedupState::default()),
            capacity: capacity.max(1),
        }
    }

    /// How many keys (claimed or done) are held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryDedupState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MemoryDedupState {
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut Entry> {
        let expired = match self.entries.get(key) {
            Some(Entry::Claimed { expires, .. }) | Some(Entry::Done { expires }) => *expires <= now,
            None => return None,
        };
        if expired {
            self.entries.remove(key);
            return None;
        }
        self.entries.get_mut(key)
    }

    /// Drops expired claims (left by workers that died) once enough new claims have arrived
    /// since the last sweep: amortised constant time per claim.
    fn sweep_claims(&mut self, now: Instant) {
        self.claims_since_sweep += 1;
        if self.claims_since_sweep < self.entries.len().max(1024) {
            return;
        }
        self.claims_since_sweep = 0;
        self.entries
            .retain(|_, e| !matches!(e, Entry::Claimed { expires, .. } if *expires <= now));
    }

    fn sweep(&mut self, now: Instant, capacity: usize) {
        while let Some((expires, key)) = self.done_order.front() {
            if *expires > now && self.done_order.len() <= capacity {
                break;
            }
            if let Some(Entry::Done { expires: e }) = self.entries.get(key)
                && e == expires
            {
                self.entries.remove(key);
            }
            self.done_order.pop_front();
        }
    }
}

impl DedupStore for MemoryDedupStore {
    fn claim<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        let answer = match s.live(key, now) {
            Some(Entry::Done { .. }) => Claim::Done,
            Some(Entry::Claimed { token: t, expires }) if t == token => {
                *expires = later(now, lease);
                Claim::Acquired
            }
            Some(Entry::Claimed { expires, .. }) => Claim::Busy {
                expires_in: Some(expires.saturating_duration_since(now)),
            },
            None => {
                s.entries.insert(
                    key.to_vec(),
                    Entry::Claimed {
                        token: token.to_string(),
                        expires: later(now, lease),
                    },
                );
                s.sweep_claims(now);
                Claim::Acquired
            }
        };
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        let ours = matches!(s.live(key, now), Some(Entry::Claimed { token: t, .. }) if t == token);
        if ours {
            let expires = later(now, ttl);
            s.entries.insert(key.to_vec(), Entry::Done { expires });
            s.done_order.push_back((expires, key.to_vec()));
            s.sweep(now, self.capacity);
        }
        Box::pin(std::future::ready(Ok(ours)))
    }

    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        if matches!(s.live(key, now), Some(Entry::Claimed { token: t, .. }) if t == token) {
            s.entries.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn extend<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        let extended = match s.live(key, now) {
            Some(Entry::Claimed { token: t, expires }) if t == token => {
                *expires = later(now, lease);
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(extended)))
    }
}
