//! The batch acker: coalesces acks up to the broker's batch size or a maximum delay, whichever
//! comes first (invariant 7 in docs/CONTRACT.md).
//!
//! Completed deliveries are queued here by the runner; one task sends them to
//! [`Settle::ack`] in batches. The ack calls (up to the adapter's parallel acks) run inside
//! that task and start in the order their batches were gathered, so a settler that acks
//! cumulatively (RabbitMQ's `multiple=true`, Kafka's offsets) sees completions in the order
//! they were queued. A failed ack is counted and logged, never retried into a loss:
//! the broker redelivers the message, and deduplication absorbs the repeat. Everything queued
//! is flushed when the acker is shut down.
//!
//! The acker task is woken once per batch: by the batch's first ack, then only when the batch
//! is full, a flush is asked for, or its delay is up. Acks queued in between do not wake it
//! (a wake per ack moved a thread from core to core for every delivery when deliveries finish
//! one at a time).

use crate::config::later;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::lease::LeaseGuard;
use crate::metrics::Metrics;
use crate::source::Settle;

/// Counts kept by the acker, and the consumer's metric handles it records into.
#[derive(Debug)]
pub struct AckStats {
    metrics: Arc<Metrics>,
    /// Tokens the broker acknowledged.
    pub acked: AtomicU64,
    /// Tokens the broker refused.
    pub failed: AtomicU64,
    /// Ack calls made.
    pub calls: AtomicU64,
    /// Tokens not sent because their lease was lost while they waited.
    pub lost: AtomicU64,
}

/// A token waiting to be acked, with the lease kept until the broker confirmed the ack.
struct Pending<T> {
    token: T,
    lease: Option<LeaseGuard<T>>,
}

/// What the queue carries: a token to ack, or a request to send everything queued before it
/// now and answer once the broker has it.
enum Item<T> {
    Ack(Pending<T>),
    Flush(oneshot::Sender<()>),
}

/// What wakes the acker while it gathers a batch.
#[derive(Debug)]
struct Signal {
    /// Acks queued and not sent yet: those waiting in the channel and those in the batch
    /// being gathered (so that the push that completes a batch wakes the acker).
    queued: AtomicUsize,
    /// When `queued` reaches this, the acker is woken.
    max_batch: usize,
    /// Wakes the acker: a batch is full, a flush is asked for, or the queue closed.
    wake: Notify,
}

/// One ack counted in [`Signal::queued`] until [`Counted::keep`]; uncounted when dropped
/// before that (the push failed or was cancelled).
struct Counted<'a> {
    queued: &'a AtomicUsize,
    count: usize,
    kept: bool,
}

impl<'a> Counted<'a> {
    fn new(queued: &'a AtomicUsize) -> Self {
        let count = queued.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        Counted {
            queued,
            count,
            kept: false,
        }
    }

    /// Keeps it counted (the acker uncounts it once sent); returns the count it made.
    fn keep(mut self) -> usize {
        self.kept = true;
        self.count
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A handle that queues tokens for acking.
#[derive(Debug)]
pub struct BatchAcker<T> {
    tx: mpsc::Sender<Item<T>>,
    signal: Arc<Signal>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<AckStats>,
}

/// Queues tokens for the acker; cheap to clone.
#[derive(Debug)]
pub struct AckQueue<T> {
    tx: mpsc::Sender<Item<T>>,
    signal: Arc<Signal>,
}

impl<T> Clone for AckQueue<T> {
    fn clone(&self) -> Self {
        AckQueue {
            tx: self.tx.clone(),
            signal: self.signal.clone(),
        }
    }
}

impl<T: Send + 'static> AckQueue<T> {
    /// Queues `token` for the next batch, waiting while the queue is full (backpressure on
    /// slow acks). Returns `false` if the acker has stopped (the token is then simply not
    /// acked, and the broker redelivers the message).
    pub async fn push(&self, token: T) -> bool {
        self.push_held(token, None).await
    }

    /// Like [`AckQueue::push`], keeping the delivery's lease until the ack is confirmed.
    pub(crate) async fn push_held(&self, token: T, lease: Option<LeaseGuard<T>>) -> bool {
        // Counted before it is queued, so that the acker, which uncounts what it sends,
        // never sends it uncounted; uncounted again if the push fails or is dropped.
        let counted = Counted::new(&self.signal.queued);
        if self
            .tx
            .send(Item::Ack(Pending { token, lease }))
            .await
            .is_err()
        {
            return false;
        }
        if counted.keep() >= self.signal.max_batch {
            self.signal.wake.notify_one();
        }
        true
    }

    /// Sends every ack queued so far without waiting for its batch to fill or its delay to
    /// pass, and returns once those ack calls have finished. Returns `false` if the acker
    /// has stopped.
    pub(crate) async fn flush(&self) -> bool {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Item::Flush(done)).await.is_err() {
            return false;
        }
        self.signal.wake.notify_one();
        flushed.await.is_ok()
    }
}

