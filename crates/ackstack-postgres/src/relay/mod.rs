//! [`OutboxRelay`]: publishes the outbox's rows after their transactions committed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ackstack_core::{Publish, PublishError};
use futures::FutureExt;

use crate::error::InboxError;
use crate::inbox::PgInbox;
use crate::listen;
use crate::outbox::{Claimed, OutboxStatus};

mod config;
mod signals;

pub use config::RelayConfig;
use signals::count;
pub use signals::{
    OUTBOX_METRICS, OUTBOX_OLDEST_PENDING_SECONDS, OUTBOX_PARKED, OUTBOX_PARKED_TOTAL,
    OUTBOX_PENDING, OUTBOX_SEND_FAILURES, OUTBOX_SENT,
};

/// The shortest wait after a failed round or a lost `LISTEN` connection, whatever the
/// backoff says (a zero base must not make a busy loop).
const MIN_WAIT: Duration = Duration::from_millis(100);

/// What a relay has done since it was made (see [`OutboxRelay::stats`]).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub sent: u64,
    /// Publishes that failed (each row is tried again after its backoff).
    pub failures: u64,
    /// Rows this relay parked.
    pub parked: u64,
    /// Rounds that ended with an error (the database unreachable, a commit lost): their rows
    /// are published again by a later round.
    pub round_errors: u64,
    /// Whether the relay is listening for notifications now.
    pub listening: bool,
    /// The outbox's status at the last query (`None` before the first, or while it fails).
    pub status: Option<OutboxStatus>,
    /// The last error of a round or of the status query, cleared by the next success.
    pub last_error: Option<String>,
}

/// What one round of [`OutboxRelay::relay_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundReport {
    /// Rows claimed (ready to send, first of their key).
    pub claimed: usize,
    /// Rows published and marked sent.
    pub sent: usize,
    /// Rows whose publish failed (tried again later).
    pub failed: usize,
    /// Rows parked.
    pub parked: usize,
}

/// A publisher behind a destination name (object-safe [`Publish`]).
trait Route: Send + Sync {
    fn send(
        &self,
        message: ackstack_core::Message,
    ) -> Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send + '_>>;
}

impl<P: Publish> Route for P {
    fn send(
        &self,
        message: ackstack_core::Message,
    ) -> Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send + '_>> {
        Box::pin(self.publish(message))
    }
}

/// How one claimed row ended in a round.
enum Sent {
    Confirmed,
    Failed(String),
    Refused(String),
    /// Not tried: an older row of its key failed in this round.
    HeldBack,
}

/// Publishes the rows handlers wrote with [`InboxTx::outbox`](crate::InboxTx::outbox), through
/// ackstack publishers, after their transactions committed.
///
/// Each round, in one transaction on the inbox's pool: claim due rows (`FOR UPDATE SKIP
/// LOCKED`, so relays in several processes share the work without sending a row twice in the
/// normal case), publish them (rows of one destination and key one after another, in the
/// order they were written; different keys concurrently), and mark the confirmed ones sent
/// (or delete them) before committing. A crash between a broker's confirmation and that
/// commit sends the row again later with the same message id: a consumer downstream that
/// deduplicates by message id (an ackstack inbox or dedup layer) applies it once.
///
/// A publish that fails is tried again after [`RelayConfig::backoff`], and holds back the rows
/// of its key behind it; one the broker refuses for good ([`PublishError::is_refused`]) is
/// parked at once: counted, listed by [`PgInbox::outbox_parked`] and `ackstack outbox parked`,
/// and back in line after [`PgInbox::outbox_retry`]. Parked rows do not hold their key back.
///
/// The relay wakes on the notification each sending transaction makes at commit
/// (`LISTEN`), and polls every [`RelayConfig::poll_interval`] besides. It rides out outages:
/// a round that fails is logged and tried again with backoff.
///
/// ```no_run
/// use std::time::Duration;
/// use ackstack_core::MemoryBroker;
/// use ackstack_postgres::{OutboxRelay, PgInbox, PgInboxConfig, RelayConfig};
///
/// # async fn run() -> Result<(), ackstack_postgres::InboxError> {
/// let inbox = PgInbox::new("postgres://postgres@127.0.0.1/test", PgInboxConfig::new("orders"))?;
/// inbox.migrate().await?;
/// let broker = MemoryBroker::new();
/// let relay = OutboxRelay::new(&inbox, RelayConfig::default())?
///     .route("payments", broker.publisher("payments"));
/// relay.run_until(tokio::time::sleep(Duration::from_secs(5))).await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct OutboxRelay {
    inbox: PgInbox,
    config: RelayConfig,
    routes: Arc<HashMap<String, Arc<dyn Route>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut destinations: Vec<&String> = self.routes.keys().collect();
        destinations.sort();
        f.debug_struct("OutboxRelay")
            .field("outbox", &self.inbox.config().outbox_table)
            .field("destinations", &destinations)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    failures: AtomicU64,
    parked: AtomicU64,
    round_errors: AtomicU64,
    listening: AtomicBool,
    status: Mutex<Option<OutboxStatus>>,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

