//! [`RedisStreamsSettler`]: `XACK`, delayed copies, lease renewal and dead letters, each an
//! atomic step in Redis.

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::deadletter::{
    ATTEMPT_HEADER, DEFERRED_SINCE_HEADER, FIRST_FAILURE_HEADER, millis as epoch_millis,
};
use ackstack_core::{
    AckReport, Backlog, DeadLetter, Delivery, Failure, Headers, Settle, SettleError, SettleFailure,
    Settled,
};
use redis::Value;
use redis::aio::ConnectionManager;

use crate::config::MESSAGE_ID_FIELD;
use crate::entry::{self, fields};
use crate::error::bounded;
use crate::source::{Shared, millis};
use crate::token::RedisStreamsToken;

/// How idle a released entry is made: far past any lease, so the next `XAUTOCLAIM` of any
/// consumer takes it (30 days).
const RELEASED_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The settling half of a [`RedisStreamsSource`](crate::RedisStreamsSource). Cheap to clone.
///
/// - **ack**: one `XACK` of the batch's entry ids.
/// - **retry** and **defer**: one script, if the entry is still pending for this consumer,
///   writes a copy (payload and headers, `x-ackstack-attempt` the next attempt, or the same
///   for a deferral) to the delayed set, due after the delay by Redis's clock, and `XACK`s
///   the original. A receive of any consumer moves due copies back to the stream.
/// - **dead_letter**: one script, if the entry is still pending for this consumer, adds a
///   copy with ackstack's `x-ackstack-dl-*` metadata to the dead-letter stream and `XACK`s
///   the original.
/// - **extend**: `XCLAIM` of the entry to this consumer with `JUSTID` (idle time reset,
///   delivery count unchanged), if it still holds it with the count it was handed out with;
///   [`SettleError::LeaseLost`] once it was taken over (by any consumer, one of the same name
///   included) or settled.
/// - **release**: the entry made idle for 30 days, so the next `XAUTOCLAIM` takes it; at
///   shutdown, for a delivery that never ran, with its delivery count lowered by one, so
///   that it comes back with the same attempt.
///
/// Each script is one atomic step: a crash leaves either the original pending (it comes back)
/// or the copy stored and the original acked, never both or neither.
#[derive(Clone, Debug)]
pub struct RedisStreamsSettler {
    shared: Arc<Shared>,
}

impl RedisStreamsSettler {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisStreamsSettler { shared }
    }

    /// The commands the source and this settler sent so far.
    pub fn stats(&self) -> crate::RedisStreamsStats {
        self.shared.counters.snapshot()
    }

    fn conn(&self) -> ConnectionManager {
        self.shared.conn.clone()
    }

    /// Runs a settling script whose answer is 1 (done), 0 (no longer pending) or -1 (held
    /// by another consumer).
    async fn settle_script(
        &self,
        what: &str,
        call: redis::ScriptInvocation<'_>,
        token: &RedisStreamsToken,
    ) -> Result<(), SettleError> {
        self.shared.counters.settle_scripts.add(1);
        let mut conn = self.conn();
        let answer: i64 = bounded(
            what,
            self.shared.config.operation_timeout,
            call.invoke_async(&mut conn),
        )
        .await
        .map_err(|e| SettleError::Broker(Box::new(e)))?;
        match answer {
            1 => Ok(()),
            0 => Err(SettleError::LeaseLost(format!(
                "entry {} is no longer pending for this group (settled by another consumer)",
                token.id
            ))),
            _ => Err(SettleError::LeaseLost(format!(
                "entry {} was taken over by another consumer",
                token.id
            ))),
        }
    }

    /// Runs `script` (the delayed-copy or the dead-letter script) on `token`'s entry with
    /// `to` as its second key: the copy is `delivery`'s payload with `headers`, written and the
    /// original acked in one step. `delay` is the delayed-copy script's delay.
    async fn copy(
        &self,
        what: &str,
        script: &redis::Script,
        to: &str,
        delay: Option<Duration>,
        (token, delivery, headers): (RedisStreamsToken, &Delivery, Headers),
    ) -> Result<Settled<RedisStreamsToken>, SettleFailure<RedisStreamsToken>> {
        let shared = &self.shared;
        let config = &shared.config;
        let mut call = script.prepare_invoke();
        call.key(&config.stream)
            .key(to)
            .arg(&config.group)
            .arg(&shared.consumer)
            .arg(&*token.id)
            .arg(token.delivered);
        if let Some(delay) = delay {
            // Rounded up: a retry is never due before its delay.
            call.arg(millis(delay + Duration::from_nanos(999_999)));
        }
        for field in fields(&config.payload_field, &delivery.payload, &headers) {
            call.arg(field.as_ref());
        }
        match self.settle_script(what, call, &token).await {
            Ok(()) => Ok(Settled::Done),
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }

    /// A retry's or a deferral's copy, due after `after`.
    async fn delayed_copy(
        &self,
        copy: (RedisStreamsToken, &Delivery, Headers),
        after: Duration,
    ) -> Result<Settled<RedisStreamsToken>, SettleFailure<RedisStreamsToken>> {
        let shared = &self.shared;
        let script = &shared.scripts.delay;
        self.copy(
            "writing a delayed copy",
            script,
            &shared.delayed,
            Some(after),
            copy,
        )
        .await
    }

    /// `XCLAIM` to itself with `idle`, if still held, leaving its delivery count at
    /// `retry_count`.
    async fn claim(
        &self,
        token: &RedisStreamsToken,
        idle: Duration,
        retry_count: u64,
    ) -> Result<(), SettleError> {
        let shared = &self.shared;
        let mut call = shared.scripts.claim.prepare_invoke();
        call.key(&shared.config.stream)
            .arg(&shared.config.group)
            .arg(&shared.consumer)
            .arg(&*token.id)
            .arg(token.delivered)
            .arg(millis(idle))
            .arg(retry_count);
        self.settle_script("XCLAIM", call, token).await
    }

    /// Hands the entry to the next `XAUTOCLAIM`, its delivery count lowered by `uncount`.
    async fn give_back(&self, token: RedisStreamsToken, uncount: u64) {
        let count = token.delivered.saturating_sub(uncount);
        if let Err(e) = self.claim(&token, RELEASED_IDLE, count).await {
            tracing::debug!(error = %e, entry = %token.id, "release not recorded; the entry comes back after the lease");
        }
    }
}

