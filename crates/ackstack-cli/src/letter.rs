//! A dead letter as the command sees it on every broker, the filters that select letters, and
//! how they are printed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ackstack_core::deadletter::{
    ATTEMPT_HEADER, CRASHES_HEADER, DEFERRED_SINCE_HEADER, DeadLetterMetadata, FIRST_FAILURE_HEADER,
};
use ackstack_core::{ErrorKind, Headers};
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The header counting how often a message was sent back from its dead-letter queue.
pub const REPLAYS_HEADER: &str = "x-ackstack-replays";

/// Headers of ours that a replayed message loses besides the dead-letter metadata: the
/// attempt count and first failure of the retry layer, the crashes counted while it ran
/// alone, and the time of its first deferral, so that the replay starts afresh.
pub const RESET_HEADERS: &[&str] = &[
    ATTEMPT_HEADER,
    FIRST_FAILURE_HEADER,
    CRASHES_HEADER,
    DEFERRED_SINCE_HEADER,
];

/// One dead letter.
#[derive(Clone, Debug)]
pub struct Letter {
    /// What `show` and `--message-id` take: the message id, or when it has none the broker's
    /// own position on Kafka (`partition:offset`) and a [`content_id`] on RabbitMQ.
    pub id: String,
    /// The body, byte for byte.
    pub payload: Bytes,
    /// The original headers: the message's own, without ackstack's metadata.
    pub headers: Headers,
    /// ackstack's dead-letter metadata; `None` when the message was not dead-lettered by
    /// ackstack (or its metadata is unreadable).
    pub metadata: Option<DeadLetterMetadata>,
    /// How often it was replayed before ([`REPLAYS_HEADER`]).
    pub replays: u32,
}

impl Letter {
    /// The queue a replay goes to: `to`, else the queue the metadata names.
    pub fn destination<'a>(&'a self, to: Option<&'a str>) -> Option<&'a str> {
        to.or_else(|| self.metadata.as_ref().map(|m| m.queue.as_str()))
    }

    /// The letter of `payload` and `headers` as a dead-letter copy carries them: ackstack's
    /// metadata read and taken out of the headers, the replay count read. It is named by the
    /// metadata's message id, else by `fallback`.
    pub fn from_copy(
        payload: Bytes,
        mut headers: Headers,
        fallback: impl FnOnce() -> String,
    ) -> Self {
        let metadata = DeadLetterMetadata::from_headers(&headers);
        let id = metadata
            .as_ref()
            .and_then(|m| m.message_id.clone())
            .unwrap_or_else(fallback);
        ackstack_core::deadletter::strip_metadata(&mut headers);
        Letter {
            id,
            replays: replays_of(&headers),
            payload,
            headers,
            metadata,
        }
    }

    /// Where it came from: `queue`, or `topic[partition]@offset`.
    pub fn origin(&self) -> String {
        match &self.metadata {
            None => "-".to_string(),
            Some(m) => match (m.partition, m.offset) {
                (Some(p), Some(o)) => format!("{}[{p}]@{o}", m.queue),
                _ => m.queue.clone(),
            },
        }
    }
}

/// An id for a letter the broker names no other way (an AMQP message without a message id):
/// `h-` and 12 hex digits of a hash over the payload and every header as the dead letter
/// carries them, ackstack's metadata with its failure times included. The same letter gets
/// the same id in every scan, whatever was removed before it; two letters get the same one
/// only when they are the same bytes, failure times and all.
pub fn content_id(payload: &[u8], headers: &Headers) -> String {
    // FNV-1a, 64 bits: fixed by its definition, so ids hold across builds and versions.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(payload);
    for (name, value) in headers.iter() {
        feed(name.as_bytes());
        feed(value);
    }
    format!("h-{:012x}", hash >> 16)
}

/// The replay count in `headers` (0 when absent or unreadable).
pub fn replays_of(headers: &Headers) -> u32 {
    headers
        .get_str(REPLAYS_HEADER)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Which letters a command acts on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this error kind.
    pub error_kind: Option<ErrorKind>,
    /// Only letters whose last failure is at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only letters whose last failure is before this time (ms since the epoch).
    pub until_ms: Option<u64>,
    /// Only this id.
    pub message_id: Option<String>,
    /// Only letters whose error message contains this text.
    pub grep: Option<String>,
    /// Only letters of this failure group (fingerprint, as `groups` shows it).
    pub group: Option<String>,
    /// At most this many letters.
    pub limit: Option<usize>,
}

