//! The ackstack conformance suite: the checks every broker adapter must pass, as a library.
//!
//! An adapter author implements [`Harness`] for their broker (how to make a fresh queue, a
//! consumer on it, a publisher, and how to read its dead letters once) and runs [`run_all`] in
//! a test. Every check drives the adapter through the real [`Consumer`] runner against the real
//! broker, and checks one of ackstack's invariants; checks that depend on what a broker can do
//! are switched by the adapter's [`Capabilities`] and by [`Harness::counts_redeliveries`].
//!
//! ```
//! use ackstack_testkit::{MemoryHarness, run_all};
//!
//! # #[tokio::main]
//! # async fn main() {
//! // The in-memory broker passes its own suite; an adapter's test looks the same.
//! let report = run_all(MemoryHarness::new()).await;
//! report.assert_passed();
//! # }
//! ```
//!
//! # Implementing `Harness`
//!
//! A harness is a small struct holding what the adapter needs to reach the broker (a URL, a
//! client). It implements five required methods:
//!
//! 1. [`Harness::name`]: the broker's name in the report.
//! 2. [`Harness::create`]: a fresh, empty queue with its dead-letter destination. Name it with
//!    [`unique_name`] so that concurrent checks and repeated runs never share a queue; declare
//!    whatever the broker needs declared (delay queues, the dead-letter queue, topics).
//! 3. [`Harness::source`]: a new consumer on that queue, as a freshly started process would
//!    have, with [`TestQueue::lease`] as its lease (visibility timeout).
//! 4. [`Harness::publisher`]: a publisher to that queue.
//! 5. [`Harness::read_dead_letters`]: one read of the dead-letter destination, returning each
//!    copy once, turned into [`DeadLetterCopy`]s ([`DeadLetterCopy::from_headers`] does it for
//!    adapters whose metadata travels as `x-ackstack-dl-*` headers).
//!
//! The checks wait for dead letters with the provided [`Harness::wait_dead_letters`], which
//! calls `read_dead_letters` until enough arrived: a harness writes no polling loop of its
//! own. The other provided methods describe what the broker can do; override them where it
//! differs: [`Harness::counts_redeliveries`], [`Harness::redelivery_wait`],
//! [`Harness::preserves_key_order`], and [`Harness::dedup_store`] to check a real dedup store.
//!
//! A harness over the in-memory broker, the shape of an adapter's test (the crate's own
//! [`MemoryHarness`] is the same, with a pluggable dedup store):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! use ackstack_core::memory::{MemoryBroker, MemoryPublisher, MemorySource};
//! use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, checks, unique_name};
//!
//! #[derive(Default)]
//! struct Memory {
//!     broker: MemoryBroker,
//!     // Peeking at the dead letters does not consume them: how many each queue has returned.
//!     returned: Mutex<HashMap<String, usize>>,
//! }
//!
//! impl Harness for Memory {
//!     type Source = MemorySource;
//!     type Publisher = MemoryPublisher;
//!
//!     fn name(&self) -> &'static str {
//!         "memory"
//!     }
//!
//!     async fn create(&self, lease: Duration) -> TestQueue {
//!         TestQueue { name: unique_name("conformance"), lease }
//!     }
//!
//!     async fn source(&self, queue: &TestQueue) -> MemorySource {
//!         self.broker.source(&queue.name).visibility_timeout(queue.lease)
//!     }
//!
//!     async fn publisher(&self, queue: &TestQueue) -> MemoryPublisher {
//!         self.broker.publisher(&queue.name)
//!     }
//!
//!     async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
//!         let all = self.broker.dead_letters(&queue.name);
//!         let mut returned = self.returned.lock().unwrap();
//!         let seen = returned.entry(queue.name.clone()).or_default();
//!         let new: Vec<_> = all.into_iter().skip(*seen).collect();
//!         *seen += new.len();
//!         new.into_iter()
//!             .map(|m| DeadLetterCopy::from_headers(m.payload, m.headers).unwrap())
//!             .collect()
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() {
//! // One check on its own; `run_all(Memory::default())` runs them all.
//! let verdict = checks::permanent_failures_dead_letter_at_once(Arc::new(Memory::default()))
//!     .await
//!     .unwrap();
//! assert_eq!(verdict, checks::Verdict::Passed);
//! # }
//! ```
//!
//! The repository's `integration-tests/tests/conformance_*.rs` hold the harnesses of the
//! RabbitMQ, SQS and Kafka adapters.
//!
//! # The checks
//!
//! The invariants are listed, with every test that proves each, in the repository's
//! `docs/CONTRACT.md`.
//!
//! | check | invariant |
//! |---|---|
//! | [`checks::acks_only_after_success`] | 1 no loss, 7 batch ack |
//! | [`checks::unacked_work_is_redelivered`] | 1 no loss, 2 attempts, 9 shutdown |
//! | [`checks::attempts_survive_restart`] | 2 attempts from the broker |
//! | [`checks::retries_back_off`] | 3 backoff delays at the broker |
//! | [`checks::dead_letters_after_max_attempts`] | 4 dead letters with metadata |
//! | [`checks::permanent_failures_dead_letter_at_once`] | 4, 10 bad input |
//! | [`checks::dedup_marks_after_success`] | 5 dedup |
//! | [`checks::long_handlers_keep_their_lease`] | 6 leases |
//! | [`checks::lost_lease_is_never_acked`] | 6 leases |
//! | [`checks::acks_are_batched`] | 7 batch ack, 8 watermarks |
//! | [`checks::out_of_order_completion_loses_nothing`] | 8 watermarks |
//! | [`checks::shutdown_drains_in_flight_work`] | 9 shutdown |
//! | [`checks::panics_and_bad_input_do_not_stop_the_consumer`] | 10 bad input |
//! | [`checks::per_key_ordering`] | 11 ordering |
//! | [`checks::concurrency_is_bounded`] | runner contract |
//! | [`checks::batch_outcomes_are_per_delivery`] | 1, 2, 4, 5 per delivery of a batch |
//! | [`checks::batch_errors_fail_every_delivery`] | 1, 2 for a batch failing as a whole |
//! | [`checks::batch_leases_cover_the_whole_batch`] | 6 for a batch |
//! | [`checks::batches_keep_key_order`] | 11 for batches |
//! | [`checks::deliveries_carry_their_produce_time`] | 12 observability (queue time) |

#![cfg_attr(docsrs, feature(doc_cfg))]
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ackstack_core::dedup::DedupStore;
use ackstack_core::memory::{MemoryBroker, MemoryPublisher, MemorySource};
use ackstack_core::{DeadLetterMetadata, Headers, MemoryDedupStore, Publish, Source};
use bytes::Bytes;

pub mod checks;
mod support;

pub use ackstack_core::{Capabilities, Consumer};
pub use support::{unique_identifier, unique_name};

/// How long [`Harness::wait_dead_letters`] sleeps after a read that found nothing.
pub const DEAD_LETTER_POLL: Duration = Duration::from_millis(50);

/// A queue (or topic) made for one check.
#[derive(Clone, Debug)]
pub struct TestQueue {
    /// Its name; dead letters go where the adapter sends them (`<name>-dlq` by default).
    pub name: String,
    /// The lease (visibility timeout) its consumers get, for brokers with leases.
    pub lease: Duration,
}

/// A dead-letter copy, as read back from the broker.
#[derive(Clone, Debug)]
pub struct DeadLetterCopy {
    /// The payload.
    pub payload: Bytes,
    /// The application headers, without ackstack's metadata.
    pub headers: Headers,
    /// ackstack's metadata.
    pub metadata: DeadLetterMetadata,
}

impl DeadLetterCopy {
    /// Splits a dead-letter copy whose metadata travels as `x-ackstack-dl-*` headers into its
    /// application headers and the metadata; `None` if the metadata is missing or malformed.
    pub fn from_headers(payload: Bytes, mut headers: Headers) -> Option<Self> {
        let metadata = DeadLetterMetadata::from_headers(&headers)?;
        ackstack_core::deadletter::strip_metadata(&mut headers);
        Some(DeadLetterCopy {
            payload,
            headers,
            metadata,
        })
    }
}

/// What the suite needs from a broker adapter.
pub trait Harness: Send + Sync + 'static {
    /// The adapter's source.
    type Source: Source;
    /// A publisher to a test queue.
    type Publisher: Publish;

    /// The broker's name, for reports.
    fn name(&self) -> &'static str;

    /// Creates a fresh, empty queue with a unique name whose consumers get leases of `lease`
    /// (brokers without leases ignore it).
    fn create(&self, lease: Duration) -> impl Future<Output = TestQueue> + Send;

    /// A new consumer on `queue`, as a freshly started process would have.
    fn source(&self, queue: &TestQueue) -> impl Future<Output = Self::Source> + Send;

    /// A publisher to `queue`.
    fn publisher(&self, queue: &TestQueue) -> impl Future<Output = Self::Publisher> + Send;

    /// Reads `queue`'s dead-letter destination once: the copies that arrived since the
    /// previous read, oldest first, or none.
    ///
    /// One read may wait as long as one read from the broker takes (an SQS long poll, a Kafka
    /// reader joining its group), but need not wait for anything to arrive:
    /// [`Harness::wait_dead_letters`] reads again until enough have. It may return fewer than
    /// have arrived (SQS hands out at most 10 messages a receive); the next read returns the
    /// rest.
    ///
    /// Each copy is returned by one read only. Brokers whose reads consume (RabbitMQ
    /// `basic.get`, SQS receive-and-delete) have that for free; where a read does not (a Kafka
    /// topic, the in-memory broker), the harness remembers how many copies of each queue it has
    /// returned and skips those.
    fn read_dead_letters(
        &self,
        queue: &TestQueue,
    ) -> impl Future<Output = Vec<DeadLetterCopy>> + Send;

    /// The dead letters of `queue`: reads them with [`Harness::read_dead_letters`], every
    /// [`DEAD_LETTER_POLL`] while reads find nothing, until at least `n` arrived or `timeout`
    /// passed; then returns all it read, which may be fewer or more than `n`.
    ///
    /// It reads at least once, even with a zero `timeout`. Harnesses need not override it.
    fn wait_dead_letters(
        &self,
        queue: &TestQueue,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = Vec<DeadLetterCopy>> + Send {
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut found = Vec::new();
            loop {
                let read = self.read_dead_letters(queue).await;
                let empty = read.is_empty();
                found.extend(read);
                if found.len() >= n || tokio::time::Instant::now() >= deadline {
                    return found;
                }
                if empty {
                    tokio::time::sleep(DEAD_LETTER_POLL).await;
                }
            }
        }
    }

    /// Whether a delivery that was received and never settled comes back with a higher
    /// attempt number (SQS: yes; RabbitMQ and Kafka: no, a redelivery runs alone as a
    /// suspect instead).
    fn counts_redeliveries(&self) -> bool {
        true
    }

    /// How long an abandoned delivery takes to come back to a new consumer, at most.
    fn redelivery_wait(&self, queue: &TestQueue) -> Duration {
        queue.lease + Duration::from_secs(3)
    }

    /// Whether the broker delivers messages of one key in publish order (Kafka partitions,
    /// RabbitMQ queues, SQS FIFO queues; not SQS standard queues).
    fn preserves_key_order(&self) -> bool {
        true
    }

    /// The dedup store the dedup checks use.
    fn dedup_store(&self) -> Arc<dyn DedupStore> {
        Arc::new(MemoryDedupStore::new())
    }
}

