//! The adapter contract: a [`Source`] receives deliveries; its [`Settle`] handle settles them.
//!
//! Adapter authors implement these two traits and run `ackstack-testkit`'s conformance suite on
//! the result. The runner guarantees the call order the traits document; adapters keep the
//! broker-side half of each invariant.

use std::future::Future;
use std::time::Duration;

use crate::deadletter::DeadLetter;
use crate::delivery::{Delivery, Origin};
use crate::error::{Failure, SettleError, SourceError};

/// A received delivery and the broker's handle for settling it.
#[derive(Debug)]
pub struct Received<T> {
    /// The broker-independent message.
    pub delivery: Delivery,
    /// The broker's handle: delivery tag, receipt handle, partition offset.
    pub token: T,
    /// Whether this delivery may have been in flight when an earlier consumer process died
    /// (the broker delivered it before and it was never settled: RabbitMQ's `redelivered`,
    /// an SQS receive count above 1, a Kafka record handed out before an unclean stop). The
    /// runner runs a suspect alone ([`Capabilities::alone`] says among what) after
    /// [`Settle::arm`], so that a crash during its run is pinned on it.
    pub suspect: bool,
}

impl<T> Received<T> {
    /// A delivery that is not a suspect.
    pub fn new(delivery: Delivery, token: T) -> Self {
        Received {
            delivery,
            token,
            suspect: false,
        }
    }

    /// Marks the delivery as a suspect (see [`Received::suspect`]).
    pub fn suspect(mut self, suspect: bool) -> Self {
        self.suspect = suspect;
        self
    }
}

/// What [`Settle::arm`] made of a suspect.
#[derive(Debug, PartialEq, Eq)]
pub enum Armed<T> {
    /// Run it now, alone. `crashes`: its earlier runs alone that ended with the process dead.
    Run {
        /// The delivery's handle.
        token: T,
        /// Earlier runs alone that ended with the process dead.
        crashes: u32,
    },
    /// Moved where its crash count travels with it (a copy confirmed by the broker): it will
    /// be received again, and run then. Nothing to run now; settle the original as said.
    Moved(Settled<T>),
    /// It took the process down `crashes` times: dead-letter it without running it.
    GiveUp {
        /// The delivery's handle.
        token: T,
        /// Runs that ended with the process dead, counting the one that made it a suspect.
        crashes: u32,
    },
}

/// A broker adapter's receiving half.
pub trait Source: Send + 'static {
    /// The broker's handle for one delivery. Cloned only by the lease keeper, which needs to
    /// refer to a delivery while its handler runs.
    type Token: Clone + Send + Sync + 'static;
    /// The settling half, shared by every in-flight delivery.
    type Settler: Settle<Token = Self::Token>;

    /// Waits for up to `max` deliveries (at least one, unless the source is closing or returns
    /// an error). Long-polling adapters should return within a few seconds even when idle so
    /// that the runner notices shutdown.
    fn receive(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Received<Self::Token>>, SourceError>> + Send;

    /// The settling handle. Called once per run.
    fn settler(&self) -> Self::Settler;

    /// What this broker can do natively.
    fn capabilities(&self) -> Capabilities;

    /// Where this source's deliveries come from: its broker, its queue (or topics, joined with
    /// `,`) and the consumer name it gives them, with no position. The labels of the metrics
    /// that belong to the consumer rather than to one delivery (acks, leases, receive errors,
    /// its state). The default says `custom` with no queue; adapters override it.
    fn origin(&self) -> Origin {
        Origin::new("custom", "", "")
    }

    /// Stops receiving (cancels the broker-side consumer). Deliveries already returned stay
    /// settleable. The default does nothing.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What happened to the original after a retry or dead-letter settlement.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled<T> {
    /// Nothing more to do (the broker holds the message back, or it was already removed).
    Done,
    /// A durable copy exists (republished and confirmed); the original must now be acked. The
    /// runner sends it through the batch acker.
    AckOriginal(T),
}

/// A retry or dead-letter settlement that failed: the token comes back with the error, so the
/// runner can release the delivery instead of losing track of it.
#[derive(Debug)]
pub struct SettleFailure<T> {
    /// The delivery's handle, still unsettled.
    pub token: T,
    /// What went wrong.
    pub error: SettleError,
}

impl<T> SettleFailure<T> {
    /// Pairs `token` with `error`.
    pub fn new(token: T, error: SettleError) -> Self {
        SettleFailure { token, error }
    }
}

