//! The ackstack conformance suite: the checks every broker adapter must pass, as a library.
//!
//! An adapter author implements [`Harness`] for their broker (how to make a fresh queue, a
//! consumer on it, a publisher, and how to read its dead letters) and runs [`run_all`] in a
//! test. Every check drives the adapter through the real [`Consumer`] runner against the real
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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ackstack_core::dedup::DedupStore;
use ackstack_core::memory::{MemoryBroker, MemoryPublisher, MemorySource};
use ackstack_core::{DeadLetterMetadata, Headers, MemoryDedupStore, Publish, Source};
use bytes::Bytes;

pub mod checks;
mod support;

pub use ackstack_core::{Capabilities, Consumer};
pub use support::{unique_identifier, unique_name};

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

    /// The dead letters of `queue`, waiting up to `timeout` until there are at least `min`.
    fn dead_letters(
        &self,
        queue: &TestQueue,
        min: usize,
        timeout: Duration,
    ) -> impl Future<Output = Vec<DeadLetterCopy>> + Send;

    /// Whether a delivery that was received and never settled comes back with a higher
    /// attempt number (SQS and quorum queues: yes; classic queues and Kafka: no).
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

    async fn dead_letters(
        &self,
        queue: &TestQueue,
        min: usize,
        timeout: Duration,
    ) -> Vec<DeadLetterCopy> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.broker.dead_letters(&queue.name);
            if found.len() >= min || tokio::time::Instant::now() >= deadline {
                return found
                    .into_iter()
                    .filter_map(|m| DeadLetterCopy::from_headers(m.payload, m.headers))
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