/// The in-memory broker's harness: the suite checking itself, and a model for adapter authors.
#[derive(Clone, Debug, Default)]
pub struct MemoryHarness {
    broker: MemoryBroker,
    dedup: Option<Arc<dyn DedupStoreDebug>>,
    /// How many dead letters of each queue [`Harness::read_dead_letters`] has returned.
    returned: Arc<Mutex<HashMap<String, usize>>>,
}

/// A dedup store that can be shown in debug output.
pub trait DedupStoreDebug: DedupStore + std::fmt::Debug {}
impl<T: DedupStore + std::fmt::Debug> DedupStoreDebug for T {}

impl MemoryHarness {
    /// A harness over a new in-memory broker.
    pub fn new() -> Self {
        MemoryHarness::default()
    }

    /// With this dedup store for the dedup checks (e.g. the Redis store).
    pub fn with_dedup_store(mut self, store: Arc<dyn DedupStoreDebug>) -> Self {
        self.dedup = Some(store);
        self
    }
}

impl Harness for MemoryHarness {
    type Source = MemorySource;
    type Publisher = MemoryPublisher;

    fn name(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        TestQueue {
            name: unique_name("conformance"),
            lease,
        }
    }

    async fn source(&self, queue: &TestQueue) -> MemorySource {
        self.broker
            .source(&queue.name)
            .visibility_timeout(queue.lease)
            .poll_wait(Duration::from_millis(200))
    }

