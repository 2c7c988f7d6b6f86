//! [`RelayConfig`]: how an [`OutboxRelay`](crate::OutboxRelay) claims, retries and waits.

use std::time::Duration;

use ackstack_core::Backoff;

use crate::error::InboxError;

/// Settings of an [`OutboxRelay`](crate::OutboxRelay).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The most rows claimed (and published concurrently, one key after another) per round.
    /// Default 100.
    pub batch_size: usize,
    /// How often the relay looks for rows without being notified: the fallback for lost
    /// notifications and for rows whose retry became due. Default 1 s.
    pub poll_interval: Duration,
    /// Whether to `LISTEN` for the notifications of committing transactions (needs an inbox
    /// made by [`PgInbox::new`]; one made from your pool is polled). Default on.
    pub listen: bool,
    /// The wait before a row whose publish failed is tried again, by its attempt number
    /// (equal jitter). Default 1 s doubling to 60 s.
    pub backoff: Backoff,
    /// Park a row after this many failed publishes (0, the default: never; an outage only
    /// delays rows, and the `oldest pending` alert tells). Refusals park at once.
    pub park_after: u32,
    /// The longest one publish may take before it counts as failed, and the longest a round
    /// keeps starting publishes: rows not started by then wait for the next round (the
    /// round's transaction, its locks and its connection are held while it publishes).
    /// Default 30 s.
    pub send_timeout: Duration,
    /// How long sent rows are kept (for audits); zero, the default, deletes each row as soon
    /// as its publish is confirmed.
    pub keep_sent: Duration,
    /// How often the pending/parked counts are queried for metrics and [`RelayStats`].
    /// Default 10 s.
    pub status_interval: Duration,
    /// How long the relay waits after a notification before it claims, so that the rows of
    /// transactions committing right after the one that notified go in the same round. Fewer,
    /// fuller rounds cost fewer transactions; each event waits this much longer. Default 5 ms;
    /// zero claims at once.
    pub gather: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            listen: true,
            backoff: Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)),
            park_after: 0,
            send_timeout: Duration::from_secs(30),
            keep_sent: Duration::ZERO,
            status_interval: Duration::from_secs(10),
            gather: Duration::from_millis(5),
        }
    }
}

impl RelayConfig {
    /// With up to `n` rows per round.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// With this poll interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// With `LISTEN` on or off.
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }

    /// With this backoff between a row's failed publishes.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// With this backoff between a row's failed publishes.
    #[deprecated(note = "named for what it sets: use `backoff`")]
    pub fn retry(self, backoff: Backoff) -> Self {
        self.backoff(backoff)
    }

    /// Parking rows after `n` failed publishes (0: never).
    pub fn park_after(mut self, n: u32) -> Self {
        self.park_after = n;
        self
    }

    /// With this bound on one publish.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Keeping sent rows this long.
    pub fn keep_sent(mut self, retention: Duration) -> Self {
        self.keep_sent = retention;
        self
    }

    /// Querying the status this often.
    pub fn status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval;
        self
    }

    /// Waiting this long after a notification.
    pub fn gather(mut self, wait: Duration) -> Self {
        self.gather = wait;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), InboxError> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(InboxError::Config(
                "relay batch_size must be between 1 and 10000".into(),
            ));
        }
        for (name, value) in [
            ("poll_interval", self.poll_interval),
            ("send_timeout", self.send_timeout),
            ("status_interval", self.status_interval),
        ] {
            if value.is_zero() {
                return Err(InboxError::Config(format!("relay {name} must not be zero")));
            }
        }
        if i32::try_from(self.park_after).is_err() {
            return Err(InboxError::Config("relay park_after is too large".into()));
        }
        Ok(())
    }
}
