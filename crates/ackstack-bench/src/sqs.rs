//! SQS (moto by default): aws-sdk-sqs by hand (DeleteMessage each; DeleteMessageBatch of 10)
//! against ackstack's SqsSource under the consumer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::Source;
use ackstack_sqs::testing::{TestQueue, endpoint};
use ackstack_sqs::{Client, SqsSource};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};

use crate::common::{
    Counts, Dedup, LoopEnd, Progress, Sample, budget, host_port, measure, payload, run_ackstack,
    tcp_reachable,
};
use crate::driver::{Loop, LoopStore, Store, interleave, store_rows};
use crate::memory::{bare_config, full_config};
use crate::report::{Role, Series};
use crate::{Options, Stores};

/// Handlers at once in ackstack's consumer (two receives' worth).
const CONCURRENCY: usize = 20;
/// Visibility timeout of every loop.
const VISIBILITY: Duration = Duration::from_secs(30);

fn sdk<E: std::error::Error + 'static>(context: &str, e: E) -> String {
    format!("{context}: {}", DisplayErrorContext(e))
}

/// Messages sent ahead of the handler at most. moto's ReceiveMessage costs O(messages in the
/// queue) (measured: 29 ms for 10 of 10, 150 ms of 100, 1.2 s of 1,000), so the queue is fed
/// while it is consumed instead of filled up front.
const BACKLOG: u64 = 40;

async fn send_batch(client: &Client, url: &str, start: u64, end: u64) -> Result<(), String> {
    let mut entries = Vec::with_capacity(10);
    for i in start..end {
        entries.push(
            SendMessageBatchRequestEntry::builder()
                .id(format!("m{i}"))
                .message_body(payload(i))
                .build()
                .map_err(|e| format!("entry: {e}"))?,
        );
    }
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send(),
    )
    .await
    .map_err(|_| "SendMessageBatch timed out".to_string())?
    .map_err(|e| sdk("SendMessageBatch", e))?;
    if !out.failed().is_empty() {
        return Err(format!("{} sends failed", out.failed().len()));
    }
    Ok(())
}

/// Sends messages `from..n` in batches of 10, keeping at most [`BACKLOG`] ahead of the
/// handled count.
async fn feed(
    client: Client,
    url: String,
    from: u64,
    n: u64,
    progress: Arc<Progress>,
) -> Result<(), String> {
    let mut sent = from;
    while sent < n {
        if sent.saturating_sub(progress.handled()) >= BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let end = (sent + 10).min(n);
        send_batch(&client, &url, sent, end).await?;
        sent = end;
    }
    Ok(())
}

async fn raw(
    client: &Client,
    url: &str,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let mut calls = 0u64;
    while !progress.is_done() {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(VISIBILITY.as_secs() as i32)
            .send()
            .await
            .map_err(|e| sdk("ReceiveMessage", e))?;
        calls += 1;
        let messages = out.messages.unwrap_or_default();
        let mut entries = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            progress
                .process(m.body().unwrap_or_default().as_bytes(), false)
                .map_err(|e| e.to_string())?;
            let handle = m.receipt_handle().ok_or("message without receipt handle")?;
            if tuned {
                entries.push(
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .build()
                        .map_err(|e| format!("entry: {e}"))?,
                );
            } else {
                client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| sdk("DeleteMessage", e))?;
                calls += 1;
            }
        }
        if !entries.is_empty() {
            let out = client
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| sdk("DeleteMessageBatch", e))?;
            calls += 1;
            if !out.failed().is_empty() {
                return Err(format!("{} deletes failed", out.failed().len()));
            }
        }
    }
    Ok(LoopEnd {
        end: Instant::now(),
        counts: Counts {
            calls: Some(calls),
            ..Counts::default()
        },
    })
}

async fn adapter(
    client: &Client,
    queue: &TestQueue,
    progress: Arc<Progress>,
    full: bool,
    dedup: Dedup,
) -> Result<LoopEnd, String> {
    let config = queue
        .config(VISIBILITY)
        .with_consumer_name("ackstack-bench");
    let source = SqsSource::from_client(client.clone(), config)
        .await
        .map_err(|e| format!("SqsSource: {e}"))?;
    let settler = source.settler();
    let consumer_config = if full {
        full_config(CONCURRENCY, 10)
    } else {
        bare_config(CONCURRENCY, 10)
    };
    let end = run_ackstack(source, consumer_config, dedup, &progress, false).await?;
    let s = settler.stats();
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(
                s.receive_calls + s.delete_batch_calls + s.change_visibility_calls + s.send_calls,
            ),
            ..Counts::default()
        },
    })
}

