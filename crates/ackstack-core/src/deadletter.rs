//! Dead-letter metadata: what is attached to a message forwarded to the dead-letter destination.
//!
//! The payload and the original headers travel byte for byte; ackstack adds a bounded set of
//! fields (invariant 4 in docs/CONTRACT.md). As headers they are named `x-ackstack-dl-*`; where a broker limits the
//! number of attributes (SQS: 10) adapters pack them into one JSON value with
//! [`DeadLetterMetadata::to_json`]. Dead-lettering a message that already carries our metadata
//! replaces it ([`strip_metadata`]) instead of adding more.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::delivery::{Delivery, Headers};
use crate::error::{ErrorKind, Failure, truncate};

/// The prefix of every dead-letter metadata header.
pub const METADATA_PREFIX: &str = "x-ackstack-dl-";
/// The header that carries ackstack's own attempt count on republished copies.
pub const ATTEMPT_HEADER: &str = "x-ackstack-attempt";
/// The header that records when a republished message first failed (milliseconds since epoch).
pub const FIRST_FAILURE_HEADER: &str = "x-ackstack-first-failure";
/// The header that records when a deferred message ([`HandlerError::defer`]) was first
/// deferred (milliseconds since epoch), carried by the copies of brokers that defer by
/// republishing. [`RetryConfig::defer_limit`] counts from it.
///
/// [`HandlerError::defer`]: crate::HandlerError::defer
/// [`RetryConfig::defer_limit`]: crate::RetryConfig::defer_limit
pub const DEFERRED_SINCE_HEADER: &str = "x-ackstack-deferred-since";
/// The header in which a suspect moved to run alone (docs/DESIGN.md, "Crashes count as
/// attempts") carries its runs alone that ended with the process dead.
pub const CRASHES_HEADER: &str = "x-ackstack-crashes";
/// The dead-letter metadata header that lists, comma-separated, what was left out of a
/// dead-letter copy so that it fits the broker's limit (Kafka's message size, RabbitMQ's
/// `frame_max`); absent when nothing was. Like every `x-ackstack-dl-*` header it is replaced
/// on re-dead-lettering. (SQS lists the same names in its metadata JSON.)
pub const DROPPED_HEADER: &str = "x-ackstack-dl-dropped";
/// In [`DROPPED_HEADER`] (or SQS's JSON list): the error message in the metadata was cut
/// shorter than usual ([`DeadLetterMetadata::cut_error_message`]).
pub const DROPPED_ERROR_TRUNCATED: &str = "error_message_truncated";

/// Why a message is dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The handler reported a permanent failure (or the payload did not decode).
    Permanent,
    /// The message failed transiently on every allowed attempt.
    MaxAttempts,
    /// The consumer process died while handling the message, as many times as attempts are
    /// allowed (an out-of-memory kill, an abort, a segfault), or the message arrived past its
    /// attempt limit without a settlement (the broker counted deliveries that ended so).
    Crashed,
    /// The handler deferred the message ([`HandlerError::defer`](crate::HandlerError::defer))
    /// for longer than [`RetryConfig::defer_limit`](crate::RetryConfig::defer_limit) in all.
    Deferred,
}

/// A decision to dead-letter: the last failure, how many attempts were made, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The last failure.
    pub failure: Failure,
    /// Attempts made, counting this one.
    pub attempts: u32,
    /// Why.
    pub reason: DeadLetterReason,
}

impl DeadLetter {
    /// Dead-letters `delivery` for `failure`.
    pub fn new(delivery: &Delivery, failure: Failure) -> Self {
        let reason = match (failure.kind, failure.deferred_since) {
            (ErrorKind::Permanent, _) => DeadLetterReason::Permanent,
            (ErrorKind::Transient, Some(_)) => DeadLetterReason::Deferred,
            (ErrorKind::Transient, None) => DeadLetterReason::MaxAttempts,
        };
        DeadLetter {
            attempts: failure.attempt.max(delivery.attempt),
            failure,
            reason,
        }
    }

    /// Dead-letters `delivery` whose handling took the consumer process down `crashes` times
    /// (or that arrived past its attempt limit: `crashes` is then the broker's count).
    pub fn crashed(delivery: &Delivery, crashes: u32) -> Self {
        DeadLetter {
            failure: Failure::new(
                ErrorKind::Transient,
                format!(
                    "the consumer stopped without settling this message {crashes} times (the \
                     process died while handling it, or the message was never settled)"
                ),
            ),
            attempts: crashes.max(delivery.attempt),
            reason: DeadLetterReason::Crashed,
        }
    }