/// Partial result of a batch ack.
#[derive(Debug)]
pub struct AckReport<T> {
    /// How many tokens were acked (or found already gone, which counts the same).
    pub acked: usize,
    /// Tokens that could not be acked, with the reason. They are not lost: the broker
    /// redelivers them, and deduplication absorbs the repeat.
    pub failed: Vec<(T, SettleError)>,
}

impl<T> AckReport<T> {
    /// Every one of `n` tokens acked.
    pub fn all(n: usize) -> Self {
        AckReport {
            acked: n,
            failed: Vec::new(),
        }
    }
}

/// A broker adapter's settling half. Cheap to clone; one per run, shared by all deliveries.
///
/// Every method consumes the token it settles (except [`Settle::extend`]), so a delivery cannot
/// be settled twice.
pub trait Settle: Clone + Send + Sync + 'static {
    /// The broker's handle for one delivery.
    type Token: Clone + Send + Sync + 'static;

    /// Acknowledges processed deliveries, as one broker call where the broker allows it.
    /// Never called with more than [`Capabilities::max_ack_batch`] tokens.
    fn ack(&self, tokens: Vec<Self::Token>) -> impl Future<Output = AckReport<Self::Token>> + Send;

    /// Has the broker deliver the message again no sooner than `after` (clamped by the adapter
    /// to what it supports). A copy, where one is made, must be durable at the broker before
    /// [`Settled::AckOriginal`] is returned.
    fn retry(
        &self,
        token: Self::Token,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> impl Future<Output = Result<Settled<Self::Token>, SettleFailure<Self::Token>>> + Send;

    /// Has the broker deliver the message again no sooner than `after` **with the same
    /// attempt number** (a deferral, [`HandlerError::defer`](crate::HandlerError::defer)),
    /// carrying when it was first deferred (`failure.deferred_since`, as
    /// [`DEFERRED_SINCE_HEADER`](crate::deadletter::DEFERRED_SINCE_HEADER) or the broker's
    /// equivalent) so that the next deferral finds it. Same rules as [`Settle::retry`] for
    /// copies. Only called where retries are delayed at the broker
    /// ([`Capabilities::broker_delay`]) and the adapter says it defers
    /// ([`Capabilities::defers`]); elsewhere the retry layer waits in place, or makes the
    /// deferral a retry. The default is [`Settle::retry`].
    ///
    /// Where the adapter cannot keep the attempt for one message (an SQS copy with no room
    /// for its attributes), it may retry instead: that redelivery counts as an attempt, and
    /// the retry layer dead-letters a deferral on an attempt past `max_attempts`, so
    /// deferrals stay bounded.
    fn defer(
        &self,
        token: Self::Token,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> impl Future<Output = Result<Settled<Self::Token>, SettleFailure<Self::Token>>> + Send {
        self.retry(token, delivery, after, failure)
    }

    /// Prepares a suspect ([`Received::suspect`]) for a run alone, given that the process
    /// holds nothing else: records durably that this run may be its own crash, or moves it
    /// where that count travels with it, or gives up on it after `give_up_at` crashes. The
    /// default runs it as it is, for brokers whose own delivery count already says it (SQS's
    /// receive count is the attempt number).
    fn arm(
        &self,
        token: Self::Token,
        delivery: &Delivery,
        give_up_at: u32,
    ) -> impl Future<Output = Result<Armed<Self::Token>, SettleFailure<Self::Token>>> + Send {
        let _ = (delivery, give_up_at);
        async { Ok(Armed::Run { token, crashes: 0 }) }
    }

    /// Ends a suspect's run alone where suspects run alone among attempts
    /// ([`Alone::Attempts`]): records durably that a crash from now on is not `token`'s own
    /// (the mark [`Settle::arm`] wrote is cleared). Called before other attempts may run
    /// again: once the suspect is settled (its ack sent), or before the wait of each of its
    /// retries in place (it is armed again, with `give_up_at` `u32::MAX`, before the next
    /// attempt). An error keeps the suspect alone through its retry's wait. The default does
    /// nothing.
    fn step_aside(
        &self,
        token: &Self::Token,
    ) -> impl Future<Output = Result<(), SettleError>> + Send {
        let _ = token;
        async { Ok(()) }
    }

    /// Forwards the message to the dead-letter destination with `letter`'s metadata; returns
    /// [`Settled::AckOriginal`] only once the broker confirmed the copy.
    fn dead_letter(
        &self,
        token: Self::Token,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<Settled<Self::Token>, SettleFailure<Self::Token>>> + Send;

    /// Extends the delivery's lease to `by` from now. [`SettleError::LeaseLost`] when it is no
    /// longer ours. Only called when [`Capabilities::lease`] is set.
    fn extend(
        &self,
        token: &Self::Token,
        by: Duration,
    ) -> impl Future<Output = Result<(), SettleError>> + Send;

    /// Gives an unprocessed delivery back for redelivery as soon as possible, without acking it
    /// (after a failed retry or dead-letter settlement, or a delivery never started). The
    /// default leaves it to the broker's own redelivery.
    fn release(&self, token: Self::Token) -> impl Future<Output = ()> + Send {
        let _ = token;
        async {}
    }

    /// Gives back a delivery that was never started because the consumer is shutting down
    /// (it only waited, for its dedup store or a busy key). The default is
    /// [`Settle::release`]; an adapter where releasing moves a shared position (Kafka's seek
    /// back, which would also discard the work of the partition's records finishing in the
    /// drain) leaves the delivery unsettled instead, for the broker to redeliver after the
    /// restart.
    fn release_at_shutdown(&self, token: Self::Token) -> impl Future<Output = ()> + Send {
        self.release(token)
    }

    /// Sends whatever the adapter holds back (coalesced acks, commits). Called after the last
    /// ack of a run.
    fn flush(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// How many messages wait at the broker for this consumer, where the broker tells
    /// (`None`: it does not, or asking failed). Called by the runner every
    /// [`ConsumerConfig::backlog_interval`](crate::ConsumerConfig::backlog_interval), one call
    /// at a time, for the `ackstack_backlog` and `ackstack_partition_lag` gauges. The default
    /// says nothing.
    fn backlog(&self) -> impl Future<Output = Option<Backlog>> + Send {
        async { None }
    }
}

/// Messages waiting at the broker for a consumer, from [`Settle::backlog`]: made with
/// [`Backlog::new`] (or `Default`, then per-partition lags pushed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Messages waiting in all: RabbitMQ's ready messages, SQS's
    /// `ApproximateNumberOfMessages`, the sum of a Kafka member's partition lags.
    pub total: u64,
    /// Per partition, where the broker has them (Kafka): partition and lag (the high
    /// watermark minus the consumer's committed position).
    pub partitions: Vec<(i32, u64)>,
}

impl Backlog {
    /// `total` messages waiting, with no per-partition figures.
    pub fn new(total: u64) -> Self {
        Backlog {
            total,
            partitions: Vec::new(),
        }
    }
}

/// What a broker supports natively; the runner and layers adapt to it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The largest batch one ack call takes (SQS: 10).
    pub max_ack_batch: usize,
    /// The lease (visibility timeout) a delivery is received with, if leases exist and must be
    /// extended while handlers run.
    pub lease: Option<Duration>,
    /// The longest delay [`Settle::retry`] can honour.
    pub max_retry_delay: Duration,
    /// Whether retries are delayed at the broker (`false`: the runner retries in place while
    /// the adapter holds the delivery).
    pub broker_delay: bool,
    /// Whether [`Settle::defer`] brings a message back with its attempt number kept. Where
    /// retries are delayed at the broker and it is not set, a deferral
    /// ([`HandlerError::defer`](crate::HandlerError::defer)) is a retry after the delay asked
    /// for, counted as an attempt (and bounded by `max_attempts`). In place, deferrals keep
    /// their attempt whatever this says.
    pub defers: bool,
    /// How many ack calls may be in flight at once. 1 keeps acks in order, which cumulative
    /// acks (Kafka commits) need; independent acks (SQS deletes) can go in parallel.
    pub parallel_acks: usize,
    /// Set where the broker's attempt number counts every receive (SQS): for this long after
    /// the start, and after each suspect ([`Received::suspect`]), the runner receives one
    /// delivery at a time (a suspect received beside others would wait for its run alone,
    /// and a crash meanwhile would count against it too), and a delivery that arrives past
    /// `max_attempts` is dead-lettered without running (only deliveries that ended unsettled
    /// get there; see `Terminal::arrival_limit`). `None` elsewhere.
    pub careful_for: Option<Duration>,
    /// Whether the careful period of [`Capabilities::careful_for`] also runs from the start
    /// (the default), or only after a suspect: an adapter that knows at connect that nothing
    /// can come back unsettled (JetStream: no acks pending for the consumer) turns it off,
    /// and so does one whose source returns each suspect alone in its own receive (Redis
    /// Streams' takeovers), with a period of zero.
    pub careful_from_start: bool,
    /// What a suspect runs alone among (see [`Alone`]).
    pub alone: Alone,
    /// A limit of the broker's own on how often a message is handed out, after which the
    /// broker moves it away itself (see [`BrokerLimit`]). `None` where there is none.
    pub broker_limit: Option<BrokerLimit>,
}

/// A broker's own limit on deliveries of a message ([`Capabilities::broker_limit`]): SQS's
/// redrive policy (`maxReceiveCount`), after which SQS moves the message to its dead-letter
/// queue unprocessed and without ackstack's metadata. Where it is not above
/// `RetryConfig::max_attempts` it would pre-empt ackstack's retries, so the run refuses to
/// start ([`ConfigError::BrokerLimit`](crate::ConfigError::BrokerLimit)), unless the adapter
/// was told to trust it, in which case `max_attempts` is lowered to one below it (logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerLimit {
    /// Deliveries after which the broker moves the message away.
    pub deliveries: u32,
    /// Lower `max_attempts` below it instead of refusing to start.
    pub lower_max_attempts: bool,
}

