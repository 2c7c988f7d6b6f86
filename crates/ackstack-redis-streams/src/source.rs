//! [`RedisStreamsSource`]: connecting, finding (or creating) the consumer group, and
//! receiving: due copies moved back, abandoned entries reclaimed, new entries read.

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{Alone, Capabilities, Delivery, Origin, Received, Source, SourceError};
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::config::{RedisStreamsConfig, StartFrom};
use crate::entry::{self, Entry};
use crate::error::{RedisStreamsError, bounded};
use crate::scripts::Scripts;
use crate::settler::RedisStreamsSettler;
use crate::stats::{Counters, RedisStreamsStats};
use crate::token::RedisStreamsToken;

/// The broker name in origins and metrics.
pub(crate) const BROKER: &str = "redis-streams";

/// What the source and its settler share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RedisStreamsConfig,
    /// For settling and maintenance; never blocks.
    pub(crate) conn: ConnectionManager,
    pub(crate) scripts: Scripts,
    /// This consumer's name in the group.
    pub(crate) consumer: String,
    pub(crate) dlq: String,
    pub(crate) delayed: String,
    pub(crate) counters: Counters,
}

/// A Redis stream read through a consumer group, as an ackstack [`Source`].
///
/// Each [`receive`](Source::receive) first moves delayed copies that are due back to the
/// stream and takes over entries other consumers left pending longer than the lease
/// (`XAUTOCLAIM`, a crashed consumer's), then reads new entries (`XREADGROUP ... >`,
/// blocking up to [`RedisStreamsConfig::block`] or until the next copy is due). A delivery's
/// `attempt` is the group's delivery count of the entry (on a copy, plus the attempt it was
/// written for), its `message_id` the `message-id` field or else `<stream>:<entry id>`,
/// its key a field ([`RedisStreamsConfig::key`]).
pub struct RedisStreamsSource {
    shared: Arc<Shared>,
    /// For `XREADGROUP ... BLOCK`, which holds its connection while it waits.
    reader: ConnectionManager,
    settler: RedisStreamsSettler,
    /// Where the next `XAUTOCLAIM` scan continues.
    cursor: String,
    next_reclaim: Instant,
    next_move: Instant,
    closed: bool,
}

