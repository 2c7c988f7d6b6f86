//! Headers between ackstack ([`Headers`]) and NATS ([`HeaderMap`]), and the message id.

use std::str::FromStr;

use ackstack_core::Headers;
use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;

/// The JetStream header that deduplicates publishes within the stream's duplicate window.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// On a dead-letter copy: the subject the original was published to.
pub const SUBJECT_HEADER: &str = "x-ackstack-nats-subject";

/// What a server-control header of the original (`Nats-Rollup`, `Nats-Expected-*`,
/// `Nats-TTL`, `Nats-Msg-Id`, any `Nats-*`) is kept as on a copy: under this prefix, so that
/// it neither acts on the dead-letter stream nor on a replay.
pub const ORIGINAL_PREFIX: &str = "x-ackstack-orig-";

/// `headers` with every `Nats-*` header renamed under [`ORIGINAL_PREFIX`]: a rollup on a
/// dead-letter copy would purge the other letters of its subject, an expected-sequence
/// check would refuse it, a TTL would expire it.
pub(crate) fn without_server_controls(headers: &Headers) -> Headers {
    let mut out = Headers::new();
    for (name, value) in headers.iter() {
        if name
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
        {
            out.append(format!("{ORIGINAL_PREFIX}{name}"), value.clone());
        } else {
            out.append(name.to_string(), value.clone());
        }
    }
    out
}

/// A NATS header map as ackstack headers (every value of a repeated name, in order; names
/// sorted, since the map keeps no order).
pub(crate) fn from_nats(map: Option<&HeaderMap>) -> Headers {
    let mut headers = Headers::new();
    let Some(map) = map else {
        return headers;
    };
    let mut names: Vec<(&HeaderName, &Vec<HeaderValue>)> = map.iter().collect();
    names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(AsRef::<str>::as_ref(b.0)));
    for (name, values) in names {
        for value in values {
            headers.append(
                name.to_string(),
                Bytes::copy_from_slice(value.as_str().as_bytes()),
            );
        }
    }
    headers
}

/// Appends `name: value` to `map`, or says why NATS cannot carry it (a name with `:` or
/// control characters, a value that is not UTF-8 text without line breaks).
pub(crate) fn append(map: &mut HeaderMap, name: &str, value: &[u8]) -> Result<(), String> {
    let name = HeaderName::from_str(name).map_err(|e| format!("header name {name:?}: {e}"))?;
    let text = std::str::from_utf8(value).map_err(|_| format!("header {name}: not UTF-8"))?;
    let value = HeaderValue::from_str(text).map_err(|e| format!("header {name}: {e}"))?;
    map.append(name, value);
    Ok(())
}

/// ackstack headers as a NATS header map.
pub(crate) fn to_nats(headers: &Headers) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        append(&mut map, name, value)?;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn headers_go_both_ways_and_bad_ones_are_refused() {
        let headers = Headers::new()
            .with("tenant", "acme")
            .with("x-ackstack-attempt", "3");
        let map = to_nats(&headers).unwrap();
        let back = from_nats(Some(&map));
        assert_eq!(back.get_str("tenant"), Some("acme"));
        assert_eq!(back.get_str("x-ackstack-attempt"), Some("3"));
        assert!(
            to_nats(&Headers::new().with("a:b", "v")).is_err(),
            "':' in a name"
        );
        assert!(to_nats(&Headers::new().with("bin", vec![0xff, 0xfe])).is_err());
        assert!(to_nats(&Headers::new().with("crlf", "a\r\nb")).is_err());
        assert!(from_nats(None).is_empty());
    }

    #[test]
    fn server_controls_are_kept_under_another_name() {
        let headers = Headers::new()
            .with("Nats-Rollup", "sub")
            .with("nats-ttl", "1s")
            .with("tenant", "acme")
            .with("é-nats", "x");
        let out = without_server_controls(&headers);
        assert_eq!(out.get_str("x-ackstack-orig-Nats-Rollup"), Some("sub"));
        assert_eq!(out.get_str("x-ackstack-orig-nats-ttl"), Some("1s"));
        assert_eq!(out.get_str("Nats-Rollup"), None);
        assert_eq!(out.get_str("tenant"), Some("acme"));
        assert_eq!(out.get_str("é-nats"), Some("x"));
    }
}
