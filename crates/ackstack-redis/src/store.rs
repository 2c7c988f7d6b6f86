//! The Redis dedup store and its pipelining background task.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ackstack_core::dedup::{BoxFuture, Claim, DedupError, DedupStore};
use redis::aio::ConnectionManager;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::RedisDedupConfig;
use crate::connection::{ConnectionSettings, connection_manager};
use crate::error::RedisDedupError;
use crate::key::redis_key;
use crate::pipeline::{Batcher, Counters, DONE_MARKER, Op, Reply, Request, Scripts};

/// The longest expiry sent to Redis, in milliseconds (far beyond any sane lease or TTL, far
/// below Redis's overflow check).
const MAX_EXPIRY_MS: u64 = 1 << 50;

/// A queued call's answer. The pipeline task answers every call by its deadline (see
/// `RedisDedupStore::enqueue`); a dropped answer means the task is gone.
async fn answered(
    answer: oneshot::Receiver<Result<Reply, RedisDedupError>>,
) -> Result<Reply, RedisDedupError> {
    answer.await.unwrap_or(Err(RedisDedupError::Closed))
}

/// Counters of the store's traffic, as returned by [`RedisDedupStore::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisDedupStats {
    /// Store calls made (claim, complete, release, extend), including failed ones.
    pub operations: u64,
    /// Pipelines sent to Redis: network round trips.
    pub round_trips: u64,
    /// Redis commands sent inside those pipelines (a script reload counts its `SCRIPT LOAD`s).
    pub commands: u64,
    /// Pipelines that failed as a whole (connection error or timeout).
    pub failed_round_trips: u64,
}

struct Shared {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    prefix: String,
    timeout: Duration,
    /// The most calls in one pipeline (`complete_all` queues this many at a time).
    max_batch: usize,
    redacted_url: String,
    conn: ConnectionManager,
}

