//! RabbitMQ: the work queue `<queue>`, delay queues for retries, and `<queue>-dlq`, all declared
//! on connect.

use std::collections::BTreeSet;
use std::time::Duration;

use ackstack::Backoff;
use ackstack::rabbitmq::config::redact_uri;
use ackstack::rabbitmq::{RabbitConfig, RabbitError, RabbitPublisher, RabbitSource};

use crate::{CONSUMER_NAME, Options, StartError};

/// Connects a source and a publisher to `--queue` at `--amqp-url`.
pub async fn connect(opts: &Options) -> Result<(RabbitSource, RabbitPublisher), StartError> {
    let (config, failed) = config(opts)?;
    let publisher = RabbitPublisher::connect(config.clone())
        .await
        .map_err(&failed)?;
    let source = RabbitSource::connect(config).await.map_err(failed)?;
    Ok((source, publisher))
}

/// A publisher to `--queue` alone (the queue and its dead-letter queue declared as for a
/// consumer).
pub async fn publisher(opts: &Options) -> Result<RabbitPublisher, StartError> {
    let (config, failed) = config(opts)?;
    RabbitPublisher::connect(config).await.map_err(failed)
}

/// The adapter's settings for `opts`, and how its errors end the start.
fn config(
    opts: &Options,
) -> Result<(RabbitConfig, impl Fn(RabbitError) -> StartError + use<>), StartError> {
    let mut config = RabbitConfig::new(opts.amqp_url.clone(), opts.queue.clone());
    config.delay_buckets = delay_buckets(&opts.backoff(), opts.max_attempts);
    config.connection_name = Some(format!("{CONSUMER_NAME}-{}", opts.queue));
    config.dlq = Some(opts.dlq());
    config
        .validate()
        .map_err(|e| StartError::Config(Box::new(e)))?;
    let at = redact_uri(&opts.amqp_url);
    // A refusal no retry can fix (a queue declared with other arguments, access refused)
    // ends the start at once; only an unreachable broker is waited for.
    let failed =
        move |e: RabbitError| StartError::from_text(e.is_fatal(), format!("RabbitMQ at {at}: {e}"));
    Ok((config, failed))
}

/// RabbitMQ delays retries in fixed buckets (one delay queue each), rounding a delay up to the
/// next bucket. These buckets are the backoff's ceilings per attempt, so a retry waits at most
/// its un-jittered delay, and the 10 s cap.
fn delay_buckets(backoff: &Backoff, max_attempts: u32) -> Vec<Duration> {
    let mut buckets: BTreeSet<Duration> = (1..max_attempts.clamp(2, 64))
        .map(|attempt| backoff.ceiling(attempt))
        .collect();
    buckets.insert(backoff.cap);
    buckets.into_iter().filter(|d| !d.is_zero()).collect()
}
