//! The wall clock that time limits counted across processes are measured with.
//!
//! [`RetryConfig::defer_limit`](crate::RetryConfig::defer_limit) is counted from a time that
//! travels with the message (a header, read by whichever process gets it next), so it needs
//! a wall-clock time, not an `Instant`. [`now`] is the system time moved on by however far
//! tokio's clock is ahead of the real one: the system time itself, except under a paused
//! clock (`#[tokio::test(start_paused = true)]`, [`testing`](crate::testing)), where it
//! follows the virtual time, so that such limits can be tested without waiting them out.

use std::time::SystemTime;

/// Now, on the clock described in the [module docs](self).
pub(crate) fn now() -> SystemTime {
    let ahead = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(std::time::Instant::now());
    SystemTime::now() + ahead
}