impl Filter {
    /// Whether a filter other than `--group` needs the letter's metadata.
    fn needs_metadata(&self) -> bool {
        self.error_kind.is_some()
            || self.since_ms.is_some()
            || self.until_ms.is_some()
            || self.grep.is_some()
    }

    /// Whether `letter` is selected (the limit is the caller's to count).
    pub fn matches(&self, letter: &Letter) -> bool {
        if let Some(id) = &self.message_id {
            let original = letter.metadata.as_ref().and_then(|m| m.message_id.as_ref());
            if letter.id != *id && original != Some(id) {
                return false;
            }
        }
        let Some(m) = &letter.metadata else {
            // `groups` shows the letters without metadata as the group `-`.
            return !self.needs_metadata() && self.group.as_deref().is_none_or(|g| g == "-");
        };
        self.error_kind.is_none_or(|k| m.error_kind == k)
            && self.since_ms.is_none_or(|t| m.last_failure_ms >= t)
            && self.until_ms.is_none_or(|t| m.last_failure_ms < t)
            && self
                .grep
                .as_deref()
                .is_none_or(|g| m.error_message.contains(g))
            && self.group.as_deref().is_none_or(|g| m.fingerprint == g)
    }
}

/// A time given on the command line: RFC 3339 (`2026-12-02T18:00:00Z`,
/// `2026-12-02T19:00:00+01:00`; UTC when it has no offset), a date (`2026-12-02`, midnight
/// UTC), or an age (`90s`, `15m`, `2h`, `3d`) counted back from now. A day the month does not
/// have is an error.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Some(ago) = parse_age(text) {
        let now = millis(SystemTime::now());
        return Ok(now.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)));
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!("{text:?} is neither a time like 2026-12-02T18:00:00Z nor an age like 2h")
    })
}