    /// The metadata to attach to the dead-letter copy of `delivery`.
    pub fn metadata(&self, delivery: &Delivery) -> DeadLetterMetadata {
        let last = millis(self.failure.at);
        let first = delivery
            .headers
            .get_str(FIRST_FAILURE_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&first| first <= last)
            .or((self.attempts <= 1).then_some(last));
        DeadLetterMetadata {
            reason: self.reason,
            error_kind: self.failure.kind,
            error_message: self.failure.message.clone(),
            attempts: self.attempts,
            broker: delivery.origin.broker.to_string(),
            queue: delivery.origin.queue.to_string(),
            partition: delivery.origin.partition,
            offset: delivery.origin.offset,
            message_id: delivery.message_id.clone(),
            first_failure_ms: first,
            last_failure_ms: last,
            consumer: delivery.origin.consumer.to_string(),
            fingerprint: crate::fingerprint::fingerprint(self.failure.kind, &self.failure.message),
        }
    }
}

/// When `delivery` was first deferred, from its [`DEFERRED_SINCE_HEADER`] (`None` when it
/// has none, or one that is not a number of milliseconds).
pub fn deferred_since(delivery: &Delivery) -> Option<SystemTime> {
    let ms = delivery
        .headers
        .get_str(DEFERRED_SINCE_HEADER)?
        .trim()
        .parse::<u64>()
        .ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The fields attached to a dead-lettered message. Bounded: the message is truncated to
/// [`crate::error::MAX_FAILURE_MESSAGE`] bytes and every other field is small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterMetadata {
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The last error's kind.
    pub error_kind: ErrorKind,
    /// The last error's message, truncated.
    pub error_message: String,
    /// Attempts made.
    pub attempts: u32,
    /// The broker kind it came from.
    pub broker: String,
    /// The queue or topic it came from.
    pub queue: String,
    /// The Kafka partition it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// The Kafka offset it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// Its message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// When it first failed (ms since the Unix epoch), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure_ms: Option<u64>,
    /// When it last failed (ms since the Unix epoch).
    pub last_failure_ms: u64,
    /// The consumer that dead-lettered it.
    pub consumer: String,
    /// The failure's group: its kind and normalised message hashed
    /// ([`fingerprint`](crate::fingerprint::fingerprint)); computed from those two where an
    /// older dead letter does not carry it.
    #[serde(default)]
    pub fingerprint: String,
}

impl DeadLetterMetadata {
    /// The fields as `(header name, value)` pairs, names prefixed with [`METADATA_PREFIX`].
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("reason", reason_str(self.reason).to_string()),
            ("error-kind", self.error_kind.as_str().to_string()),
            ("error-message", self.error_message.clone()),
            ("attempts", self.attempts.to_string()),
            ("broker", self.broker.clone()),
            ("queue", self.queue.clone()),
            ("last-failure-ms", self.last_failure_ms.to_string()),
            ("consumer", self.consumer.clone()),
            ("fingerprint", self.fingerprint.clone()),
        ];
        if let Some(p) = self.partition {
            pairs.push(("partition", p.to_string()));
        }
        if let Some(o) = self.offset {
            pairs.push(("offset", o.to_string()));
        }
        if let Some(id) = &self.message_id {
            pairs.push(("message-id", id.clone()));
        }
        if let Some(first) = self.first_failure_ms {
            pairs.push(("first-failure-ms", first.to_string()));
        }
        pairs
            .into_iter()
            .map(|(k, v)| (format!("{METADATA_PREFIX}{k}"), v))
            .collect()
    }

    /// Replaces any earlier metadata in `headers` with this one.
    pub fn apply_to(&self, headers: &mut Headers) {
        strip_metadata(headers);
        for (name, value) in self.header_pairs() {
            headers.append(name, value);
        }
    }

    /// Cuts the error message by `over` bytes, what a dead-letter copy is over its broker's
    /// limit (each byte cut shortens the copy by at least one), marking the cut with `…`
    /// ([`truncate`]); to nothing when no more than the marker would be left. Adapters that
    /// shrink a copy to fit repeat this until it fits or the message is empty, and record
    /// [`DROPPED_ERROR_TRUNCATED`].
    pub fn cut_error_message(&mut self, over: usize) {
        let keep = self.error_message.len().saturating_sub(over);
        self.error_message = if keep <= '…'.len_utf8() {
            String::new()
        } else {
            truncate(std::mem::take(&mut self.error_message), keep)
        };
    }

    /// The fields as one compact JSON object, for brokers with few attributes.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the fields back from headers written by [`DeadLetterMetadata::apply_to`].
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let get = |k: &str| headers.get_str(&format!("{METADATA_PREFIX}{k}"));
        let mut metadata = DeadLetterMetadata {
            reason: match get("reason")? {
                "permanent" => DeadLetterReason::Permanent,
                "max_attempts" => DeadLetterReason::MaxAttempts,
                "crashed" => DeadLetterReason::Crashed,
                "deferred" => DeadLetterReason::Deferred,
                _ => return None,
            },
            error_kind: match get("error-kind")? {
                "permanent" => ErrorKind::Permanent,
                "transient" => ErrorKind::Transient,
                _ => return None,
            },
            error_message: get("error-message")?.to_string(),
            attempts: get("attempts")?.parse().ok()?,
            broker: get("broker")?.to_string(),
            queue: get("queue")?.to_string(),
            partition: get("partition").and_then(|v| v.parse().ok()),
            offset: get("offset").and_then(|v| v.parse().ok()),
            message_id: get("message-id").map(str::to_string),
            first_failure_ms: get("first-failure-ms").and_then(|v| v.parse().ok()),
            last_failure_ms: get("last-failure-ms")?.parse().ok()?,
            consumer: get("consumer")?.to_string(),
            fingerprint: get("fingerprint").unwrap_or_default().to_string(),
        };
        metadata.fill_fingerprint();
        Some(metadata)
    }

    /// With the fingerprint computed where it is missing ([`DeadLetterMetadata::fill_fingerprint`]).
    pub fn with_fingerprint(mut self) -> Self {
        self.fill_fingerprint();
        self
    }

    /// Computes the fingerprint where it is missing (a dead letter written before
    /// fingerprints, or one whose metadata was packed without it).
    pub fn fill_fingerprint(&mut self) {
        if self.fingerprint.is_empty() {
            self.fingerprint =
                crate::fingerprint::fingerprint(self.error_kind, &self.error_message);
        }
    }
}