impl std::fmt::Debug for RedisStreamsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsSource")
            .field("stream", &self.shared.config.stream)
            .field("group", &self.shared.config.group)
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisStreamsSource {
    /// Connects and finds the consumer group, creating it (and the stream) when missing and
    /// [`RedisStreamsConfig::create`] allows; an existing group is used as it is.
    pub async fn connect(
        config: RedisStreamsConfig,
    ) -> Result<RedisStreamsSource, RedisStreamsError> {
        config.validate()?;
        let settings = |response_timeout| ackstack_redis::connection::ConnectionSettings {
            url: &config.url,
            tls_ca_file: config.tls_ca_file.as_deref(),
            connect_timeout: config.operation_timeout,
            response_timeout,
        };
        let conn =
            ackstack_redis::connection::connection_manager(&settings(config.operation_timeout))
                .map_err(RedisStreamsError::Config)?;
        let reader = ackstack_redis::connection::connection_manager(&settings(
            config.block + config.operation_timeout,
        ))
        .map_err(RedisStreamsError::Config)?;
        let consumer = config.consumer.clone().unwrap_or_else(generated_name);
        find_group(&conn, &config).await?;
        warn_if_evicting(&conn, config.operation_timeout).await;
        let shared = Arc::new(Shared {
            dlq: config.dlq_stream(),
            delayed: config.delayed_key(),
            config,
            conn,
            scripts: Scripts::new(),
            consumer,
            counters: Counters::default(),
        });
        let now = Instant::now();
        Ok(RedisStreamsSource {
            settler: RedisStreamsSettler::new(shared.clone()),
            shared,
            reader,
            cursor: "0-0".into(),
            next_reclaim: now,
            next_move: now,
            closed: false,
        })
    }

    /// The commands this source and its settler sent so far.
    pub fn stats(&self) -> RedisStreamsStats {
        self.shared.counters.snapshot()
    }

    /// This consumer's name in the group.
    pub fn consumer_name(&self) -> &str {
        &self.shared.consumer
    }

    /// The (non-blocking) connection this source settles through, for a publisher or other
    /// commands on the same Redis.
    pub fn connection(&self) -> ConnectionManager {
        self.shared.conn.clone()
    }

    fn convert(&self, entry: Entry) -> Received<RedisStreamsToken> {
        let config = &self.shared.config;
        let parts = entry.parts(&config.payload_field, &config.key);
        let delivered = entry.delivered.max(1);
        let redelivered = u32::try_from(delivered - 1).unwrap_or(u32::MAX);
        let attempt = parts.copy_attempt.saturating_add(redelivered);
        let mut origin = self.origin();
        // The id's time part orders entries; it is the closest a stream has to an offset.
        origin.offset = entry
            .id
            .split('-')
            .next()
            .and_then(|ms| ms.parse::<i64>().ok());
        let message_id = parts
            .message_id
            .unwrap_or_else(|| format!("{}:{}", config.stream, entry.id));
        let produced_at = origin
            .offset
            .and_then(|ms| u64::try_from(ms).ok())
            .and_then(|ms| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)));
        let delivery = Delivery {
            payload: parts.payload,
            headers: parts.headers,
            key: parts.key,
            message_id: Some(message_id),
            attempt,
            origin,
            produced_at,
        };
        let token = RedisStreamsToken {
            id: entry.id.into(),
            delivered,
        };
        // Handed out before and never settled: it may have been in flight when a consumer
        // died, so it runs alone.
        Received::new(delivery, token).suspect(delivered > 1)
    }

    /// Moves due copies back to the stream; returns how long until the next one is due.
    async fn move_due(&self, max: usize) -> Result<Option<Duration>, SourceError> {
        let shared = &self.shared;
        let mut conn = shared.conn.clone();
        shared.counters.moves.add(1);
        let mut script = shared.scripts.move_due.prepare_invoke();
        script
            .key(&shared.config.stream)
            .key(&shared.delayed)
            .arg(max.max(16));
        let reply: (i64, i64) = call(
            "moving due copies",
            shared.config.operation_timeout,
            call_script(&script, &mut conn),
        )
        .await?;
        if reply.0 > 0 {
            tracing::debug!(moved = reply.0, "delayed copies moved back to the stream");
        }
        Ok(u64::try_from(reply.1).ok().map(Duration::from_millis))
    }

    /// One step of the `XAUTOCLAIM` scan for entries idle longer than the lease.
    async fn reclaim(&mut self, max: usize) -> Result<Vec<Entry>, SourceError> {
        let shared = &self.shared;
        let config = &shared.config;
        let mut conn = shared.conn.clone();
        shared.counters.reclaims.add(1);
        let mut script = shared.scripts.reclaim.prepare_invoke();
        script
            .key(&config.stream)
            .arg(&config.group)
            .arg(&shared.consumer)
            .arg(millis(config.lease))
            .arg(&self.cursor)
            .arg(max);
        let reply: Value = match call(
            "reclaiming idle entries",
            config.operation_timeout,
            call_script(&script, &mut conn),
        )
        .await
        {
            Ok(reply) => reply,
            Err(e) => {
                // The scan starts over later; reading new entries need not wait for it.
                self.cursor = "0-0".into();
                self.next_reclaim = Instant::now() + config.lease / 2;
                return Err(e);
            }
        };
        let parts = entry::items(&reply).unwrap_or_default();
        let cursor = parts.first().and_then(|v| entry::text(v));
        let entries: Vec<Entry> = parts
            .get(1)
            .and_then(|v| entry::items(v))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let fields = entry::items(e)?;
                let count = fields.get(2).and_then(|v| entry::int(v)).unwrap_or(1);
                entry::parse_entry(
                    &Value::Array(fields.iter().take(2).map(|v| (*v).clone()).collect()),
                    u64::try_from(count).unwrap_or(1),
                )
            })
            .collect();
        let gone = parts.get(2).and_then(|v| entry::int(v)).unwrap_or(0);
        if gone > 0 {
            tracing::warn!(
                stream = %config.stream,
                entries = gone,
                "pending entries were deleted from the stream (trimmed?) before they were settled"
            );
        }
        match cursor {
            Some(next) if next != "0-0" => self.cursor = next,
            _ => {
                // A full pass: the next one after half a lease.
                self.cursor = "0-0".into();
                self.next_reclaim = Instant::now() + config.lease / 2;
            }
        }
        if !entries.is_empty() {
            tracing::debug!(entries = entries.len(), "idle entries taken over");
        }
        Ok(entries)
    }

    /// `XREADGROUP` of new entries, blocking up to `block`.
    async fn read_new(&mut self, max: usize, block: Duration) -> Result<Vec<Entry>, SourceError> {
        let config = &self.shared.config;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(&self.shared.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(&config.stream)
            .arg(">");
        let limit = block + config.operation_timeout;
        self.shared.counters.reads.add(1);
        let reply: Value = call("XREADGROUP", limit, cmd.query_async(&mut self.reader)).await?;
        Ok(entry::parse_read(&reply))
    }
}

