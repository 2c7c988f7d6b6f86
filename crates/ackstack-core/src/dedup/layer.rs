//! [`DedupLayer`]: the layer that claims, runs and completes or releases a delivery's key.

use crate::config::later;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::context::{Context, StoreHooks};
use crate::delivery::Delivery;
use crate::error::{ErrorKind, Failure};
use crate::handler::{Layer, Process};
use crate::outcome::Outcome;

use super::{Claim, DedupConfig, DedupKey, DedupStore, OnStoreError, ShowKey};

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
            let claimed = self.store.claim(key, token, self.config.claim_lease).await;
            cx.note_store(claimed.is_ok());
            let wait = match claimed {
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
                cx.metrics().dedup_held.increment(1);
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
                        inner_cx.cancel_work();
                    }
                }
            }
        }
    }
}

impl<P: Process> Process for Dedup<P> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        let Some(key) = self.key.extract(delivery) else {
            cx.note_keyless();
            return self.inner.process(delivery, cx).await;
        };
        let key = &key[..];
        let token = claim_token();
        match self.claim(key, &token, cx).await {
            Claimed::Acquired => {}
            Claimed::Done => {
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
            Outcome::Ack => {
                // Done before ack, and as soon as the handler succeeded: a crash from here on
                // leaves at most this one round trip's marks unwritten. A failure is logged,
                // not returned: the effect happened, so acking is still right.
                match self.store.complete(key, &token, self.config.done_ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(key = %ShowKey(key), "dedup claim had lapsed before completion")
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, key = %ShowKey(key), "could not mark the dedup key done")
                    }
                }
            }
            _ => {
                if let Err(err) = self.store.release(key, &token).await {
                    tracing::warn!(error = %err, key = %ShowKey(key), "could not release the dedup claim; it lapses with its lease");
                }
            }
        }
        outcome
    }
}

/// A fresh random claim token: 128 bits as 32 lowercase hex digits (written by hand: the
/// `format!` machinery cost about 1,500 instructions per delivery).
fn claim_token() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random();
    let mut token = String::with_capacity(32);
    for shift in (0..32).rev() {
        let digit = ((bits >> (shift * 4)) & 0xf) as usize;
        token.push(char::from(HEX[digit]));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::claim_token;

    #[test]
    fn claim_tokens_are_32_hex_digits_and_differ() {
        let (a, b) = (claim_token(), claim_token());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
