//! [`SqsSettler`]: deletes in batches, delays retries with `ChangeMessageVisibility`, extends
//! leases, and copies dead letters with `SendMessage`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use ackstack_core::adapter::Retried;
use ackstack_core::{
    AckReport, Backlog, Backoff, DeadLetter, Delivery, Failure, Settle, SettleError, SettleFailure,
    Settled,
};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use aws_sdk_sqs::types::QueueAttributeName;

use crate::config::{MAX_BATCH, duration_secs_ceil};
use crate::error::{ErrorClass, bounded, classify_code, settle_error};
use crate::metadata::{MAX_SEND_DELAY, deferred_copy, fit_dead_letter};
use crate::queue::QueueInfo;
use crate::stats::{Counters, SqsStats};
use crate::token::SqsToken;

/// Tries of a transient `DeleteMessageBatch` failure before it is reported as failed.
const DELETE_ATTEMPTS: u32 = 5;

/// The settling half of an [`SqsSource`](crate::SqsSource). Cheap to clone.
///
/// - **ack**: `DeleteMessageBatch` in chunks of 10. Entries that fail transiently (throttling,
///   `SenderFault=false`) and whole requests that fail transiently are retried with backoff
///   (5 tries, 50 ms doubling to 2 s, equal jitter); an invalid or expired receipt handle is
///   reported as [`SettleError::LeaseLost`] (SQS redelivers; deduplication absorbs it). A
///   message already deleted counts as acked: SQS (and moto) answer success for it.
/// - **retry**: `ChangeMessageVisibility` to the delay, rounded up to whole seconds and clamped
///   to what is left of SQS's 12-hour visibility budget since the receive → [`Settled::Done`].
/// - **defer**: on a standard queue, `SendMessage` of a copy to the queue itself, delayed
///   by the deferral (at most SQS's 15 minutes), with the original attributes plus
///   `x-ackstack-attempt` (this attempt) and `x-ackstack-deferred-since`, then
///   [`Settled::AckOriginal`]: the copy's receive count starts afresh and the source adds it
///   to that attempt, so a deferral uses none. A FIFO queue has no per-message delay: its
///   source does not offer deferrals (`Capabilities::defers`), so the retry layer makes them
///   retries. When the copy would carry more than SQS's 10 attributes, a retry here too:
///   the delay is kept, but the next receive counts as an attempt.
/// - **extend**: `ChangeMessageVisibility(by)`; a lost handle is [`SettleError::LeaseLost`].
/// - **dead_letter**: `SendMessage` to the dead-letter queue with the original body and
///   attributes plus one `ackstack-dead-letter` attribute (see
///   [`dead_letter_attributes`](crate::dead_letter_attributes)), then
///   [`Settled::AckOriginal`]. On a FIFO dead-letter queue the copy keeps the
///   `MessageGroupId` and is deduplicated by the original `MessageId`. A copy over the
///   dead-letter queue's `MaximumMessageSize` is shrunk first
///   ([`fit_dead_letter`](crate::fit_dead_letter)); one that cannot fit is
///   [`SettleError::Rejected`] without a call (the original stays in its queue).
/// - **release**: `ChangeMessageVisibility(0)`.
#[derive(Clone, Debug)]
pub struct SqsSettler {
    client: Client,
    queue: Arc<QueueInfo>,
    stats: Arc<Counters>,
    backoff: Backoff,
    /// Messages this process delayed for a retry (shared with the source).
    pub(crate) retried: Arc<Retried<String>>,
}

impl SqsSettler {
    pub(crate) fn new(
        client: Client,
        queue: Arc<QueueInfo>,
        stats: Arc<Counters>,
        backoff: Backoff,
    ) -> Self {
        SqsSettler {
            client,
            queue,
            stats,
            backoff,
            retried: Arc::default(),
        }
    }

    /// The adapter's counters so far (shared with the source).
    pub fn stats(&self) -> SqsStats {
        self.stats.snapshot()
    }

