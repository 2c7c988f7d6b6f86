//! SQS: the dead-letter queue read with `ReceiveMessage` under a visibility timeout long enough
//! for the scan, each letter held invisible until the scan ends, then released
//! (`ChangeMessageVisibility` 0) unless removed; if the command dies, the timeout releases
//! them. A replay is a `SendMessage` of the original body and attributes to the original
//! queue; the dead letter is deleted only after SQS answered it.
//!
//! Some letters a scan cannot receive: those another reader holds, those a receive whose
//! answer was lost took (the SDK asked again; they stay invisible until their timeout), and
//! in a FIFO queue every letter behind one of its message group that the scan keeps. So the
//! scan counts the queue at the start and reports what it could not reach
//! ([`DeadLetters::unreached`]) rather than present a partial scan as the whole.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ackstack_core::Headers;
use ackstack_sqs::attrs::{
    DEAD_LETTER_ATTRIBUTE, DeadLetterRecord, MAX_ATTRIBUTES, attribute_bytes,
};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_sqs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, Message, MessageAttributeValue,
    MessageSystemAttributeName, QueueAttributeName,
};

use crate::letter::{Letter, REPLAYS_HEADER, RESET_HEADERS, replays_of};
use crate::run::{CliError, DeadLetters, Found, Sent};

/// Empty receives in a row that end a scan (SQS may answer a short poll empty while a few
/// messages remain, on other servers).
const EMPTY_RECEIVES: u32 = 2;

/// A scan of one SQS dead-letter queue.
pub struct SqsDlq {
    client: Client,
    url: String,
    visibility: Duration,
    timeout: Duration,
    buffer: VecDeque<Message>,
    seen: HashSet<String>,
    kept: Vec<String>,
    empty: u32,
    urls: HashMap<String, String>,
    /// How many letters the queue held when the scan started (`None`: it could not be
    /// asked, e.g. no `sqs:GetQueueAttributes`).
    held_at_start: Option<u64>,
    /// How many letters the queue held at the end beyond those the scan holds itself.
    left_at_end: Option<u64>,
}

/// A received letter: its receipt handle and what a replay sends.
pub struct Handle {
    receipt: String,
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    group: Option<String>,
    message_id: String,
}

impl SqsDlq {
    /// Prepares to scan the queue named (or at the URL) `queue`, holding letters invisible for
    /// `visibility` at most.
    pub async fn open(
        client: Client,
        queue: &str,
        visibility: Duration,
        timeout: Duration,
    ) -> Result<Self, CliError> {
        let mut dlq = SqsDlq {
            client,
            url: String::new(),
            visibility,
            timeout,
            buffer: VecDeque::new(),
            seen: HashSet::new(),
            kept: Vec::new(),
            empty: 0,
            urls: HashMap::new(),
            held_at_start: None,
            left_at_end: None,
        };
        dlq.url = dlq.url_of(queue).await?;
        dlq.held_at_start = dlq.count_or_warn().await;
        Ok(dlq)
    }

    /// The queue's messages: visible, in flight and delayed, as SQS counts them.
    async fn count(&self) -> Result<u64, CliError> {
        let call = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send();
        let out = bounded("GetQueueAttributes", self.timeout, call).await?;
        Ok(out
            .attributes()
            .map(|attributes| {
                attributes
                    .values()
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0))
    }

    /// [`count`](Self::count), or `None` with a note on stderr: the scan goes on, unable to
    /// say what it could not reach.
    async fn count_or_warn(&self) -> Option<u64> {
        match self.count().await {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!(
                    "note: cannot count the queue, so letters out of reach go unreported: {e}"
                );
                None
            }
        }
    }

    async fn url_of(&mut self, queue: &str) -> Result<String, CliError> {
        if queue.starts_with("http://") || queue.starts_with("https://") {
            return Ok(queue.to_string());
        }
        if let Some(url) = self.urls.get(queue) {
            return Ok(url.clone());
        }
        let call = self.client.get_queue_url().queue_name(queue).send();
        let out = bounded(&format!("GetQueueUrl {queue}"), self.timeout, call).await?;
        let url = out
            .queue_url()
            .ok_or_else(|| CliError::Broker(format!("SQS gave no URL for queue {queue}")))?
            .to_string();
        self.urls.insert(queue.to_string(), url.clone());
        Ok(url)
    }

    async fn receive(&mut self) -> Result<(), CliError> {
        let secs = i32::try_from(self.visibility.as_secs().clamp(1, 43_200)).unwrap_or(43_200);
        let call = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .visibility_timeout(secs)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send();
        let out = bounded(
            "ReceiveMessage",
            self.timeout + Duration::from_secs(1),
            call,
        )
        .await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            self.empty += 1;
        } else {
            self.empty = 0;
        }
        self.buffer.extend(messages);
        Ok(())
    }
}

async fn bounded<T, E, R>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, aws_sdk_sqs::error::SdkError<E, R>>>,
) -> Result<T, CliError>
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CliError::broker(
            &format!("SQS {what}"),
            aws_sdk_sqs::error::DisplayErrorContext(e),
        )),
        Err(_) => Err(CliError::Broker(format!(
            "SQS {what}: timed out after {timeout:?}"
        ))),
    }
}

/// Counts the attempts of one call that went unanswered: no answer at all (a timeout, a
/// dropped connection) or a 5xx. The SDK retries those, and a `SendMessage` attempt can have
/// landed without its answer arriving: a send that succeeded after one of them may be on the
/// queue twice. (Refused connections count too: they cannot be told apart from a connection
/// dropped after the request went out, and over-reporting a duplicate is the safe side.)
#[derive(Clone, Debug, Default)]
struct Unanswered(Arc<AtomicU32>);

