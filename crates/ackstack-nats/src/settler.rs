//! [`NatsSettler`]: acks, naks with a delay, progress (`+WPI`) and dead letters.

use std::sync::Arc;
use std::time::Duration;

use ackstack_core::{
    AckReport, Backlog, DeadLetter, Delivery, Failure, Settle, SettleError, SettleFailure, Settled,
};
use bytes::Bytes;
use tokio::time::Instant;

use crate::error::bounded;
use crate::headers::{self, MESSAGE_ID_HEADER};
use crate::source::Resolved;
use crate::token::NatsToken;

/// The settling half of a [`NatsSource`](crate::NatsSource). Cheap to clone.
///
/// - **ack**: `+ACK` to each delivery's ack subject, then a flush (the frames reached the
///   server). An ack the server never sees is a redelivery after `ack_wait`, which
///   deduplication absorbs.
/// - **retry**: `-NAK` with the delay: the server delivers it again after it, counting the
///   delivery (the attempt number).
/// - **extend**: `+WPI` (in progress), which restarts `ack_wait`; a lease that lapsed before
///   is [`SettleError::LeaseLost`].
/// - **dead_letter**: a copy published to the dead-letter subject with the original headers
///   and ackstack's `x-ackstack-dl-*` metadata (line breaks in the error message written as
///   `\r` and `\n`, which NATS headers cannot carry), `Nats-Msg-Id` `<stream>:<sequence>:dead-letter`
///   (so that the stream drops a second copy within its duplicate window), awaited until the
///   stream confirmed it; then `+TERM` on the original.
/// - **release**: `-NAK` without a delay.
#[derive(Clone, Debug)]
pub struct NatsSettler {
    shared: Arc<Resolved>,
}

impl NatsSettler {
    pub(crate) fn new(shared: Arc<Resolved>) -> Self {
        NatsSettler { shared }
    }

    /// What the source and this settler sent so far.
    pub fn stats(&self) -> crate::NatsStats {
        self.shared.counters.snapshot()
    }

    /// Sends `body` to `token`'s ack subject.
    async fn reply(&self, token: &NatsToken, body: &'static [u8]) -> Result<(), SettleError> {
        self.reply_owned(token, Bytes::from_static(body)).await
    }

    async fn reply_owned(&self, token: &NatsToken, body: Bytes) -> Result<(), SettleError> {
        self.shared.counters.ack_frames.add(1);
        self.shared
            .client
            .publish(token.0.reply.clone(), body)
            .await
            .map_err(|e| SettleError::Broker(Box::new(e)))
    }

    /// Waits until what was published reached the server, bounded.
    async fn flush(&self) -> Result<(), SettleError> {
        let limit = self.shared.config.operation_timeout;
        self.shared.counters.flushes.add(1);
        bounded("flush", limit, self.shared.client.flush())
            .await
            .map_err(|e| SettleError::Broker(Box::new(e)))
    }

    /// Whether `token`'s lease (`ack_wait` since its last renewal) has lapsed.
    fn lapsed(&self, token: &NatsToken) -> bool {
        token.renewed().elapsed() >= self.shared.ack_wait
    }
}

impl Settle for NatsSettler {
    type Token = NatsToken;

    async fn ack(&self, tokens: Vec<NatsToken>) -> AckReport<NatsToken> {
        let mut report = AckReport::all(0);
        let mut sent = Vec::with_capacity(tokens.len());
        for token in tokens {
            match self.reply(&token, b"+ACK").await {
                Ok(()) => sent.push(token),
                Err(e) => report.failed.push((token, e)),
            }
        }
        match self.flush().await {
            Ok(()) => report.acked += sent.len(),
            Err(e) => {
                for token in sent {
                    report
                        .failed
                        .push((token, SettleError::Broker(e.to_string().into())));
                }
            }
        }
        report
    }

