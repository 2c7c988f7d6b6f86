//! Channel generations: one connection with its consuming and publishing channels, opened
//! anew on every reconnect, and the frames sent on it. Delivery tags are only meaningful on
//! the channel that delivered them, so a token of a dead generation is never acked anywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ackstack_core::adapter;
use ackstack_core::{Backoff, Jitter, SettleError};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};

use crate::amqp::{self, bounded};
use crate::config::RabbitConfig;
use crate::error::RabbitError;
use crate::stats::{Counters, RabbitStats};
use crate::tracker::{AckPlan, AckTracker, Singles};

/// How long one `basic.ack`/`basic.reject` frame may take to be written.
pub(crate) const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a dead or abandoned connection may take.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between reconnect attempts.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(5);

/// State shared by the source and its settler.
pub(crate) struct Shared {
    pub(crate) config: RabbitConfig,
    pub(crate) counters: Counters,
    /// The generation the source currently consumes on.
    pub(crate) current: Mutex<Option<Arc<Generation>>>,
    /// Suspects may be waiting in the queue of runs alone: set at the start, by each move
    /// there and by the periodic look; cleared by a get that finds it empty.
    pub(crate) alone_pending: AtomicBool,
    /// The queue of runs alone does not exist (declare_topology off, and not declared by
    /// hand): suspects run alone in place, their crashes not counted.
    pub(crate) alone_missing: AtomicBool,
}

impl Shared {
    pub(crate) fn current(&self) -> MutexGuard<'_, Option<Arc<Generation>>> {
        // A panic elsewhere while holding this lock cannot leave the Option inconsistent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether suspects may be waiting to run alone.
    pub(crate) fn alone_pending(&self) -> bool {
        self.alone_pending.load(Ordering::Acquire)
    }

    /// Records whether suspects may be waiting to run alone.
    pub(crate) fn set_alone_pending(&self, pending: bool) {
        let pending = pending && !self.alone_missing();
        self.alone_pending.store(pending, Ordering::Release);
    }

    /// Whether the queue of runs alone was found missing.
    pub(crate) fn alone_missing(&self) -> bool {
        self.alone_missing.load(Ordering::Acquire)
    }

    /// The queue of runs alone is missing: suspects run in place from now on.
    pub(crate) fn set_alone_missing(&self) {
        if !self.alone_missing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                queue = %self.config.alone_queue_name(),
                "the queue of suspects waiting to run alone does not exist: a message that \
                 takes the process down is not counted (declare it, or let ackstack declare \
                 the topology)"
            );
        }
        self.alone_pending.store(false, Ordering::Release);
    }

    pub(crate) fn stats(&self) -> RabbitStats {
        self.counters.snapshot()
    }
}

/// One connection and its consuming channel. Delivery tags are only meaningful on the
/// channel that delivered them, so every token points at its generation, and a token of a
/// dead generation is never acked anywhere (its delivery is redelivered by the broker).
pub(crate) struct Generation {
    /// Its number; tokens are fenced by it (see [`adapter::Generation`]).
    pub(crate) id: adapter::Generation,
    pub(crate) connection: Connection,
    pub(crate) consume: Channel,
    /// A confirm-mode channel on the same connection, reopened when it closes.
    publish: tokio::sync::Mutex<Option<Channel>>,
    /// [`RabbitConfig::operation_timeout`]: bounds reopening `publish`.
    pub(crate) timeout: Duration,
    /// The tags of `consume`; the lock also orders the frames sent for them.
    pub(crate) tracker: tokio::sync::Mutex<AckTracker>,
    /// Woken when ack frames were sent or the generation died: ack calls waiting for their
    /// held tags look again.
    pub(crate) progress: tokio::sync::Notify,
    dead: AtomicBool,
}

