//! Testing a handler without a broker and without waiting: [`HandlerTest`] runs messages
//! through the whole processing stack (the retry layer, your layers, the handler) and the real
//! runner over the in-memory broker, and reports what happened to each: every attempt with
//! its outcome (ack, retry after a delay, deferral, dead letter), and its fate (acked,
//! dead-lettered with the metadata a real dead letter carries, or still pending).
//!
//! Under tokio's paused clock (`#[tokio::test(start_paused = true)]`) every delay passes at
//! once, in virtual time: a test of eight attempts an hour apart takes milliseconds, and each
//! [`Attempt::at`] says when, in virtual time, the attempt ran. Without it the same test runs
//! in real time.
//!
//! Enabled by the `test-util` feature (of `ackstack`, or of `ackstack-core`).
//!
//! ```
//! use std::time::Duration;
//! use ackstack_core::testing::{Fate, HandlerTest};
//! use ackstack_core::{Backoff, DeadLetterReason, HandlerError, Message, Outcome, handler_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // Fails on the first two attempts, then succeeds; "poison" is refused for good.
//! let handler = handler_fn(|d, _cx| async move {
//!     if &d.payload[..] == b"poison" {
//!         return Err(HandlerError::permanent("not an order"));
//!     }
//!     if d.attempt <= 2 { Err(HandlerError::transient("payment service down")) } else { Ok(()) }
//! });
//! let report = HandlerTest::new(handler)
//!     .backoff(Backoff::exponential(Duration::from_secs(60), Duration::from_secs(600)).no_jitter())
//!     .run([Message::new("order-1"), Message::new("poison")])
//!     .await;
//!
//! let order = &report.messages[0];
//! assert_eq!(order.fate, Fate::Acked);
//! assert_eq!(order.attempt_numbers(), [1, 2, 3]);
//! assert!(matches!(order.attempts[0].outcome, Outcome::Retry { after, .. } if after == Duration::from_secs(60)));
//! // Two minutes of backoff passed in virtual time.
//! assert!(order.attempts[2].at >= Duration::from_secs(180));
//!
//! let Fate::DeadLettered(letter) = &report.messages[1].fate else { panic!() };
//! assert_eq!(letter.reason, DeadLetterReason::Permanent);
//! assert_eq!(letter.attempts, 1);
//! # }
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::deadletter::DeadLetterMetadata;
use crate::handler::Handler;
use crate::memory::MemoryBroker;
use crate::outcome::Outcome;
use crate::publish::Message;
use crate::runner::{Consumer, ConsumerConfig, Summary};

/// The queue a [`HandlerTest`] publishes to.
const QUEUE: &str = "handler-test";

/// Runs a handler on messages through the real processing stack; see the [module docs](self).
#[derive(Debug)]
pub struct HandlerTest<H> {
    handler: H,
    config: ConsumerConfig,
    horizon: Duration,
}

impl<H: Handler> HandlerTest<H> {
    /// A test of `handler` with the default [`ConsumerConfig`] (8 attempts, the default
    /// backoff), one delivery at a time.
    pub fn new(handler: H) -> Self {
        HandlerTest {
            handler,
            config: ConsumerConfig {
                concurrency: 1,
                ..ConsumerConfig::default()
            },
            horizon: Duration::from_secs(24 * 3600),
        }
    }

