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

use crate::config::later;
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::delivery::Delivery;
use crate::error::{ErrorKind, Failure};
use crate::handler::{Context, Layer, Process};
use crate::outcome::Outcome;

/// A function computing a delivery's dedup key.
pub type KeyFn = Arc<dyn Fn(&Delivery) -> Option<String> + Send + Sync>;

/// How a delivery's dedup key is found.
#[derive(Clone)]
pub enum DedupKey {
    /// The value of this header (deliveries without it are not deduplicated).
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
    /// The key of `delivery`, if it has one.
    pub fn extract(&self, delivery: &Delivery) -> Option<String> {
        match self {
            DedupKey::Header(name) => delivery
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            DedupKey::MessageId => delivery.message_id.clone(),
            DedupKey::Func(f) => f(delivery),
        }
    }

    /// A key computed by `f`.
    pub fn from_fn(f: impl Fn(&Delivery) -> Option<String> + Send + Sync + 'static) -> Self {
        DedupKey::Func(Arc::new(f))
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
    /// When the store is unreachable (fail-closed), how long until the delivery is retried.
    #[serde(with = "crate::config::duration")]
    pub store_retry_after: Duration,
    /// When another worker holds the key, how long until the delivery is retried (at most the
    /// other claim's remaining lease).
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

impl<P: Process> Dedup<P> {
    fn store_unavailable(&self, err: &DedupError) -> Outcome {
        tracing::warn!(error = %err, "dedup store unavailable; failing closed");
        Outcome::Retry {
            after: self.config.store_retry_after,
            failure: Failure::new(
                ErrorKind::Transient,
                format!("dedup store unavailable: {err}"),
            ),
        }
    }

    /// Runs the inner process while extending the claim at half its lease.
    async fn run_claimed(
        &self,
        key: &str,
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
                            after: self.config.busy_retry_after,
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
                            tracing::warn!(error = %err, key, "could not extend the dedup claim");
                            lost = Instant::now() >= held_until;
                            next = later(Instant::now(), every / 4);
                        }
                    }
                    if lost {
                        tracing::warn!(key, "dedup claim lost while the handler ran; cancelling it");
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
            return self.inner.process(delivery, cx).await;
        };
        let token = claim_token();
        match self
            .store
            .claim(&key, &token, self.config.claim_lease)
            .await
        {
            Ok(Claim::Acquired) => {}
            Ok(Claim::Done) => {
                metrics::counter!(crate::metrics::DEDUPLICATED).increment(1);
                cx.note_deduplicated();
                tracing::debug!(key, "already processed; acking without calling the handler");
                return Outcome::Ack;
            }
            Ok(Claim::Busy { expires_in }) => {
                let after = expires_in
                    .unwrap_or(self.config.claim_lease)
                    .min(self.config.busy_retry_after);
                return Outcome::Retry {
                    after,
                    failure: Failure::new(
                        ErrorKind::Transient,
                        "dedup key is being processed by another worker",
                    ),
                };
            }
            Err(err) => {
                return match self.config.on_store_error {
                    OnStoreError::FailClosed => self.store_unavailable(&err),
                    OnStoreError::FailOpen => {
                        tracing::warn!(error = %err, "dedup store unavailable; failing open");
                        self.inner.process(delivery, cx).await
                    }
                };
            }
        }
        let outcome = self.run_claimed(&key, &token, delivery, cx).await;
        match &outcome {
            Outcome::Ack => match self
                .store
                .complete(&key, &token, self.config.done_ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::warn!(key, "dedup claim had lapsed before completion"),
                // The effect happened: acking is right; a later duplicate may run again.
                Err(err) => tracing::warn!(error = %err, key, "could not mark the dedup key done"),
            },
            _ => {
                if let Err(err) = self.store.release(&key, &token).await {
                    tracing::warn!(error = %err, key, "could not release the dedup claim; it lapses with its lease");
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
    entries: HashMap<String, Entry>,
    done_order: VecDeque<(Instant, String)>,
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
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
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
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        let answer = match s.live(key, now) {
            Some(Entry::Done { .. }) => Claim::Done,
            Some(Entry::Claimed { expires, .. }) => Claim::Busy {
                expires_in: Some(expires.saturating_duration_since(now)),
            },
            None => {
                s.entries.insert(
                    key.to_string(),
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
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        let now = Instant::now();
        let mut s = self.lock();
        let ours = matches!(s.live(key, now), Some(Entry::Claimed { token: t, .. }) if t == token);
        if ours {
            let expires = later(now, ttl);
            s.entries.insert(key.to_string(), Entry::Done { expires });
            s.done_order.push_back((expires, key.to_string()));
            s.sweep(now, self.capacity);
        }
        Box::pin(std::future::ready(Ok(ours)))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
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
        key: &'a str,
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