/// The headers of a copy of `delivery` for `attempt`: its message id kept (the original's
/// `<stream>:<entry id>` when it had none), and, for a retry, when it first failed.
fn copy_headers(delivery: &Delivery, attempt: u32, failed: Option<&Failure>) -> Headers {
    let mut headers = delivery.headers.clone();
    headers.insert(ATTEMPT_HEADER, attempt.to_string());
    if let Some(failure) = failed
        && headers.get(FIRST_FAILURE_HEADER).is_none()
    {
        headers.insert(FIRST_FAILURE_HEADER, epoch_millis(failure.at).to_string());
    }
    if let Some(id) = &delivery.message_id
        && headers.get(MESSAGE_ID_FIELD).is_none()
    {
        headers.insert(MESSAGE_ID_FIELD, id.clone());
    }
    headers
}

impl Settle for RedisStreamsSettler {
    type Token = RedisStreamsToken;

    async fn ack(&self, tokens: Vec<RedisStreamsToken>) -> AckReport<RedisStreamsToken> {
        if tokens.is_empty() {
            return AckReport::all(0);
        }
        let config = &self.shared.config;
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&config.stream).arg(&config.group);
        for token in &tokens {
            cmd.arg(&*token.id);
        }
        self.shared.counters.ack_calls.add(1);
        let mut conn = self.conn();
        match bounded(
            "XACK",
            config.operation_timeout,
            cmd.query_async::<i64>(&mut conn),
        )
        .await
        {
            // Entries no longer pending (taken over and acked by another consumer) count as
            // acked: they are gone from the group either way.
            Ok(_) => AckReport::all(tokens.len()),
            Err(e) => {
                let mut report = AckReport::all(0);
                let text = e.to_string();
                report.failed = tokens
                    .into_iter()
                    .map(|t| (t, SettleError::Broker(text.clone().into())))
                    .collect();
                report
            }
        }
    }

    async fn retry(
        &self,
        token: RedisStreamsToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<RedisStreamsToken>, SettleFailure<RedisStreamsToken>> {
        let headers = copy_headers(delivery, delivery.attempt.saturating_add(1), Some(failure));
        self.delayed_copy((token, delivery, headers), after).await
    }

    async fn defer(
        &self,
        token: RedisStreamsToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<RedisStreamsToken>, SettleFailure<RedisStreamsToken>> {
        let mut headers = copy_headers(delivery, delivery.attempt, None);
        let since = failure.deferred_since.unwrap_or(failure.at);
        headers.insert(DEFERRED_SINCE_HEADER, epoch_millis(since).to_string());
        self.delayed_copy((token, delivery, headers), after).await
    }

    async fn dead_letter(
        &self,
        token: RedisStreamsToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<RedisStreamsToken>, SettleFailure<RedisStreamsToken>> {
        let mut headers = delivery.headers.clone();
        letter.metadata(delivery).apply_to(&mut headers);
        let shared = &self.shared;
        let script = &shared.scripts.dead_letter;
        let copy = (token, delivery, headers);
        self.copy("adding a dead letter", script, &shared.dlq, None, copy)
            .await
    }

    async fn extend(&self, token: &RedisStreamsToken, _by: Duration) -> Result<(), SettleError> {
        self.claim(token, Duration::ZERO, token.delivered).await
    }

    /// After a handler ran (a settlement that failed): its takeover counts as an attempt.
    async fn release(&self, token: RedisStreamsToken) {
        self.give_back(token, 0).await;
    }

    /// A delivery that never ran (the consumer stopped while it waited for its dedup store
    /// or its key): given back with its count lowered by one, so that the takeover's
    /// increment leaves its attempt as it was.
    async fn release_at_shutdown(&self, token: RedisStreamsToken) {
        self.give_back(token, 1).await;
    }

    /// The group's `lag` (entries not yet handed out, Redis 7) plus the delayed copies.
    async fn backlog(&self) -> Option<Backlog> {
        let config = &self.shared.config;
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        pipe.cmd("XINFO")
            .arg("GROUPS")
            .arg(&config.stream)
            .cmd("ZCARD")
            .arg(&self.shared.delayed);
        let (groups, delayed): (Value, u64) = bounded(
            "XINFO GROUPS",
            config.operation_timeout,
            pipe.query_async(&mut conn),
        )
        .await
        .ok()?;
        let lag = entry::items(&groups)?.into_iter().find_map(|g| {
            let name = entry::info_field(g, "name").and_then(entry::text);
            (name.as_deref() == Some(config.group.as_str()))
                .then(|| entry::info_field(g, "lag").and_then(entry::int))
                .flatten()
        })?;
        Some(Backlog::new(
            u64::try_from(lag).unwrap_or(0).saturating_add(delayed),
        ))
    }
}
