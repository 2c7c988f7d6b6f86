//! [`Flow`]: how the poll thread sleeps without polling every queue in turn. A partition
//! queue that becomes non-empty, a settler with work for the thread, or a receive that makes
//! room in a full channel wakes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Wakes the poll thread: records arrived, or the runner made room.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    woken: Mutex<bool>,
    cv: Condvar,
    /// Set by the poll thread before it sleeps on a full channel; a receive that finds it set
    /// wakes the thread.
    wants_room: AtomicBool,
}

impl Flow {
    /// Wakes the poll thread (or makes its next wait return at once).
    pub(crate) fn wake(&self) {
        *self.lock() = true;
        self.cv.notify_one();
    }

    /// Forgets earlier wake-ups: called before the thread looks at its queues, so a wake-up
    /// after that look is never lost.
    pub(crate) fn reset(&self) {
        *self.lock() = false;
    }

    /// Sleeps until woken or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) {
        let woken = self.lock();
        let (mut woken, _) = self
            .cv
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(PoisonError::into_inner);
        *woken = false;
    }

    /// Asks the next receive to wake the thread once it has taken records.
    pub(crate) fn want_room(&self) {
        self.wants_room.store(true, Ordering::SeqCst);
    }

    /// Called by a receive after it took records: wakes the thread if it waits for room.
    pub(crate) fn room_made(&self) {
        if self.wants_room.load(Ordering::SeqCst) && self.wants_room.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.woken.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_wake_before_the_wait_is_not_lost_and_a_reset_forgets_it() {
        let flow = Flow::default();
        flow.wake();
        let t = Instant::now();
        flow.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
        flow.wake();
        flow.reset();
        let t = Instant::now();
        flow.wait(Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn room_made_wakes_only_a_thread_that_asked_for_room() {
        let flow = Arc::new(Flow::default());
        flow.room_made();
        let t = Instant::now();
        flow.wait(Duration::from_millis(50));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "woken without asking"
        );
        flow.want_room();
        let f = flow.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            f.room_made();
        });
        let t = Instant::now();
        flow.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
        waker.join().unwrap();
    }
}
