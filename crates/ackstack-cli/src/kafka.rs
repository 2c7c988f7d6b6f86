//! Kafka: a dead-letter topic cannot give records up, so "removed" means "behind the replay
//! group's position". The command reads the topic with a consumer of its own
//! (`ackstack-dlq-<topic>`, partitions assigned by hand, no group membership), from that
//! group's committed offsets to the high watermarks seen when the scan began. A removed letter
//! (replayed and confirmed by its delivery report, or purged) is committed at once: the
//! offset past the letters removed in a row, and the removed letters beyond a kept one in the
//! commit's metadata, so that a filtered replay that stops half-way continues where it
//! stopped, and nothing it sent is sent again.
//!
//! That position lives as long as the broker keeps the group's offsets: a group without
//! commits for `offsets.retention.minutes` (7 days by default) loses them, and the next scan
//! starts from the topic's start again, purged and replayed letters included. A position past
//! the topic's end (a topic deleted and created again) is dropped with a note.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ackstack_core::{DeadLetterMetadata, Message, Publish};
use ackstack_kafka::KafkaPublisher;
use ackstack_kafka::from_record;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::letter::{Letter, REPLAYS_HEADER, RESET_HEADERS, replays_of};
use crate::run::{CliError, DeadLetters, Found, Sent};

/// The most bytes of done offsets kept in a commit's metadata (Kafka's default limit is 4096).
const MAX_METADATA: usize = 3500;

/// One partition's scan.
struct Partition {
    /// Read up to here (the high watermark when the scan began).
    end: i64,
    /// Everything below is removed (the committed offset).
    committed: i64,
    /// Removed offsets at or above `committed`.
    done: BTreeSet<i64>,
    /// Read up to here.
    position: i64,
}

/// A scan of one Kafka dead-letter topic.
pub struct KafkaDlq {
    brokers: String,
    /// The cluster's own librdkafka properties (TLS, SASL), for the consumer and publishers.
    properties: BTreeMap<String, String>,
    topic: String,
    consumer: BaseConsumer,
    partitions: BTreeMap<i32, Partition>,
    publishers: BTreeMap<String, KafkaPublisher>,
    timeout: Duration,
}

/// A letter's position and what a replay sends.
pub struct Handle {
    partition: i32,
    offset: i64,
    key: Option<bytes::Bytes>,
    payload: bytes::Bytes,
    headers: ackstack_core::Headers,
}

/// librdkafka's error, through ackstack-kafka's conversion: a refused secret property is named
/// without its value.
fn broker_err(what: &str) -> impl Fn(rdkafka::error::KafkaError) -> CliError + '_ {
    move |e| {
        CliError::broker(
            &format!("Kafka {what}"),
            ackstack_kafka::KafkaError::from(e),
        )
    }
}