fn reason_str(r: DeadLetterReason) -> &'static str {
    match r {
        DeadLetterReason::Permanent => "permanent",
        DeadLetterReason::MaxAttempts => "max_attempts",
        DeadLetterReason::Crashed => "crashed",
        DeadLetterReason::Deferred => "deferred",
    }
}

/// Removes every `x-ackstack-dl-*` header.
pub fn strip_metadata(headers: &mut Headers) {
    let ours: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.starts_with(METADATA_PREFIX))
        .map(|(n, _)| n.to_string())
        .collect();
    for name in ours {
        headers.remove(&name);
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Origin;

    fn delivery() -> Delivery {
        let mut d = Delivery::new("body", Origin::new("memory", "orders", "c1"));
        d.attempt = 3;
        d.message_id = Some("m-1".into());
        d.headers.insert("app", "kept");
        d
    }

    #[test]
    fn metadata_round_trips_through_headers_and_replaces_earlier() {
        let d = delivery();
        let letter = DeadLetter::new(&d, Failure::new(ErrorKind::Transient, "boom"));
        assert_eq!(letter.reason, DeadLetterReason::MaxAttempts);
        let meta = letter.metadata(&d);
        let mut headers = d.headers.clone();
        meta.apply_to(&mut headers);
        let count = headers.len();
        meta.apply_to(&mut headers);
        assert_eq!(
            headers.len(),
            count,
            "re-dead-lettering must not grow headers"
        );
        assert_eq!(headers.get_str("app"), Some("kept"));
        assert_eq!(
            DeadLetterMetadata::from_headers(&headers),
            Some(meta.clone())
        );
        let json: DeadLetterMetadata = serde_json::from_str(&meta.to_json()).unwrap();
        assert_eq!(json, meta);
    }

    #[test]
    fn the_error_message_is_cut_by_the_overshoot_to_nothing_below_the_marker() {
        let d = delivery();
        let mut meta =
            DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "x".repeat(100))).metadata(&d);
        meta.cut_error_message(40);
        assert_eq!(meta.error_message.len(), 60);
        assert!(meta.error_message.ends_with('…'));
        meta.cut_error_message(0);
        assert_eq!(meta.error_message.len(), 60, "nothing over: nothing cut");
        meta.cut_error_message(57);
        assert_eq!(
            meta.error_message, "",
            "3 bytes left: no room for more than the marker"
        );
        let mut meta = DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "éééé")).metadata(&d);
        meta.cut_error_message(3);
        assert_eq!(meta.error_message, "é…", "cut on a character boundary");
        meta.cut_error_message(usize::MAX);
        assert_eq!(meta.error_message, "");
    }

    #[test]
    fn first_failure_comes_from_header_when_present() {
        let mut d = delivery();
        d.headers.insert(FIRST_FAILURE_HEADER, "1000");
        let meta = DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "bad")).metadata(&d);
        assert_eq!(meta.first_failure_ms, Some(1000));
        assert_eq!(meta.reason, DeadLetterReason::Permanent);
        let mut unknown = delivery();
        unknown.headers.insert(FIRST_FAILURE_HEADER, "not a number");
        let meta =
            DeadLetter::new(&unknown, Failure::new(ErrorKind::Permanent, "bad")).metadata(&unknown);
        assert_eq!(
            meta.first_failure_ms, None,
            "attempt 3 with no record: unknown"
        );
    }
}
