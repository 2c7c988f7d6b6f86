//! Apache Kafka (rdkafka) adapter for ackstack.
//!
//! [`KafkaSource`] is a consumer-group member that implements [`ackstack_core::Source`];
//! [`KafkaSettler`] commits progress as a per-partition contiguous watermark; [`KafkaPublisher`]
//! implements [`ackstack_core::Publish`].
//!
//! ```no_run
//! use ackstack_core::{Settle, Source};
//! use ackstack_kafka::{KafkaConfig, KafkaSource};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let config = KafkaConfig::new("localhost:9092", "billing", "orders")
//!     .property("partition.assignment.strategy", "cooperative-sticky");
//! let mut source = KafkaSource::new(&config)?;
//! let settler = source.settler();
//! // Normally `ackstack_core::Consumer` drives this loop; by hand it is:
//! let batch = source.receive(100).await?;
//! let tokens = batch.into_iter().map(|r| r.token).collect();
//! let report = settler.ack(tokens).await; // marks offsets done; commits the watermark
//! assert!(report.failed.is_empty());
//! settler.flush().await; // synchronous commit of everything committable
//! # Ok(())
//! # }
//! ```
//!
//! # How progress is committed
//!
//! Every received offset is tracked in its partition's core [`ackstack_core::Watermark`] (the
//! one tracker that the RabbitMQ adapter's cumulative acks use too); an ack marks it complete.
//! The committed position is the watermark's
//! [`resume_position`](ackstack_core::Watermark::resume_position): the lowest offset still in
//! flight, or one past the highest completed one, so it never passes a record that is still being handled, retried or
//! was released (invariant 8 in docs/CONTRACT.md), and gaps in the offsets (compaction, transaction markers) never
//! hold it back. Positions are committed as offset lists (`enable.auto.commit=false`,
//! `enable.auto.offset.store=false`): storing one message's offset adds 1 while a list does
//! not, and we only ever commit lists of "next offset to read".
//!
//! Progress is tied to the assignment generation: each (re)assignment of a partition starts a
//! new generation and watermark, and each [`KafkaToken`] carries the generation it was
//! received in. On revoke, the partition's watermark is committed synchronously and the
//! generation ends; acks of its older tokens are refused with
//! [`SettleError::LeaseLost`](ackstack_core::SettleError::LeaseLost) and their records are read
//! again by the new owner.
//!
//! # Ownership as the lease
//!
//! Kafka has no per-record lease: a record is ours while its partition is assigned to this
//! member in the generation the record was received in. The adapter reports
//! [`KafkaConfig::ownership_check`] (default 10 s) as its
//! [`lease`](ackstack_core::Capabilities::lease), so the runner's lease keeper calls
//! [`extend`](ackstack_core::Settle::extend) at 70% of it; `extend` returns
//! [`SettleError::LeaseLost`](ackstack_core::SettleError::LeaseLost) once the partition was
//! revoked. A revoke therefore cancels the handlers of that partition's records within about
//! 7 s (by default), and those records are never acked by this member: their new owner reads
//! them again. Because it is a lease to the runner, the runner's `lease.max_total` (default one
//! hour) also bounds how long one record, in-place retries included, may be worked on; a record
//! that outlives it is abandoned unacked and holds its partition's commits until the partition
//! is reassigned or the consumer restarts.
//!
//! # Releases
//!
//! [`release`](ackstack_core::Settle::release) (which the runner calls only after a failed
//! settlement or for cancelled work) makes the poll thread seek the record's partition back to
//! its lowest unfinished offset and start a new generation there, so the record is read again
//! instead of freezing the partition's commits. Every other record of that partition still in
//! flight is read again too (as after a revoke). Should the seek fail, the record stays in
//! flight and the partition's commits are held before it until reassignment (logged at warn).
//!
//! # Retries and dead letters
//!
//! Kafka retries in place ([`ackstack_core::Capabilities::with_in_place_retry`]): the runner
//! re-runs the handler while the record holds its partition's watermark back. The poll thread
//! keeps polling meanwhile (the member stays in its group) and stops reading the partitions'
//! queues while the runner has no room, so nothing is buffered without bound and nothing
//! prefetched is thrown away (no pause: a pause drops librdkafka's prefetched records). Dead letters are produced
//! to [`KafkaConfig::dlq_topic`] (default `<topic>-dlq`) with the same key, payload and
//! headers plus `x-ackstack-dl-*` metadata, and the original offset passes only after the
//! delivery report confirmed the copy.
//!
//! A copy refused for its size (librdkafka's `MSG_SIZE_TOO_LARGE` against the producer's
//! `message.max.bytes`, or the broker's against the topic's `max.message.bytes`) is produced
//! again with the error message in its metadata cut to fit (to nothing when the broker's
//! limit is the lower one), marked in [`DROPPED_HEADER`]; key, payload and original headers
//! never change. When even that is refused, `dead_letter` fails with
//! [`SettleError::Rejected`](ackstack_core::SettleError::Rejected) and the offset does not
//! pass.
//!
//! # A record that takes the process down
//!
//! A handler that kills the process (an `abort`, an out-of-memory kill) is counted as an
//! attempt through the partition's commit metadata (`marks.rs`): every commit records how far
//! records may have been handed to handlers (raised ahead, synchronously, before they are),
//! and which record runs alone now. A partition assigned after an unclean stop reads that
//! metadata with its committed offset; its records handed out then are suspects
//! ([`Received::suspect`](ackstack_core::Received::suspect)), and each runs alone among
//! handler attempts ([`Alone::Attempts`](ackstack_core::Alone::Attempts)): marked in the
//! metadata before its first attempt, unmarked after it. A record that took the process down
//! while marked is dead-lettered with reason `crashed` after `max_attempts` such crashes,
//! without running again; the others run alone once and go on. docs/DESIGN.md ("Crashes
//! count as attempts") has the design and its limits.
//!
//! # Header and payload mapping
//!
//! Kafka headers become [`ackstack_core::Headers`] in order, repeated names kept. A header
//! with a **null value** becomes a header with an **empty** value (core headers hold bytes
//! only), so a dead-letter copy carries it as empty rather than null; likewise a null payload
//! (tombstone) is delivered, and dead-lettered, as an empty payload. Core header names are
//! strings: a header whose name is not UTF-8 (Kafka does not check; clients that take names
//! as bytes can write one) is left out of the delivery, with a warning, rather than stop the
//! consumer, and so is missing from a dead-letter copy. librdkafka keeps names as C strings,
//! so a name with a NUL byte reads back cut at the NUL. The attempt number is our
//! [`ATTEMPT_HEADER`](ackstack_core::deadletter::ATTEMPT_HEADER) when present and valid, else 1.
//! The message id travels in [`MESSAGE_ID_HEADER`].
//!
//! # The mock cluster and its 5 MB partitions
//!
//! Tests run on librdkafka's mock cluster ([`rdkafka::mocking::MockCluster`]) unless
//! `KAFKA_BROKERS` is set. The mock keeps at most 5 MiB (`mpart->max_size = 1024 * 1024 * 5`
//! in `rdkafka_mock.c`) or 100,000 message sets per partition and deletes the oldest message
//! sets beyond that, moving the partition's low watermark (log start) up.
//!
//! Measured (`tests/mock_retention.rs`, run with `--ignored`): after producing 2,000 records of
//! 256 B to one partition, a fresh group reads offsets 0..2000. After producing 50,000, the
//! partition holds only offsets ~31,965..50,000 (about 18,000 records); a fresh group with
//! `auto.offset.reset=earliest`, through this adapter or through a plain `StreamConsumer`,
//! starts at the log start and reads every retained record: it does not stall, but the first
//! ~32,000 records no longer exist. So a test that expects all 50,000 waits forever after the
//! records that remain. The "stall after the first message" follows when the consumer's
//! position falls below the moving log start while the producer is still writing (a consumer
//! subscribed before or during production): its next fetch is `OFFSET_OUT_OF_RANGE` and
//! `auto.offset.reset` moves it, to the end of the log under the default `latest` (nothing more
//! arrives), or forward past the deleted records under `earliest`. (That sequence was not
//! reproduced here; the retention numbers above were.) It is the mock's retention, not a
//! consumer bug. Tests keep each partition's unconsumed backlog well under 5 MB: spread records
//! over partitions, or produce while consuming; and set `auto.offset.reset=earliest` (this
//! adapter's default).