    /// Sets the backoff used to retry transient delete failures.
    pub fn with_ack_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    async fn delete_chunk(&self, chunk: Vec<SqsToken>, report: &mut AckReport<SqsToken>) {
        let mut pending = chunk;
        let mut attempt: u32 = 1;
        loop {
            let mut entries = Vec::with_capacity(pending.len());
            let mut slots: Vec<Option<SqsToken>> = Vec::with_capacity(pending.len());
            for (i, token) in pending.into_iter().enumerate() {
                match DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(token.receipt_handle())
                    .build()
                {
                    Ok(entry) => {
                        entries.push(entry);
                        slots.push(Some(token));
                    }
                    Err(e) => {
                        self.fail(report, token, SettleError::Rejected(e.to_string()));
                        slots.push(None);
                    }
                }
            }
            if entries.is_empty() {
                return;
            }
            self.stats.delete_batch_calls.add(1);
            let request = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue.url)
                .set_entries(Some(entries));
            let result = bounded("DeleteMessageBatch", self.queue.timeout, request.send()).await;
            let mut again: Vec<(SqsToken, String)> = Vec::new();
            match result {
                Ok(out) => {
                    for ok in out.successful() {
                        if let Some(token) = take(&mut slots, ok.id()) {
                            drop(token);
                            report.acked += 1;
                            self.stats.deleted.add(1);
                        }
                    }
                    for failed in out.failed() {
                        let Some(token) = take(&mut slots, failed.id()) else {
                            continue;
                        };
                        let message = format!(
                            "DeleteMessageBatch entry failed: {}: {}",
                            failed.code(),
                            failed.message().unwrap_or("")
                        );
                        match classify_code(
                            failed.code(),
                            failed.message().unwrap_or(""),
                            Some(failed.sender_fault()),
                        ) {
                            ErrorClass::Transient => again.push((token, message)),
                            class => self.fail(report, token, settle_error(class, message)),
                        }
                    }
                    // An entry the answer does not mention: deleting again is harmless.
                    for token in slots.into_iter().flatten() {
                        again.push((token, "DeleteMessageBatch did not report the entry".into()));
                    }
                }
                Err(e) => {
                    let message = format!("DeleteMessageBatch failed: {}", e.describe());
                    match e.class() {
                        ErrorClass::Transient => {
                            for token in slots.into_iter().flatten() {
                                again.push((token, message.clone()));
                            }
                        }
                        class => {
                            for token in slots.into_iter().flatten() {
                                self.fail(report, token, settle_error(class, message.clone()));
                            }
                        }
                    }
                }
            }
            if again.is_empty() {
                return;
            }
            if attempt >= DELETE_ATTEMPTS {
                for (token, message) in again {
                    self.fail(report, token, SettleError::Broker(message.into()));
                }
                return;
            }
            tracing::debug!(
                entries = again.len(),
                attempt,
                "retrying transient DeleteMessageBatch failures"
            );
            tokio::time::sleep(self.backoff.delay(attempt)).await;
            attempt += 1;
            pending = again.into_iter().map(|(t, _)| t).collect();
        }
    }

    fn fail(&self, report: &mut AckReport<SqsToken>, token: SqsToken, error: SettleError) {
        self.stats.ack_failures.add(1);
        if error.is_lease_lost() {
            self.stats.lease_lost.add(1);
        }
        tracing::warn!(message_id = ?token.message_id(), %error, "SQS delete failed");
        report.failed.push((token, error));
    }

    /// `ChangeMessageVisibility` for `token` to `timeout` (whole seconds, rounded up).
    async fn change_visibility(
        &self,
        token: &SqsToken,
        timeout: Duration,
    ) -> Result<(), SettleError> {
        self.stats.change_visibility_calls.add(1);
        let request = self
            .client
            .change_message_visibility()
            .queue_url(&self.queue.url)
            .receipt_handle(token.receipt_handle())
            .visibility_timeout(duration_secs_ceil(timeout));
        let result = bounded(
            "ChangeMessageVisibility",
            self.queue.timeout,
            request.send(),
        )
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                let class = e.class();
                if class == ErrorClass::LeaseLost {
                    self.stats.lease_lost.add(1);
                }
                Err(settle_error(
                    class,
                    format!("ChangeMessageVisibility failed: {}", e.describe()),
                ))
            }
        }
    }
}

fn take(slots: &mut [Option<SqsToken>], id: &str) -> Option<SqsToken> {
    let i: usize = id.parse().ok()?;
    slots.get_mut(i)?.take()
}

/// A deduplication id for the dead-letter copy: the original message id (so a repeated
/// dead-lettering of the same receive within SQS's 5-minute window is deduplicated), else a
/// hash of the receipt handle.
fn dead_letter_dedup_id(token: &SqsToken) -> String {
    match token.message_id() {
        Some(id) if !id.is_empty() && id.len() <= 120 => format!("dl-{id}"),
        _ => {
            let mut h = DefaultHasher::new();
            token.receipt_handle().hash(&mut h);
            format!("dl-{:016x}", h.finish())
        }
    }
}

impl Settle for SqsSettler {
    type Token = SqsToken;

    async fn ack(&self, tokens: Vec<SqsToken>) -> AckReport<SqsToken> {
        let mut report = AckReport {
            acked: 0,
            failed: Vec::new(),
        };
        let mut rest = tokens;
        let batch = MAX_BATCH as usize;
        while !rest.is_empty() {
            let tail = if rest.len() > batch {
                rest.split_off(batch)
            } else {
                Vec::new()
            };
            self.delete_chunk(rest, &mut report).await;
            rest = tail;
        }
        report
    }

    async fn retry(
        &self,
        token: SqsToken,
        delivery: &Delivery,
        after: Duration,
        _failure: &Failure,
    ) -> Result<Settled<SqsToken>, SettleFailure<SqsToken>> {
        let delay = after.min(token.visibility_budget());
        // Remembered before the call: with a short delay, a long poll can receive the message
        // again before the call returns.
        // By SQS's own id: the delivery's may be its publisher's, shared by two sends.
        if let Some(id) = token.message_id() {
            self.retried.delayed(id.to_string(), delivery.attempt);
        }
        match self.change_visibility(&token, delay).await {
            Ok(()) => Ok(Settled::Done),
            Err(e) => Err(SettleFailure::new(token, e)),
        }
    }