impl Generation {
    /// Opens generation `id`: connects, declares the topology (unless disabled), sets the
    /// prefetch and starts consuming on one channel, and opens the publish channel.
    pub(crate) async fn open(
        config: &RabbitConfig,
        id: adapter::Generation,
    ) -> Result<(Generation, lapin::Consumer), RabbitError> {
        let timeout = config.operation_timeout;
        let connection = amqp::connect(config, "consumer").await?;
        amqp::declare_topology(&connection, config).await?;
        let consume = bounded("channel open", timeout, connection.create_channel()).await?;
        bounded(
            "basic.qos",
            timeout,
            consume.basic_qos(config.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = match &config.consumer_tag {
            Some(tag) => amqp::short(tag)?,
            None => ShortString::default(),
        };
        let consume_call = consume.basic_consume(
            amqp::short(&config.queue)?,
            tag,
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        );
        let consumer = bounded("basic.consume", timeout, consume_call).await?;
        let publish = amqp::confirm_channel(&connection, timeout).await?;
        Ok((
            Generation {
                id,
                connection,
                consume,
                publish: tokio::sync::Mutex::new(Some(publish)),
                timeout,
                tracker: tokio::sync::Mutex::new(AckTracker::new(config.prefetch)),
                progress: tokio::sync::Notify::new(),
                dead: AtomicBool::new(false),
            },
            consumer,
        ))
    }

    pub(crate) fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
            && self.consume.status().connected()
            && self.connection.status().connected()
    }

    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.progress.notify_waiters();
    }

    /// The connection's negotiated maximum frame size (0: no limit). A content header (the
    /// properties with the header table) must fit one frame.
    pub(crate) fn frame_max(&self) -> u32 {
        self.connection.configuration().frame_max()
    }

    pub(crate) async fn publish_channel(&self) -> Result<Channel, RabbitError> {
        let mut guard = self.publish.lock().await;
        if let Some(channel) = guard.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = amqp::confirm_channel(&self.connection, self.timeout).await?;
        *guard = Some(channel.clone());
        Ok(channel)
    }

    /// Sends the planned frames, counting the deliveries they ack as each is sent. On error
    /// the channel is broken: the generation is killed.
    pub(crate) async fn send(
        &self,
        plan: &AckPlan,
        counters: &Counters,
    ) -> Result<(), SettleError> {
        if let Some(tag) = plan.multiple {
            self.ack_frame(tag, true, counters).await?;
            counters.acked_tokens.add(plan.multiple_covers as u64);
        }
        for &tag in &plan.singles {
            self.ack_frame(tag, false, counters).await?;
            counters.acked_tokens.add(1);
            match plan.why {
                Singles::Pressure => counters.pressure_ack_frames.add(1),
                Singles::Late => counters.late_ack_frames.add(1),
                Singles::Flush => {}
            }
        }
        if plan.multiple.is_some() || !plan.singles.is_empty() {
            self.progress.notify_waiters();
        }
        Ok(())
    }

    async fn ack_frame(&self, tag: u64, multiple: bool, c: &Counters) -> Result<(), SettleError> {
        let sent = tokio::time::timeout(
            FRAME_TIMEOUT,
            self.consume.basic_ack(tag, BasicAckOptions { multiple }),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                c.ack_frames.add(1);
                if multiple {
                    c.multiple_ack_frames.add(1);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.kill();
                Err(SettleError::LeaseLost(format!(
                    "channel closed while acking tag {tag}: {e}"
                )))
            }
            Err(_) => {
                self.kill();
                Err(SettleError::LeaseLost(format!(
                    "timed out acking tag {tag}; channel presumed dead"
                )))
            }
        }
    }
}

/// The schedule of reconnect pauses: core's [`Backoff`], exponential from 100 ms up to
/// [`MAX_RECONNECT_PAUSE`], without jitter.
const RECONNECT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    factor: 2.0,
    cap: MAX_RECONNECT_PAUSE,
    jitter: Jitter::None,
};

/// The pause before the next reconnect attempt after `failures` failed ones (the source
/// pauses only after a failure): [`RECONNECT_BACKOFF`] one step on, 100 ms × 2^`failures`,
/// so 200 ms after the first failure, up to [`MAX_RECONNECT_PAUSE`].
pub(crate) fn reconnect_pause(failures: u32) -> Duration {
    RECONNECT_BACKOFF.delay(failures.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_pauses_double_from_100_ms_up_to_5_s() {
        let ms = |n| Duration::from_millis(n);
        let pauses: Vec<Duration> = (0..8).map(reconnect_pause).collect();
        let expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(ms);
        assert_eq!(pauses, expected);
        assert_eq!(reconnect_pause(u32::MAX), MAX_RECONNECT_PAUSE);
    }
}
