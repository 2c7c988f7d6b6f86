//! The messages this process delayed for a retry, so that their next receive is not taken
//! for a crash suspect.
//!
//! SQS counts every receive (`ApproximateReceiveCount`) and keeps no other mark: a message
//! received before and never settled may have been in flight when a consumer died, and the
//! runner runs such a suspect alone. A retry is delayed with `ChangeMessageVisibility`, which
//! also brings the message back with a higher count; when it comes back to the process that
//! delayed it, exactly one receive later, it is this process's own retry and runs as usual.
//! A retry received by another replica runs alone once: slower, never wrong. Bounded: the
//! oldest entries are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// How many delayed messages are remembered at most.
const CAPACITY: usize = 65_536;

/// Message ids this process delayed, with the receive count they had then.
#[derive(Debug, Default)]
pub(crate) struct Retried {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    count: HashMap<String, u32>,
    order: VecDeque<String>,
}

impl Retried {
    /// Remembers that the message `id`, received `receives` times, was delayed for a retry.
    pub(crate) fn delayed(&self, id: &str, receives: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.count.insert(id.to_string(), receives).is_none() {
            inner.order.push_back(id.to_string());
        }
        while inner.order.len() > CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.count.remove(&old);
            }
        }
    }

    /// Whether the message `id`, now received `receives` times, comes back from a retry this
    /// process delayed one receive ago (and forgets it).
    pub(crate) fn came_back(&self, id: &str, receives: u32) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.count.remove(id) {
            Some(then) => {
                inner.order.retain(|o| o != id);
                then.saturating_add(1) == receives
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_next_receive_of_a_delayed_message_is_its_retry() {
        let retried = Retried::default();
        retried.delayed("a", 1);
        retried.delayed("b", 2);
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
        let retried = Retried::default();
        for i in 0..CAPACITY + 10 {
            retried.delayed(&i.to_string(), 1);
        }
        assert!(!retried.came_back("0", 2), "the oldest was forgotten");
        assert!(retried.came_back(&(CAPACITY + 9).to_string(), 2));
    }
}
