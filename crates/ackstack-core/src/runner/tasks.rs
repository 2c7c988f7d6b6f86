//! The deliveries' tasks: spawned detached, counted so that the receive loop can wait until
//! none is left, and stopped together at the shutdown deadline.
//!
//! A `JoinSet` would do the same with an allocation and two locked list operations per task,
//! and a join per task for the loop to reap. Here a task only moves a counter; the shutdown
//! deadline stops the tasks through the run's hard-stop token, which a task watches only while
//! it waits, dropping each task's future at its current `.await` as an abort would.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::Notify;

use crate::cancel::HardStop;

/// The run's delivery tasks.
#[derive(Debug)]
pub(super) struct Tasks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    running: AtomicUsize,
    /// Woken when `running` falls to zero.
    idle: Notify,
    /// Set, before `hard_stop` fires, when the tasks are to stop.
    stop: AtomicBool,
    /// Fired when the tasks are to stop (after `stop` is set).
    hard_stop: Arc<HardStop>,
}

impl Drop for Tasks {
    /// A run dropped before its end (a timeout around it, an aborted task) stops its
    /// deliveries, as dropping a `JoinSet` aborts its tasks; after a run's end, nothing is
    /// left to stop.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counts one running task while alive.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tasks {
    /// Tasks stopped through `hard_stop`.
    pub(super) fn new(hard_stop: Arc<HardStop>) -> Self {
        Tasks {
            inner: Arc::new(Inner {
                running: AtomicUsize::new(0),
                idle: Notify::new(),
                stop: AtomicBool::new(false),
                hard_stop,
            }),
        }
    }

    /// Spawns `task`, a delivery's. A lost lease does not end it (the delivery decides what a
    /// lost lease means); only [`Tasks::stop`] ends it from outside.
    ///
    /// `task` comes boxed, built in its box by the caller: a delivery's future (the delivery,
    /// its guards and the whole stack's state) is several KiB, and moving it by value into a
    /// task cell, or into a box here, copies it (callgrind: thousands of instructions of
    /// memcpy per delivery); a box moves as a pointer.
    pub(super) fn spawn<F>(&self, task: Pin<Box<F>>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(self.inner.clone());
        tokio::spawn(async move {
            until_stopped(task, &running.0).await;
            drop(running);
        });
    }

    /// Polls `task` once right here, in the caller's task, and spawns it (as
    /// [`Tasks::spawn`]) only if it is not done by then. For the receive loop when it would
    /// wait for a permit anyway: a delivery that finishes without waiting then costs no task
    /// and no wake of another thread (one handler at a time ran at a few hundredths of a
    /// hand-written loop, mostly in threads parking and waking). The first poll registers the
    /// caller's waker; the spawned task's first poll registers its own, as the `Future`
    /// contract asks of every future.
    ///
    /// A task done in that poll gives its box back, for the caller's next delivery
    /// ([`Pin::set`] puts the next future in it: no allocation).
    pub(super) async fn start<F>(&self, mut task: Pin<Box<F>>) -> Option<Pin<Box<F>>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if !self.inner.stop.load(Ordering::Acquire) {
            let first = std::future::poll_fn(|cx| Poll::Ready(poll_caught(task.as_mut(), cx)));
            if first.await.is_ready() {
                return Some(task);
            }
        }
        self.spawn(task);
        None
    }

    /// Tasks not finished yet.
    pub(super) fn len(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Returns once no task is running.
    pub(super) async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if self.len() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops every task at its current `.await` (their futures are dropped, nothing after that
    /// point runs).
    pub(super) fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.hard_stop.fire();
    }
}

/// `future` in `spare` (a box [`Tasks::start`] gave back) if there is one, else in a new box.
pub(super) fn boxed<F: Future>(spare: Option<Pin<Box<F>>>, future: F) -> Pin<Box<F>> {
    match spare {
        Some(mut spare) => {
            spare.as_mut().set(future);
            spare
        }
        None => Box::pin(future),
    }
}

/// Runs `task` until it ends or the tasks are stopped. A panic outside the handler (which
/// catches its own) is logged and ends the task.
async fn until_stopped<F: Future<Output = ()>>(mut task: Pin<Box<F>>, inner: &Inner) {
    // What wakes the task when it is to stop: registered the first time the task waits, and
    // not polled again (each poll of it locks the hard stop's shared mutexes, which every
    // waiting task would contend for). A spawned task keeps its waker, and `stop` is set
    // before the hard stop fires, so the flag says why it woke.
    let mut stopped = pin!(inner.hard_stop.token().cancelled());
    let mut watching = false;
    std::future::poll_fn(|cx| {
        // The hard stop's flag too: whatever fires it, a task it woke must not wait on.
        if inner.stop.load(Ordering::Acquire) || inner.hard_stop.is_fired() {
            return Poll::Ready(());
        }
        if poll_caught(task.as_mut(), cx).is_ready() {
            return Poll::Ready(());
        }
        if watching {
            return Poll::Pending;
        }
        watching = true;
        stopped.as_mut().poll(cx)
    })
    .await;
}

