//! The wall clock that time limits counted across processes are measured with.
//!
//! [`RetryConfig::defer_limit`](crate::RetryConfig::defer_limit) is counted from a time that
//! travels with the message (a header, read by whichever process gets it next), so it needs
//! a wall-clock time, not an [`Instant`]. [`now`] is the system time when first asked, moved
//! on by tokio's clock since: the same as `SystemTime::now()` give or take the adjustments
//! made to the system clock since the process started, and it follows a paused clock
//! (`#[tokio::test(start_paused = true)]`, [`testing`](crate::testing)), so such limits can
//! be tested without waiting them out.

use std::sync::OnceLock;
use std::time::SystemTime;

use tokio::time::Instant;

static BASE: OnceLock<(SystemTime, Instant)> = OnceLock::new();

/// Now, on the clock described in the [module docs](self).
pub(crate) fn now() -> SystemTime {
    let (wall, at) = *BASE.get_or_init(|| (SystemTime::now(), Instant::now()));
    wall + Instant::now().saturating_duration_since(at)
}