    async fn retry(
        &self,
        token: NatsToken,
        delivery: &Delivery,
        after: Duration,
        _failure: &Failure,
    ) -> Result<Settled<NatsToken>, SettleFailure<NatsToken>> {
        // Remembered first: with a short delay, the next fetch can bring it back before the
        // nak's call returns.
        self.shared
            .retried
            .delayed(token.stream_sequence(), delivery.attempt);
        let nanos = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        let body = Bytes::from(format!("-NAK {{\"delay\": {nanos}}}"));
        let sent = match self.reply_owned(&token, body).await {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => Ok(Settled::Done),
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }

    async fn dead_letter(
        &self,
        token: NatsToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<NatsToken>, SettleFailure<NatsToken>> {
        let shared = &self.shared;
        let mut copy_headers = headers::without_server_controls(&delivery.headers);
        let mut metadata = letter.metadata(delivery);
        // A NATS header value cannot hold a line break; an error message often does.
        metadata.error_message = metadata
            .error_message
            .replace('\r', "\\r")
            .replace('\n', "\\n");
        metadata.apply_to(&mut copy_headers);
        // Where it was published, so that a replay goes back to the same subject.
        copy_headers.insert(headers::SUBJECT_HEADER, token.0.subject.to_string());
        // The consumer is part of the id: two consumers of one stream may share a
        // dead-letter stream, and one's copy must not be taken for the other's repeat.
        copy_headers.insert(
            MESSAGE_ID_HEADER,
            format!(
                "{}:{}:{}:dead-letter",
                shared.config.stream,
                shared.config.consumer,
                token.stream_sequence()
            ),
        );
        let map = match headers::to_nats(&copy_headers) {
            Ok(map) => map,
            Err(why) => return Err(SettleFailure::new(token, SettleError::Rejected(why))),
        };
        let limit = shared.config.operation_timeout;
        let confirmed = async {
            let ack = shared
                .js
                .publish_with_headers(shared.dlq_subject.clone(), map, delivery.payload.clone())
                .await?;
            ack.await
        };
        if let Err(e) = bounded("publishing a dead letter", limit, confirmed).await {
            return Err(SettleFailure::new(
                token,
                SettleError::Broker(e.to_string().into()),
            ));
        }
        shared.counters.dead_letters.add(1);
        // The copy is stored: the original is done with. A +TERM the server never sees brings
        // it back after ack_wait, and its second copy has the same Nats-Msg-Id.
        let termed = match self.reply(&token, b"+TERM").await {
            Ok(()) => self.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = termed {
            tracing::warn!(error = %e, stream_seq = token.stream_sequence(), "dead letter stored; +TERM of the original not sent");
        }
        Ok(Settled::Done)
    }

    async fn extend(&self, token: &NatsToken, _by: Duration) -> Result<(), SettleError> {
        if self.lapsed(token) {
            return Err(SettleError::LeaseLost(format!(
                "ack_wait ({:?}) passed before the lease was renewed",
                self.shared.ack_wait
            )));
        }
        let at = Instant::now();
        self.reply(token, b"+WPI").await?;
        // Renewed only once the frame reached the server (it is queued while reconnecting).
        NatsSettler::flush(self).await?;
        token.renew(at);
        Ok(())
    }

    async fn release(&self, token: NatsToken) {
        if let Err(e) = self.reply(&token, b"-NAK").await {
            tracing::debug!(error = %e, "release not sent; the message returns after ack_wait");
        }
    }

    async fn flush(&self) {
        if let Err(e) = NatsSettler::flush(self).await {
            tracing::debug!(error = %e, "final flush failed");
        }
    }

    /// The consumer's `num_pending`: messages of the stream not yet delivered to it.
    async fn backlog(&self) -> Option<Backlog> {
        let limit = self.shared.config.operation_timeout;
        let info = bounded("consumer info", limit, self.shared.consumer.get_info())
            .await
            .ok()?;
        Some(Backlog::new(info.num_pending))
    }
}
