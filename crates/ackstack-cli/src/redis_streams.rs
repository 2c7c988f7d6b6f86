//! Redis Streams: the dead-letter stream read with `XRANGE` in pages, up to the last entry it
//! held when the scan began, so a scan takes nothing away from other readers. A replay adds
//! the original payload and fields to the original stream (`--to` for another) and deletes
//! the letter in one script, so a kill can neither lose a letter nor send it twice.

use std::collections::VecDeque;
use std::time::Duration;

use ackstack_core::Headers;
use ackstack_core::deadletter::METADATA_PREFIX;
use ackstack_redis::connection::{ConnectionSettings, connection_manager};
use ackstack_redis_streams::redis::{self, Script, Value, aio::ConnectionManager};
use bytes::Bytes;

use crate::letter::{Letter, REPLAYS_HEADER, RESET_HEADERS};
use crate::run::{self, CliError, DeadLetters, Found, Sent};

/// The broker, as errors name it.
const BROKER: &str = "Redis";

/// Entries read per `XRANGE`.
const PAGE: usize = 100;

/// `KEYS[1]` the work stream, `KEYS[2]` the dead-letter stream; `ARGV[1]` the letter's id,
/// the rest the replay's fields. Answers 1, or 0 when the letter was gone already (another
/// run replayed or purged it) and nothing was added. The letter is deleted after the add:
/// a script's writes before a failing command stay, so an add that fails (a key of another
/// type) leaves the letter where it was.
const MOVE: &str = "if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[2], ARGV[1])
return 1";

/// A scan of one dead-letter stream.
pub struct StreamsDlq {
    conn: ConnectionManager,
    dlq: String,
    /// The id after which the next page starts (exclusive).
    after: String,
    /// The last id when the scan began (`None`: the stream was empty or missing).
    end: Option<String>,
    page: VecDeque<(String, Vec<(Bytes, Bytes)>)>,
    /// The field that carries the payload.
    payload_field: String,
    moved: Script,
    timeout: Duration,
}

/// A letter found at an entry id.
pub struct Handle {
    id: String,
    payload: Bytes,
    headers: Headers,
}

/// `[[id, [field, value, ...]], ...]` as ids and field pairs.
fn entries(value: Value) -> Vec<(String, Vec<(Bytes, Bytes)>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut parts) = item else {
                return None;
            };
            let fields = match parts.pop()? {
                Value::Array(flat) => flat,
                _ => return None,
            };
            let id = match parts.pop()? {
                Value::BulkString(b) => String::from_utf8(b).ok()?,
                _ => return None,
            };
            let pairs = fields
                .chunks(2)
                .filter_map(|pair| match pair {
                    [Value::BulkString(n), Value::BulkString(v)] => {
                        Some((Bytes::from(n.clone()), Bytes::from(v.clone())))
                    }
                    _ => None,
                })
                .collect();
            Some((id, pairs))
        })
        .collect()
}

impl StreamsDlq {
    /// Connects to `url` and prepares to scan the stream `dlq`.
    pub async fn open(
        url: &str,
        dlq: &str,
        payload_field: &str,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let mut conn = connection_manager(&ConnectionSettings {
            url,
            tls_ca_file: None,
            connect_timeout: timeout,
            response_timeout: timeout,
        })
        .map_err(CliError::Usage)?;
        let last: Value = run::bounded(
            BROKER,
            "XREVRANGE",
            timeout,
            redis::cmd("XREVRANGE")
                .arg(dlq)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn),
        )
        .await?;
        let end = entries(last).into_iter().next().map(|(id, _)| id);
        Ok(StreamsDlq {
            conn,
            dlq: dlq.to_string(),
            after: "-".into(),
            end,
            page: VecDeque::new(),
            payload_field: payload_field.to_string(),
            moved: Script::new(MOVE),
            timeout,
        })
    }
}

impl DeadLetters for StreamsDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        let Some(end) = self.end.clone() else {
            return Ok(None);
        };
        if self.page.is_empty() {
            let start = match self.after.as_str() {
                "-" => "-".to_string(),
                after => format!("({after}"),
            };
            let got: Value = run::bounded(
                BROKER,
                "XRANGE",
                self.timeout,
                redis::cmd("XRANGE")
                    .arg(&self.dlq)
                    .arg(start)
                    .arg(&end)
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut self.conn),
            )
            .await?;
            self.page = entries(got).into();
        }
        let Some((id, fields)) = self.page.pop_front() else {
            return Ok(None);
        };
        self.after = id.clone();
        let mut payload = Bytes::new();
        let mut headers = Headers::new();
        for (name, value) in fields {
            if name.as_ref() == self.payload_field.as_bytes() && payload.is_empty() {
                payload = value;
            } else {
                headers.append(String::from_utf8_lossy(&name).into_owned(), value);
            }
        }
        let fallback = || {
            headers
                .get_str(ackstack_redis_streams::MESSAGE_ID_FIELD)
                .map_or_else(|| format!("{}:{id}", self.dlq), str::to_string)
        };
        let letter = Letter::from_copy(payload.clone(), headers.clone(), fallback);
        Ok(Some(Found {
            letter,
            handle: Handle {
                id,
                payload,
                headers,
            },
        }))
    }

    async fn republish(
        &mut self,
        handle: &Handle,
        queue: &str,
        replays: u32,
    ) -> Result<Sent, CliError> {
        let mut call = self.moved.prepare_invoke();
        call.key(queue).key(&self.dlq).arg(&handle.id);
        call.arg(&self.payload_field).arg(handle.payload.as_ref());
        for (name, value) in handle.headers.iter() {
            if name.starts_with(METADATA_PREFIX)
                || RESET_HEADERS.contains(&name)
                || name == REPLAYS_HEADER
            {
                continue;
            }
            call.arg(name).arg(value.as_ref());
        }
        call.arg(REPLAYS_HEADER).arg(replays.to_string());
        let moved: i64 = run::bounded(
            BROKER,
            &format!("replay to {queue}"),
            self.timeout,
            call.invoke_async(&mut self.conn),
        )
        .await?;
        if moved == 0 {
            return Err(CliError::Broker(format!(
                "letter {} left {} before it was replayed (another run took it)",
                handle.id, self.dlq
            )));
        }
        Ok(Sent::Once)
    }

    /// After a replay the letter is gone already (it moved in one step); `XDEL` of a missing
    /// entry does nothing.
    async fn remove(&mut self, handle: Handle) -> Result<(), CliError> {
        run::bounded(
            BROKER,
            "XDEL",
            self.timeout,
            redis::cmd("XDEL")
                .arg(&self.dlq)
                .arg(&handle.id)
                .query_async::<i64>(&mut self.conn),
        )
        .await
        .map(drop)
    }

    async fn keep(&mut self, _handle: Handle) -> Result<(), CliError> {
        Ok(())
    }

    async fn finish(self) -> Result<(), CliError> {
        Ok(())
    }
}
