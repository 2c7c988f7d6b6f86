//! Failure fingerprints: dead letters that failed for the same cause share one, so that an
//! operator sees forty thousand dead letters as three incidents.
//!
//! A fingerprint is 16 hex digits of a fixed hash over the error kind and the error message
//! *normalised*: quoted values, UUIDs, long hex ids and numbers are replaced by placeholders,
//! so `order 4711 not found` and `order 4712 not found` are one group, and `insert failed:
//! 'A-7' violates "orders_pkey"` groups with every other key.
//!
//! ```
//! use ackstack_core::ErrorKind;
//! use ackstack_core::fingerprint::{fingerprint, normalise};
//!
//! assert_eq!(normalise("order 4711 not found in 'eu-west'"), "order <n> not found in <q>");
//! assert_eq!(
//!     fingerprint(ErrorKind::Permanent, "order 4711 not found"),
//!     fingerprint(ErrorKind::Permanent, "order 12 not found"),
//! );
//! assert_ne!(
//!     fingerprint(ErrorKind::Permanent, "order 4711 not found"),
//!     fingerprint(ErrorKind::Transient, "order 4711 not found"),
//! );
//! ```
//!
//! The hash (FNV-1a, 64 bits) and the rules are fixed: a fingerprint written into a dead letter
//! today matches the one computed for the same failure by a later version.

use crate::error::ErrorKind;

/// The error message with the parts that differ between occurrences of one cause replaced:
/// quoted text (`'…'`, `"…"`, `` `…` ``) by `<q>`, UUIDs by `<uuid>`, hex runs of 8 or more
/// digits holding a digit by `<hex>`, other numbers (digits, with `.`, `-` or `:` between
/// them, as in times and versions) by `<n>`; runs of whitespace become one space.
pub fn normalise(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '\'' | '"' | '`') && !word_char_before(&chars, i) {
            // Unclosed: a quoted value the message's length limit cut off runs to the end.
            let len = chars[i + 1..]
                .iter()
                .position(|&e| e == c)
                .unwrap_or(chars.len() - i - 1);
            out.push_str("<q>");
            i += len + 2;
            continue;
        }
        if c.is_ascii_hexdigit() && !word_char_before(&chars, i) {
            // A UUID is 36 characters: looking further would make `a-a-a-…` quadratic.
            let run = chars[i..]
                .iter()
                .take(37)
                .take_while(|c| c.is_ascii_hexdigit() || **c == '-')
                .count();
            let token: String = chars[i..i + run].iter().collect();
            let token = token.trim_end_matches('-');
            if is_uuid(token) && !word_char_at(&chars, i + token.len()) {
                out.push_str("<uuid>");
                i += token.len();
                continue;
            }
            let hex = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit())
                .count();
            let hex_token = &chars[i..i + hex];
            if hex >= 8
                && hex_token.iter().any(char::is_ascii_digit)
                && !word_char_at(&chars, i + hex)
            {
                out.push_str("<hex>");
                i += hex;
                continue;
            }
        }
        if c.is_ascii_digit() && !word_char_before(&chars, i) {
            let mut end = i;
            while end < chars.len() {
                if chars[end].is_ascii_digit() {
                    end += 1;
                } else if matches!(chars[end], '.' | '-' | ':')
                    && chars.get(end + 1).is_some_and(char::is_ascii_digit)
                {
                    end += 2;
                } else {
                    break;
                }
            }
            out.push_str("<n>");
            i = end;
            continue;
        }
        if c.is_whitespace() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
            i += 1;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out.trim().to_string()
}

/// The fingerprint of a failure: 16 hex digits over its kind and [`normalise`]d message.
pub fn fingerprint(kind: ErrorKind, message: &str) -> String {
    // FNV-1a, 64 bits: fixed by its definition, so fingerprints hold across builds.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind
        .as_str()
        .bytes()
        .chain([b'|'])
        .chain(normalise(message).bytes())
    {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn word_char_before(chars: &[char], i: usize) -> bool {
    i > 0 && word_char_at(chars, i - 1)
}

fn word_char_at(chars: &[char], i: usize) -> bool {
    chars
        .get(i)
        .is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

fn is_uuid(token: &str) -> bool {
    let groups: Vec<&str> = token.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_differs_between_occurrences_is_replaced() {
        let cases = [
            ("order 4711 not found", "order <n> not found"),
            ("timeout after 2.5s", "timeout after <n>s"),
            (
                "row 550e8400-e29b-41d4-a716-446655440000 is locked",
                "row <uuid> is locked",
            ),
            ("blob deadbeef01 missing", "blob <hex> missing"),
            (
                r#"insert failed: 'A-7' violates "orders_pkey""#,
                "insert failed: <q> violates <q>",
            ),
            (
                "at 2026-12-07 12:00:01 the  peer\treset",
                "at <n> <n> the peer reset",
            ),
            ("it's broken", "it's broken"),
            ("it's Bob's", "it's Bob's"),
            ("bad row 'A-7, B-", "bad row <q>"),
            ("http2 stream reset", "http2 stream reset"),
            ("deadline exceeded", "deadline exceeded"),
        ];
        for (message, expected) in cases {
            assert_eq!(normalise(message), expected, "{message}");
        }
    }

    #[test]
    fn fingerprints_are_stable_and_kind_sensitive() {
        // Pinned: a fingerprint stored in a dead letter must keep matching.
        assert_eq!(
            fingerprint(ErrorKind::Permanent, "order 4711 not found"),
            fingerprint(ErrorKind::Permanent, "order  99 not found")
        );
        assert_ne!(
            fingerprint(ErrorKind::Permanent, "order 1 not found"),
            fingerprint(ErrorKind::Permanent, "customer 1 not found")
        );
        assert_eq!(fingerprint(ErrorKind::Transient, "x").len(), 16);
    }

    #[test]
    fn long_runs_of_hex_and_dashes_are_read_once() {
        // Each hex scan looks at most a UUID's length ahead: `a-a-a-…` is linear, not
        // quadratic, in a letter of any length the CLI reads.
        let long = "a-".repeat(100_000);
        assert_eq!(normalise(&long), long);
        let ids = "deadbeef01-".repeat(10_000);
        assert_eq!(normalise(&ids), "<hex>-".repeat(10_000));
    }
}
