//! NATS JetStream: the dead-letter stream read message by message, by stream sequence (direct
//! gets, no consumer), from its first to the last sequence it held when the scan began, so a
//! scan takes nothing away from other readers. A replay publishes the original payload and
//! headers to the original subject (`--to` for another) and waits for the stream's ack; the
//! letter is deleted from the dead-letter stream only then. A replay to the letter's own
//! stream goes to the subject it was first published to (recorded on the copy). The
//! replay's `Nats-Msg-Id` is `<dead-letter stream>:<sequence>:<stored at>:replay`, so a
//! replay sent again after a kill within the work stream's duplicate window (2 minutes by
//! default) is dropped by JetStream.

use std::time::Duration;

use ackstack_core::Headers;
use ackstack_core::deadletter::METADATA_PREFIX;
use ackstack_nats::async_nats::jetstream::{self, stream};
use ackstack_nats::async_nats::{self, HeaderMap};
use ackstack_nats::{MESSAGE_ID_HEADER, SUBJECT_HEADER};
use bytes::Bytes;

use crate::letter::{Letter, REPLAYS_HEADER, RESET_HEADERS};
use crate::run::{self, CliError, DeadLetters, Found, Sent};

/// The broker, as errors name it.
const BROKER: &str = "NATS";

/// A scan of one dead-letter stream.
pub struct NatsDlq {
    js: jetstream::Context,
    stream: stream::Stream,
    name: String,
    next_seq: u64,
    last_seq: u64,
    timeout: Duration,
}

/// A letter found at a stream sequence.
pub struct Handle {
    seq: u64,
    /// When the dead-letter stream stored it (part of the replay's id, so that a sequence
    /// reused after the stream was purged is a different replay).
    stored_nanos: i128,
    /// The stream the letter came from and the subject it had there, when recorded.
    origin: Option<(String, String)>,
    payload: Bytes,
    headers: Headers,
}

impl NatsDlq {
    /// Connects to `url` and prepares to scan the stream `dlq`.
    pub async fn open(url: &str, dlq: &str, timeout: Duration) -> Result<Self, CliError> {
        let client = run::bounded(
            BROKER,
            "connect",
            timeout,
            async_nats::ConnectOptions::new()
                .connection_timeout(timeout)
                .name("ackstack-cli")
                .connect(url),
        )
        .await?;
        let js = jetstream::new(client);
        let stream = run::bounded(
            BROKER,
            &format!("stream {dlq}"),
            timeout,
            js.get_stream(dlq),
        )
        .await?;
        let state = &stream.cached_info().state;
        Ok(NatsDlq {
            next_seq: state.first_sequence.max(1),
            last_seq: state.last_sequence,
            stream,
            js,
            name: dlq.to_string(),
            timeout,
        })
    }
}

/// The headers a replay carries: the letter's own, without ackstack's metadata and retry
/// bookkeeping, the replay count set, and a `Nats-Msg-Id` of its own.
fn replay_headers(headers: &Headers, msg_id: &str, replays: u32) -> Result<HeaderMap, CliError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        if name.starts_with(METADATA_PREFIX)
            || RESET_HEADERS.contains(&name)
            || name == REPLAYS_HEADER
            || name == MESSAGE_ID_HEADER
            || name == SUBJECT_HEADER
        {
            continue;
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| CliError::Broker(format!("header {name} is not UTF-8")))?;
        map.append(name, text);
    }
    map.insert(REPLAYS_HEADER, replays.to_string().as_str());
    map.insert(MESSAGE_ID_HEADER, msg_id);
    Ok(map)
}

impl DeadLetters for NatsDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        while self.next_seq <= self.last_seq {
            let seq = self.next_seq;
            self.next_seq += 1;
            let got = tokio::time::timeout(self.timeout, self.stream.get_raw_message(seq)).await;
            let message = match got {
                Ok(Ok(m)) => m,
                Ok(Err(e))
                    if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) =>
                {
                    continue;
                }
                Ok(Err(e)) => return Err(CliError::broker("NATS message get", e)),
                Err(_) => {
                    return Err(CliError::Broker(format!(
                        "NATS message get: timed out after {:?}",
                        self.timeout
                    )));
                }
            };
            let mut headers = Headers::new();
            for (name, values) in message.headers.iter() {
                for value in values {
                    headers.append(name.to_string(), value.as_str().to_string());
                }
            }
            let fallback = || format!("{}:{seq}", self.name);
            let letter = Letter::from_copy(message.payload.clone(), headers.clone(), fallback);
            let origin = letter
                .metadata
                .as_ref()
                .zip(headers.get_str(SUBJECT_HEADER));
            let origin = origin.map(|(m, subject)| (m.queue.clone(), subject.to_string()));
            return Ok(Some(Found {
                letter,
                handle: Handle {
                    seq,
                    stored_nanos: message.time.unix_timestamp_nanos(),
                    origin,
                    payload: message.payload,
                    headers,
                },
            }));
        }
        Ok(None)
    }

    async fn republish(
        &mut self,
        handle: &Handle,
        queue: &str,
        replays: u32,
    ) -> Result<Sent, CliError> {
        let msg_id = format!(
            "{}:{}:{}:replay",
            self.name, handle.seq, handle.stored_nanos
        );
        let headers = replay_headers(&handle.headers, &msg_id, replays)?;
        // Back to the subject it was published to, when the destination is its own stream.
        let queue = match &handle.origin {
            Some((stream, subject)) if stream == queue => subject.as_str(),
            _ => queue,
        };
        let confirmed = async {
            let ack = self
                .js
                .publish_with_headers(queue.to_string(), headers, handle.payload.clone())
                .await?;
            ack.await
        };
        run::bounded(
            BROKER,
            &format!("publish to {queue}"),
            self.timeout,
            confirmed,
        )
        .await?;
        Ok(Sent::Once)
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), CliError> {
        let deleted = run::bounded(
            BROKER,
            "message delete",
            self.timeout,
            self.stream.delete_message(handle.seq),
        )
        .await?;
        if deleted {
            Ok(())
        } else {
            Err(CliError::Broker(format!(
                "NATS did not delete letter {} of {}",
                handle.seq, self.name
            )))
        }
    }

    async fn keep(&mut self, _handle: Handle) -> Result<(), CliError> {
        Ok(())
    }

    async fn finish(self) -> Result<(), CliError> {
        Ok(())
    }
}
