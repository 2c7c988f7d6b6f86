//! A broker's own delivery limit (SQS's redrive policy, invariant 14): not above
//! `max_attempts`, it would move messages away before ackstack's retries are done, so the run
//! refuses to start, naming both numbers; trusted, `max_attempts` is lowered below it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::memory::{MemorySettler, MemorySource, MemoryToken};
use ackstack_core::{
    BrokerLimit, Capabilities, ConfigError, Consumer, ConsumerError, DeadLetterMetadata,
    HandlerError, MemoryBroker, Message, Received, Source, SourceError, handler_fn,
};

mod common;
use common::{fast_retry, until};

/// A memory source whose broker moves messages away after `limit` deliveries.
struct Limited {
    inner: MemorySource,
    limit: BrokerLimit,
}

impl Source for Limited {
    type Token = MemoryToken;
    type Settler = MemorySettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        self.inner.receive(max).await
    }
    fn settler(&self) -> MemorySettler {
        self.inner.settler()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities().with_broker_limit(self.limit)
    }
}

/// Runs a consumer with `max_attempts` whose handler always fails, over one message, under a
/// broker limit of 3 deliveries (`trusted` or not).
async fn run(max_attempts: u32, trusted: bool) -> (Result<(), ConsumerError>, MemoryBroker) {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("fails"));
    let source = Limited {
        inner: broker.source("q"),
        limit: BrokerLimit::new(3, trusted),
    };
    let b = broker.clone();
    let result = Consumer::new(source)
        .max_attempts(max_attempts)
        .backoff(fast_retry())
        .run_until(
            handler_fn(|_d, _cx| async { Err(HandlerError::transient("down")) }),
            until(move || b.is_empty("q")),
        )
        .await
        .map(drop);
    (result, broker)
}

#[tokio::test]
async fn a_broker_limit_not_above_max_attempts_refuses_to_start_naming_both() {
    let (result, broker) = run(3, false).await;
    match result {
        Err(ConsumerError::Config(ConfigError::BrokerLimit {
            deliveries: 3,
            max_attempts: 3,
        })) => {}
        other => panic!("{other:?}"),
    }
    assert!(!broker.is_empty("q"), "nothing was consumed");
}

#[tokio::test]
async fn a_trusted_broker_limit_lowers_max_attempts_below_it() {
    let (result, broker) = run(5, true).await;
    result.unwrap();
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(
        meta.attempts, 2,
        "dead-lettered by ackstack before the broker's limit"
    );
}

#[tokio::test]
async fn a_broker_limit_above_max_attempts_changes_nothing() {
    let (result, broker) = tokio::time::timeout(Duration::from_secs(30), run(2, false))
        .await
        .unwrap();
    result.unwrap();
    let letters = broker.dead_letters("q");
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.attempts, 2);
}