async fn one(
    client: &Client,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let queue = tokio::time::timeout(
        Duration::from_secs(30),
        TestQueue::create(client, "ackstack-bench", false),
    )
    .await
    .map_err(|_| "CreateQueue timed out".to_string())?
    .map_err(|e| format!("CreateQueue: {e}"))?;
    let result = one_inner(client, &queue, kind, n, opts, stores).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), queue.delete(client)).await;
    result
}

async fn one_inner(
    client: &Client,
    queue: &TestQueue,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let initial = n.min(BACKLOG);
    let mut start = 0;
    while start < initial {
        let end = (start + 10).min(initial);
        send_batch(client, &queue.url, start, end).await?;
        start = end;
    }
    let store = LoopStore::open(kind, stores, CONCURRENCY).await?;
    let dedup = store.dedup();
    let progress = Progress::new(n);
    let p = progress.clone();
    let feeder = tokio::spawn(feed(
        client.clone(),
        queue.url.clone(),
        initial,
        n,
        progress.clone(),
    ));
    let abort = feeder.abort_handle();
    let measured = measure(&progress, budget(n, opts.timeout_secs), async move {
        let end = match kind {
            Loop::RawNaive => raw(client, &queue.url, p, false).await,
            Loop::RawTuned => raw(client, &queue.url, p, true).await,
            Loop::Bare | Loop::Batches => adapter(client, queue, p, false, dedup).await,
            Loop::Full(_) | Loop::Serial(_) => adapter(client, queue, p, true, dedup).await,
        }?;
        match feeder.await {
            Ok(Ok(())) => Ok(end),
            Ok(Err(e)) => Err(format!("feeder: {e}")),
            Err(e) => Err(format!("feeder: {e}")),
        }
    })
    .await;
    abort.abort();
    let mut measured = measured;
    store.finish(&mut measured).await;
    let sample = measured?;
    let left = queue
        .approximate_count(client)
        .await
        .map_err(|e| format!("GetQueueAttributes: {e}"))?;
    if left > 0 {
        return Err(format!("{left} messages left in the queue after the loop"));
    }
    Ok(sample)
}

/// The SQS rows, rounds interleaved; an error when the endpoint does not answer.
pub async fn run(opts: &Options, stores: &Stores) -> Result<Vec<Series>, String> {
    let url = endpoint();
    let hp = host_port(&url, 443).ok_or("cannot parse SQS_ENDPOINT")?;
    tcp_reachable(&hp).map_err(|e| {
        format!(
            "SQS endpoint {url} unavailable ({e}); start moto: moto_server -H 127.0.0.1 -p 4566"
        )
    })?;
    let client = ackstack_sqs::testing::client().await;
    let n = opts.messages.unwrap_or(1_000);
    let what =
        "ReceiveMessage + DeleteMessage(Batch) + ChangeMessageVisibility + SendMessage calls";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "sqs",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                "aws-sdk-sqs: ReceiveMessage(10, 1 s wait), decode, DeleteMessage per message, sequential. Every SQS loop gets its queue fed while it runs, at most 40 messages ahead of the handler (moto's ReceiveMessage costs O(queue length)); the feeder's SendMessageBatch calls are not in calls/msg but its allocations are in allocs/msg",
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "sqs",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                "aws-sdk-sqs: ReceiveMessage(10), decode, one DeleteMessageBatch per receive, sequential",
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "sqs",
                "ackstack adapter",
                Role::Ackstack,
                what,
                n,
                format!(
                    "SqsSource + Consumer defaults (concurrency {CONCURRENCY}, batched deletes, lease keeper built in), decode; no dedup"
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "sqs",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers (retry/dead-letter, batch ack, lease keeper) + dedup in MemoryDedupStore",
            ),
        ),
    ];
    loops.extend(store_rows("sqs", what, n, stores, false));
    let client = &client;
    Ok(interleave(opts, "sqs", loops, |kind| {
        one(client, kind, n, opts, stores)
    })
    .await)
}