fn parse_age(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

/// RFC 3339 by the `time` crate's parser, with the forms a person types besides: a date alone
/// (midnight), no offset (UTC), a space for the `T`.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let mut full = text.replacen(' ', "T", 1);
    if !full.contains('T') {
        full.push_str("T00:00:00");
    }
    let has_offset = full.ends_with(['Z', 'z'])
        || full
            .rsplit_once('T')
            .is_some_and(|(_, time)| time.contains(['+', '-']));
    if !has_offset {
        full.push('Z');
    }
    let at = OffsetDateTime::parse(&full, &Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A time (ms since the epoch) as `2026-12-02T18:00:00Z` (whole seconds), or the number of
/// milliseconds where that cannot be written (past the year 9999).
pub fn format_time(ms: u64) -> String {
    i64::try_from(ms / 1000)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `s` cut to `max` characters, marked with `…`.
pub fn cut(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The `list` table: a header line and one line per letter.
pub fn table(letters: &[Letter]) -> String {
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|l| {
            let m = l.metadata.as_ref();
            [
                l.id.clone(),
                l.origin(),
                m.map_or("-".into(), |m| m.attempts.to_string()),
                m.map_or("-".into(), |m| m.error_kind.as_str().to_string()),
                m.map_or("-".into(), |m| {
                    m.first_failure_ms.map_or("-".into(), format_time)
                }),
                m.map_or("-".into(), |m| format_time(m.last_failure_ms)),
                m.map_or("-".into(), |m| cut(&m.error_message, 60)),
            ]
        })
        .collect();
    let head = [
        "MESSAGE ID",
        "ORIGIN",
        "ATTEMPTS",
        "KIND",
        "FIRST FAILURE",
        "LAST FAILURE",
        "ERROR",
    ];
    columns(&head, &rows)
}

/// A table: `head`, then `rows`, each column as wide as its widest cell (the last one free).
pub fn columns<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A letter as JSON, for `--json`: id, origin, replays, the metadata, the headers (text, or
/// `hex:` for binary values) and, with `payload`, the body (text, or hex for binary).
#[derive(Serialize)]
pub struct LetterJson<'a> {
    id: &'a str,
    origin: String,
    replays: u32,
    metadata: Option<&'a DeadLetterMetadata>,
    headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_encoding: Option<&'static str>,
}

impl<'a> LetterJson<'a> {
    /// The JSON form of `letter`, with its payload when asked.
    pub fn new(letter: &'a Letter, payload: bool) -> Self {
        let (body, encoding) = if payload {
            let (text, enc) = shown_bytes(&letter.payload);
            (Some(text), Some(enc))
        } else {
            (None, None)
        };
        LetterJson {
            id: &letter.id,
            origin: letter.origin(),
            replays: letter.replays,
            metadata: letter.metadata.as_ref(),
            headers: letter
                .headers
                .iter()
                .map(|(n, v)| {
                    let (text, enc) = shown_bytes(v);
                    let text = if enc == "hex" {
                        format!("hex:{text}")
                    } else {
                        text
                    };
                    (n.to_string(), text)
                })
                .collect(),
            payload: body,
            payload_encoding: encoding,
        }
    }
}

/// Bytes as text when they are UTF-8 without control characters (newlines and tabs allowed),
/// else as hex; and which it is (`utf8` or `hex`).
pub fn shown_bytes(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text)
            if text
                .chars()
                .all(|c| !c.is_control() || c == '\n' || c == '\t' || c == '\r') =>
        {
            (text.to_string(), "utf8")
        }
        _ => (bytes.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
    }
}

/// The `show` page: metadata, headers and payload, for a person.
pub fn page(letter: &Letter) -> String {
    let mut out = format!("message id:  {}\n", letter.id);
    out.push_str(&format!("origin:      {}\n", letter.origin()));
    out.push_str(&format!("replays:     {}\n", letter.replays));
    match &letter.metadata {
        Some(m) => {
            out.push_str(&format!("reason:      {:?}\n", m.reason));
            out.push_str(&format!("error kind:  {}\n", m.error_kind.as_str()));
            out.push_str(&format!("attempts:    {}\n", m.attempts));
            out.push_str(&format!("consumer:    {}\n", m.consumer));
            if let Some(first) = m.first_failure_ms {
                out.push_str(&format!("first:       {}\n", format_time(first)));
            }
            out.push_str(&format!(
                "last:        {}\n",
                format_time(m.last_failure_ms)
            ));
            out.push_str(&format!("error:       {}\n", m.error_message));
        }
        None => out.push_str("metadata:    none (not dead-lettered by ackstack)\n"),
    }
    out.push_str("headers:\n");
    for (name, value) in letter.headers.iter() {
        let (text, enc) = shown_bytes(value);
        let text = if enc == "hex" {
            format!("hex:{text}")
        } else {
            text
        };
        out.push_str(&format!("  {name}: {text}\n"));
    }
    let (body, encoding) = shown_bytes(&letter.payload);
    out.push_str(&format!(
        "payload ({} bytes, {encoding}):\n{body}\n",
        letter.payload.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_depend_on_every_byte_and_nothing_else() {
        let headers = Headers::new().with("x-tenant", "acme");
        let id = content_id(b"order", &headers);
        assert_eq!(id, content_id(b"order", &headers.clone()));
        assert_eq!(id.len(), 14);
        assert!(id.starts_with("h-"));
        assert_ne!(id, content_id(b"orders", &headers));
        assert_ne!(
            id,
            content_id(b"order", &Headers::new().with("x-tenant", "acne"))
        );
        assert_ne!(id, content_id(b"order", &Headers::new()));
        // Lengths are hashed too: moving a byte between name and value changes the id.
        assert_ne!(
            content_id(b"", &Headers::new().with("ab", "c")),
            content_id(b"", &Headers::new().with("a", "bc"))
        );
        // FNV-1a is fixed by its definition: the id of a letter never changes between builds.
        assert_eq!(content_id(b"", &Headers::new()), "h-a8c7f832281a");
    }

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-12-02T18:51:06Z").unwrap();
        assert_eq!(format_time(ms), "2026-12-02T18:51:06Z");
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_time("2000-02-29T00:00:00Z").unwrap(), 951_782_400_000);
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
        // Days a month does not have are refused, not carried into the next month.
        assert!(parse_time("2026-02-31").is_err());
        assert!(parse_time("2026-04-31T10:00:00Z").is_err());
        assert!(parse_time("2026-02-29").is_err(), "2026 is no leap year");
        // An offset is honoured; without one the time is UTC.
        assert_eq!(parse_time("2026-12-02T19:51:06+01:00").unwrap(), ms);
        assert_eq!(parse_time("2026-12-02T18:51:06").unwrap(), ms);
        assert_eq!(parse_time("2026-12-02 18:51:06Z").unwrap(), ms);
        assert_eq!(parse_time("2026-12-02T18:51:06.250Z").unwrap(), ms + 250);
        let two_hours_ago = parse_time("2h").unwrap();
        let now = millis(SystemTime::now());
        assert!(now - two_hours_ago >= 7_200_000 && now - two_hours_ago < 7_210_000);
    }

    #[test]
    fn binary_is_shown_as_hex() {
        assert_eq!(shown_bytes(b"plain\ntext"), ("plain\ntext".into(), "utf8"));
        assert_eq!(shown_bytes(&[0, 255, 16]), ("00ff10".into(), "hex"));
    }
}