impl<T: Clone + Send + Sync + 'static> BatchAcker<T> {
    /// Starts an acker that sends batches of at most `max_batch` tokens to `settler`, each
    /// token waiting at most `max_delay`, with up to `parallel` ack calls in flight. At most
    /// `capacity` tokens wait; beyond that, [`AckQueue::push`] waits.
    pub fn spawn<S>(
        settler: S,
        max_batch: usize,
        max_delay: Duration,
        parallel: usize,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Self
    where
        S: Settle<Token = T>,
    {
        let (tx, rx) = mpsc::channel(capacity.max(max_batch).max(1));
        let signal = Arc::new(Signal {
            queued: AtomicUsize::new(0),
            max_batch: max_batch.max(1),
            wake: Notify::new(),
        });
        let stats = Arc::new(AckStats {
            metrics,
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(
            settler,
            rx,
            signal.clone(),
            max_delay,
            parallel.max(1),
            stats.clone(),
        ));
        BatchAcker {
            tx,
            signal,
            task,
            stats,
        }
    }

    /// A queue handle for completed deliveries.
    pub fn queue(&self) -> AckQueue<T> {
        AckQueue {
            tx: self.tx.clone(),
            signal: self.signal.clone(),
        }
    }

    /// The acker's counts.
    pub fn stats(&self) -> &Arc<AckStats> {
        &self.stats
    }

    /// Flushes everything queued (once every [`AckQueue`] is dropped) and waits for the last
    /// ack call to finish.
    pub async fn shutdown(self) {
        drop(self.tx);
        // The queue is closed: the acker sends what it holds without waiting for the delay.
        self.signal.wake.notify_one();
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "ack task failed");
        }
    }
}

async fn run<S: Settle>(
    settler: S,
    mut rx: mpsc::Receiver<Item<S::Token>>,
    signal: Arc<Signal>,
    max_delay: Duration,
    parallel: usize,
    stats: Arc<AckStats>,
) {
    let max_batch = signal.max_batch;
    // The ack calls in flight, polled by this task: each is first polled in the order its
    // batch was gathered (a task spawned per call could start before the one ahead of it,
    // and a settler that acks cumulatively would then hold its positions back).
    let mut calls = FuturesUnordered::new();
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            Some(()) = calls.next(), if !calls.is_empty() => continue,
        };
        let Some(first) = first else { break };
        let mut gathering = Gathering {
            batch: Vec::with_capacity(max_batch),
            flush: None,
            open: true,
        };
        gathering.take(first);
        let deadline = later(Instant::now(), max_delay);
        let timer = tokio::time::sleep_until(deadline);
        tokio::pin!(timer);
        loop {
            gathering.drain(&mut rx, &signal);
            if gathering.done(max_batch) {
                break;
            }
            tokio::select! {
                biased;
                () = signal.wake.notified() => {}
                () = &mut timer => {
                    gathering.drain(&mut rx, &signal);
                    break;
                }
                Some(()) = calls.next(), if !calls.is_empty() => {}
            }
        }
        let Gathering { batch, flush, open } = gathering;
        signal.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        if !batch.is_empty() {
            while calls.len() >= parallel {
                calls.next().await;
            }
            calls.push(send(settler.clone(), batch, stats.clone()));
        }
        if let Some(done) = flush {
            while calls.next().await.is_some() {}
            let _ = done.send(());
        }
        if !open {
            break;
        }
    }
    while calls.next().await.is_some() {}
}

/// One batch being gathered.
struct Gathering<T> {
    batch: Vec<Pending<T>>,
    flush: Option<oneshot::Sender<()>>,
    /// Whether the queue is still open.
    open: bool,
}

impl<T> Gathering<T> {
    fn take(&mut self, item: Item<T>) {
        match item {
            Item::Ack(p) => self.batch.push(p),
            Item::Flush(done) => self.flush = Some(done),
        }
    }

    /// Takes what is queued, up to a full batch or a flush, without waiting.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Item<T>>, signal: &Signal) {
        while self.flush.is_none() && self.batch.len() < signal.max_batch {
            match rx.try_recv() {
                Ok(item) => self.take(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
    }

    /// Whether the batch goes now: full, flushed, or the queue closed.
    fn done(&self, max_batch: usize) -> bool {
        self.flush.is_some() || self.batch.len() >= max_batch || !self.open
    }
}

async fn send<S: Settle>(settler: S, batch: Vec<Pending<S::Token>>, stats: Arc<AckStats>) {
    // A delivery whose lease was lost while its ack waited is not ours any more: the broker
    // redelivers it, so it must not be acked (invariant 6 in docs/CONTRACT.md).
    let before = batch.len();
    let batch: Vec<_> = batch
        .into_iter()
        .filter(|p| !p.lease.as_ref().is_some_and(LeaseGuard::is_lost))
        .collect();
    if batch.len() < before {
        let lost = (before - batch.len()) as u64;
        stats.lost.fetch_add(lost, Ordering::Relaxed);
        tracing::warn!(lost, "lease lost while the ack waited; not acking");
    }
    if batch.is_empty() {
        return;
    }
    let n = batch.len();
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let (tokens, leases): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.token, p.lease)).unzip();
    // A panic in the settler is contained here: the acker goes on with the next batch.
    let report = match AssertUnwindSafe(settler.ack(tokens)).catch_unwind().await {
        Ok(report) => report,
        Err(panic) => {
            stats.failed.fetch_add(n as u64, Ordering::Relaxed);
            stats.metrics.ack_failures.increment(n as u64);
            tracing::error!(
                panic = %crate::error::panic_message(panic.as_ref()),
                batch = n,
                "an ack call panicked; the broker will redeliver what it did not ack"
            );
            return;
        }
    };
    // The leases were kept until now so that no lease lapsed while its ack was on its way.
    drop(leases);
    stats
        .acked
        .fetch_add(report.acked as u64, Ordering::Relaxed);
    stats.metrics.acked.increment(report.acked as u64);
    if !report.failed.is_empty() {
        stats
            .failed
            .fetch_add(report.failed.len() as u64, Ordering::Relaxed);
        stats
            .metrics
            .ack_failures
            .increment(report.failed.len() as u64);
        for (_, err) in &report.failed {
            tracing::warn!(error = %err, batch = n, "ack failed; the broker will redeliver");
        }
    }
}

#[cfg(test)]
mod tests;