    /// With this configuration (the one the service runs with, say).
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// With this retry schedule.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.retry.backoff = backoff;
        self
    }

    /// With this attempt limit.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.retry.max_attempts = n.max(1);
        self
    }

    /// Stops the run once this much (virtual) time has passed, leaving what is not settled
    /// [`Fate::Pending`]. Default one day: longer than the default retry schedule and defer
    /// limit. Without a paused clock it is real time: set a short one.
    pub fn horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// Publishes `messages` and runs the handler on them until each is acked or
    /// dead-lettered (or the horizon passes).
    ///
    /// # Panics
    ///
    /// When the consumer refuses to start (the configuration is invalid), with the reason.
    pub async fn run(self, messages: impl IntoIterator<Item = Message>) -> Report {
        let broker = MemoryBroker::new();
        let messages: Vec<Message> = messages.into_iter().collect();
        // A fresh broker numbers its messages 1, 2, ... in publish order (the delivery's
        // offset, and the letter's): that is how outcomes and letters find their message.
        for message in &messages {
            broker.publish(QUEUE, message.clone());
        }
        let started = Instant::now();
        let seen: Arc<Mutex<Vec<(usize, Attempt)>>> = Arc::default();
        let record = seen.clone();
        let consumer = Consumer::new(broker.source(QUEUE))
            .config(self.config)
            .name("handler-test")
            .inspect(move |delivery, outcome| {
                let Some(index) = index_of(delivery.origin.offset) else {
                    return;
                };
                let attempt = Attempt {
                    number: delivery.attempt,
                    outcome: outcome.clone(),
                    at: started.elapsed(),
                };
                lock(&record).push((index, attempt));
            });
        let until = {
            let broker = broker.clone();
            let deadline = started + self.horizon;
            async move {
                // Under a paused clock a tick costs no time; in real time it is short
                // enough not to slow a test down.
                let tick = Duration::from_millis(50);
                while !broker.is_empty(QUEUE) && Instant::now() < deadline {
                    tokio::time::sleep(tick).await;
                }
            }
        };
        let summary = match consumer.run_until(self.handler, until).await {
            Ok(summary) => summary,
            Err(e) => panic!("the consumer under test did not run: {e}"),
        };
        let letters = broker.dead_letters(QUEUE);
        let seen = std::mem::take(&mut *lock(&seen));
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| {
                let attempts: Vec<Attempt> = seen
                    .iter()
                    .filter(|(i, _)| *i == index)
                    .map(|(_, a)| a.clone())
                    .collect();
                let letter = letters.iter().find_map(|l| {
                    let metadata = DeadLetterMetadata::from_headers(&l.headers)?;
                    (index_of(metadata.offset) == Some(index)).then(|| (metadata, l.clone()))
                });
                let (fate, dead_letter) = match (letter, attempts.last().map(|a| &a.outcome)) {
                    (Some((metadata, copy)), _) => {
                        (Fate::DeadLettered(Box::new(metadata)), Some(copy))
                    }
                    (None, Some(Outcome::Ack)) => (Fate::Acked, None),
                    _ => (Fate::Pending, None),
                };
                Handled {
                    message,
                    attempts,
                    fate,
                    dead_letter,
                }
            })
            .collect();
        Report { messages, summary }
    }
}

/// The message a delivery or letter with this in-memory offset is (see [`HandlerTest::run`]).
fn index_of(offset: Option<i64>) -> Option<usize> {
    usize::try_from(offset?).ok()?.checked_sub(1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a [`HandlerTest`] run did, message by message.
#[derive(Debug)]
#[non_exhaustive]
pub struct Report {
    /// Each message, in the order given to [`HandlerTest::run`].
    pub messages: Vec<Handled>,
    /// The consumer's summary of the run.
    pub summary: Summary,
}

/// What happened to one message.
#[derive(Debug)]
#[non_exhaustive]
pub struct Handled {
    /// The message as published.
    pub message: Message,
    /// Every outcome decided for it, in order: one per handler attempt (a retry, a deferral,
    /// the final ack or dead letter), and one without a handler call where none was made (a
    /// duplicate acked by deduplication).
    pub attempts: Vec<Attempt>,
    /// How it ended.
    pub fate: Fate,
    /// The copy that reached the dead-letter queue, when it was dead-lettered: its payload
    /// and headers as forwarded, with the metadata headers.
    pub dead_letter: Option<Message>,
}

impl Handled {
    /// The attempt numbers its outcomes were decided on (a deferral repeats its number).
    pub fn attempt_numbers(&self) -> Vec<u32> {
        self.attempts.iter().map(|a| a.number).collect()
    }
}

/// One outcome decided for a message.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Attempt {
    /// The attempt number, as the broker counted it.
    pub number: u32,
    /// What the processing stack decided.
    pub outcome: Outcome,
    /// When, counted from the start of the run (virtual time under a paused clock).
    pub at: Duration,
}

/// How a message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fate {
    /// Acked: handled successfully (or acked as a duplicate).
    Acked,
    /// Forwarded to the dead-letter queue, with this metadata.
    DeadLettered(Box<DeadLetterMetadata>),
    /// Neither, when the run ended (its horizon passed).
    Pending,
}
