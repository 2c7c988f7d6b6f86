//! Crash marks: what a partition's commit metadata records so that a consumer that died in a
//! handler is found out by the next owner of the partition (invariant 2, crashes count as
//! attempts; docs/DESIGN.md, "Crashes count as attempts").
//!
//! Every commit of a partition carries, in its metadata (`ackstack1;s=S;a=A;c=O:N,...`):
//!
//! * `s`: records at offsets below `S` may have been handed to handlers. It is raised, a chunk
//!   ahead and synchronously, before `receive` returns a record beyond it, so a process that
//!   dies in a handler always left it above that record;
//! * `a`: the record running alone now, if any (written synchronously before its run, see
//!   [`Settle::arm`](ackstack_core::Settle::arm));
//! * `c`: crash counts of suspects not yet passed by the committed position.
//!
//! A partition assigned with such marks reads them with its committed offset: its records
//! below `s` are suspects, and the record at `a` died alone once more.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// The prefix (and version) of ackstack's commit metadata.
const PREFIX: &str = "ackstack1";
/// Crash counts kept at most per partition (the lowest offsets win).
const MAX_COUNTS: usize = 64;

/// A partition's crash marks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// Records at or above it were never handed to handlers (`s`).
    pub(crate) started_below: Option<i64>,
    /// The record running alone now (`a`).
    pub(crate) alone: Option<i64>,
    /// Runs alone that ended with the process dead, per offset (`c`).
    pub(crate) crashes: BTreeMap<i64, u32>,
}

impl Marks {
    /// The metadata of a commit at `position`: counts below it are dropped (passed for good).
    pub(crate) fn encode(&self, position: i64) -> String {
        let mut out = String::from(PREFIX);
        if let Some(s) = self.started_below {
            out.push_str(&format!(";s={s}"));
        }
        if let Some(a) = self.alone {
            out.push_str(&format!(";a={a}"));
        }
        let counts: Vec<String> = self
            .crashes
            .range(position..)
            .take(MAX_COUNTS)
            .map(|(o, n)| format!("{o}:{n}"))
            .collect();
        if !counts.is_empty() {
            out.push_str(";c=");
            out.push_str(&counts.join(","));
        }
        out
    }

    /// The marks found in a committed offset's metadata, with the run alone they record
    /// counted as one more crash. `None` for metadata that is not ackstack's (empty, or
    /// written by another tool) or that cannot be read.
    pub(crate) fn recover(metadata: &str) -> Option<Marks> {
        let mut fields = metadata.split(';');
        if fields.next()? != PREFIX {
            return None;
        }
        let mut marks = Marks::default();
        for field in fields {
            let (name, value) = field.split_once('=')?;
            match name {
                "s" => marks.started_below = Some(value.parse().ok()?),
                "a" => marks.alone = Some(value.parse().ok()?),
                "c" => {
                    for pair in value.split(',') {
                        let (offset, n) = pair.split_once(':')?;
                        marks.crashes.insert(offset.parse().ok()?, n.parse().ok()?);
                    }
                }
                // A field of a later version: ignored.
                _ => {}
            }
        }
        if let Some(a) = marks.alone.take() {
            let n = marks.crashes.entry(a).or_default();
            *n = n.saturating_add(1);
        }
        Some(marks)
    }

    /// The record's runs alone that ended with the process dead.
    pub(crate) fn crashes(&self, offset: i64) -> u32 {
        self.crashes.get(&offset).copied().unwrap_or(0)
    }
}

/// How long reading the committed offsets' crash marks at assignment may take, and how many
/// times it is tried (on the poll thread, in the rebalance callback: well within
/// `max.poll.interval.ms`).
const RECOVER_TIMEOUT: Duration = Duration::from_secs(5);
const RECOVER_TRIES: u32 = 3;

/// The crash marks of the assigned partitions `tpl`, read with their committed offsets (see
/// `marks.rs`). A partition whose marks say records may have been handed to handlers beyond
/// the committed offset was left by a process that did not stop cleanly: its records there
/// are suspects. Without an answer, none is (logged).
pub(crate) fn recover_marks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> Vec<(String, i32, Marks)> {
    let mut tries = 0;
    let committed = loop {
        tries += 1;
        match consumer.committed_offsets(tpl.clone(), RECOVER_TIMEOUT) {
            Ok(committed) => break committed,
            Err(error) if tries < RECOVER_TRIES => {
                tracing::debug!(%error, "reading the committed offsets failed; trying again");
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot read the committed offsets' crash marks; records in flight at an \
                     earlier crash are not run alone, and their crash counts start over"
                );
                return Vec::new();
            }
        }
    };
    let mut out = Vec::new();
    for e in committed.elements() {
        let Offset::Offset(position) = e.offset() else {
            continue;
        };
        // rdkafka panics on metadata that is not UTF-8 (written by another tool): not ours.
        let metadata =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_string()))
                .unwrap_or_default();
        let Some(marks) = Marks::recover(&metadata) else {
            continue;
        };
        if marks.started_below.is_some_and(|s| s > position) || !marks.crashes.is_empty() {
            tracing::warn!(
                topic = e.topic(),
                partition = e.partition(),
                position,
                suspects_below = marks.started_below,
                "partition left by a consumer that did not stop cleanly: its records in \
                 flight then run alone"
            );
        }
        out.push((e.topic().to_string(), e.partition(), marks));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_alone_recovered_counts_one_more_crash() {
        let marks = Marks {
            started_below: Some(40),
            alone: Some(12),
            crashes: BTreeMap::from([(12, 1), (15, 2), (3, 1)]),
        };
        let metadata = marks.encode(10);
        assert_eq!(metadata, "ackstack1;s=40;a=12;c=12:1,15:2");
        let recovered = Marks::recover(&metadata).unwrap();
        assert_eq!(recovered.started_below, Some(40));
        assert_eq!(recovered.alone, None);
        assert_eq!(recovered.crashes(12), 2);
        assert_eq!(recovered.crashes(15), 2);
        assert_eq!(recovered.crashes(3), 0, "passed by the position");
    }

    #[test]
    fn metadata_that_is_not_ours_recovers_nothing() {
        for other in [
            "",
            "hello",
            "ackstack1;s=x",
            "ackstack1;c=1",
            "ackstack2;s=4",
        ] {
            assert_eq!(Marks::recover(other), None, "{other:?}");
        }
        assert_eq!(Marks::recover("ackstack1"), Some(Marks::default()));
        assert_eq!(
            Marks::recover("ackstack1;s=4;z=future")
                .unwrap()
                .started_below,
            Some(4)
        );
    }

    #[test]
    fn counts_are_bounded() {
        let marks = Marks {
            crashes: (0..200).map(|o| (o, 1)).collect(),
            ..Marks::default()
        };
        let recovered = Marks::recover(&marks.encode(0)).unwrap();
        assert_eq!(recovered.crashes.len(), MAX_COUNTS);
    }
}
