//! `ackstack dlq groups`: dead letters grouped by cause.
//!
//! A group is the letters whose metadata carries one fingerprint (error kind and normalised
//! error message, see `ackstack_core::fingerprint`): an operator with forty thousand dead
//! letters sees the few causes behind them, how many each, since when, and replays or purges
//! one cause with `--group FP`.

use std::collections::HashMap;

use serde::Serialize;

use crate::letter::{Letter, columns, format_time};

/// The letters of one cause.
#[derive(Debug, Serialize)]
pub struct Group {
    /// The fingerprint `--group` takes; `-` for letters without ackstack's metadata.
    pub fingerprint: String,
    /// How many letters.
    pub count: u64,
    /// `transient` or `permanent` (`-` without metadata).
    pub error_kind: &'static str,
    /// The earliest failure among them (ms since the epoch).
    pub first_seen_ms: Option<u64>,
    /// The latest failure among them (ms since the epoch).
    pub last_seen_ms: Option<u64>,
    /// The error message with what differs between letters replaced (`<n>`, `<q>`, ...).
    pub pattern: String,
    /// One letter's id and error message, as an example.
    pub sample_id: String,
    /// That letter's error message.
    pub sample_error: String,
}

/// The groups of `letters`, the largest first (ties: the latest failure first).
pub fn groups(letters: &[Letter]) -> Vec<Group> {
    let mut by: HashMap<String, Group> = HashMap::new();
    for letter in letters {
        let m = letter.metadata.as_ref();
        let fingerprint = m.map_or_else(|| "-".to_string(), |m| m.fingerprint.clone());
        let group = by.entry(fingerprint.clone()).or_insert_with(|| Group {
            fingerprint,
            count: 0,
            error_kind: m.map_or("-", |m| m.error_kind.as_str()),
            first_seen_ms: None,
            last_seen_ms: None,
            pattern: m.map_or_else(
                || "(not dead-lettered by ackstack)".to_string(),
                |m| ackstack_core::fingerprint::normalise(&m.error_message),
            ),
            sample_id: letter.id.clone(),
            sample_error: m.map_or_else(String::new, |m| m.error_message.clone()),
        });
        group.count += 1;
        if let Some(m) = m {
            let first = m.first_failure_ms.unwrap_or(m.last_failure_ms);
            group.first_seen_ms = Some(group.first_seen_ms.map_or(first, |t| t.min(first)));
            group.last_seen_ms = Some(
                group
                    .last_seen_ms
                    .map_or(m.last_failure_ms, |t| t.max(m.last_failure_ms)),
            );
        }
    }
    let mut groups: Vec<Group> = by.into_values().collect();
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last_seen_ms.cmp(&a.last_seen_ms))
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    groups
}

/// The `groups` table.
pub fn table(groups: &[Group]) -> String {
    let time = |t: Option<u64>| t.map_or("-".to_string(), format_time);
    let rows: Vec<[String; 7]> = groups
        .iter()
        .map(|g| {
            [
                g.fingerprint.clone(),
                g.count.to_string(),
                g.error_kind.to_string(),
                time(g.first_seen_ms),
                time(g.last_seen_ms),
                g.sample_id.clone(),
                g.pattern.clone(),
            ]
        })
        .collect();
    let head = [
        "GROUP",
        "COUNT",
        "KIND",
        "FIRST SEEN",
        "LAST SEEN",
        "SAMPLE",
        "ERROR",
    ];
    columns(&head, &rows)
}

#[cfg(test)]
mod tests {
    use ackstack_core::{DeadLetter, Delivery, ErrorKind, Failure, Headers, Origin};
    use bytes::Bytes;

    use super::*;

    fn letter(id: &str, kind: ErrorKind, error: &str, at_ms: u64) -> Letter {
        let delivery = Delivery::new("x", Origin::new("rabbitmq", "orders", "c"));
        let mut failure = Failure::new(kind, error);
        failure.at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
        let mut headers = Headers::new();
        DeadLetter::new(&delivery, failure)
            .metadata(&delivery)
            .apply_to(&mut headers);
        Letter::from_copy(Bytes::from_static(b"x"), headers, || id.to_string())
    }

    #[test]
    fn letters_of_one_cause_form_one_group_with_counts_and_times() {
        let letters = vec![
            letter("a", ErrorKind::Permanent, "order 1 not found", 3_000),
            letter("b", ErrorKind::Permanent, "order 22 not found", 1_000),
            letter("c", ErrorKind::Transient, "timeout after 30s", 2_000),
            letter("d", ErrorKind::Permanent, "order 333 not found", 5_000),
            Letter::from_copy(Bytes::from_static(b"?"), Headers::new(), || "e".into()),
        ];
        let groups = groups(&letters);
        assert_eq!(groups.len(), 3);
        let orders = &groups[0];
        assert_eq!(orders.count, 3);
        assert_eq!(orders.pattern, "order <n> not found");
        assert_eq!(orders.error_kind, "permanent");
        assert_eq!(
            (orders.first_seen_ms, orders.last_seen_ms),
            (Some(1_000), Some(5_000))
        );
        let fp = letters[0].metadata.as_ref().unwrap().fingerprint.clone();
        assert_eq!(orders.fingerprint, fp);
        assert_eq!(groups[1].pattern, "timeout after <n>s");
        assert_eq!(groups[2].fingerprint, "-");
        let shown = table(&groups);
        assert!(shown.starts_with("GROUP"), "{shown}");
        assert!(shown.contains(&fp), "{shown}");
    }
}
