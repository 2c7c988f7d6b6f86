//! Errors: what handlers return, what brokers fail with, and what is recorded about a failure.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A boxed error that can cross threads.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether a failure is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// May succeed later: retried with backoff until the attempt limit.
    Transient,
    /// Will never succeed: dead-lettered at once.
    Permanent,
}

impl ErrorKind {
    /// The lower-case name used in metadata and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

/// The error a [`Handler`](crate::Handler) returns: a kind, the underlying error and,
/// optionally, the delay the handler asks for before the next attempt.
///
/// `?` converts any error (`std::error::Error + Send + Sync + 'static`) into a **transient**
/// one: retried with backoff, then dead-lettered once `max_attempts` are used up. Mark what
/// can never succeed as permanent (dead-lettered at once) with [`HandlerError::permanent`] or
/// [`ResultExt::permanent`]:
///
/// ```
/// use std::time::Duration;
/// use ackstack_core::{Delivery, HandlerError, ResultExt};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the payment service said 429")]
/// struct TooManyRequests { retry_after: Duration }
///
/// async fn pay(_cents: i64) -> Result<(), TooManyRequests> { Ok(()) }
///
/// async fn handle(delivery: &Delivery) -> Result<(), HandlerError> {
///     let text = std::str::from_utf8(&delivery.payload).permanent()?; // never retried
///     let cents: i64 = text.trim().parse().permanent()?;
///     match pay(cents).await {
///         Err(e) => {
///             let after = e.retry_after;
///             Err(HandlerError::transient(e).retry_after(after)) // the service's Retry-After
///         }
///         Ok(()) => Ok(()),
///     }
/// }
/// ```
///
/// It is not itself a `std::error::Error` (as `anyhow::Error` is not), which is what lets `?`
/// convert every error that is. A `Box<dyn Error + Send + Sync>` is not one either (a rule
/// of the standard library), so `?` on it needs the kind said:
/// `.map_err(HandlerError::transient)?`. [`HandlerError::inner`] gives the underlying error, and
/// `BoxError::from(err)` a boxed one that keeps the kind: the tower integration reads it back
/// from a service's error, so one rule holds for handlers and services alike.
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    source: BoxError,
    retry_after: Option<Duration>,
    /// Set by [`HandlerError::defer`]: not a failed attempt.
    defer: bool,
}