#![cfg_attr(docsrs, feature(doc_cfg))]
mod commit;
pub mod config;
mod error;
mod flow;
mod headers;
mod marks;
pub mod oauth;
mod poller;
pub mod publisher;
mod queues;
mod reach;
#[cfg(feature = "test-util")]
mod reader;
mod settler;
pub mod source;
mod stats;
mod token;
pub mod watermark;

/// What a dead-letter copy's [`DROPPED_HEADER`] lists when it had to be shrunk to fit the
/// size limit (see [`KafkaSettler`]; core's dead-letter format).
pub use ackstack_core::deadletter::{DROPPED_ERROR_TRUNCATED, DROPPED_HEADER};
pub use config::KafkaConfig;
pub use error::KafkaError;
pub use headers::{Converted, MESSAGE_ID_HEADER, from_record};
pub use oauth::{BearerToken, TokenProvider};
pub use publisher::KafkaPublisher;
/// The rdkafka this crate builds with ([`KafkaConfig::consumer_config`] returns its
/// `ClientConfig`); see the versioning policy in docs/GUIDE.md.
pub use rdkafka;
#[cfg(feature = "test-util")]
pub use reader::read_topic;
pub use source::{KafkaSettler, KafkaSource, KafkaStats, KafkaToken};

/// Internal parsers reachable by the fuzz targets in `fuzz/` (feature `fuzzing`); not part
/// of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::headers::{Converted, attempt_of, from_record};
}