/// A [`DedupStore`] on Redis: one key per dedup key, claims with a lease, done markers with a
/// TTL, all compare-and-set steps in Lua scripts (sent as `EVALSHA`, reloaded on `NOSCRIPT`).
///
/// Calls from many concurrent deliveries are coalesced into pipelines by a background task, so
/// at high concurrency a call costs well under one round trip ([`stats`](Self::stats) counts
/// them). The connection is a [`ConnectionManager`], which reconnects by itself after Redis
/// restarts; every call is bounded by [`RedisDedupConfig::timeout`], so a Redis that is down makes
/// calls fail fast instead of hanging.
///
/// Cloning is cheap and shares the connection and the background task, which ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct RedisDedupStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for RedisDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupStore")
            .field("url", &self.shared.redacted_url)
            .field("key_prefix", &self.shared.prefix)
            .field("timeout", &self.shared.timeout)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RedisDedupStore {
    /// Creates the store and checks that Redis answers (a `PING` within the timeout), so that a
    /// wrong URL or password shows at startup. Must be called within a Tokio runtime.
    pub async fn connect(config: RedisDedupConfig) -> Result<Self, RedisDedupError> {
        let store = Self::new_lazy(config)?;
        let mut conn = store.shared.conn.clone();
        let ping_cmd = redis::cmd("PING");
        let ping = ping_cmd.query_async::<String>(&mut conn);
        let after = store.shared.timeout;
        let tls = store.shared.redacted_url.starts_with("rediss://");
        let no_tls_answer = || RedisDedupError::TlsTimeout {
            url: store.shared.redacted_url.clone(),
            after,
        };
        // Over TLS, no answer at all (our timeout or the connection's) is how a port that
        // speaks plaintext shows: say so.
        match tokio::time::timeout(after, ping).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) if tls && e.is_timeout() => Err(no_tls_answer()),
            Ok(Err(e)) => Err(RedisDedupError::Redis(e)),
            Err(_) if tls => Err(no_tls_answer()),
            Err(_) => Err(RedisDedupError::Timeout(after)),
        }
    }

    /// Creates the store without contacting Redis; the connection is made on first use (and
    /// remade whenever it drops). Use this to start a consumer while Redis may be down: calls
    /// fail (and the dedup layer retries the deliveries later) until it is up. Must be called
    /// within a Tokio runtime.
    pub fn new_lazy(config: RedisDedupConfig) -> Result<Self, RedisDedupError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            RedisDedupError::Config("the store must be created within a Tokio runtime".into())
        })?;
        let pipeline = &config.pipeline;
        if pipeline.max_batch == 0 || pipeline.max_in_flight == 0 || pipeline.queue_capacity == 0 {
            return Err(RedisDedupError::Config(
                "pipeline.max_batch, max_in_flight and queue_capacity must be at least 1".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(RedisDedupError::Config("timeout must not be zero".into()));
        }
        let redacted_url = config.redacted_url();
        let conn = connection_manager(&ConnectionSettings {
            url: &config.url,
            tls_ca_file: config.tls_ca_file.as_deref(),
            connect_timeout: config.connect_timeout,
            response_timeout: config.timeout,
        })
        .map_err(RedisDedupError::Config)?;

        let (tx, rx) = mpsc::channel(pipeline.queue_capacity);
        let counters = Arc::new(Counters::default());
        let batcher = Batcher {
            rx,
            conn: conn.clone(),
            scripts: Arc::new(Scripts::new()),
            counters: counters.clone(),
            max_batch: pipeline.max_batch,
            linger: pipeline.linger,
            in_flight: Arc::new(Semaphore::new(pipeline.max_in_flight)),
            timeout: config.timeout,
            redacted_url: redacted_url.clone(),
        };
        runtime.spawn(batcher.run());
        tracing::debug!(url = %redacted_url, prefix = %config.key_prefix, "redis dedup store created");
        Ok(RedisDedupStore {
            shared: Arc::new(Shared {
                tx,
                counters,
                prefix: config.key_prefix,
                timeout: config.timeout,
                max_batch: pipeline.max_batch,
                redacted_url,
                conn,
            }),
        })
    }

    /// A snapshot of the traffic counters.
    pub fn stats(&self) -> RedisDedupStats {
        let c = &self.shared.counters;
        RedisDedupStats {
            operations: c.operations.load(Ordering::Relaxed),
            round_trips: c.round_trips.load(Ordering::Relaxed),
            commands: c.commands.load(Ordering::Relaxed),
            failed_round_trips: c.failed_round_trips.load(Ordering::Relaxed),
        }
    }

    /// The Redis key that holds the state of dedup key `key` (see [`crate::redis_key`]).
    pub fn redis_key(&self, key: &[u8]) -> String {
        redis_key(&self.shared.prefix, key)
    }

    async fn call(&self, op: Op, key: &[u8], token: &str) -> Result<Reply, RedisDedupError> {
        let deadline = tokio::time::Instant::now() + self.shared.timeout;
        let answer = self.enqueue(op, key, token, deadline).await?;
        answered(answer).await
    }

    /// Queues one call for the next pipeline; its answer comes on the returned channel, by
    /// `deadline`: the pipeline task answers a call with a timeout at its deadline, whether it
    /// is still queued or its round trip is under way (so the caller needs no timer of its
    /// own). Only a full queue is waited for here, until `deadline`.
    async fn enqueue(
        &self,
        op: Op,
        key: &[u8],
        token: &str,
        deadline: tokio::time::Instant,
    ) -> Result<oneshot::Receiver<Result<Reply, RedisDedupError>>, RedisDedupError> {
        self.shared
            .counters
            .operations
            .fetch_add(1, Ordering::Relaxed);
        if token == DONE_MARKER {
            return Err(RedisDedupError::ReservedToken);
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            op,
            key: self.redis_key(key),
            token: token.to_owned(),
            reply: Some(reply),
            deadline,
        };
        let request = match self.shared.tx.try_send(request) {
            Ok(()) => return Ok(answer),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(RedisDedupError::Closed),
            Err(mpsc::error::TrySendError::Full(request)) => request,
        };
        match tokio::time::timeout_at(deadline, self.shared.tx.send(request)).await {
            Ok(Ok(())) => Ok(answer),
            Ok(Err(_)) => Err(RedisDedupError::Closed),
            Err(_) => Err(RedisDedupError::Timeout(self.shared.timeout)),
        }
    }

    /// Marks every `(key, token)` done for `ttl` (see [`DedupStore::complete_all`]): up to
    /// `pipeline.max_batch` of them are queued before any answer is awaited, so that they share
    /// a pipeline (one round trip); a larger batch goes a pipeline's worth at a time, each with
    /// [`RedisDedupConfig::timeout`] of its own, so that calls of others queued meanwhile wait
    /// for one pipeline of it at most.
    pub async fn try_complete_all(
        &self,
        marks: &[(&[u8], &str)],
        ttl: Duration,
    ) -> Vec<Result<bool, RedisDedupError>> {
        let op = Op::Complete {
            ttl_ms: expiry_ms(ttl),
        };
        let mut out = Vec::with_capacity(marks.len());
        for chunk in marks.chunks(self.shared.max_batch.max(1)) {
            let deadline = tokio::time::Instant::now() + self.shared.timeout;
            let mut queued = Vec::with_capacity(chunk.len());
            for (key, token) in chunk {
                queued.push(self.enqueue(op, key, token, deadline).await);
            }
            for q in queued {
                let reply = match q {
                    Ok(answer) => answered(answer).await,
                    Err(e) => Err(e),
                };
                out.push(reply.and_then(as_flag));
            }
        }
        out
    }

    /// Claims `key` (see [`DedupStore::claim`]), with this crate's error type.
    pub async fn try_claim(
        &self,
        key: &[u8],
        token: &str,
        lease: Duration,
    ) -> Result<Claim, RedisDedupError> {
        let op = Op::Claim {
            lease_ms: expiry_ms(lease),
        };
        match self.call(op, key, token).await? {
            Reply::Claim(claim) => Ok(claim),
            Reply::Flag(_) => Err(RedisDedupError::UnexpectedReply("flag for a claim".into())),
        }
    }

    /// Marks `key` done (see [`DedupStore::complete`]), with this crate's error type.
    pub async fn try_complete(
        &self,
        key: &[u8],
        token: &str,
        ttl: Duration,
    ) -> Result<bool, RedisDedupError> {
        let op = Op::Complete {
            ttl_ms: expiry_ms(ttl),
        };
        self.flag(op, key, token).await
    }

    /// Releases the claim on `key` (see [`DedupStore::release`]); returns whether `token` held it.
    pub async fn try_release(&self, key: &[u8], token: &str) -> Result<bool, RedisDedupError> {
        self.flag(Op::Release, key, token).await
    }

    /// Extends the claim on `key` (see [`DedupStore::extend`]), with this crate's error type.
    pub async fn try_extend(
        &self,
        key: &[u8],
        token: &str,
        lease: Duration,
    ) -> Result<bool, RedisDedupError> {
        let op = Op::Extend {
            lease_ms: expiry_ms(lease),
        };
        self.flag(op, key, token).await
    }

    async fn flag(&self, op: Op, key: &[u8], token: &str) -> Result<bool, RedisDedupError> {
        as_flag(self.call(op, key, token).await?)
    }
}