impl Source for RedisStreamsSource {
    type Token = RedisStreamsToken;
    type Settler = RedisStreamsSettler;

    async fn receive(
        &mut self,
        max: usize,
    ) -> Result<Vec<Received<RedisStreamsToken>>, SourceError> {
        if self.closed {
            return Ok(Vec::new());
        }
        let config = &self.shared.config;
        let n = max.clamp(1, config.max_batch);
        let block = config.block;
        if Instant::now() >= self.next_move {
            // A failure here is logged, not returned: new entries are read all the same.
            let due_in = match self.move_due(n).await {
                Ok(due_in) => due_in,
                Err(e) => {
                    tracing::warn!(error = %e, "moving due copies back failed; trying again later");
                    None
                }
            };
            self.next_move = Instant::now() + due_in.map_or(block, |d| d.min(block));
        }
        let mut entries = Vec::new();
        if Instant::now() >= self.next_reclaim {
            // One at a time, and alone: an entry taken over is a suspect, and one handed out
            // beside others would have their delivery counts rise with its crash too.
            entries = self.reclaim(1).await?;
        }
        if entries.is_empty() {
            let now = Instant::now();
            let wait = block
                .min(self.next_move.saturating_duration_since(now))
                .min(self.next_reclaim.saturating_duration_since(now));
            entries = self.read_new(n, wait).await?;
        }
        self.shared.counters.received.add(entries.len() as u64);
        Ok(entries.into_iter().map(|e| self.convert(e)).collect())
    }

    fn settler(&self) -> RedisStreamsSettler {
        self.settler.clone()
    }

    /// Acks in batches (4 calls at once), a lease of [`RedisStreamsConfig::lease`], retries
    /// and deferrals as delayed copies kept in Redis (the attempt travels with a copy, so
    /// deferrals keep it). The group's delivery count rises for every entry taken over after
    /// a crash, so, as on SQS, suspects run with nothing else in flight and a delivery past
    /// `max_attempts` is dead-lettered on arrival. No careful period is needed: suspects come
    /// only from takeovers, which a receive returns one at a time and never beside new
    /// entries.
    fn capabilities(&self) -> Capabilities {
        let lease = self.shared.config.lease;
        Capabilities::new(self.shared.config.max_batch)
            .with_lease(lease)
            .with_max_retry_delay(Duration::from_secs(30 * 24 * 3600))
            .with_deferrals()
            .with_parallel_acks(4)
            .with_alone(Alone::InFlight)
            .with_careful_receives(Duration::ZERO)
            .without_careful_start()
    }

    fn origin(&self) -> Origin {
        let config = &self.shared.config;
        Origin::new(
            BROKER,
            config.stream.as_str(),
            self.shared.consumer.as_str(),
        )
    }

    async fn close(&mut self) {
        self.closed = true;
    }
}

/// `fut`, bounded by `limit`, its error as a [`SourceError`]: a stream or group that is gone
/// (`NOGROUP`) is [`SourceError::Fatal`], a dropped connection or no answer
/// [`SourceError::Disconnected`], anything else [`SourceError::Broker`].
async fn call<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, SourceError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.code() == Some("NOGROUP") => Err(SourceError::Fatal(
            format!("{what}: {e} (the stream or its group was deleted)").into(),
        )),
        Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
            Err(SourceError::Disconnected(format!("{what}: {e}").into()))
        }
        Ok(Err(e)) => Err(SourceError::Broker(format!("{what}: {e}").into())),
        Err(_) => Err(SourceError::Disconnected(
            format!("{what}: no answer in {limit:?}").into(),
        )),
    }
}