impl BrokerLimit {
    /// A limit of `deliveries`; with `lower_max_attempts`, trusted rather than refused.
    pub fn new(deliveries: u32, lower_max_attempts: bool) -> Self {
        BrokerLimit {
            deliveries,
            lower_max_attempts,
        }
    }
}

/// What a suspect ([`Received::suspect`]) runs alone among.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Alone {
    /// Nothing else in flight: the runner lets every delivery in flight finish and be acked,
    /// runs the suspect, and receives again once it is settled. For brokers whose count of a
    /// delivery rises for everything handed out at a crash (SQS's receive count).
    #[default]
    InFlight,
    /// No other handler attempt: deliveries may be received, wait for their key or sleep
    /// between retries in place while a suspect runs, but none starts an attempt while a
    /// suspect's attempt runs, until it is settled or waits for its retry and
    /// [`Settle::step_aside`] recorded that. For brokers
    /// where the crash count is kept for the one delivery [`Settle::arm`] marked (Kafka's
    /// commit metadata), so that a suspect does not wait for in-place retries' backoff.
    Attempts,
}

impl Capabilities {
    /// Capabilities with acks batched up to `max_ack_batch`, no leases, broker-side delays up to
    /// 12 hours.
    pub fn new(max_ack_batch: usize) -> Self {
        Capabilities {
            max_ack_batch: max_ack_batch.max(1),
            lease: None,
            max_retry_delay: Duration::from_secs(12 * 3600),
            broker_delay: true,
            defers: false,
            parallel_acks: 1,
            careful_for: None,
            careful_from_start: true,
            alone: Alone::InFlight,
            broker_limit: None,
        }
    }

