//! [`Retried`]: the deliveries this process delayed for a retry, so that their next delivery
//! is not taken for a crash suspect.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

/// How many delayed messages are remembered at most.
const CAPACITY: usize = 65_536;

/// Messages this process delayed for a retry, by key (an SQS message id, a JetStream stream
/// sequence), with the attempt they were on.
///
/// Where the broker counts every delivery (SQS's receive count, JetStream's delivery count)
/// and keeps no other mark, a message delivered before and never settled may have been in
/// flight when a consumer died, and the runner runs such a suspect alone. A retry also brings
/// the message back with a higher count; when it comes back to the process that delayed it,
/// exactly one attempt later, it is this process's own retry and runs as usual. A retry
/// received by another replica runs alone once: slower, never wrong. Bounded: the oldest
/// entries are forgotten first.
#[derive(Debug)]
pub struct Retried<K> {
    inner: Mutex<(HashMap<K, u32>, VecDeque<K>)>,
}

impl<K> Default for Retried<K> {
    fn default() -> Self {
        Retried {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }
}

impl<K: Eq + Hash + Clone> Retried<K> {
    /// Remembers that the message `key`, on attempt `attempt`, was delayed for a retry.
    pub fn delayed(&self, key: K, attempt: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, order) = &mut *inner;
        if count.insert(key.clone(), attempt).is_none() {
            order.push_back(key);
        }
        while order.len() > CAPACITY {
            if let Some(old) = order.pop_front() {
                count.remove(&old);
            }
        }
    }

    /// The attempt the message `key` was on when this process delayed it, if it did (and
    /// forgets it).
    pub fn take<Q>(&self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, order) = &mut *inner;
        let then = count.remove(key)?;
        order.retain(|k| k.borrow() != key);
        Some(then)
    }

    /// Whether the message `key`, now on attempt `attempt`, comes back from a retry this
    /// process delayed one attempt ago (and forgets it).
    pub fn came_back<Q>(&self, key: &Q, attempt: u32) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.take(key)
            .is_some_and(|then| then.saturating_add(1) == attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_next_receive_of_a_delayed_message_is_its_retry() {
        let retried = Retried::<String>::default();
        retried.delayed("a".into(), 1);
        retried.delayed("b".into(), 2);
        assert!(retried.came_back("a", 2));
        assert!(!retried.came_back("a", 2), "forgotten once it came back");
        assert!(
            !retried.came_back("b", 4),
            "received in between elsewhere, or crashed: a suspect"
        );
        assert!(!retried.came_back("c", 2), "never delayed here");
    }

    #[test]
    fn it_stays_bounded() {
        let retried = Retried::<String>::default();
        for i in 0..CAPACITY + 10 {
            retried.delayed(i.to_string(), 1);
        }
        assert!(!retried.came_back("0", 2), "the oldest was forgotten");
        assert!(retried.came_back(&(CAPACITY + 9).to_string(), 2));
    }

    #[test]
    fn a_delayed_key_is_remembered_once() {
        let r = Retried::<u64>::default();
        r.delayed(7, 1);
        assert_eq!(r.take(&7), Some(1));
        assert_eq!(r.take(&7), None, "forgotten once taken");
    }
}
