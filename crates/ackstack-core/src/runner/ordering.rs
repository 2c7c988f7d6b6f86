//! Per-key ordering: a delivery whose key has an earlier delivery in flight (or retrying in
//! place) waits for it (invariant 11 in docs/CONTRACT.md).
//!
//! The gate is entered in receive order, so deliveries of one key run one at a time in the
//! order the broker gave them. State is one small entry per key with work in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

/// Per key: the sequence number of its last turn and that turn's completion signal.
type Tails = HashMap<Bytes, (u64, oneshot::Receiver<()>)>;

/// Serialises deliveries that share a key.
#[derive(Clone, Debug, Default)]
pub struct KeyGate {
    tails: Arc<Mutex<Tails>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

/// A place in a key's line: [`Turn::wait`] until the previous delivery of the key is done; drop
/// to let the next one go.
#[derive(Debug)]
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
    key: Bytes,
    seq: u64,
    gate: KeyGate,
}

impl KeyGate {
    /// An empty gate.
    pub fn new() -> Self {
        KeyGate::default()
    }

    /// Takes the next place in `key`'s line. Call in receive order.
    pub fn enter(&self, key: Bytes) -> Turn {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        let previous = tails.insert(key.clone(), (seq, rx)).map(|(_, rx)| rx);
        Turn {
            previous,
            done: Some(tx),
            key,
            seq,
            gate: self.clone(),
        }
    }

    /// Keys with work in flight.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tails.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key has work in flight.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Turn {
    /// Waits until every earlier delivery of the key has finished. Cancel-safe: waiting again
    /// after a cancelled wait resumes it.
    pub async fn wait(&mut self) {
        if let Some(previous) = &mut self.previous {
            // An error means the previous turn was dropped without sending: finished either way.
            let _ = previous.await;
            self.previous = None;
        }
    }
}

impl Turn {
    /// Lets the key's next delivery go, and forgets the key if this was its last turn.
    fn finish(gate: &KeyGate, key: &Bytes, seq: u64, done: oneshot::Sender<()>) {
        let _ = done.send(());
        let mut tails = gate.tails.lock().unwrap_or_else(|p| p.into_inner());
        if tails.get(key).is_some_and(|(last, _)| *last == seq) {
            tails.remove(key);
        }
    }
}

impl Drop for Turn {
    /// A turn that ran (or whose predecessors had all finished) lets the next one go at once.
    /// A turn left before it came (its lease lost, its partition revoked, the deadline
    /// reached) hands its place on only once the delivery ahead of it has finished, so the
    /// key's next delivery never runs beside one that is still running; the key stays in the
    /// gate until then, so a delivery entering meanwhile waits too.
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        let Some(mut previous) = self.previous.take() else {
            Turn::finish(&self.gate, &self.key, self.seq, done);
            return;
        };
        if !matches!(
            previous.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            // The one ahead has finished (or left): nothing to wait for.
            Turn::finish(&self.gate, &self.key, self.seq, done);
            return;
        }
        let (gate, key, seq) = (self.gate.clone(), self.key.clone(), self.seq);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = previous.await;
                    Turn::finish(&gate, &key, seq, done);
                });
            }
            // No runtime left to wait on: nothing of this gate runs any more.
            Err(_) => Turn::finish(&gate, &key, seq, done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_key_waits_other_keys_do_not() {
        let gate = KeyGate::new();
        let first = gate.enter(Bytes::from_static(b"a"));
        let mut second = gate.enter(Bytes::from_static(b"a"));
        let mut other = gate.enter(Bytes::from_static(b"b"));
        tokio::time::timeout(Duration::from_millis(50), other.wait())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second.wait())
                .await
                .is_err()
        );
        drop(first);
        tokio::time::timeout(Duration::from_millis(50), second.wait())
            .await
            .unwrap();
        drop(other);
        assert_eq!(gate.len(), 1, "only key a's last turn is left");
        drop(second);
        assert!(gate.is_empty());
    }

    #[tokio::test]
    async fn turns_left_before_they_came_keep_the_next_one_behind_the_running_one() {
        let key = Bytes::from_static(b"k");
        let gate = KeyGate::new();
        let running = gate.enter(key.clone());
        let mut first_waiting = gate.enter(key.clone());
        let second_waiting = gate.enter(key.clone());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), first_waiting.wait())
                .await
                .is_err()
        );
        // Both waiting deliveries lose their leases and leave without running.
        drop(first_waiting);
        drop(second_waiting);
        let mut next = gate.enter(key.clone());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), next.wait())
                .await
                .is_err(),
            "the key's next delivery started while an earlier one was still running"
        );
        drop(running);
        tokio::time::timeout(Duration::from_secs(1), next.wait())
            .await
            .unwrap();
        drop(next);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            gate.is_empty(),
            "the key is forgotten once its line is empty"
        );
    }
}
