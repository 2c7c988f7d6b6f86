//! Handlers, and the [`Process`]/[`Layer`] pair that middleware is built from. The
//! per-delivery [`Context`] is in `context.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use crate::context::Context;
use crate::delivery::Delivery;
use crate::error::{Failure, HandlerError};
use crate::outcome::Outcome;

/// The application's message handler.
///
/// Return `Ok(())` once the message's effects are durable; the delivery is acked only then.
/// Return a [`HandlerError`] to retry ([`HandlerError::transient`]) or dead-letter
/// ([`HandlerError::permanent`]). A panic counts as a transient failure.
///
/// Cancellation is cooperative: when the delivery's lease is lost (or the shutdown deadline
/// passes), [`Context::cancelled`] completes and whatever the handler returns afterwards is
/// not acked, but the handler runs on until it returns. A long handler should watch
/// [`Context::cancelled`]; one that is safe to stop at any `.await` can have its future
/// dropped at once instead with [`LeaseConfig::abort_on_loss`](crate::LeaseConfig).
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(
        &self,
        delivery: &Delivery,
        cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A [`Handler`] made from an async closure; see [`handler_fn`].
#[derive(Clone, Debug)]
pub struct HandlerFn<F>(F);

/// Makes a handler from a closure `Fn(Delivery, Context) -> impl Future<Output = Result<(), HandlerError>>`.
///
/// The closure gets owned (cheaply cloned) values so that its future can be `'static`.
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Delivery, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    HandlerFn(f)
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Delivery, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        delivery: &Delivery,
        cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.0)(delivery.clone(), cx.clone())
    }
}

impl<H: Handler> Handler for Arc<H> {
    fn handle(
        &self,
        delivery: &Delivery,
        cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(delivery, cx)
    }
}

/// One step of the processing stack: turns a delivery into an [`Outcome`].
///
/// The innermost step is a [`Handler`] wrapped by [`Terminal`]; every [`Layer`] wraps a
/// `Process` in another.
pub trait Process: Send + Sync + 'static {
    /// Processes one delivery.
    fn process(&self, delivery: &Delivery, cx: &Context) -> impl Future<Output = Outcome> + Send;
}

/// Wraps a [`Process`] in another, like `tower::Layer`.
pub trait Layer<P> {
    /// The wrapped process.
    type Process: Process;
    /// Wraps `inner`.
    fn layer(&self, inner: P) -> Self::Process;
}

/// The innermost step: runs the handler, catching panics, and maps its result to an outcome.
///
/// `Ok` is [`Outcome::Ack`]; a transient error or a panic is [`Outcome::Retry`] (with the
/// delay the error asked for, [`HandlerError::retry_after`], else zero: the retry layer
/// decides the delay and the attempt limit); a permanent error is [`Outcome::DeadLetter`].
/// A deferral ([`HandlerError::defer`]) is [`Outcome::Defer`].
#[derive(Clone)]
pub struct Terminal<H> {
    handler: H,
    classifier: Option<Classifier>,
    arrival_limit: Option<u32>,
    timeout: Option<Duration>,
}

impl<H> std::fmt::Debug for Terminal<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal").finish_non_exhaustive()
    }
}

impl<H: Handler> Terminal<H> {
    /// Wraps `handler`.
    pub fn new(handler: H) -> Self {
        Terminal {
            handler,
            classifier: None,
            arrival_limit: None,
            timeout: None,
        }
    }

    /// Fails an attempt that runs longer than `limit` (transiently), dropping its future.
    pub fn timeout(mut self, limit: Option<Duration>) -> Self {
        self.timeout = limit;
        self
    }

    /// Dead-letters, without calling the handler, a delivery whose attempt number is above
    /// `limit` on arrival: where the broker's count grows with every receive (SQS), only
    /// deliveries that ended unsettled get past the limit (ackstack's own retries stop at it),
    /// most often because the process died while handling them. Checked innermost, so that a
    /// duplicate is still acked by the dedup layer first.
    pub fn arrival_limit(mut self, limit: Option<u32>) -> Self {
        self.arrival_limit = limit;
        self
    }

    /// Classifies errors with `classifier` instead of trusting the kind the handler gave, e.g.
    /// to make a downstream's validation error permanent by downcasting it.
    pub fn classify(mut self, classifier: Option<Classifier>) -> Self {
        self.classifier = classifier;
        self
    }
}