fn as_flag(reply: Reply) -> Result<bool, RedisDedupError> {
    match reply {
        Reply::Flag(done) => Ok(done),
        Reply::Claim(_) => Err(RedisDedupError::UnexpectedReply("claim for a flag".into())),
    }
}

impl DedupStore for RedisDedupStore {
    fn claim<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        Box::pin(async move { Ok(self.try_claim(key, token, lease).await?) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        Box::pin(async move { Ok(self.try_complete(key, token, ttl).await?) })
    }

    fn complete_all<'a>(
        &'a self,
        marks: &'a [(&'a [u8], &'a str)],
        ttl: Duration,
    ) -> BoxFuture<'a, Vec<Result<bool, DedupError>>> {
        Box::pin(async move {
            self.try_complete_all(marks, ttl)
                .await
                .into_iter()
                .map(|r| r.map_err(DedupError::from))
                .collect()
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(async move {
            self.try_release(key, token).await?;
            Ok(())
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a [u8],
        token: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, DedupError>> {
        Box::pin(async move { Ok(self.try_extend(key, token, lease).await?) })
    }
}

/// A duration as a Redis expiry in milliseconds: at least 1 (Redis rejects 0), at most
/// [`MAX_EXPIRY_MS`].
fn expiry_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(MAX_EXPIRY_MS)
        .clamp(1, MAX_EXPIRY_MS)
}
