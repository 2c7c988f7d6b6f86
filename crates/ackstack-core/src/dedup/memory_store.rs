//! [`MemoryDedupStore`]: the in-process store.

use crate::config::later;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{BoxFuture, Claim, DedupError, DedupStore};

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
