//! Batch handlers: one call for many deliveries, with an outcome for each.
//!
//! A [`BatchHandler`] gets a [`Batch`] of up to [`BatchConfig::max_size`] deliveries and
//! returns a [`BatchResults`]: for each delivery, success or the [`HandlerError`] it failed
//! with (retried, dead-lettered or deferred exactly as a single handler's error would be).
//! Returning `Err` fails every delivery of the batch with that error. Run one with
//! [`Consumer::run_batches_until`](crate::Consumer::run_batches_until).
//!
//! ```
//! use std::time::Duration;
//! use ackstack_core::batch::{Batch, BatchConfig, BatchResults, batch_handler_fn};
//! use ackstack_core::{Consumer, HandlerError, MemoryBroker, Message};
//!
//! # #[tokio::main]
//! # async fn main() {
//! let broker = MemoryBroker::new();
//! for n in 0..10 {
//!     broker.publish("rows", Message::new(n.to_string()));
//! }
//! let consumer = Consumer::new(broker.source("rows")).concurrency(20);
//! let status = consumer.status();
//! let handler = batch_handler_fn(|batch: Batch| async move {
//!     // One bulk write for the batch; a row that cannot be parsed fails alone.
//!     let mut results = BatchResults::succeeded(batch.len());
//!     for (i, delivery) in batch.deliveries().enumerate() {
//!         if std::str::from_utf8(&delivery.payload).is_err() {
//!             results.fail(i, HandlerError::permanent("not UTF-8"));
//!         }
//!     }
//!     Ok(results)
//! });
//! let batches = BatchConfig { max_size: 10, max_wait: Duration::from_millis(50) };
//! let summary = consumer
//!     .run_batches_until(handler, batches, async move {
//!         status.idle(Duration::from_millis(200)).await
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(summary.acked, 10);
//! # }
//! ```
//!
//! # How the invariants hold per delivery
//!
//! Every delivery still travels the whole processing stack on its own (retry, dedup, your
//! layers); only the innermost step, where a single handler would be called, hands it to a
//! collector ([`Batcher`]) and waits for its result. So each delivery is acked only after its
//! own success, retried with its own attempt count and backoff, dead-lettered with its own
//! metadata; its dedup key is claimed before the batch and marked done after its success,
//! before its ack; its lease is extended until it is settled, however long the batch takes. A
//! delivery whose lease is lost while it waits for its batch is left out of it. Where key
//! order is kept, a key has one delivery in flight at a time, so a batch never holds two
//! deliveries whose order matters.
//!
//! A batch is called when it holds `max_size` deliveries, when `max_wait` has passed since its
//! first one arrived, or at once when the consumer begins to stop. Batches run concurrently
//! (at most `concurrency / max_size` full ones at a time), so set
//! [`ConsumerConfig::concurrency`](crate::ConsumerConfig::concurrency) to a multiple of
//! `max_size`: two batches' worth lets the next batch fill while one runs.
//!
//! A lost lease cancels one delivery of a batch cooperatively: its
//! [`Context::cancelled`](crate::Context::cancelled) fires (each delivery's context is in
//! [`Batch::iter`]) and its result is not acked, but the call runs on for the others. With
//! [`LeaseConfig::abort_on_loss`](crate::LeaseConfig::abort_on_loss) the call is dropped once
//! none of its deliveries waits for it any more.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::context::Context;
use crate::delivery::Delivery;
use crate::error::HandlerError;
use crate::handler::Handler;

/// How deliveries are gathered into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// The most deliveries in one batch (at least 1, at most the consumer's concurrency).
    pub max_size: usize,
    /// How long a batch waits for more deliveries after its first, before it is handled
    /// with what it has.
    #[serde(with = "crate::config::duration")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    /// Up to 100 deliveries, waiting at most 50 ms for them.
    fn default() -> Self {
        BatchConfig {
            max_size: 100,
            max_wait: Duration::from_millis(50),
        }
    }
}

/// A handler of batches of deliveries; see the [module docs](self).
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles a batch: returns a result for each delivery (in the batch's order), or one
    /// error that fails them all.
    ///
    /// Return a delivery's success only once its effects are durable: it is acked then. A
    /// panic fails every delivery of the batch transiently.
    fn handle(
        &self,
        batch: &Batch,
    ) -> impl Future<Output = Result<BatchResults, HandlerError>> + Send;
}

/// A [`BatchHandler`] made from an async closure; see [`batch_handler_fn`].
#[derive(Clone, Debug)]
pub struct BatchHandlerFn<F>(F);

/// Makes a batch handler from a closure `Fn(Batch) -> impl Future<Output = Result<BatchResults, HandlerError>>`.
///
/// The closure gets the batch by value (a cheap clone) so that its future can be `'static`.
pub fn batch_handler_fn<F, Fut>(f: F) -> BatchHandlerFn<F>
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BatchResults, HandlerError>> + Send,
{
    BatchHandlerFn(f)
}

