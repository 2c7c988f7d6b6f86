//! How calls reach Redis: the Lua scripts of the claim protocol, and the background task that
//! sends queued calls as pipelines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ackstack_core::dedup::Claim;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Script, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::RedisDedupError;

/// The value a completed key holds. Tokens equal to it are refused.
pub const DONE_MARKER: &str = "ackstack:done";

/// The live counts behind `RedisDedupStats`.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) operations: AtomicU64,
    pub(crate) round_trips: AtomicU64,
    pub(crate) commands: AtomicU64,
    pub(crate) failed_round_trips: AtomicU64,
}

/// Claim, when the plain `SET key token NX PX lease` that goes first found the key: report
/// done, our own claim (same token: refreshed, so a claim retried after a lost reply is
/// idempotent) or busy with its PTTL. (It tries the `SET` again first: the key may have expired
/// in between.) Replies `{1, 0}` acquired, `{2, pttl}` done, `{3, pttl}` busy.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, 0}
end
local v = redis.call('GET', KEYS[1])
if v == ARGV[3] then
  return {2, redis.call('PTTL', KEYS[1])}
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
return {3, redis.call('PTTL', KEYS[1])}
";

/// Complete: replace our claim by the done marker with a TTL, only if the token still matches.
const COMPLETE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Release: compare-and-delete.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Extend: compare-and-PEXPIRE.
const EXTEND_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

pub(crate) struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            claim: Script::new(CLAIM_LUA),
            complete: Script::new(COMPLETE_LUA),
            release: Script::new(RELEASE_LUA),
            extend: Script::new(EXTEND_LUA),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Claim { lease_ms: u64 },
    Complete { ttl_ms: u64 },
    Release,
    Extend { lease_ms: u64 },
}

pub(crate) enum Reply {
    Claim(Claim),
    Flag(bool),
}

pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) key: String,
    pub(crate) token: String,
    /// Where the answer goes; taken when the call is answered.
    pub(crate) reply: Option<oneshot::Sender<Result<Reply, RedisDedupError>>>,
    /// By when the caller must have its answer.
    pub(crate) deadline: tokio::time::Instant,
}

/// The background task: takes queued requests and sends them as pipelines.
pub(crate) struct Batcher {
    pub(crate) rx: mpsc::Receiver<Request>,
    pub(crate) conn: ConnectionManager,
    pub(crate) scripts: Arc<Scripts>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) max_batch: usize,
    pub(crate) linger: Duration,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) timeout: Duration,
    pub(crate) redacted_url: String,
}

