//! Start-up: waiting for the broker, Redis and PostgreSQL to answer.

use std::future::Future;
use std::time::{Duration, Instant};

use ackstack::Backoff;

use crate::{CONNECT_TIMEOUT, Fatal};

/// Why a start-up step did not succeed.
pub enum StartError {
    /// The configuration is wrong, or the broker refused something no retry can fix (a queue
    /// declared with other arguments, access denied): give up at once (exit 1).
    Config(Fatal),
    /// The broker, Redis or PostgreSQL did not answer: wait and try again.
    Unreachable(Fatal),
}

impl StartError {
    /// `text` as a refusal no retry can fix when `permanent`, else as an unreachable service
    /// to wait for.
    pub fn from_text(permanent: bool, text: String) -> StartError {
        if permanent {
            StartError::Config(text.into())
        } else {
            StartError::Unreachable(text.into())
        }
    }
}

/// Runs `step` until it succeeds. While what it connects to is unreachable, waits with
/// backoff (logging each failure) for ever, or until `limit` (`--connect-timeout`) has passed
/// since `started`; a configuration error ends it at once. Each try is bounded too.
pub async fn until_up<T, Fut>(
    what: &str,
    started: Instant,
    limit: Option<Duration>,
    mut step: impl FnMut() -> Fut,
) -> Result<T, Fatal>
where
    Fut: Future<Output = Result<T, StartError>>,
{
    let backoff =
        Backoff::exponential(Duration::from_millis(200), Duration::from_secs(5)).equal_jitter();
    let remaining = || limit.map(|l| l.saturating_sub(started.elapsed()));
    let mut failures = 0u32;
    let mut last_error: Option<Fatal> = None;
    loop {
        let try_limit = remaining().map_or(CONNECT_TIMEOUT, |r| r.min(CONNECT_TIMEOUT));
        if let (Some(limit), Some(error)) = (limit, &last_error)
            && try_limit < Duration::from_millis(10)
        {
            return Err(
                format!("not reachable within --connect-timeout {limit:?}: {error}").into(),
            );
        }
        let error: Fatal = match tokio::time::timeout(try_limit, step()).await {
            Ok(Ok(value)) => {
                if failures > 0 {
                    tracing::warn!("{what} answered after {failures} failed tries");
                }
                return Ok(value);
            }
            Ok(Err(StartError::Config(e))) => return Err(e),
            Ok(Err(StartError::Unreachable(e))) => e,
            Err(_) => format!("{what}: no answer within {try_limit:?}").into(),
        };
        failures = failures.saturating_add(1);
        let left = remaining();
        let wait = left.map_or(backoff.delay(failures), |l| l.min(backoff.delay(failures)));
        tracing::warn!(error = %error, retry_in = ?wait, "waiting for {what}");
        last_error = Some(error);
        tokio::time::sleep(wait).await;
    }
}