impl<F, Fut> BatchHandler for BatchHandlerFn<F>
where
    F: Fn(Batch) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<BatchResults, HandlerError>> + Send,
{
    fn handle(
        &self,
        batch: &Batch,
    ) -> impl Future<Output = Result<BatchResults, HandlerError>> + Send {
        (self.0)(batch.clone())
    }
}

impl<B: BatchHandler> BatchHandler for Arc<B> {
    fn handle(
        &self,
        batch: &Batch,
    ) -> impl Future<Output = Result<BatchResults, HandlerError>> + Send {
        (**self).handle(batch)
    }
}

/// The deliveries of one batch, each with its [`Context`]. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Batch {
    items: Arc<[(Delivery, Context)]>,
}

impl Batch {
    /// A batch of these deliveries with their contexts (for tests of a batch handler).
    pub fn new(items: Vec<(Delivery, Context)>) -> Self {
        Batch {
            items: items.into(),
        }
    }

    /// How many deliveries the batch holds (never zero when a handler gets it).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no delivery.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The deliveries, in the batch's order: the order of [`BatchResults`].
    pub fn deliveries(&self) -> impl ExactSizeIterator<Item = &Delivery> {
        self.items.iter().map(|(d, _)| d)
    }

    /// The deliveries with their contexts (each delivery's cancellation, its lease).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Delivery, &Context)> {
        self.items.iter().map(|(d, cx)| (d, cx))
    }

    /// The `index`th delivery.
    pub fn get(&self, index: usize) -> Option<&Delivery> {
        self.items.get(index).map(|(d, _)| d)
    }

    /// Whether the consumer has begun to shut down (see [`Context::is_stopping`]).
    pub fn is_stopping(&self) -> bool {
        self.items.first().is_some_and(|(_, cx)| cx.is_stopping())
    }
}

/// A batch handler's result for each delivery of its batch, in the batch's order.
///
/// Start from [`BatchResults::succeeded`] and [`fail`](BatchResults::fail) the deliveries that
/// failed, or collect one `Result` per delivery:
///
/// ```
/// use ackstack_core::HandlerError;
/// use ackstack_core::batch::BatchResults;
///
/// let results: BatchResults = ["1", "x", "3"]
///     .iter()
///     .map(|s| s.parse::<u32>().map(|_| ()).map_err(HandlerError::permanent))
///     .collect();
/// assert_eq!(results.len(), 3);
/// assert_eq!(results.failed(), 1);
/// ```
///
/// Results that do not match the batch (more or fewer than its deliveries, or a `fail` past
/// its end) are never taken as successes: the whole batch fails transiently, with an error
/// saying so.
#[derive(Debug, Default)]
pub struct BatchResults {
    results: Vec<Result<(), HandlerError>>,
    /// The first index given to `fail` that was past the end.
    out_of_range: Option<usize>,
}

impl BatchResults {
    /// Success for each of `n` deliveries.
    pub fn succeeded(n: usize) -> Self {
        BatchResults {
            results: (0..n).map(|_| Ok(())).collect(),
            out_of_range: None,
        }
    }

    /// Fails the `index`th delivery with `error`.
    pub fn fail(&mut self, index: usize, error: HandlerError) -> &mut Self {
        match self.results.get_mut(index) {
            Some(slot) => *slot = Err(error),
            None => {
                self.out_of_range.get_or_insert(index);
            }
        }
        self
    }

    /// How many results there are.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether there are no results.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// How many deliveries failed.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.is_err()).count()
    }
}

impl From<Vec<Result<(), HandlerError>>> for BatchResults {
    fn from(results: Vec<Result<(), HandlerError>>) -> Self {
        BatchResults {
            results,
            out_of_range: None,
        }
    }
}

impl FromIterator<Result<(), HandlerError>> for BatchResults {
    fn from_iter<I: IntoIterator<Item = Result<(), HandlerError>>>(iter: I) -> Self {
        BatchResults::from(iter.into_iter().collect::<Vec<_>>())
    }
}

/// One delivery waiting in the collector for its batch.
struct Waiting {
    delivery: Delivery,
    cx: Context,
    reply: oneshot::Sender<Result<(), HandlerError>>,
}

/// The [`Handler`] that gathers deliveries into batches for a [`BatchHandler`]; what
/// [`Consumer::run_batches_until`](crate::Consumer::run_batches_until) runs as the innermost
/// step of the processing stack.
pub struct Batcher<B> {
    queue: mpsc::UnboundedSender<Waiting>,
    _handler: std::marker::PhantomData<fn() -> B>,
}

impl<B> std::fmt::Debug for Batcher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<B: BatchHandler> Batcher<B> {
    /// Starts the collector of `handler`'s batches (on the current Tokio runtime); a batch
    /// call running longer than `timeout` fails all its deliveries transiently. The collector
    /// ends when the `Batcher` is dropped.
    pub fn spawn(handler: B, config: BatchConfig, timeout: Option<Duration>) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        let handler = Arc::new(handler);
        tokio::spawn(collect(handler, config, timeout, waiting));
        Batcher {
            queue,
            _handler: std::marker::PhantomData,
        }
    }
}

