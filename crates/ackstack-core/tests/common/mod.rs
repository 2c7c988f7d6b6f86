//! Helpers shared by the core's integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack_core::dedup::{BoxFuture, Claim, DedupError, DedupStore};
use ackstack_core::memory::MemoryBroker;
use ackstack_core::{Backoff, Consumer, MemoryDedupStore, Source, Summary, handler_fn};

/// Exponential from 20 ms to 100 ms, no jitter.
pub fn fast_retry() -> Backoff {
    Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100)).no_jitter()
}

/// Runs `consumer` with a handler that succeeds and counts its calls, until `broker`'s queue
/// `q` is empty (or 20 s); returns the count and the summary.
pub async fn run_counting<S: Source>(
    consumer: Consumer<S>,
    broker: &MemoryBroker,
) -> (u32, Summary) {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let b = broker.clone();
    let summary = consumer
        .run_until(
            handler_fn(move |_d, _cx| {
                c.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    (calls.load(Ordering::SeqCst), summary)
}

/// Resolves when `done` holds, or after 20 s (the test's assertions then fail).
pub async fn until(done: impl Fn() -> bool + Send + 'static) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A store that is down while `down` is set, and can lose the reply of the first claim it
/// applies.
pub struct Outage {
    pub inner: MemoryDedupStore,
    pub down: AtomicBool,
    pub lose_first_reply: AtomicBool,
    pub claims: AtomicUsize,
}

impl Outage {
    pub fn new(down: bool, lose_first_reply: bool) -> Arc<Self> {
        Arc::new(Outage {
            inner: MemoryDedupStore::new(),
            down: AtomicBool::new(down),
            lose_first_reply: AtomicBool::new(lose_first_reply),
            claims: AtomicUsize::new(0),
        })
    }

    fn err() -> DedupError {
        DedupError("store down".into())
    }
}

impl DedupStore for Outage {
    fn claim<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        Box::pin(async move {
            self.claims.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Self::err());
            }
            let answer = self.inner.claim(key, token, lease).await;
            if self.lose_first_reply.swap(false, Ordering::SeqCst) {
                // Applied, but the reply timed out.
                return Err(Self::err());
            }
            answer
        })
    }
    fn complete<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        self.inner.complete(key, token, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        self.inner.release(key, token)
    }
    fn extend<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        self.inner.extend(key, token, lease)
    }
}