impl KafkaDlq {
    /// Reads `topic` on `brokers` (with the cluster's `properties`: TLS, SASL) from the replay
    /// group's position.
    pub fn open(
        brokers: &str,
        properties: &BTreeMap<String, String>,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let mut config = ClientConfig::new();
        for (name, value) in properties {
            config.set(name, value);
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("ackstack-dlq-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(broker_err("consumer"))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(broker_err("metadata"))?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if ids.is_empty() {
            return Err(CliError::Broker(format!(
                "Kafka topic {topic} does not exist (or has no partitions)"
            )));
        }
        let mut wanted = TopicPartitionList::new();
        for id in &ids {
            wanted.add_partition(topic, *id);
        }
        let committed = consumer
            .committed_offsets(wanted, timeout)
            .map_err(broker_err("committed offsets"))?;
        let mut partitions = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for elem in committed.elements() {
            let (low, high) = consumer
                .fetch_watermarks(topic, elem.partition(), timeout)
                .map_err(broker_err("watermarks"))?;
            let (start, stale) = start_of(elem.offset().to_raw(), low, high);
            let done = if stale {
                eprintln!(
                    "note: the replay group's position in {topic}[{}] ({}) is past the end \
                     ({high}): the topic was recreated since; reading it from its start",
                    elem.partition(),
                    elem.offset().to_raw().unwrap_or(-1)
                );
                BTreeSet::new()
            } else {
                parse_done(elem.metadata(), start)
            };
            assignment
                .add_partition_offset(topic, elem.partition(), Offset::Offset(start))
                .map_err(broker_err("assign"))?;
            partitions.insert(
                elem.partition(),
                Partition {
                    end: high,
                    committed: start,
                    done,
                    position: start,
                },
            );
        }
        consumer.assign(&assignment).map_err(broker_err("assign"))?;
        Ok(KafkaDlq {
            brokers: brokers.to_string(),
            properties: properties.clone(),
            topic: topic.to_string(),
            consumer,
            partitions,
            publishers: BTreeMap::new(),
            timeout,
        })
    }

    fn finished(&self) -> bool {
        self.partitions.values().all(|p| p.position >= p.end)
    }

    /// Commits partition `id`'s position: past the removed letters in a row, the rest of the
    /// removed ones in the metadata.
    fn commit(&mut self, id: i32) -> Result<(), CliError> {
        let Some(p) = self.partitions.get_mut(&id) else {
            return Ok(());
        };
        while p.done.remove(&p.committed) {
            p.committed += 1;
        }
        let metadata = done_metadata(&p.done);
        if metadata.len() > MAX_METADATA {
            return Err(CliError::Broker(format!(
                "too many letters removed past a kept one in partition {id}; replay or purge \
                 the kept ones first (or without a filter)"
            )));
        }
        let mut list = TopicPartitionList::new();
        let mut elem = list.add_partition(&self.topic, id);
        elem.set_offset(Offset::Offset(p.committed))
            .map_err(broker_err("commit"))?;
        elem.set_metadata(metadata);
        self.consumer
            .commit(&list, CommitMode::Sync)
            .map_err(broker_err("commit"))
    }
}

/// Where a partition's scan starts: the replay group's committed offset, or the low watermark
/// when there is none or it is below it (retention removed records). A committed offset past
/// the high watermark belongs to an earlier topic of the same name (offsets never go back
/// otherwise): the scan starts from the low watermark and says so (`true`), rather than skip
/// every letter the new topic will hold below the old offset.
fn start_of(committed: Option<i64>, low: i64, high: i64) -> (i64, bool) {
    match committed.filter(|o| *o >= 0) {
        Some(o) if o > high => (low, true),
        Some(o) => (o.max(low), false),
        None => (low, false),
    }
}

/// The metadata that records `done` (removed offsets past the committed one).
fn done_metadata(done: &BTreeSet<i64>) -> String {
    done.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether removing `offset` can still be recorded: the commit position moves past the
/// removed letters in a row, and the rest must fit the metadata.
fn removal_fits(committed: i64, done: &BTreeSet<i64>, offset: i64) -> bool {
    let mut done = done.clone();
    done.insert(offset);
    let mut committed = committed;
    while done.remove(&committed) {
        committed += 1;
    }
    done_metadata(&done).len() <= MAX_METADATA
}

/// The removed offsets written in a commit's metadata (those at or above `start`).
fn parse_done(metadata: &str, start: i64) -> BTreeSet<i64> {
    metadata
        .split(',')
        .filter_map(|o| o.trim().parse::<i64>().ok())
        .filter(|o| *o >= start)
        .collect()
}

impl DeadLetters for KafkaDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.finished() {
                return Ok(None);
            }
            if Instant::now() > deadline {
                return Err(CliError::Broker(format!(
                    "Kafka: no record of {} arrived within {:?}",
                    self.topic, self.timeout
                )));
            }
            // Short polls on this task: the scan is the only work the command does.
            let Some(polled) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = polled.map_err(broker_err("poll"))?;
            let (id, offset) = (m.partition(), m.offset());
            let Some(p) = self.partitions.get_mut(&id) else {
                continue;
            };
            p.position = p.position.max(offset + 1);
            if offset >= p.end || p.done.contains(&offset) {
                // Past the scan's end, or removed by an earlier run.
                continue;
            }
            let mut headers = from_record(m.headers()).headers;
            let metadata = DeadLetterMetadata::from_headers(&headers);
            ackstack_core::deadletter::strip_metadata(&mut headers);
            let payload = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
            let key = m.key().map(bytes::Bytes::copy_from_slice);
            let letter = Letter {
                id: format!("{id}:{offset}"),
                payload: payload.clone(),
                replays: replays_of(&headers),
                headers: headers.clone(),
                metadata,
            };
            return Ok(Some(Found {
                letter,
                handle: Handle {
                    partition: id,
                    offset,
                    key,
                    payload,
                    headers,
                },
            }));
        }
    }

    async fn republish(
        &mut self,
        handle: &Handle,
        queue: &str,
        replays: u32,
    ) -> Result<Sent, CliError> {
        if !self.publishers.contains_key(queue) {
            // Idempotent: librdkafka's own retries of a produce never write the record twice.
            // A replay can still be there twice where a run died between the delivery report
            // and the commit, or where the produce timed out here but was delivered later.
            let mut properties = self.properties.clone();
            properties.insert("enable.idempotence".to_string(), "true".to_string());
            let publisher = KafkaPublisher::with_properties(
                &self.brokers,
                queue,
                &properties,
                Duration::from_secs(30),
            )
            .map_err(|e| CliError::broker("Kafka producer", e))?;
            self.publishers.insert(queue.to_string(), publisher);
        }
        let Some(publisher) = self.publishers.get(queue) else {
            return Err(CliError::Broker("Kafka producer missing".into()));
        };
        let mut message = Message::new(handle.payload.clone());
        message.key = handle.key.clone();
        message.headers = handle.headers.clone();
        for name in RESET_HEADERS {
            message.headers.remove(name);
        }
        message.headers.insert(REPLAYS_HEADER, replays.to_string());
        // Returns once the delivery report said the record is written.
        publisher
            .publish(message)
            .await
            .map_err(|e| CliError::broker(&format!("Kafka produce to {queue}"), e))?;
        Ok(Sent::Once)
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), CliError> {
        if let Some(p) = self.partitions.get_mut(&handle.partition) {
            p.done.insert(handle.offset);
        }
        self.commit(handle.partition)
    }

    async fn keep(&mut self, _handle: Handle) -> Result<(), CliError> {
        Ok(())
    }

    fn can_remove(&self, handle: &Handle) -> bool {
        self.partitions
            .get(&handle.partition)
            .is_none_or(|p| removal_fits(p.committed, &p.done, handle.offset))
    }

    async fn finish(self) -> Result<(), CliError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_past_the_end_starts_the_scan_over() {
        assert_eq!(start_of(None, 0, 10), (0, false));
        assert_eq!(
            start_of(Some(-1001), 3, 10),
            (3, false),
            "no offset committed"
        );
        assert_eq!(start_of(Some(7), 0, 10), (7, false));
        assert_eq!(start_of(Some(10), 0, 10), (10, false), "everything removed");
        assert_eq!(start_of(Some(2), 5, 10), (5, false), "retention passed it");
        assert_eq!(start_of(Some(500), 0, 10), (0, true), "a recreated topic");
    }

    #[test]
    fn a_removal_fits_while_its_metadata_does() {
        let empty = BTreeSet::new();
        assert!(
            removal_fits(0, &empty, 0),
            "the next in a row needs no metadata"
        );
        assert!(removal_fits(0, &empty, 5));
        // A kept letter at 0 and removed ones from 1 on: each needs its place in the metadata.
        let full: BTreeSet<i64> = (1..)
            .take_while(|n| done_metadata(&(1..=*n).collect()).len() <= MAX_METADATA)
            .collect();
        let next = full.last().unwrap() + 1;
        assert!(!removal_fits(0, &full, next), "the metadata is full");
        assert!(
            removal_fits(0, &full, 0),
            "removing the kept letter moves the position past all of them"
        );
    }

    #[test]
    fn done_offsets_round_trip_through_the_metadata() {
        assert_eq!(parse_done("5,7,9", 6), BTreeSet::from([7, 9]));
        assert_eq!(parse_done("", 0), BTreeSet::new());
        assert_eq!(parse_done("x,3", 0), BTreeSet::from([3]));
    }
}
