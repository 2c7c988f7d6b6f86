//! [`MemorySource`]: receiving from one in-memory queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::later;
use crate::delivery::{Delivery, Origin};
use crate::error::SourceError;
use crate::source::{Capabilities, Received, Source};

use super::broker::{Handed, MemoryBroker, MemoryToken};
use super::settler::MemorySettler;

impl MemoryBroker {
    /// A source on `queue` with a 30 s visibility timeout.
    pub fn source(&self, queue: &str) -> MemorySource {
        MemorySource {
            broker: self.clone(),
            queue: queue.into(),
            consumer: "memory-consumer".into(),
            visibility: Duration::from_secs(30),
            poll_wait: Duration::from_millis(500),
            max_ack_batch: 100,
        }
    }
}

/// A [`Source`] on one in-memory queue.
#[derive(Clone, Debug)]
pub struct MemorySource {
    broker: MemoryBroker,
    queue: Arc<str>,
    consumer: Arc<str>,
    visibility: Duration,
    poll_wait: Duration,
    max_ack_batch: usize,
}

impl MemorySource {
    /// With this visibility timeout (the lease).
    pub fn visibility_timeout(mut self, t: Duration) -> Self {
        self.visibility = t;
        self
    }

    /// Returning an empty batch after waiting this long with nothing to receive.
    pub fn poll_wait(mut self, t: Duration) -> Self {
        self.poll_wait = t;
        self
    }

    /// Acking at most `n` messages per ack call.
    pub fn max_ack_batch(mut self, n: usize) -> Self {
        self.max_ack_batch = n.max(1);
        self
    }

    /// Naming the consumer `name` in deliveries' origin.
    pub fn consumer_name(mut self, name: &str) -> Self {
        self.consumer = name.into();
        self
    }
}

impl Source for MemorySource {
    type Token = MemoryToken;
    type Settler = MemorySettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        let deadline = later(Instant::now(), self.poll_wait);
        loop {
            let notified = self.broker.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (batch, next_due) =
                self.broker
                    .receive_now(&self.queue, max.max(1), self.visibility);
            if !batch.is_empty() {
                return Ok(batch
                    .into_iter()
                    .map(
                        |Handed {
                             id,
                             message,
                             receives,
                             attempt,
                             published_at,
                         }| {
                            let mut origin =
                                Origin::new("memory", self.queue.clone(), self.consumer.clone());
                            origin.offset = i64::try_from(id).ok();
                            Received {
                                delivery: Delivery {
                                    payload: message.payload,
                                    headers: message.headers,
                                    key: message.key,
                                    message_id: message.message_id,
                                    attempt,
                                    origin,
                                    produced_at: Some(published_at),
                                },
                                token: MemoryToken {
                                    id,
                                    receive: receives,
                                },
                                // The broker lives in the consumer's process: no redelivery
                                // outlives a crash.
                                suspect: false,
                            }
                        },
                    )
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn settler(&self) -> MemorySettler {
        MemorySettler {
            broker: self.broker.clone(),
            queue: self.queue.clone(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.max_ack_batch)
            .with_lease(self.visibility)
            .with_deferrals()
    }

    fn origin(&self) -> Origin {
        Origin::new("memory", self.queue.clone(), self.consumer.clone())
    }
}
