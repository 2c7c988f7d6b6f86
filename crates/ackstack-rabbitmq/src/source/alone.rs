//! The queue of runs alone (docs/DESIGN.md, "Crashes count as attempts"): getting a suspect
//! from it only while nothing else is in flight, looking whether suspects wait there, and
//! holding the work queue back meanwhile.

use std::time::Duration;

use ackstack_core::{Received, SourceError};
use futures::{FutureExt, StreamExt};
use lapin::options::BasicGetOptions;
use tokio::time::Instant;

use super::RabbitSource;
use crate::amqp;
use crate::channel::CLOSE_TIMEOUT;
use crate::error::RabbitError;
use crate::token::RabbitToken;

/// How long the source stops reading the work queue, so that what is in flight finishes and
/// a suspect can run alone, before it reads it again meanwhile.
const ALONE_WAIT_MAX: Duration = Duration::from_secs(30);

/// How often a consumer looks whether suspects wait to run alone that no move of its own
/// announced (another replica moved them, or stopped before running them).
const ALONE_LOOK_EVERY: Duration = Duration::from_secs(10);

/// What a look at the queue of suspects found.
enum Alone {
    /// One suspect, to run alone now.
    Got(Box<Received<RabbitToken>>),
    /// Others are in flight: a suspect waits until they are done.
    Busy,
    /// Nothing waits there.
    Empty,
}

impl RabbitSource {
    /// The queue of runs alone's turn in a receive: `Some` to return (a suspect, or nothing
    /// while the work queue is held back for one), `None` to read the work queue.
    pub(super) async fn alone_turn(
        &mut self,
    ) -> Result<Option<Vec<Received<RabbitToken>>>, SourceError> {
        self.look_for_alone().await;
        if !self.shared.alone_pending() {
            return Ok(None);
        }
        match self.take_alone().await? {
            Alone::Got(received) => {
                self.busy_since = None;
                Ok(Some(vec![*received]))
            }
            Alone::Empty => {
                self.busy_since = None;
                self.shared.set_alone_pending(false);
                Ok(None)
            }
            Alone::Busy => {
                let poll = self.shared.config.poll_interval;
                let mut since = *self.busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ALONE_WAIT_MAX * 2 {
                    // Waited, then read meanwhile: wait again, so that under steady load the
                    // suspects' turn still comes.
                    since = Instant::now();
                    self.busy_since = Some(since);
                }
                if since.elapsed() < ALONE_WAIT_MAX {
                    // Take nothing more from the work queue until what is in flight is done,
                    // so that the suspect's turn comes.
                    if let Some(active) = self.active.as_ref() {
                        let progress = active.generation.progress.notified();
                        let wait = poll.min(Duration::from_millis(200));
                        let _ = tokio::time::timeout(wait, progress).await;
                    }
                    return Ok(Some(Vec::new()));
                }
                // Something stays in flight for long (a slow handler): the work queue is read
                // meanwhile, for as long again, then the wait starts over.
                if since.elapsed() < ALONE_WAIT_MAX + poll {
                    tracing::info!(
                        waited = ?since.elapsed(),
                        "suspects wait to run alone behind work in flight; reading the work queue meanwhile"
                    );
                }
                Ok(None)
            }
        }
    }

    /// Gets one suspect from the queue of runs alone, when nothing else is in flight. Every
    /// delivery the consumer stream holds with a lower tag is taken off it and kept in
    /// `held` (tracked, so no cumulative ack passes it).
    async fn take_alone(&mut self) -> Result<Alone, SourceError> {
        let config = &self.shared.config;
        // Deliveries of a lost channel may still be running here: they are in flight too.
        self.lost.retain(|g| g.strong_count() > 0);
        let lost_in_flight = !self.lost.is_empty();
        let Some(active) = self.active.as_mut() else {
            return Err(SourceError::Disconnected("not connected".into()));
        };
        let mut tracker = active.generation.tracker.lock().await;
        if tracker.in_flight() > 0 || !active.held.is_empty() || lost_in_flight {
            return Ok(Alone::Busy);
        }
        let queue =
            amqp::short(&config.alone_queue_name()).map_err(RabbitError::into_source_error)?;
        let get = active
            .generation
            .consume
            .basic_get(queue, BasicGetOptions { no_ack: false });
        let got = match amqp::bounded("basic.get", config.operation_timeout, get).await {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(Alone::Empty),
            Err(e) if e.is_permanent_channel_error() => {
                // The queue went away (it expired) since it was seen: nothing waits there.
                // The broker closed the channel: start over.
                drop(tracker);
                tracing::debug!(error = %e, "basic.get on the queue of suspects refused");
                self.shared.set_alone_pending(false);
                self.drop_active("basic.get refused").await;
                return Err(SourceError::Disconnected(Box::new(e)));
            }
            Err(e) => {
                drop(tracker);
                self.drop_active("basic.get failed").await;
                return Err(e.into_source_error());
            }
        };
        loop {
            match active.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    tracker.delivered(d.delivery_tag);
                    active.held.push_back(d);
                }
                // Cancelled by the broker, or failed: the held ones and the suspect are handed
                // out, then the source reconnects (see `receive`).
                Some(Some(Err(_)) | None) => {
                    active.ended = true;
                    break;
                }
                None => break,
            }
        }
        if !tracker.got(got.delivery.delivery_tag) {
            drop(tracker);
            self.drop_active("basic.get returned an impossible delivery tag")
                .await;
            return Err(SourceError::Disconnected(
                "delivery tags out of sequence".into(),
            ));
        }
        drop(tracker);
        if got.message_count == 0 {
            // The last one: the next receive reads the work queue again.
            self.shared.set_alone_pending(false);
        }
        let Some(active) = self.active.as_ref() else {
            return Err(SourceError::Disconnected("not connected".into()));
        };
        Ok(Alone::Got(Box::new(self.convert(
            active,
            got.delivery,
            true,
        ))))
    }

    /// Whether suspects wait to run alone that no move of this consumer announced (another
    /// replica's moves, or a consumer that stopped before running them): on connecting and
    /// every [`ALONE_LOOK_EVERY`], a declare of the queue on a throwaway channel (passive
    /// when the topology is not ours to declare: a missing queue then means suspects run in
    /// place, and a `basic.get` on it would close the consuming channel).
    async fn look_for_alone(&mut self) {
        if Instant::now() < self.next_alone_look || self.shared.alone_missing() {
            return;
        }
        self.next_alone_look = Instant::now() + ALONE_LOOK_EVERY;
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let config = &self.shared.config;
        let count = async {
            let open = active.generation.connection.create_channel();
            let channel = amqp::bounded("channel open", config.operation_timeout, open).await?;
            let count = if config.declare_topology.declares() {
                amqp::declare_alone(&channel, config).await
            } else {
                amqp::declare_alone_passive(&channel, config).await
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "ok".into())).await;
            count
        };
        match count.await {
            Ok(n) => {
                if n > 0 {
                    self.shared.set_alone_pending(true);
                }
            }
            Err(err) if err.is_permanent_channel_error() => {
                tracing::debug!(error = %err, "no queue of suspects to look at");
                self.shared.set_alone_missing();
            }
            Err(err) => tracing::debug!(error = %err, "cannot look at the queue of suspects"),
        }
    }
}