impl<B: BatchHandler> Handler for Batcher<B> {
    async fn handle(&self, delivery: &Delivery, cx: &Context) -> Result<(), HandlerError> {
        let (reply, result) = oneshot::channel();
        let waiting = Waiting {
            delivery: delivery.clone(),
            cx: cx.clone(),
            reply,
        };
        if self.queue.send(waiting).is_err() {
            return Err(HandlerError::transient("the batch collector has stopped"));
        }
        result.await.unwrap_or_else(|_| {
            Err(HandlerError::transient(
                "the batch holding this delivery was abandoned",
            ))
        })
    }
}

/// The collector: gathers waiting deliveries into batches and starts each batch's call. The
/// calls are its own: when the run ends (the [`Batcher`] dropped), one still running (its
/// deliveries abandoned at the shutdown deadline) is stopped.
async fn collect<B: BatchHandler>(
    handler: Arc<B>,
    config: BatchConfig,
    timeout: Option<Duration>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
) {
    let max_size = config.max_size.max(1);
    let mut calls = tokio::task::JoinSet::new();
    while let Some(first) = waiting.recv().await {
        while calls.try_join_next().is_some() {}
        let deadline = Instant::now() + config.max_wait;
        let stopping = first.cx.clone();
        let mut items = Vec::with_capacity(max_size);
        items.push(first);
        while items.len() < max_size {
            tokio::select! {
                biased;
                next = waiting.recv() => match next {
                    Some(next) => items.push(next),
                    None => break,
                },
                // Stopping: what is gathered runs now; nothing more will come.
                () = stopping.stopping() => break,
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        calls.spawn(call(handler.clone(), items, timeout));
    }
    calls.abort_all();
}

/// Calls the handler with one batch and sends each delivery its result.
async fn call<B: BatchHandler>(handler: Arc<B>, items: Vec<Waiting>, timeout: Option<Duration>) {
    use futures::FutureExt;
    // A delivery whose lease was lost while it waited (or whose task stopped waiting) is not
    // handled: its result would not be used.
    let (items, gone): (Vec<_>, Vec<_>) = items
        .into_iter()
        .partition(|w| !w.cx.is_cancelled() && !w.reply.is_closed());
    for w in gone {
        let _ = w.reply.send(Err(HandlerError::transient(
            "left out of its batch: its lease was lost",
        )));
    }
    let (replies, entries): (Vec<_>, Vec<_>) = items
        .into_iter()
        .map(|w| (w.reply, (w.delivery, w.cx)))
        .unzip();
    let batch = Batch::new(entries);
    let Some((_, cx)) = batch.items.first() else {
        return;
    };
    let metrics = cx.metrics();
    let n = batch.len();
    metrics.batch_size.record(n as f64);
    let run = std::panic::AssertUnwindSafe(handler.handle(&batch)).catch_unwind();
    let timed = async {
        match timeout {
            None => Some(run.await),
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
        }
    };
    let mut replies = replies;
    // Nobody waits for any of its results any more (every delivery's future was dropped: lost
    // leases with `abort_on_loss`, or the shutdown deadline): the call is dropped too.
    let abandoned = futures::future::join_all(replies.iter_mut().map(|r| r.closed()));
    let ran = tokio::select! {
        ran = timed => ran,
        _ = abandoned => {
            tracing::debug!("batch call dropped: none of its deliveries waits for it");
            return;
        }
    };
    let results: Vec<Result<(), HandlerError>> = match ran {
        Some(Ok(Ok(results))) if results.results.len() == n && results.out_of_range.is_none() => {
            results.results
        }
        Some(Ok(Ok(results))) => {
            let why = match results.out_of_range {
                Some(index) => format!(
                    "the batch handler failed delivery {index} of a batch of {n}: results \
                     that do not match the batch are not taken as successes"
                ),
                None => format!(
                    "the batch handler returned {} results for a batch of {n}: results that \
                     do not match the batch are not taken as successes",
                    results.results.len()
                ),
            };
            tracing::error!("{why}");
            all_fail(HandlerError::transient(why), n)
        }
        Some(Ok(Err(error))) => all_fail(error, n),
        Some(Err(panic)) => {
            metrics.handler_panics.increment(1);
            let message = crate::error::panic_message(panic.as_ref());
            all_fail(
                HandlerError::transient(format!("batch handler panicked: {message}")),
                n,
            )
        }
        None => {
            metrics.handler_timeouts.increment(1);
            all_fail(
                HandlerError::transient(format!(
                    "the batch handler ran longer than handler_timeout ({:?})",
                    timeout.unwrap_or_default()
                )),
                n,
            )
        }
    };
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply.send(result);
    }
}

/// `error` for each of `n` deliveries.
fn all_fail(error: HandlerError, n: usize) -> Vec<Result<(), HandlerError>> {
    error.copies(n).into_iter().map(Err).collect()
}