impl HandlerError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        // A HandlerError boxed and back: unwrap it, keeping its delay.
        match source.downcast::<Kinded>() {
            Ok(kinded) => HandlerError { kind, ..kinded.0 },
            Err(source) => HandlerError {
                kind,
                source,
                retry_after: None,
                defer: false,
            },
        }
    }

    /// A boxed error as a handler error: a boxed [`HandlerError`] keeps its kind, anything
    /// else is transient.
    pub fn from_boxed(err: BoxError) -> Self {
        match err.downcast::<Kinded>() {
            Ok(kinded) => kinded.0,
            Err(other) => HandlerError::transient(other),
        }
    }

    /// A failure that may succeed on a later attempt (what `?` makes of any error).
    pub fn transient(source: impl Into<BoxError>) -> Self {
        HandlerError::new(ErrorKind::Transient, source)
    }

    /// A failure that will never succeed; the message is dead-lettered at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        HandlerError::new(ErrorKind::Permanent, source)
    }

    /// Asks for the next attempt `delay` from now instead of the backoff's delay (for
    /// example a downstream's `Retry-After`). Capped by the backoff's cap and by the longest
    /// delay the broker can honour; a zero delay asks for nothing. Only a transient error is
    /// retried: a permanent one is dead-lettered whatever it asks.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay).filter(|d| !d.is_zero());
        self
    }

    /// Defers the message: it is not ready to be handled yet (an event that arrived before
    /// the one it depends on, a resource not yet created), so it comes back `after` from now
    /// **without using an attempt**. Deferring is bounded in total time, not in count: a
    /// message deferred again and again is dead-lettered once
    /// [`RetryConfig::defer_limit`](crate::RetryConfig::defer_limit) has passed since its first
    /// deferral (reason `deferred`). `after` is at least the backoff's base, and capped by
    /// the longest delay the broker can honour and by the time left before that limit. Where
    /// deferrals wait in place (Kafka, keys held in order), the delivery's lease also bounds
    /// them: a deferral that would outlive `lease.max_total` dead-letters it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ackstack_core::HandlerError;
    ///
    /// let err = HandlerError::defer(Duration::from_secs(30));
    /// assert_eq!(err.deferred_for(), Some(Duration::from_secs(30)));
    /// ```
    pub fn defer(after: Duration) -> Self {
        HandlerError {
            kind: ErrorKind::Transient,
            source: Box::new(Deferred(after)),
            retry_after: Some(after),
            defer: true,
        }
    }

    /// How long the message asked to be deferred for, if this is a deferral
    /// ([`HandlerError::defer`]).
    pub fn deferred_for(&self) -> Option<Duration> {
        match (self.defer, self.kind) {
            (true, ErrorKind::Transient) => Some(self.retry_after.unwrap_or_default()),
            _ => None,
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The delay asked for with [`HandlerError::retry_after`].
    pub fn requested_delay(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    pub fn inner(&self) -> &(dyn StdError + Send + Sync + 'static) {
        self.source.as_ref()
    }

    /// Takes the underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// `n` copies of this error, one for each delivery of a batch that failed as a whole:
    /// the same kind, requested delay and deferral, and the same message and causes (the
    /// underlying error is shared, so it no longer downcasts to its own type).
    pub(crate) fn copies(self, n: usize) -> Vec<HandlerError> {
        let shared = Arc::new(self.source);
        (0..n)
            .map(|_| HandlerError {
                kind: self.kind,
                source: Box::new(SharedError(shared.clone())),
                retry_after: self.retry_after,
                defer: self.defer,
            })
            .collect()
    }
}

/// An error shared by several [`HandlerError`]s: displays as, and has the causes of, the
/// error it shares.
#[derive(Debug)]
struct SharedError(Arc<BoxError>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for SharedError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    /// Any error, as a transient failure.
    fn from(err: E) -> Self {
        HandlerError::transient(err)
    }
}

impl From<HandlerError> for BoxError {
    /// A boxed error whose kind and requested delay survive: [`HandlerError::new`] (and so
    /// `transient`, `permanent` and the tower integration) finds them again.
    fn from(err: HandlerError) -> Self {
        Box::new(Kinded(err))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failure: {}", self.kind.as_str(), self.source)
    }
}

/// What a deferral ([`HandlerError::defer`]) reports as its error.
#[derive(Debug)]
struct Deferred(Duration);

impl fmt::Display for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "deferred by the handler for {:?}", self.0)
    }
}

impl StdError for Deferred {}

/// A [`HandlerError`] as a `std::error::Error`, inside a [`BoxError`].
#[derive(Debug)]
struct Kinded(HandlerError);

impl fmt::Display for Kinded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for Kinded {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.0.source.as_ref())
    }
}

/// `.permanent()` on a `Result`: its error, if any, as a [`HandlerError`] that is
/// dead-lettered at once (`?` alone makes it transient).
pub trait ResultExt<T> {
    /// The error as a permanent failure.
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

/// The longest error message kept in a [`Failure`], in bytes.
pub const MAX_FAILURE_MESSAGE: usize = 1024;

/// What is recorded about a failed attempt: small, cloneable, bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// Transient or permanent.
    pub kind: ErrorKind,
    /// The error's message (with its causes), truncated to [`MAX_FAILURE_MESSAGE`] bytes.
    pub message: String,
    /// When the failure happened.
    pub at: SystemTime,
    /// The attempt that failed (1-based), once the retry layer has seen it; 0 before.
    pub attempt: u32,
    /// Set when this is a deferral ([`HandlerError::defer`]) rather than a failed attempt:
    /// when the message was first deferred. A dead letter of a deferral past
    /// [`RetryConfig::defer_limit`](crate::RetryConfig::defer_limit) has reason `deferred`.
    pub deferred_since: Option<SystemTime>,
}

