//! Redis Streams: the stream `<queue>` and its consumer group are created when missing; dead
//! letters go to the stream `<queue>-dlq`. A retry is a copy kept in Redis until it is due.

use ackstack::redis_streams::{RedisStreamsConfig, RedisStreamsPublisher, RedisStreamsSource};

use crate::{CONSUMER_NAME, Options, StartError};

/// Connects a source and a publisher to the stream `--queue` at `--redis-url` (default
/// `redis://127.0.0.1:6379`).
pub async fn connect(
    opts: &Options,
) -> Result<(RedisStreamsSource, RedisStreamsPublisher), StartError> {
    let url = opts.stream_redis_url();
    let mut config = RedisStreamsConfig::new(url.clone(), opts.queue.clone());
    config.group = CONSUMER_NAME.into();
    config.dlq_stream = Some(opts.dlq());
    let at = ackstack::redis::redact_url(&url);
    let source = RedisStreamsSource::connect(config).await.map_err(|e| {
        StartError::from_text(e.is_permanent(), format!("Redis Streams at {at}: {e}"))
    })?;
    let publisher = RedisStreamsPublisher::new(source.connection(), opts.queue.clone());
    Ok((source, publisher))
}