    async fn defer(
        &self,
        token: SqsToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<SqsToken>, SettleFailure<SqsToken>> {
        let since = failure.deferred_since.unwrap_or(failure.at);
        let fifo = self.queue.name.ends_with(".fifo");
        let copy = match deferred_copy(fifo, token.attributes(), delivery, since) {
            Ok(copy) => copy,
            Err(why) => {
                tracing::debug!(message_id = ?token.message_id(), why, "deferred as a retry");
                return self.retry(token, delivery, after, failure).await;
            }
        };
        let (body, attributes) = copy;
        let request = self
            .client
            .send_message()
            .queue_url(&self.queue.url)
            .message_body(body)
            .set_message_attributes(Some(attributes))
            .delay_seconds(duration_secs_ceil(after.min(MAX_SEND_DELAY)));
        self.stats.send_calls.add(1);
        match bounded("SendMessage", self.queue.timeout, request.send()).await {
            Ok(_) => Ok(Settled::AckOriginal(token)),
            Err(e) => {
                let class = match e.class() {
                    ErrorClass::LeaseLost => ErrorClass::Rejected,
                    c => c,
                };
                let message = format!("SendMessage of a deferred copy failed: {}", e.describe());
                Err(SettleFailure::new(token, settle_error(class, message)))
            }
        }
    }

    async fn dead_letter(
        &self,
        token: SqsToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<SqsToken>, SettleFailure<SqsToken>> {
        let metadata = letter.metadata(delivery);
        // The payload came from an SQS body, which is a string.
        let body = match std::str::from_utf8(&delivery.payload) {
            Ok(b) => b.to_string(),
            Err(_) => {
                return Err(SettleFailure::new(
                    token,
                    SettleError::Rejected("payload is not UTF-8; SQS bodies are text".into()),
                ));
            }
        };
        let fitted = match fit_dead_letter(
            token.attributes(),
            &metadata,
            &body,
            self.queue.dlq_max_size,
        ) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(
                    message_id = ?token.message_id(), error = %e,
                    "dead-letter copy refused: too large for the dead-letter queue"
                );
                return Err(SettleFailure::new(token, SettleError::Rejected(e)));
            }
        };
        if !fitted.dropped.is_empty() {
            tracing::warn!(
                message_id = ?token.message_id(), dropped = ?fitted.dropped, size = fitted.size,
                "dead-letter copy shrunk to fit the dead-letter queue's size limit"
            );
        }
        let attributes = fitted.attributes;
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue.dlq_url)
            .message_body(body)
            .set_message_attributes(Some(attributes));
        if self.queue.dlq_fifo {
            let group = token
                .message_group_id()
                .map(str::to_string)
                .or_else(|| {
                    delivery
                        .key
                        .as_ref()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "ackstack-dead-letter".to_string());
            request = request
                .message_group_id(group)
                .message_deduplication_id(dead_letter_dedup_id(&token));
        }
        self.stats.send_calls.add(1);
        match bounded("SendMessage", self.queue.timeout, request.send()).await {
            Ok(_) => {
                self.stats.dead_lettered.add(1);
                Ok(Settled::AckOriginal(token))
            }
            Err(e) => {
                let class = match e.class() {
                    // A receipt-handle code cannot come from SendMessage; treat as rejected.
                    ErrorClass::LeaseLost => ErrorClass::Rejected,
                    c => c,
                };
                Err(SettleFailure::new(
                    token,
                    settle_error(
                        class,
                        format!(
                            "SendMessage to the dead-letter queue failed: {}",
                            e.describe()
                        ),
                    ),
                ))
            }
        }
    }

    async fn extend(&self, token: &SqsToken, by: Duration) -> Result<(), SettleError> {
        let budget = token.visibility_budget();
        if budget.is_zero() {
            self.stats.lease_lost.add(1);
            return Err(SettleError::LeaseLost(
                "SQS's 12-hour visibility limit for this receive is reached".into(),
            ));
        }
        self.change_visibility(token, by.min(budget)).await
    }

    async fn release(&self, token: SqsToken) {
        if let Err(e) = self.change_visibility(&token, Duration::ZERO).await {
            tracing::debug!(message_id = ?token.message_id(), error = %e, "SQS release failed; the message returns when its visibility lapses");
        }
    }

    /// The queue's `ApproximateNumberOfMessages` (visible messages waiting).
    async fn backlog(&self) -> Option<Backlog> {
        let request = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages);
        let answer = bounded("GetQueueAttributes", self.queue.timeout, request.send()).await;
        let waiting = match answer {
            Ok(out) => out
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
                .and_then(|v| v.trim().parse::<u64>().ok()),
            Err(e) => {
                tracing::debug!(error = %e.describe(), "cannot read the queue's backlog");
                None
            }
        }?;
        Some(Backlog::new(waiting))
    }
}

#[cfg(test)]
mod tests;
