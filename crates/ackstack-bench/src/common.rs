//! What every loop shares: the payload, the decode, progress tracking, the handler, the
//! measured sample, allocation and RSS accounting.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ackstack_core::memory::MemoryPublisher;
use ackstack_core::{
    Consumer, ConsumerConfig, Context, DedupKey, DedupStore, Delivery, Handler, HandlerError,
    Message, Publish, Source,
};
use ackstack_postgres::{OutboxRelay, PgInbox};
use serde::Deserialize;
use stats_alloc::Region;
use tokio::sync::Notify;

/// Size of every payload, in bytes.
pub const PAYLOAD_SIZE: usize = 256;

/// The decoded payload (what a user's handler would parse).
#[derive(Debug, Deserialize)]
pub struct Order {
    /// Sequence number.
    pub id: u64,
    /// A customer reference.
    pub customer: String,
    /// An amount.
    pub amount_cents: u64,
    /// A currency code.
    pub currency: String,
    /// Padding text.
    pub note: String,
}

/// A JSON payload of exactly [`PAYLOAD_SIZE`] bytes for message `i`.
pub fn payload(i: u64) -> String {
    let head = format!(
        r#"{{"id":{i},"customer":"customer-{}","amount_cents":{},"currency":"EUR","note":""#,
        i % 1000,
        (i * 37) % 100_000
    );
    let tail = r#""}"#;
    let pad = PAYLOAD_SIZE.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(PAYLOAD_SIZE);
    s.push_str(&head);
    for k in 0..pad {
        s.push(char::from(b'a' + (k % 26) as u8));
    }
    s.push_str(tail);
    s
}

/// Parses a payload as the handler of every loop does.
pub fn decode(payload: &[u8]) -> Result<Order, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// A name unique to this process and call: `prefix-<nanos>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Counts handled messages; records when the first arrived and signals when the target is
/// reached.
#[derive(Debug)]
pub struct Progress {
    target: u64,
    handled: AtomicU64,
    failed: AtomicU64,
    first: OnceLock<Instant>,
    done: Notify,
}

impl Progress {
    /// Progress towards `target` messages.
    pub fn new(target: u64) -> Arc<Self> {
        Arc::new(Progress {
            target,
            handled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first: OnceLock::new(),
            done: Notify::new(),
        })
    }

    /// Marks the start of the measured interval (idempotent).
    pub fn start(&self) {
        self.first.get_or_init(Instant::now);
    }