impl Batcher {
    pub(crate) async fn run(mut self) {
        loop {
            // Wait for a free pipeline slot first: while all slots are busy, requests pile up in
            // the queue and go out together in the next pipeline.
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let Some(first) = self.rx.recv().await else {
                return;
            };
            // Lingering for more calls never keeps the first past its deadline.
            let first_deadline = first.deadline;
            let mut batch = Vec::with_capacity(self.max_batch.min(64));
            batch.push(first);
            if !self.linger.is_zero() {
                let deadline = (tokio::time::Instant::now() + self.linger).min(first_deadline);
                while batch.len() < self.max_batch {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(request)) => batch.push(request),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            // A caller that gave up no longer waits: don't run its command. A call whose
            // deadline passed while it waited for a pipeline is answered now, unsent.
            let now = tokio::time::Instant::now();
            batch.retain_mut(|request| {
                if request.deadline <= now {
                    timed_out(request, self.timeout);
                }
                request
                    .reply
                    .as_ref()
                    .is_some_and(|reply| !reply.is_closed())
            });
            if batch.is_empty() {
                continue;
            }
            let sender = Sender {
                conn: self.conn.clone(),
                scripts: self.scripts.clone(),
                counters: self.counters.clone(),
                timeout: self.timeout,
                redacted_url: self.redacted_url.clone(),
            };
            tokio::spawn(async move {
                sender.send(batch).await;
                drop(permit);
            });
        }
    }
}

/// Sends one batch as a pipeline and answers each request.
struct Sender {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    counters: Arc<Counters>,
    timeout: Duration,
    redacted_url: String,
}

impl Sender {
    async fn send(mut self, mut batch: Vec<Request>) {
        // A claim goes first as a plain `SET NX`, which Redis runs at about twice the rate of
        // the claim script: only a key that exists (a duplicate, a retried claim) needs the
        // script, in a second round trip.
        let all: Vec<(usize, Form)> = (0..batch.len()).map(|i| (i, Form::Plain)).collect();
        let mut results = match self.round_trip(&mut batch, &all, false).await {
            Ok(results) => results,
            Err(err) => {
                tracing::warn!(url = %self.redacted_url, error = %err, calls = batch.len(), "redis dedup pipeline failed");
                for request in &mut batch {
                    answer(request, Err(err.clone()));
                }
                return;
            }
        };
        // Then the script for the claims that found their key, and again (after loading the
        // scripts, which Redis loses on restart or SCRIPT FLUSH) for the commands that found no
        // script: those did not run, so running them again is safe. Two rounds at most: the
        // second only reloads scripts that the first found missing. Calls whose result is
        // final are answered before each round.
        for _ in 0..2 {
            let load = results.iter().any(is_noscript);
            let mut again = Vec::new();
            for (index, request) in batch.iter_mut().enumerate() {
                let Some(result) = results.get_mut(index).filter(|_| request.reply.is_some())
                else {
                    continue;
                };
                if is_noscript(result) || found_the_key(request, result) {
                    again.push((index, Form::Script));
                } else {
                    let result = std::mem::replace(result, Err(RedisDedupError::Closed));
                    answer_with(request, result);
                }
            }
            if again.is_empty() {
                return;
            }
            match self.round_trip(&mut batch, &again, load).await {
                Ok(rerun) => {
                    for ((index, _), result) in again.iter().zip(rerun) {
                        if let Some(slot) = results.get_mut(*index) {
                            *slot = result;
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(url = %self.redacted_url, error = %err, calls = again.len(), "redis dedup follow-up pipeline failed");
                    for (index, _) in &again {
                        if let Some(request) = batch.get_mut(*index) {
                            answer(request, Err(err.clone()));
                        }
                    }
                    return;
                }
            }
        }
        for (request, result) in batch.iter_mut().zip(results) {
            answer_with(request, result);
        }
    }

    /// One pipeline with the commands of `batch[index]` in their form (and the `SCRIPT LOAD`s
    /// first when `load`); one result per index.
    async fn round_trip(
        &mut self,
        batch: &mut [Request],
        indices: &[(usize, Form)],
        load: bool,
    ) -> Result<Vec<Result<Value, RedisDedupError>>, RedisDedupError> {
        let scripts = &*self.scripts;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if load {
            for script in [
                &scripts.claim,
                &scripts.complete,
                &scripts.release,
                &scripts.extend,
            ] {
                pipe.load_script(script).ignore();
            }
        }
        for &(index, form) in indices {
            let Some(request) = batch.get(index) else {
                continue;
            };
            if let (Op::Claim { lease_ms }, Form::Plain) = (request.op, form) {
                let data = request.key.len() + request.token.len() + 32;
                let mut cmd = redis::Cmd::with_capacity(6, data);
                cmd.arg("SET")
                    .arg(&request.key)
                    .arg(&request.token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease_ms);
                pipe.add_command(cmd);
                continue;
            }
            // EVALSHA built as one command, sized up front: a `ScriptInvocation` allocated a
            // buffer per key and argument and then copied them into the command.
            let script = match request.op {
                Op::Claim { .. } => &scripts.claim,
                Op::Complete { .. } => &scripts.complete,
                Op::Release => &scripts.release,
                Op::Extend { .. } => &scripts.extend,
            };
            let data = script.get_hash().len() + request.key.len() + request.token.len() + 64;
            let mut cmd = redis::Cmd::with_capacity(7, data);
            cmd.arg("EVALSHA")
                .arg(script.get_hash())
                .arg(1)
                .arg(&request.key)
                .arg(&request.token);
            match request.op {
                Op::Claim { lease_ms } => {
                    cmd.arg(lease_ms).arg(DONE_MARKER);
                }
                Op::Complete { ttl_ms } => {
                    cmd.arg(ttl_ms).arg(DONE_MARKER);
                }
                Op::Release => {}
                Op::Extend { lease_ms } => {
                    cmd.arg(lease_ms);
                }
            }
            pipe.add_command(cmd);
        }
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        self.counters
            .commands
            .fetch_add(pipe.len() as u64, Ordering::Relaxed);
        let query = pipe.query_async::<Vec<RedisResult<Value>>>(&mut self.conn);
        let cap = tokio::time::Instant::now() + self.timeout;
        let outcome = match answering_the_late(query, cap, batch, indices, self.timeout).await {
            Some(Ok(values)) if values.len() == indices.len() => Ok(values
                .into_iter()
                .map(|r| r.map_err(RedisDedupError::Redis))
                .collect()),
            Some(Ok(values)) => Err(RedisDedupError::UnexpectedReply(format!(
                "{} replies for {} commands",
                values.len(),
                indices.len()
            ))),
            Some(Err(e)) => Err(RedisDedupError::Redis(e)),
            None => Err(RedisDedupError::Timeout(self.timeout)),
        };
        if outcome.is_err() {
            self.counters
                .failed_round_trips
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }
}

/// Waits for a round trip's `query` until `cap` (one `timeout` after it was sent), answering
/// meanwhile, with a timeout, each call of `indices` whose own deadline passes: one timer at a
/// time, for the earliest deadline still waiting. `None` when `cap` passed, or when every
/// call of the round trip was answered that way.
async fn answering_the_late<T>(
    query: impl std::future::Future<Output = T>,
    cap: tokio::time::Instant,
    batch: &mut [Request],
    indices: &[(usize, Form)],
    timeout: Duration,
) -> Option<T> {
    let mut query = std::pin::pin!(query);
    loop {
        let waiting = indices
            .iter()
            .filter_map(|(index, _)| batch.get(*index))
            .filter(|request| request.reply.is_some())
            .map(|request| request.deadline)
            .min()?;
        tokio::select! {
            biased;
            out = &mut query => return Some(out),
            () = tokio::time::sleep_until(waiting.min(cap)) => {
                let now = tokio::time::Instant::now();
                for (index, _) in indices {
                    if let Some(request) = batch.get_mut(*index).filter(|r| r.deadline <= now) {
                        timed_out(request, timeout);
                    }
                }
                if now >= cap {
                    return None;
                }
            }
        }
    }
}

/// Answers `request`, unless it was answered already.
fn answer(request: &mut Request, result: Result<Reply, RedisDedupError>) {
    if let Some(reply) = request.reply.take() {
        let _ = reply.send(result);
    }
}

/// Answers `request` with its command's `result`, read as its op's reply.
fn answer_with(request: &mut Request, result: Result<Value, RedisDedupError>) {
    let op = request.op;
    answer(request, result.and_then(|value| parse_reply(op, value)));
}

/// Answers `request` with a timeout: its deadline passed.
fn timed_out(request: &mut Request, timeout: Duration) {
    answer(request, Err(RedisDedupError::Timeout(timeout)));
}

/// How a call is sent: a claim as a plain `SET NX` first, every call as its script otherwise.
#[derive(Clone, Copy)]
enum Form {
    Plain,
    Script,
}

/// Whether `result` is a plain claim's `SET NX` that found the key (it then needs the script).
fn found_the_key(request: &Request, result: &Result<Value, RedisDedupError>) -> bool {
    matches!(request.op, Op::Claim { .. }) && matches!(result, Ok(Value::Nil))
}

fn is_noscript(result: &Result<Value, RedisDedupError>) -> bool {
    match result {
        Err(RedisDedupError::Redis(e)) => {
            e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        }
        _ => false,
    }
}

fn parse_reply(op: Op, value: Value) -> Result<Reply, RedisDedupError> {
    match op {
        // The plain `SET NX` that set the key.
        Op::Claim { .. } if matches!(value, Value::Okay) => Ok(Reply::Claim(Claim::Acquired)),
        Op::Claim { .. } => {
            let (code, pttl) = redis::from_redis_value::<(i64, i64)>(value)
                .map_err(|e| RedisDedupError::UnexpectedReply(e.to_string()))?;
            match code {
                1 => Ok(Reply::Claim(Claim::Acquired)),
                2 => Ok(Reply::Claim(Claim::Done)),
                3 => Ok(Reply::Claim(Claim::Busy {
                    expires_in: u64::try_from(pttl).ok().map(Duration::from_millis),
                })),
                other => Err(RedisDedupError::UnexpectedReply(format!(
                    "claim script returned {other}"
                ))),
            }
        }
        Op::Complete { .. } | Op::Release | Op::Extend { .. } => {
            let n = redis::from_redis_value::<i64>(value)
                .map_err(|e| RedisDedupError::UnexpectedReply(e.to_string()))?;
            Ok(Reply::Flag(n == 1))
        }
    }
}