impl OutboxRelay {
    /// A relay of `inbox`'s outbox table, with no routes yet.
    pub fn new(inbox: &PgInbox, config: RelayConfig) -> Result<OutboxRelay, InboxError> {
        config.validate()?;
        Ok(OutboxRelay {
            inbox: inbox.clone(),
            config,
            routes: Arc::default(),
            shared: Arc::default(),
        })
    }

    /// Publishes the rows written for `destination` through `publisher`. A relay claims only
    /// the rows of its destinations: rows for others wait for a relay that has them.
    pub fn route(mut self, destination: impl Into<String>, publisher: impl Publish) -> Self {
        Arc::make_mut(&mut self.routes).insert(destination.into(), Arc::new(publisher));
        self
    }

    /// Counts and the last known status (cheap; for health endpoints and tests).
    pub fn stats(&self) -> RelayStats {
        let shared = &self.shared;
        RelayStats {
            sent: shared.sent.load(Ordering::Relaxed),
            failures: shared.failures.load(Ordering::Relaxed),
            parked: shared.parked.load(Ordering::Relaxed),
            round_errors: shared.round_errors.load(Ordering::Relaxed),
            listening: shared.listening.load(Ordering::Relaxed),
            status: *shared.status.lock().unwrap_or_else(PoisonError::into_inner),
            last_error: shared
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Rows of this relay's destinations that wait to be sent (parked rows not included).
    pub async fn pending(&self) -> Result<u64, InboxError> {
        let destinations: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        let tx = self.inbox.begin().await?;
        let row = tx
            .query_one(
                self.inbox.outbox_sql().pending_for.as_str(),
                &[&destinations],
            )
            .await?;
        tx.commit().await?;
        let n: i64 = row.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One round: claims up to [`RelayConfig::batch_size`] due rows, publishes them and
    /// records the outcomes, in one transaction.
    pub async fn relay_once(&self) -> Result<RoundReport, InboxError> {
        let sql = self.inbox.outbox_sql();
        let destinations: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        let limit = i64::try_from(self.config.batch_size).unwrap_or(i64::MAX);
        let tx = self.inbox.begin().await?;
        let claim = tx.prepare_cached(&sql.claim).await?;
        let rows = tx.query(&claim, &[&limit, &destinations]).await?;
        let claimed: Vec<Claimed> = rows
            .iter()
            .map(Claimed::from_row)
            .collect::<Result<_, _>>()?;
        let mut report = RoundReport {
            claimed: claimed.len(),
            ..RoundReport::default()
        };
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(report);
        }

        // Rows of one destination and key, in id order, go one after another; keyless rows
        // and other keys concurrently.
        let mut groups: Vec<Vec<Claimed>> = Vec::new();
        let mut by_key: HashMap<(String, Vec<u8>), usize> = HashMap::new();
        for row in claimed {
            match &row.key {
                Some(key) => {
                    let slot = (row.destination.clone(), key.clone());
                    match by_key.get(&slot) {
                        Some(&i) => groups[i].push(row),
                        None => {
                            by_key.insert(slot, groups.len());
                            groups.push(vec![row]);
                        }
                    }
                }
                None => groups.push(vec![row]),
            }
        }
        // Publishes start until this deadline; what is not started by then waits for the
        // next round.
        let deadline = Instant::now() + self.config.send_timeout;
        let outcomes =
            futures::future::join_all(groups.into_iter().map(|g| self.send_group(g, deadline)))
                .await
                .into_iter()
                .flatten();

        let mut sent: Vec<i64> = Vec::new();
        let mut sent_to: Vec<String> = Vec::new();
        let (mut failed_ids, mut failed_errors, mut failed_waits) =
            (Vec::new(), Vec::new(), Vec::new());
        let (mut refused_ids, mut refused_errors) = (Vec::new(), Vec::new());
        let mut failed_to: Vec<String> = Vec::new();
        let mut refused_to: Vec<String> = Vec::new();
        for (row, outcome) in outcomes {
            match outcome {
                Sent::Confirmed => {
                    sent.push(row.id);
                    sent_to.push(row.destination);
                }
                Sent::Failed(error) => {
                    let attempt = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
                    failed_ids.push(row.id);
                    failed_errors.push(error);
                    failed_waits.push(self.config.backoff.ceiling(attempt).as_secs_f64());
                    failed_to.push(row.destination);
                }
                Sent::Refused(error) => {
                    refused_ids.push(row.id);
                    refused_errors.push(error);
                    refused_to.push(row.destination);
                }
                Sent::HeldBack => {}
            }
        }
        if !sent.is_empty() {
            let done = if self.config.keep_sent.is_zero() {
                &sql.delete_sent
            } else {
                &sql.mark_sent
            };
            let done = tx.prepare_cached(done).await?;
            tx.execute(&done, &[&sent]).await?;
        }
        if !failed_ids.is_empty() {
            let park_after = i32::try_from(self.config.park_after).unwrap_or(i32::MAX);
            // Rows past the attempt limit are parked by the same statement.
            let rows = tx
                .query(
                    sql.failed.as_str(),
                    &[&failed_ids, &failed_errors, &failed_waits, &park_after],
                )
                .await?;
            for row in rows {
                let (id, destination): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
                refused_to.push(destination);
                tracing::warn!(outbox = %sql.table, id, attempts = self.config.park_after, "outbox row parked: its publish failed as many times as park_after allows");
            }
        }
        if !refused_ids.is_empty() {
            tx.execute(sql.park.as_str(), &[&refused_ids, &refused_errors])
                .await?;
        }
        tx.commit().await?;

        report.sent = sent.len();
        report.failed = failed_ids.len();
        report.parked = refused_to.len();
        let table = &sql.table;
        count(&self.shared.sent, OUTBOX_SENT, table, &sent_to);
        count(
            &self.shared.failures,
            OUTBOX_SEND_FAILURES,
            table,
            &failed_to,
        );
        count(&self.shared.parked, OUTBOX_PARKED_TOTAL, table, &refused_to);
        for (id, error) in refused_ids.iter().zip(&refused_errors) {
            tracing::warn!(outbox = %table, id, error = %error, "outbox row parked: the broker refused it for good");
        }
        Ok(report)
    }

    /// Publishes one key's rows in order; after a failure, or once `deadline` has passed,
    /// the rest of the key waits.
    async fn send_group(&self, rows: Vec<Claimed>, deadline: Instant) -> Vec<(Claimed, Sent)> {
        let mut out = Vec::with_capacity(rows.len());
        let mut blocked = false;
        for mut row in rows {
            if blocked || Instant::now() >= deadline {
                out.push((row, Sent::HeldBack));
                continue;
            }
            let message = std::mem::replace(&mut row.message, Err(String::new()));
            let outcome = match (message, self.routes.get(&row.destination)) {
                (Err(why), _) => Sent::Refused(format!("the row is not a message: {why}")),
                (Ok(_), None) => Sent::HeldBack,
                (Ok(message), Some(route)) => {
                    match tokio::time::timeout(self.config.send_timeout, route.send(message)).await
                    {
                        Ok(Ok(())) => Sent::Confirmed,
                        Ok(Err(err)) if err.is_refused() => Sent::Refused(err.to_string()),
                        Ok(Err(err)) => Sent::Failed(err.to_string()),
                        Err(_) => Sent::Failed(format!(
                            "no confirmation within {:?}",
                            self.config.send_timeout
                        )),
                    }
                }
            };
            blocked = matches!(outcome, Sent::Failed(_));
            out.push((row, outcome));
        }
        out
    }

    /// Runs rounds until `shutdown` completes: at once when notified, every
    /// [`RelayConfig::poll_interval`] otherwise, back to back while rounds come back full.
    /// A round in progress finishes before the relay stops (its rows are marked sent). Errors
    /// are logged and retried with backoff; the relay never gives up.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let wake = Arc::new(tokio::sync::Notify::new());
        let _listener = self.spawn_listener(&wake);
        let mut next_status = Instant::now();
        let mut next_sweep = Instant::now();
        let mut errors: u32 = 0;
        loop {
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            if Instant::now() >= next_status {
                self.refresh_status().await;
                next_status = Instant::now() + self.config.status_interval;
            }
            if !self.config.keep_sent.is_zero() && Instant::now() >= next_sweep {
                self.sweep().await;
                next_sweep =
                    Instant::now() + self.config.status_interval.max(Duration::from_secs(60));
            }
            let wait = match self.relay_once().await {
                Ok(report) => {
                    errors = 0;
                    self.shared.set_error(None);
                    if report.claimed >= self.config.batch_size {
                        continue;
                    }
                    self.config.poll_interval
                }
                Err(err) => {
                    errors = errors.saturating_add(1);
                    self.shared.round_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(outbox = %self.inbox.config().outbox_table, error = %err, "outbox relay round failed; trying again");
                    self.shared.set_error(Some(err.to_string()));
                    self.config
                        .backoff
                        .ceiling(errors)
                        .min(self.config.poll_interval.max(Duration::from_secs(5)))
                        .max(MIN_WAIT)
                }
            };
            let notified = tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.notified(), if errors == 0 => true,
                _ = tokio::time::sleep(wait) => false,
            };
            // Transactions commit one after another: let the ones right behind the one that
            // woke us commit too, so that one round takes them all.
            if notified && !self.config.gather.is_zero() {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(self.config.gather) => {}
                }
            }
        }
    }

    fn spawn_listener(&self, wake: &Arc<tokio::sync::Notify>) -> Option<AbortOnDrop> {
        if !self.config.listen {
            return None;
        }
        let Some(params) = self.inbox.listen_params().cloned() else {
            tracing::info!(
                outbox = %self.inbox.config().outbox_table,
                "the inbox was made from a pool of yours: the outbox relay polls every {:?} instead of listening",
                self.config.poll_interval
            );
            return None;
        };
        let channel = self.inbox.outbox_sql().channel.clone();
        let wake = wake.clone();
        let shared = self.shared.clone();
        let retry = self.config.backoff;
        Some(AbortOnDrop(tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let result = listen::listen(&params, &channel, &wake, &shared.listening).await;
                // A connection that was listening starts the count of failures afresh.
                if shared.listening.swap(false, Ordering::Relaxed) {
                    failures = 0;
                }
                // Rows may have committed while we were not listening.
                wake.notify_one();
                failures = failures.saturating_add(1);
                if let Err(err) = result {
                    tracing::debug!(error = %err, "outbox LISTEN connection lost; reconnecting");
                }
                tokio::time::sleep(retry.ceiling(failures).max(MIN_WAIT)).await;
            }
        })))
    }

    async fn refresh_status(&self) {
        match self.inbox.outbox_status().await {
            Ok(status) => {
                signals::record_status(&self.inbox.config().outbox_table, &status);
                *self
                    .shared
                    .status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(status);
            }
            Err(err) => {
                tracing::debug!(error = %err, "outbox status query failed");
                *self
                    .shared
                    .status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
    }

    async fn sweep(&self) {
        let sql = self.inbox.outbox_sql();
        let secs = self.config.keep_sent.as_secs_f64();
        let batch = i64::from(self.inbox.config().sweep_batch);
        loop {
            let deleted = async {
                let tx = self.inbox.begin().await?;
                let n = tx.execute(sql.sweep.as_str(), &[&secs, &batch]).await?;
                tx.commit().await?;
                Ok::<u64, InboxError>(n)
            }
            .await;
            match deleted {
                Ok(n) if n == u64::try_from(batch).unwrap_or(u64::MAX) => continue,
                Ok(_) => return,
                Err(err) => {
                    tracing::debug!(error = %err, "outbox sweep failed; trying again later");
                    return;
                }
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