/// A prepared script's run, as a future [`call`] can bound.
async fn call_script<T: redis::FromRedisValue>(
    script: &redis::ScriptInvocation<'_>,
    conn: &mut ConnectionManager,
) -> redis::RedisResult<T> {
    script.invoke_async(conn).await
}

/// A duration in whole milliseconds.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A consumer name unique to this process: host, process id and a random part.
fn generated_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ackstack".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}-{}-{nanos:08x}", std::process::id())
}

/// The group: created (with the stream, `MKSTREAM`) when missing and allowed; `BUSYGROUP`
/// means it exists, and it is used as it is. A stream with other groups is refused.
async fn find_group(
    conn: &ConnectionManager,
    config: &RedisStreamsConfig,
) -> Result<(), RedisStreamsError> {
    let mut conn = conn.clone();
    let limit = config.operation_timeout;
    let key_type: String = bounded(
        "TYPE",
        limit,
        redis::cmd("TYPE")
            .arg(&config.stream)
            .query_async(&mut conn),
    )
    .await?;
    if key_type != "stream" && key_type != "none" {
        return Err(RedisStreamsError::Topology(format!(
            "key {} is a {key_type}, not a stream",
            config.stream
        )));
    }
    let groups: Vec<String> = match key_type.as_str() {
        "none" => Vec::new(),
        _ => {
            let reply: Value = bounded(
                "XINFO GROUPS",
                limit,
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&config.stream)
                    .query_async(&mut conn),
            )
            .await?;
            group_names(&reply)
        }
    };
    let others: Vec<&String> = groups.iter().filter(|g| **g != config.group).collect();
    if !others.is_empty() {
        // Retry copies go back into the stream, where every group would read them.
        return Err(RedisStreamsError::Topology(format!(
            "stream {} has other consumer groups ({}): retry copies moved back to it would \
             reach them too; ackstack needs a stream whose only group is {}",
            config.stream,
            others
                .iter()
                .map(|g| g.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            config.group
        )));
    }
    if groups.contains(&config.group) {
        return Ok(());
    }
    if !config.create {
        return Err(RedisStreamsError::Topology(format!(
            "stream {} has no consumer group {} and create is off",
            config.stream, config.group
        )));
    }
    let start = match config.start_from {
        StartFrom::Beginning => "0",
        StartFrom::New => "$",
    };
    let created = tokio::time::timeout(
        limit,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&config.stream)
            .arg(&config.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async::<Value>(&mut conn),
    )
    .await;
    match created {
        Ok(Ok(_)) => {
            tracing::info!(stream = %config.stream, group = %config.group, "consumer group created");
            Ok(())
        }
        Ok(Err(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
        Ok(Err(e)) if e.code() == Some("WRONGTYPE") => Err(RedisStreamsError::Topology(format!(
            "key {} is not a stream: {e}",
            config.stream
        ))),
        Ok(Err(e)) => Err(RedisStreamsError::Call(format!("XGROUP CREATE: {e}"))),
        Err(_) => Err(RedisStreamsError::Call(format!(
            "XGROUP CREATE: no answer in {limit:?}"
        ))),
    }
}

/// The names in an `XINFO GROUPS` reply.
fn group_names(reply: &Value) -> Vec<String> {
    entry::items(reply)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| entry::info_field(g, "name").and_then(entry::text))
        .collect()
}

/// Logs a warning when Redis may evict keys (`maxmemory-policy` other than `noeviction`):
/// an evicted stream, delayed copy or dead-letter stream is lost. Managed services that
/// refuse `CONFIG GET` are not asked again.
async fn warn_if_evicting(conn: &ConnectionManager, limit: Duration) {
    let mut conn = conn.clone();
    let asked = bounded(
        "CONFIG GET maxmemory-policy",
        limit,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async::<Vec<String>>(&mut conn),
    )
    .await;
    if let Ok(reply) = asked
        && let Some(policy) = reply.get(1)
        && policy != "noeviction"
    {
        tracing::warn!(
            policy = %policy,
            "Redis may evict keys under memory pressure: a stream, a delayed copy or a dead \
             letter evicted is lost; set maxmemory-policy noeviction for a broker"
        );
    }
}