impl Failure {
    /// A failure of this kind with this message (truncated), happening now.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: truncate(message.into(), MAX_FAILURE_MESSAGE),
            at: SystemTime::now(),
            attempt: 0,
            deferred_since: None,
        }
    }

    /// Records a handler error with its chain of causes.
    pub fn from_error(err: &HandlerError) -> Self {
        let mut message = err.inner().to_string();
        let mut cause = err.inner().source();
        while let Some(c) = cause {
            if message.len() > MAX_FAILURE_MESSAGE {
                break;
            }
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        Failure::new(err.kind(), message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

/// Truncates `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    // Below the marker's own 3 bytes there is no room for it: cut without a marker.
    let marked = max >= '…'.len_utf8();
    let mut end = if marked { max - '…'.len_utf8() } else { max };
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    if marked {
        s.push('…');
    }
    s
}

/// A broker failed to deliver messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The connection or channel is down; the source is reconnecting. Receiving again is right.
    #[error("broker connection lost: {0}")]
    Disconnected(#[source] BoxError),
    /// The broker answered with an error that may pass.
    #[error("broker error: {0}")]
    Broker(#[source] BoxError),
    /// The source can never work as configured (bad credentials, missing queue, bad config).
    #[error("source misconfigured: {0}")]
    Fatal(#[source] BoxError),
}

impl SourceError {
    /// Whether receiving again can succeed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Fatal(_))
    }
}

/// Settling (ack, retry, dead-letter, lease extension) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The delivery is no longer ours: its lease expired, its receipt handle is invalid, its
    /// channel closed or its partition was revoked. The broker will redeliver it; we must not
    /// act on it again.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// The broker did not confirm (a publish nack, a timeout, a network error). May pass.
    #[error("broker error: {0}")]
    Broker(#[source] BoxError),
    /// The broker rejected the request as invalid; repeating it will not help.
    #[error("rejected by the broker: {0}")]
    Rejected(String),
}

impl SettleError {
    /// Whether the delivery is lost to us (redelivery will follow).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, SettleError::LeaseLost(_))
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries() {
        let s = "é".repeat(1000);
        let t = truncate(s, 11);
        assert!(t.len() <= 11);
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short".into(), 11), "short");
        assert_eq!(truncate("short".into(), 2), "sh", "no room for the marker");
        assert_eq!(truncate("é".into(), 1), "");
    }

    #[test]
    fn failure_collects_causes_and_is_bounded() {
        let io = std::io::Error::other("disk on fire");
        let err = HandlerError::transient(io);
        let f = Failure::from_error(&err);
        assert_eq!(f.kind, ErrorKind::Transient);
        assert!(f.message.contains("disk on fire"));
        let long = HandlerError::permanent("x".repeat(10_000));
        assert!(Failure::from_error(&long).message.len() <= MAX_FAILURE_MESSAGE);
    }

    #[test]
    fn question_mark_makes_any_error_transient_and_permanent_marks_it() {
        fn parse(text: &str) -> Result<u32, HandlerError> {
            Ok(text.parse::<u32>()?)
        }
        assert_eq!(parse("x").unwrap_err().kind(), ErrorKind::Transient);
        let marked: Result<u32, HandlerError> = "x".parse::<u32>().permanent();
        assert_eq!(marked.unwrap_err().kind(), ErrorKind::Permanent);
    }

    #[test]
    fn a_boxed_handler_error_keeps_its_kind_and_delay() {
        let asked = HandlerError::permanent("no").retry_after(Duration::from_secs(3));
        let boxed = BoxError::from(asked);
        assert_eq!(HandlerError::from_boxed(boxed).kind(), ErrorKind::Permanent);
        let back = HandlerError::transient(BoxError::from(
            HandlerError::permanent("no").retry_after(Duration::from_secs(3)),
        ));
        // The constructor's kind wins; the delay and the underlying error are kept.
        assert_eq!(back.kind(), ErrorKind::Transient);
        assert_eq!(back.requested_delay(), Some(Duration::from_secs(3)));
        assert_eq!(back.inner().to_string(), "no");
        assert_eq!(
            HandlerError::transient("x")
                .retry_after(Duration::ZERO)
                .requested_delay(),
            None
        );
    }
}