    async fn publisher(&self, queue: &TestQueue) -> MemoryPublisher {
        self.broker.publisher(&queue.name)
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        // Peeking does not consume: skip the copies earlier reads returned.
        let all = self.broker.dead_letters(&queue.name);
        let mut returned = self.returned.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = returned.entry(queue.name.clone()).or_default();
        let new = all.into_iter().skip(*seen).collect::<Vec<_>>();
        *seen += new.len();
        new.into_iter()
            .filter_map(|m| DeadLetterCopy::from_headers(m.payload, m.headers))
            .collect()
    }

    fn dedup_store(&self) -> Arc<dyn DedupStore> {
        match &self.dedup {
            Some(store) => store.clone() as Arc<dyn DedupStore>,
            None => Arc::new(MemoryDedupStore::new()),
        }
    }
}

/// The result of [`run_all`]: which checks passed, failed or were skipped.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Report {
    /// The broker's name.
    pub broker: &'static str,
    /// Checks that passed, with how long each took.
    pub passed: Vec<(&'static str, Duration)>,
    /// Checks that do not apply to this broker, with the reason.
    pub skipped: Vec<(&'static str, String)>,
    /// Checks that failed, with the failure.
    pub failed: Vec<(&'static str, String)>,
}

impl Report {
    /// Panics, listing every failure, unless all checks passed or were skipped.
    pub fn assert_passed(&self) {
        for (name, why) in &self.skipped {
            println!("{}: skipped {name}: {why}", self.broker);
        }
        for (name, took) in &self.passed {
            println!("{}: passed {name} in {took:.1?}", self.broker);
        }
        if !self.failed.is_empty() {
            let list: Vec<String> = self
                .failed
                .iter()
                .map(|(name, why)| format!("  {name}: {why}"))
                .collect();
            panic!(
                "{} of {} conformance checks failed on {}:\n{}",
                self.failed.len(),
                self.failed.len() + self.passed.len(),
                self.broker,
                list.join("\n")
            );
        }
    }
}

/// Runs every check against `harness`, concurrently, each on its own queue.
pub async fn run_all<H: Harness>(harness: H) -> Report {
    let harness = Arc::new(harness);
    let mut report = Report {
        broker: harness.name(),
        ..Report::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (name, check) in checks::all::<H>() {
        let h = harness.clone();
        tasks.spawn(async move {
            let started = tokio::time::Instant::now();
            let outcome = match tokio::spawn(check(h)).await {
                Ok(result) => result,
                Err(err) => Err(match err.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                    Err(err) => err.to_string(),
                }),
            };
            (name, outcome, started.elapsed())
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((name, Ok(checks::Verdict::Passed), took)) => report.passed.push((name, took)),
            Ok((name, Ok(checks::Verdict::Skipped(why)), _)) => report.skipped.push((name, why)),
            Ok((name, Err(why), took)) => report
                .failed
                .push((name, format!("{why} (after {took:.1?})"))),
            Err(err) => report.failed.push(("(runner)", err.to_string())),
        }
    }
    report.passed.sort_unstable();
    report
}