impl<H: Handler> Process for Terminal<H> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        use futures::FutureExt;
        if let Some(limit) = self.arrival_limit
            && delivery.attempt > limit
        {
            let mut failure = Failure::new(
                crate::ErrorKind::Transient,
                format!(
                    "handed out {} times without a settlement (the consumer stopped while \
                     handling it); max_attempts is {limit}",
                    delivery.attempt - 1
                ),
            );
            failure.attempt = delivery.attempt;
            return Outcome::DeadLetter(failure);
        }
        let run = std::panic::AssertUnwindSafe(self.handler.handle(delivery, cx)).catch_unwind();
        let ran = match self.timeout {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(ran) => ran,
                Err(_) => {
                    cx.metrics().handler_timeouts.increment(1);
                    let failure = Failure::new(
                        crate::ErrorKind::Transient,
                        format!("the handler ran longer than handler_timeout ({limit:?})"),
                    );
                    return Outcome::Retry {
                        after: Duration::ZERO,
                        failure,
                    };
                }
            },
        };
        let mut asked = Duration::ZERO;
        let failure = match ran {
            Ok(Ok(())) => return Outcome::Ack,
            Ok(Err(err)) => {
                let mut failure = Failure::from_error(&err);
                if let Some(after) = err.deferred_for() {
                    // Not a failed attempt, whatever a classifier would say.
                    // A time ahead of this clock (skew, a bad header) would never run out.
                    let now = crate::clock::now();
                    let since = crate::deadletter::deferred_since(delivery)
                        .map_or(now, |since| since.min(now));
                    failure.deferred_since = Some(since);
                    return Outcome::Defer { after, failure };
                }
                if let Some(classify) = &self.classifier {
                    failure.kind = classify(&err);
                }
                asked = err.requested_delay().unwrap_or_default();
                failure
            }
            Err(panic) => {
                cx.metrics().handler_panics.increment(1);
                Failure::new(
                    crate::ErrorKind::Transient,
                    format!(
                        "handler panicked: {}",
                        crate::error::panic_message(panic.as_ref())
                    ),
                )
            }
        };
        match failure.kind {
            // The retry layer decides the delay: the backoff's, or the one asked for.
            crate::ErrorKind::Transient => Outcome::Retry {
                after: asked,
                failure,
            },
            crate::ErrorKind::Permanent => Outcome::DeadLetter(failure),
        }
    }
}

impl<P: Process> Process for Arc<P> {
    fn process(&self, delivery: &Delivery, cx: &Context) -> impl Future<Output = Outcome> + Send {
        (**self).process(delivery, cx)
    }
}

/// Two layers applied in turn: `Stack<Inner, Outer>` wraps with `Inner` first.
#[derive(Clone, Debug)]
pub struct Stack<Inner, Outer> {
    inner: Inner,
    outer: Outer,
}

impl<Inner, Outer> Stack<Inner, Outer> {
    /// `inner` wraps first, `outer` wraps the result.
    pub fn new(inner: Inner, outer: Outer) -> Self {
        Stack { inner, outer }
    }
}

impl<P, Inner, Outer> Layer<P> for Stack<Inner, Outer>
where
    Inner: Layer<P>,
    Outer: Layer<Inner::Process>,
{
    type Process = Outer::Process;
    fn layer(&self, inner: P) -> Self::Process {
        self.outer.layer(self.inner.layer(inner))
    }
}

/// The layer that adds nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity;

impl<P: Process> Layer<P> for Identity {
    type Process = P;
    fn layer(&self, inner: P) -> P {
        inner
    }
}

/// One of two processes; what an optional layer makes.
#[derive(Clone, Debug)]
pub enum Either<A, B> {
    /// The layer was present.
    Left(A),
    /// The layer was absent.
    Right(B),
}

impl<A: Process, B: Process> Process for Either<A, B> {
    async fn process(&self, delivery: &Delivery, cx: &Context) -> Outcome {
        match self {
            Either::Left(a) => a.process(delivery, cx).await,
            Either::Right(b) => b.process(delivery, cx).await,
        }
    }
}

impl<P: Process, L: Layer<P>> Layer<P> for Option<L> {
    type Process = Either<L::Process, P>;
    fn layer(&self, inner: P) -> Self::Process {
        match self {
            Some(layer) => Either::Left(layer.layer(inner)),
            None => Either::Right(inner),
        }
    }
}

/// Decides the [`ErrorKind`](crate::ErrorKind) of a handler error, overriding the kind the
/// handler gave it; see [`Terminal::classify`].
pub type Classifier = Arc<dyn Fn(&HandlerError) -> crate::ErrorKind + Send + Sync>;