    /// With the broker's own delivery limit (see [`BrokerLimit`]).
    pub fn with_broker_limit(mut self, limit: BrokerLimit) -> Self {
        self.broker_limit = Some(limit);
        self
    }

    /// With suspects run alone among `alone` (see [`Alone`]).
    pub fn with_alone(mut self, alone: Alone) -> Self {
        self.alone = alone;
        self
    }

    /// With suspects received one at a time for `period` after the start and after each
    /// suspect (see [`Capabilities::careful_for`]).
    pub fn with_careful_receives(mut self, period: Duration) -> Self {
        self.careful_for = Some(period);
        self.careful_from_start = true;
        self
    }

    /// With the careful period only after suspects, not from the start (see
    /// [`Capabilities::careful_from_start`]).
    pub fn without_careful_start(mut self) -> Self {
        self.careful_from_start = false;
        self
    }

    /// With up to `n` ack calls in flight at once.
    pub fn with_parallel_acks(mut self, n: usize) -> Self {
        self.parallel_acks = n.max(1);
        self
    }

    /// With leases of this length.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// With this longest retry delay.
    pub fn with_max_retry_delay(mut self, max: Duration) -> Self {
        self.max_retry_delay = max;
        self
    }

    /// [`Settle::defer`] keeps the attempt number (see [`Capabilities::defers`]).
    pub fn with_deferrals(mut self) -> Self {
        self.defers = true;
        self
    }

    /// Retries are performed in place by the runner rather than delayed at the broker.
    pub fn with_in_place_retry(mut self) -> Self {
        self.broker_delay = false;
        self
    }
}
