//! NATS JetStream: the stream `<queue>` (subject `<queue>`), its dead-letter stream
//! `<queue>-dlq` (subject `<queue>.dlq`) and the durable consumer are created when missing.
//! A retry is a `-NAK` with the delay, at the server.

use ackstack::nats::{NatsConfig, NatsPublisher, NatsSource};

use crate::{CONSUMER_NAME, Options, StartError};

/// Connects a source and a publisher to `--queue` at `--nats-url`.
pub async fn connect(opts: &Options) -> Result<(NatsSource, NatsPublisher), StartError> {
    let mut config = NatsConfig::new(opts.nats_url.clone(), opts.queue.clone());
    config.consumer = CONSUMER_NAME.into();
    config.dlq_stream = Some(opts.dlq());
    let at = &opts.nats_url;
    // A refusal no retry can fix (a name NATS does not take, a consumer that acks otherwise)
    // ends the start at once; only an unreachable server is waited for.
    let source = NatsSource::connect(config)
        .await
        .map_err(|e| StartError::from_text(e.is_permanent(), format!("NATS at {at}: {e}")))?;
    let publisher = NatsPublisher::new(source.client(), opts.queue.clone());
    Ok((source, publisher))
}