impl Unanswered {
    fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Intercept for Unanswered {
    fn name(&self) -> &'static str {
        "ackstack-unanswered-attempts"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let answered = context
            .response()
            .is_some_and(|r| !r.status().is_server_error());
        if !answered {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The letter and its handle; `None` for a message without a receipt handle.
fn found_of(m: Message) -> Option<Found<Handle>> {
    let receipt = m.receipt_handle?;
    let message_id = m.message_id.unwrap_or_default();
    let mut attributes = m.message_attributes.unwrap_or_default();
    let record = DeadLetterRecord::from_attributes(&attributes);
    attributes.remove(DEAD_LETTER_ATTRIBUTE);
    if let Some(record) = &record {
        // Attributes that the dead-letter copy had no room for go back with the replay.
        for (name, value) in &record.displaced {
            attributes
                .entry(name.clone())
                .or_insert_with(|| value.clone());
        }
    }
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    let headers: Headers = names
        .iter()
        .map(|n| (n.to_string(), attribute_bytes(&attributes[*n])))
        .collect();
    let metadata = record.map(|r| r.metadata);
    let id = metadata
        .as_ref()
        .and_then(|m| m.message_id.clone())
        .unwrap_or_else(|| message_id.clone());
    let body = m.body.unwrap_or_default();
    let group = m
        .attributes
        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId).cloned());
    Some(Found {
        letter: Letter {
            id,
            payload: bytes::Bytes::from(body.clone().into_bytes()),
            replays: replays_of(&headers),
            headers,
            metadata,
        },
        handle: Handle {
            receipt,
            body,
            attributes,
            group,
            message_id,
        },
    })
}

impl DeadLetters for SqsDlq {
    type Handle = Handle;

    async fn next(&mut self) -> Result<Option<Found<Handle>>, CliError> {
        loop {
            if let Some(m) = self.buffer.pop_front() {
                let first_time = m
                    .message_id
                    .as_ref()
                    .is_none_or(|id| self.seen.insert(id.clone()));
                if !first_time {
                    // Received again (its visibility lapsed): hold the newest receipt.
                    if let Some(r) = m.receipt_handle {
                        self.kept.push(r);
                    }
                    continue;
                }
                match found_of(m) {
                    Some(found) => return Ok(Some(found)),
                    None => continue,
                }
            }
            if self.empty >= EMPTY_RECEIVES {
                // What is still there beyond what this scan holds: letters that others took
                // away during the scan are not out of reach, and new ones are not missed.
                let held_here = self.kept.len() as u64;
                self.left_at_end = self
                    .count_or_warn()
                    .await
                    .map(|n| n.saturating_sub(held_here));
                return Ok(None);
            }
            self.receive().await?;
        }
    }

    async fn republish(
        &mut self,
        handle: &Handle,
        queue: &str,
        replays: u32,
    ) -> Result<Sent, CliError> {
        let url = self.url_of(queue).await?;
        let mut attributes = handle.attributes.clone();
        attributes.retain(|name, _| !RESET_HEADERS.contains(&name.as_str()));
        if attributes.contains_key(REPLAYS_HEADER) || attributes.len() < MAX_ATTRIBUTES {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(replays.to_string())
                .build()
                .map_err(|e| CliError::broker("SQS attribute", e))?;
            attributes.insert(REPLAYS_HEADER.to_string(), value);
        } else {
            eprintln!(
                "note: {} has {MAX_ATTRIBUTES} attributes already; its replay is not counted",
                handle.message_id
            );
        }
        let mut send = self
            .client
            .send_message()
            .queue_url(&url)
            .message_body(&handle.body)
            .set_message_attributes(Some(attributes));
        if url.ends_with(".fifo") {
            let group = handle
                .group
                .clone()
                .unwrap_or_else(|| "ackstack-replay".into());
            send = send
                .message_group_id(group)
                .message_deduplication_id(format!("{}-replay-{replays}", handle.message_id));
        }
        let unanswered = Unanswered::default();
        bounded(
            &format!("SendMessage to {queue}"),
            self.timeout,
            send.customize().interceptor(unanswered.clone()).send(),
        )
        .await?;
        // A FIFO queue drops a second copy with the same deduplication id (within five
        // minutes), so a retried send is there once.
        Ok(if unanswered.count() > 0 && !url.ends_with(".fifo") {
            Sent::Retried
        } else {
            Sent::Once
        })
    }

    async fn remove(&mut self, handle: Handle) -> Result<(), CliError> {
        let call = self
            .client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(handle.receipt)
            .send();
        bounded("DeleteMessage", self.timeout, call).await?;
        Ok(())
    }

    async fn keep(&mut self, handle: Handle) -> Result<(), CliError> {
        self.kept.push(handle.receipt);
        Ok(())
    }

    fn unreached(&self) -> u64 {
        match (self.held_at_start, self.left_at_end) {
            (Some(start), Some(end)) => start.saturating_sub(self.seen.len() as u64).min(end),
            _ => 0,
        }
    }

    async fn finish(mut self) -> Result<(), CliError> {
        // Received but not looked at (the scan stopped early): given back too.
        let unread: Vec<String> = self
            .buffer
            .drain(..)
            .filter_map(|m| m.receipt_handle)
            .collect();
        self.kept.extend(unread);
        for chunk in self.kept.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, receipt)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(0)
                        .build()
                        .ok()
                })
                .collect();
            let call = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send();
            // Not released now, they come back by themselves when the scan's visibility lapses.
            if let Err(e) = bounded("ChangeMessageVisibilityBatch", self.timeout, call).await {
                eprintln!("note: {e}; the letters come back once their visibility lapses");
            }
        }
        Ok(())
    }
}