/// Polls `task` once; a panic outside the handler (which catches its own) is logged and ends
/// it, as if it were done.
fn poll_caught<F: Future<Output = ()>>(task: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<()> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| task.poll(cx))) {
        Ok(poll) => poll,
        Err(panic) => {
            tracing::error!(
                panic = %crate::error::panic_message(panic.as_ref()),
                "delivery task panicked outside the handler"
            );
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cancel::{Cancel, Slots};

    #[tokio::test(start_paused = true)]
    async fn stop_ends_tasks_that_wait_even_after_their_lease_was_lost() {
        let hard_stop = Arc::<HardStop>::default();
        let tasks = Tasks::new(hard_stop.clone());
        let reached_end = Arc::new(AtomicUsize::new(0));
        let cancels: Vec<Cancel> = Slots::batch(&hard_stop, 3).collect();
        for cancel in &cancels {
            let reached_end = reached_end.clone();
            let cancel = cancel.clone();
            tasks.spawn(Box::pin(async move {
                // Waits as a handler that watches its cancellation would, and goes on.
                cancel.cancelled().await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                reached_end.fetch_add(1, Ordering::Relaxed);
            }));
        }
        assert_eq!(tasks.len(), 3);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A lost lease fires the delivery's cancellation: its task goes on.
        cancels[0].cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(tasks.len(), 3, "a lost lease does not end the task");
        tasks.stop();
        tokio::time::timeout(Duration::from_secs(1), tasks.idle())
            .await
            .unwrap_or_else(|_| panic!("tasks still running after stop"));
        assert_eq!(
            reached_end.load(Ordering::Relaxed),
            0,
            "dropped at their await"
        );
    }

    #[tokio::test]
    async fn a_task_started_here_runs_here_until_it_waits_then_goes_on_by_itself() {
        let tasks = Tasks::new(Arc::default());
        let done = Arc::new(AtomicUsize::new(0));
        let counted = done.clone();
        tasks
            .start(Box::pin(async move {
                counted.fetch_add(1, Ordering::Relaxed);
            }))
            .await;
        assert_eq!(done.load(Ordering::Relaxed), 1, "finished within start");
        assert_eq!(tasks.len(), 0);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let counted = done.clone();
        tasks
            .start(Box::pin(async move {
                counted.fetch_add(1, Ordering::Relaxed);
                let _ = rx.await;
                counted.fetch_add(1, Ordering::Relaxed);
            }))
            .await;
        assert_eq!(done.load(Ordering::Relaxed), 2, "ran up to its first wait");
        assert_eq!(tasks.len(), 1, "then spawned");
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(5), tasks.idle())
            .await
            .unwrap_or_else(|_| panic!("the spawned rest never finished"));
        assert_eq!(done.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_started_here_is_stopped_like_any_other_and_its_panic_is_caught() {
        let hard_stop = Arc::<HardStop>::default();
        let tasks = Tasks::new(hard_stop.clone());
        tasks
            .start(Box::pin(async {
                panic!("in its first poll");
            }))
            .await;
        assert_eq!(tasks.len(), 0, "the panic ended it, the caller went on");
        let reached_end = Arc::new(AtomicUsize::new(0));
        let counted = reached_end.clone();
        tasks
            .start(Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                counted.fetch_add(1, Ordering::Relaxed);
            }))
            .await;
        assert_eq!(tasks.len(), 1);
        tasks.stop();
        tokio::time::timeout(Duration::from_secs(1), tasks.idle())
            .await
            .unwrap_or_else(|_| panic!("still running after stop"));
        assert_eq!(reached_end.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_box_given_back_carries_the_next_delivery_even_after_a_panic() {
        let tasks = Tasks::new(Arc::default());
        let done = Arc::new(AtomicUsize::new(0));
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let job = |n: usize, panics: bool| {
            let done = done.clone();
            // Held by the future as a delivery's permit is.
            let permit = permits.clone().try_acquire_owned();
            async move {
                // Taken only if the future before let go of it when it finished, not when its
                // box was reused (a failed take panics here: `done` then misses it).
                let _permit = permit.expect("the permit was released");
                if panics {
                    panic!("in its first poll");
                }
                done.fetch_add(n, Ordering::Relaxed);
            }
        };
        let spare = tasks.start(boxed(None, job(1, true))).await;
        assert!(
            spare.is_some(),
            "a caught panic ends the task in that poll too"
        );
        assert_eq!(
            permits.available_permits(),
            1,
            "released by the panic, not by a reuse"
        );
        let spare = tasks.start(boxed(spare, job(10, false))).await;
        assert_eq!(
            permits.available_permits(),
            1,
            "released when its future finished"
        );
        let spare = tasks.start(boxed(spare, job(100, false))).await;
        assert!(spare.is_some());
        assert_eq!(permits.available_permits(), 1);
        assert_eq!(
            done.load(Ordering::Relaxed),
            110,
            "each future ran once, in the same box"
        );
        assert_eq!(tasks.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_tasks_stops_what_still_runs() {
        let hard_stop = Arc::<HardStop>::default();
        let tasks = Tasks::new(hard_stop.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let _ = tx.send(());
        }));
        drop(tasks);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), rx)
                .await
                .is_ok_and(|r| r.is_err()),
            "the task's future was dropped"
        );
    }

    #[tokio::test]
    async fn idle_waits_for_every_task_and_a_panic_is_counted_out() {
        let tasks = Tasks::new(Arc::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(Box::pin(async move {
            let _ = rx.await;
        }));
        tasks.spawn(Box::pin(async {
            panic!("outside the handler");
        }));
        tokio::task::yield_now().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tasks.idle())
                .await
                .is_err(),
            "one task still waits"
        );
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(5), tasks.idle())
            .await
            .unwrap_or_else(|_| panic!("idle never answered"));
        assert_eq!(tasks.len(), 0);
    }
}