    /// When the first message arrived.
    pub fn started_at(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    /// Counts one handled message; true when it was the last one.
    pub fn handled_one(&self) -> bool {
        let n = self.handled.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.target {
            self.done.notify_one();
            return true;
        }
        false
    }

    /// Messages handled so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    /// Payloads that did not decode.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the target was reached.
    pub fn is_done(&self) -> bool {
        self.handled() >= self.target
    }

    /// Completes once the target is reached.
    pub async fn wait_done(&self) {
        while !self.is_done() {
            let notified = self.done.notified();
            if self.is_done() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// The work every loop does per message: start the clock, decode (unless `noop`), count.
    pub fn process(&self, payload: &[u8], noop: bool) -> Result<(), serde_json::Error> {
        self.start();
        if !noop {
            match decode(payload) {
                Ok(order) => {
                    // Touch every field, as a handler using the message would.
                    let touched = order.id
                        ^ order.amount_cents
                        ^ (order.customer.len() + order.currency.len() + order.note.len()) as u64;
                    std::hint::black_box(touched);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        self.handled_one();
        Ok(())
    }
}

/// The handler given to ackstack's consumer: the same work as the raw loops, without cloning
/// the delivery.
#[derive(Clone, Debug)]
pub struct BenchHandler {
    progress: Arc<Progress>,
    noop: bool,
}

impl BenchHandler {
    /// A handler counting into `progress`; `noop` skips the decode.
    pub fn new(progress: Arc<Progress>, noop: bool) -> Self {
        BenchHandler { progress, noop }
    }
}

impl Handler for BenchHandler {
    fn handle(
        &self,
        delivery: &Delivery,
        _cx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let result = self
            .progress
            .process(&delivery.payload, self.noop)
            .map_err(HandlerError::permanent);
        std::future::ready(result)
    }
}

/// How a loop deduplicates.
#[derive(Clone)]
pub enum Dedup {
    /// Not at all.
    None,
    /// The dedup layer, by message id, in this store.
    Store(Arc<dyn DedupStore>),
    /// The transactional inbox, by message id (the handler runs in its transaction and runs
    /// no statements of its own, but what `InboxEffect` says).
    Inbox(PgInbox, InboxEffect),
}

/// Where the outbox rows and the direct publishes of the inbox loops go.
pub const EVENTS: &str = "bench-events";

/// What the handler of an inbox loop does besides the inbox row.
#[derive(Clone)]
pub enum InboxEffect {
    /// Nothing.
    None,
    /// Writes an outbox row per delivery; the loop ends when this relay has sent them all.
    Outbox(OutboxRelay),
    /// Publishes a message per delivery itself, inside the transaction.
    Publish(MemoryPublisher),
}

impl From<Option<Arc<dyn DedupStore>>> for Dedup {
    fn from(store: Option<Arc<dyn DedupStore>>) -> Self {
        store.map_or(Dedup::None, Dedup::Store)
    }
}

/// Runs ackstack's consumer of `source` with `config` and `dedup` until `progress` is done.
/// Fails unless every handled message was acked; returns when the consumer finished, after
/// its shutdown flush.
pub async fn run_ackstack<S: Source>(
    source: S,
    config: ConsumerConfig,
    dedup: impl Into<Dedup>,
    progress: &Arc<Progress>,
    noop: bool,
) -> Result<Instant, String> {
    let consumer = Consumer::new(source).config(config);
    let bench = BenchHandler::new(progress.clone(), noop);
    match dedup.into() {
        Dedup::None => run_to_end(consumer, bench, progress).await,
        Dedup::Store(store) => {
            let consumer = consumer.dedup_shared(store, DedupKey::MessageId);
            run_to_end(consumer, bench, progress).await
        }
        Dedup::Inbox(inbox, effect) => {
            let emit = effect.clone();
            let handler = inbox.handler(DedupKey::MessageId, move |delivery, tx, cx| {
                let bench = bench.clone();
                let emit = emit.clone();
                async move {
                    let event = || Message::new(delivery.payload.clone());
                    match &emit {
                        InboxEffect::None => {}
                        InboxEffect::Outbox(_) => {
                            tx.outbox().send(EVENTS, event()).await?;
                        }
                        InboxEffect::Publish(publisher) => publisher.publish(event()).await?,
                    }
                    bench.handle(&delivery, &cx).await
                }
            });
            let end = run_to_end(consumer, handler, progress).await?;
            let InboxEffect::Outbox(relay) = effect else {
                return Ok(end);
            };
            // The outbox rows count once the relay has published them all (a handler run
            // whose commit failed counts in `handled` but left no row: ask the table too).
            let mut checks = 0u32;
            loop {
                if relay.stats().sent >= progress.handled() {
                    break;
                }
                checks += 1;
                if checks.is_multiple_of(100) && relay.pending().await.is_ok_and(|n| n == 0) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            Ok(Instant::now())
        }
    }
}

async fn run_to_end<S: Source, H: Handler>(
    consumer: Consumer<S>,
    handler: H,
    progress: &Arc<Progress>,
) -> Result<Instant, String> {
    let done = progress.clone();
    let summary = consumer
        .run_until(handler, async move { done.wait_done().await })
        .await
        .map_err(|e| e.to_string())?;
    acked_all(&summary, progress)
}

/// The end of a run whose `summary` says it acked everything `progress` handled.
pub fn acked_all(summary: &ackstack_core::Summary, progress: &Progress) -> Result<Instant, String> {
    let end = Instant::now();
    if summary.acked < progress.handled() {
        return Err(format!(
            "acked {} of {}: {summary:?}",
            summary.acked,
            progress.handled()
        ));
    }
    Ok(end)
}

/// What one loop reports besides the clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Broker calls made (None when not countable).
    pub calls: Option<u64>,
    /// Redis round trips (dedup store rows only).
    pub redis_round_trips: Option<u64>,
    /// PostgreSQL transactions (inbox rows only).
    pub pg_transactions: Option<u64>,
    /// PostgreSQL round trips (inbox rows only).
    pub pg_round_trips: Option<u64>,
}

/// One measured run of one loop.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Messages processed.
    pub messages: u64,
    /// From the first message to the loop's end (last ack / flush).
    pub elapsed: Duration,
    /// Broker calls and Redis round trips.
    pub counts: Counts,
    /// Heap allocations during the loop.
    pub allocations: u64,
    /// Peak RSS during the loop, KiB (VmHWM after a reset), if readable.
    pub peak_rss_kib: Option<u64>,
}

impl Sample {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.messages as f64 / secs
    }
}

/// What a loop body returns: when it ended and what it counted.
#[derive(Clone, Copy, Debug)]
pub struct LoopEnd {
    /// When the loop was finished (after its last ack/commit/flush).
    pub end: Instant,
    /// Calls and round trips.
    pub counts: Counts,
}

/// Runs `body` as a measured loop: resets the RSS peak, counts allocations, bounds it by
/// `budget`, and turns the progress into a [`Sample`].
pub async fn measure<F>(
    progress: &Arc<Progress>,
    budget: Duration,
    body: F,
) -> Result<Sample, String>
where
    F: Future<Output = Result<LoopEnd, String>>,
{
    reset_peak_rss();
    let region = Region::new(crate::GLOBAL);
    let ended = tokio::time::timeout(budget, body).await;
    let allocations = region.change().allocations as u64;
    let peak_rss_kib = peak_rss_kib();
    let end = match ended {
        Ok(Ok(end)) => end,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(format!(
                "timed out after {budget:?} with {} of {} handled",
                progress.handled(),
                progress.target
            ));
        }
    };
    if progress.failed() > 0 {
        return Err(format!("{} payloads failed to decode", progress.failed()));
    }
    let Some(start) = progress.started_at() else {
        return Err("no message arrived".into());
    };
    Ok(Sample {
        messages: progress.handled(),
        elapsed: end.end.saturating_duration_since(start),
        counts: end.counts,
        allocations,
        peak_rss_kib,
    })
}

/// Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux 4.0+).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM from /proc/self/status, KiB.
pub fn peak_rss_kib() -> Option<u64> {
    status_field("VmHWM:")
}

/// VmRSS from /proc/self/status, KiB.
pub fn rss_kib() -> Option<u64> {
    status_field("VmRSS:")
}

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
}

/// The time budget of one loop of `n` messages: 30 s plus 5 ms per message, or the
/// override.
pub fn budget(n: u64, override_secs: Option<u64>) -> Duration {
    match override_secs {
        Some(s) => Duration::from_secs(s),
        None => Duration::from_secs(30) + Duration::from_millis(5 * n),
    }
}

/// Whether something listens on `host:port` (answers within 2 s).
pub fn tcp_reachable(host_port: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs = host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host_port}: {e}"))?;
    let mut last = format!("no address for {host_port}");
    for addr in addrs {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{host_port}: {e}"),
        }
    }
    Err(last)
}

/// The `host:port` of a URL such as `amqp://user:pass@host:5672/vhost`, with `default_port`
/// when the URL has none.
pub fn host_port(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        Some(host.to_string())
    } else {
        Some(format!("{host}:{default_port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_256_bytes_and_decodes() {
        for i in [0, 7, 12_345, 999_999_999] {
            let p = payload(i);
            assert_eq!(p.len(), PAYLOAD_SIZE);
            assert_eq!(decode(p.as_bytes()).unwrap().id, i);
        }
    }

    #[test]
    fn host_port_parses_urls() {
        assert_eq!(
            host_port("amqp://guest:guest@127.0.0.1:5672/%2f", 5672).unwrap(),
            "127.0.0.1:5672"
        );
        assert_eq!(
            host_port("redis://127.0.0.1", 6379).unwrap(),
            "127.0.0.1:6379"
        );
        assert_eq!(
            host_port("http://127.0.0.1:4566", 80).unwrap(),
            "127.0.0.1:4566"
        );
    }
}
