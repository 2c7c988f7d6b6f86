//! Invariant 12: a span per delivery with its fields, and the documented metrics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::memory::MemoryToken;
use ackstack_core::metrics as names;
use ackstack_core::{
    AckReport, Backlog, Backoff, Capabilities, Consumer, DeadLetter, Delivery, Failure,
    HandlerError, MemoryBroker, Message, Origin, Received, Settle, SettleError, SettleFailure,
    Settled, Source, SourceError, handler_fn,
};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// A counter total, a gauge value or a histogram's sample count.
#[derive(Default)]
struct Cell(
    AtomicU64,
    /* the highest value a gauge reached */ AtomicU64,
    /* the highest value a histogram recorded, in milliseconds */ AtomicU64,
);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}
impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        let now = self.0.fetch_add(value as u64, Ordering::SeqCst) + value as u64;
        self.1.fetch_max(now, Ordering::SeqCst);
    }
    fn decrement(&self, value: f64) {
        self.0.fetch_sub(value as u64, Ordering::SeqCst);
    }
    fn set(&self, value: f64) {
        // NaN (unknown) is kept as u64::MAX, which no count reaches.
        let value = if value.is_nan() {
            u64::MAX
        } else {
            value as u64
        };
        self.0.store(value, Ordering::SeqCst);
    }
}
impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.2.fetch_max((value * 1000.0) as u64, Ordering::SeqCst);
    }
}

/// Collects the fields of every `delivery` span.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);
impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "delivery" {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            self.0.lock().unwrap().insert(id.into_u64(), fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

#[test]
fn every_delivery_has_a_span_and_the_documented_metrics_are_emitted() {
    let totals = ByKey::default();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let broker = MemoryBroker::new();
    broker.publish(
        "q",
        Message::new("ok")
            .message_id("m-ok")
            .header("x-correlation-id", "corr-1"),
    );
    broker.publish("q", Message::new("retry once").message_id("m-retry"));
    broker.publish("q", Message::new("bad").message_id("m-bad"));
    broker.publish("q", Message::new("panics once").message_id("m-panic"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let summary = metrics::with_local_recorder(&totals, || {
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let mut config = ackstack_core::ConsumerConfig::default();
                config.correlation_header = Some("x-correlation-id".into());
                config.retry.backoff =
                    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(50))
                        .no_jitter();
                let consumer =
                    Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
                        .config(config);
                let status = consumer.status();
                consumer
                    .run_until(
                        handler_fn(|d, _cx| async move {
                            match (&d.payload[..], d.attempt) {
                                (b"bad", _) => Err(HandlerError::permanent("bad")),
                                (b"retry once", 1) => Err(HandlerError::transient("later")),
                                (b"panics once", 1) => panic!("boom"),
                                _ => Ok(()),
                            }
                        }),
                        async move { status.idle(Duration::from_millis(300)).await },
                    )
                    .await
                    .unwrap()
            })
        })
    });
    assert_eq!(totals.total(names::RECEIVED), summary.received);
    assert_eq!(totals.total(names::RECEIVED), 6);
    assert_eq!(
        totals.total(names::ACKED),
        4,
        "three successes and the dead-lettered original"
    );
    assert_eq!(totals.total(names::RETRIED), 2);
    assert_eq!(totals.total(names::DEAD_LETTERED), 1);
    assert_eq!(totals.total(names::HANDLER_PANICS), 1);
    assert_eq!(
        totals.total(names::HANDLER_SECONDS),
        6,
        "one latency sample per delivery"
    );
    assert_eq!(
        totals.total(names::IN_FLIGHT),
        0,
        "the gauge returns to zero"
    );

    let spans = spans.0.lock().unwrap();
    assert_eq!(spans.len(), 6, "one span per delivery");
    let ok = spans
        .values()
        .find(|f| f.get("message_id").map(String::as_str) == Some("m-ok"))
        .unwrap();
    assert_eq!(ok["broker"], "memory");
    assert_eq!(ok["queue"], "q");
    assert_eq!(ok["attempt"], "1");
    assert_eq!(ok["outcome"], "ack");
    assert_eq!(ok["correlation_id"], "corr-1");
    let outcomes: Vec<(&str, &str, &str)> = {
        let mut v: Vec<_> = spans
            .values()
            .map(|f| {
                (
                    f["message_id"].as_str(),
                    f["attempt"].as_str(),
                    f["outcome"].as_str(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        outcomes,
        vec![
            ("m-bad", "1", "dead_letter"),
            ("m-ok", "1", "ack"),
            ("m-panic", "1", "retry"),
            ("m-panic", "2", "ack"),
            ("m-retry", "1", "retry"),
            ("m-retry", "2", "ack"),
        ]
    );
}

/// A metric's name and its labels, sorted.
type FullKey = (String, Vec<(String, String)>);

/// Records every metric under its full key: name and labels (counter totals, gauge values,
/// histogram sample counts).
#[derive(Clone, Default)]
struct ByKey(Arc<Mutex<HashMap<FullKey, Arc<Cell>>>>);

impl ByKey {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<(String, String)> = key
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        labels.sort();
        self.0
            .lock()
            .unwrap()
            .entry((key.name().to_string(), labels))
            .or_default()
            .clone()
    }

    /// The value under `name` with exactly these labels (0 if never registered).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.read(name, labels, |c| c.0.load(Ordering::SeqCst))
    }

    /// The highest value the gauge `name` with exactly these labels reached.
    fn peak(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.read(name, labels, |c| c.1.load(Ordering::SeqCst))
    }

    /// `value` of the cell under `name` with exactly these labels (0 if never registered).
    fn read(&self, name: &str, labels: &[(&str, &str)], value: impl Fn(&Cell) -> u64) -> u64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        self.0
            .lock()
            .unwrap()
            .get(&(name.to_string(), labels))
            .map_or(0, |c| value(c))
    }

    /// The highest value (in thousandths) any histogram `name` recorded.
    fn highest(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, c)| c.2.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0)
    }

    /// The sum under `name` over all its label sets.
    fn total(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, c)| c.0.load(Ordering::SeqCst))
            .sum()
    }

    fn keys(&self) -> Vec<FullKey> {
        self.0.lock().unwrap().keys().cloned().collect()
    }
}

impl Recorder for ByKey {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

#[test]
fn two_consumers_in_one_process_are_told_apart_by_their_labels() {
    let recorder = ByKey::default();
    let broker = MemoryBroker::new();
    for m in ["ok", "ok", "bad"] {
        broker.publish("a", Message::new(m));
    }
    for m in ["ok", "retry once"] {
        broker.publish("b", Message::new(m));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let handler = || {
                handler_fn(|d, _cx| async move {
                    match (&d.payload[..], d.attempt) {
                        (b"bad", _) => Err(HandlerError::permanent("bad")),
                        (b"retry once", 1) => Err(HandlerError::transient("later")),
                        _ => Ok(()),
                    }
                })
            };
            let run = |queue: &str, name: &str| {
                let mut config = ackstack_core::ConsumerConfig::default();
                config.retry.backoff =
                    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(20))
                        .no_jitter();
                let consumer =
                    Consumer::new(broker.source(queue).poll_wait(Duration::from_millis(20)))
                        .config(config)
                        .name(name);
                let status = consumer.status();
                consumer.run_until(handler(), async move {
                    status.idle(Duration::from_millis(300)).await
                })
            };
            let (a, b) = tokio::join!(run("a", "alpha"), run("b", "beta"));
            a.unwrap();
            b.unwrap();
        })
    });
    let alpha = [("consumer", "alpha"), ("broker", "memory"), ("queue", "a")];
    let beta = [("consumer", "beta"), ("broker", "memory"), ("queue", "b")];
    let with = |base: &[(&'static str, &'static str); 3], k: &'static str, v: &'static str| {
        let mut labels = base.to_vec();
        labels.push((k, v));
        labels
    };
    assert_eq!(recorder.get(names::RECEIVED, &alpha), 3);
    assert_eq!(
        recorder.get(names::RECEIVED, &beta),
        3,
        "one retry redelivered"
    );
    assert_eq!(
        recorder.get(names::OUTCOMES, &with(&alpha, "outcome", "ack")),
        2
    );
    assert_eq!(
        recorder.get(names::OUTCOMES, &with(&alpha, "outcome", "dead_letter")),
        1
    );
    assert_eq!(
        recorder.get(
            names::DEAD_LETTERED,
            &with(&alpha, "error_kind", "permanent")
        ),
        1
    );
    assert_eq!(
        recorder.get(names::RETRIED, &with(&beta, "error_kind", "transient")),
        1
    );
    assert_eq!(
        recorder.get(names::RETRIED, &with(&alpha, "error_kind", "transient")),
        0
    );
    assert_eq!(
        recorder.get(names::OUTCOMES, &with(&beta, "outcome", "ack")),
        2
    );
    assert_eq!(recorder.get(names::ACKED, &alpha), 3);
    assert_eq!(recorder.get(names::ACKED, &beta), 2);
    assert_eq!(
        recorder.get(names::HANDLER_SECONDS, &with(&alpha, "outcome", "ack")),
        2,
        "one latency sample per delivery, by outcome"
    );
    assert_eq!(recorder.get(names::IN_FLIGHT, &alpha), 0);
    assert!(
        recorder.peak(names::IN_FLIGHT, &alpha) >= 1,
        "in flight while its deliveries ran"
    );
    assert_eq!(
        recorder.get(names::CONSUMER_STATE, &with(&beta, "state", "running")),
        1
    );
    assert_eq!(
        recorder.get(names::CONSUMER_STATE, &with(&beta, "state", "paused")),
        0
    );
    for (name, labels) in recorder.keys() {
        assert!(names::ALL.contains(&name.as_str()), "{name} is documented");
        for label in ["consumer", "broker", "queue"] {
            assert!(
                labels.iter().any(|(k, _)| k == label),
                "{name} carries {label}: {labels:?}"
            );
        }
    }
}

#[test]
fn the_backlog_gauge_shows_what_waits_at_the_broker() {
    let recorder = ByKey::default();
    let broker = MemoryBroker::new();
    for i in 0..3 {
        broker.publish("q", Message::new(format!("m{i}")));
    }
    let labels = [
        ("consumer", "lagging"),
        ("broker", "memory"),
        ("queue", "q"),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let mut config = ackstack_core::ConsumerConfig::default();
            config.backlog_interval = Duration::from_millis(20);
            let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)))
                .config(config)
                .name("lagging");
            let control = consumer.control();
            control.pause();
            let status = consumer.status();
            let watch = recorder.clone();
            let stop = async move {
                // Paused: all three wait at the broker.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while watch.get(names::BACKLOG, &labels) != 3
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let seen = watch.get(names::BACKLOG, &labels);
                control.resume();
                status.idle(Duration::from_millis(200)).await;
                seen
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let summary = consumer
                .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
                    let _ = tx.send(stop.await);
                })
                .await
                .unwrap();
            assert_eq!(summary.acked, 3);
            rx.await.unwrap()
        })
    });
    assert_eq!(seen, 3, "the backlog while paused");
    assert_eq!(
        recorder.get(names::BACKLOG, &labels),
        0,
        "and once consumed"
    );
}

/// A memory source whose broker stops answering the backlog question once `silent` is set.
struct Silenced {
    inner: ackstack_core::memory::MemorySource,
    settler: SilencedSettler,
}

#[derive(Clone)]
struct SilencedSettler {
    inner: ackstack_core::memory::MemorySettler,
    silent: Arc<std::sync::atomic::AtomicBool>,
}

impl Source for Silenced {
    type Token = MemoryToken;
    type Settler = SilencedSettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        self.inner.receive(max).await
    }
    fn settler(&self) -> SilencedSettler {
        self.settler.clone()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn origin(&self) -> Origin {
        self.inner.origin()
    }
}

impl Settle for SilencedSettler {
    type Token = MemoryToken;
    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        self.inner.ack(tokens).await
    }
    async fn retry(
        &self,
        token: MemoryToken,
        d: &Delivery,
        after: Duration,
        f: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.inner.retry(token, d, after, f).await
    }
    async fn dead_letter(
        &self,
        token: MemoryToken,
        d: &Delivery,
        l: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.inner.dead_letter(token, d, l).await
    }
    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        self.inner.extend(token, by).await
    }
    async fn release(&self, token: MemoryToken) {
        self.inner.release(token).await
    }
    async fn backlog(&self) -> Option<Backlog> {
        if self.silent.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.backlog().await
    }
}

#[test]
fn the_backlog_gauge_says_unknown_once_the_broker_stops_answering() {
    let recorder = ByKey::default();
    let broker = MemoryBroker::new();
    for i in 0..3 {
        broker.publish("q", Message::new(format!("m{i}")));
    }
    let labels = [
        ("consumer", "silenced"),
        ("broker", "memory"),
        ("queue", "q"),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inner = broker.source("q").poll_wait(Duration::from_millis(20));
    let source = Silenced {
        settler: SilencedSettler {
            inner: inner.settler(),
            silent: silent.clone(),
        },
        inner,
    };
    let (known, unknown) = metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let mut config = ackstack_core::ConsumerConfig::default();
            config.backlog_interval = Duration::from_millis(20);
            let consumer = Consumer::new(source).config(config).name("silenced");
            consumer.control().pause();
            let watch = recorder.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            consumer
                .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
                    let until = |value: u64| {
                        let watch = watch.clone();
                        async move {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                            while watch.get(names::BACKLOG, &labels) != value
                                && tokio::time::Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            watch.get(names::BACKLOG, &labels)
                        }
                    };
                    let known = until(3).await;
                    silent.store(true, Ordering::SeqCst);
                    let unknown = until(u64::MAX).await;
                    let _ = tx.send((known, unknown));
                })
                .await
                .unwrap();
            rx.await.unwrap()
        })
    });
    assert_eq!(known, 3, "the backlog while the broker answers");
    assert_eq!(
        unknown,
        u64::MAX,
        "unknown (NaN) once it stops answering, not its last value"
    );
}

#[test]
fn queue_time_is_measured_from_the_brokers_timestamp_and_otel_names_are_opt_in() {
    let totals = ByKey::default();
    let broker = MemoryBroker::new();
    broker.publish("orders", Message::new("ok"));
    broker.publish("orders", Message::new("fails once"));
    broker.publish("orders", Message::new("bad"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&totals, || {
        runtime.block_on(async {
            // Produced, then waiting 300 ms before any consumer runs.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut config = ackstack_core::ConsumerConfig::default();
            config.otel_metric_names = true;
            config.retry.backoff =
                Backoff::exponential(Duration::from_millis(10), Duration::from_millis(50))
                    .no_jitter();
            let consumer =
                Consumer::new(broker.source("orders").poll_wait(Duration::from_millis(20)))
                    .config(config)
                    .name("billing");
            let status = consumer.status();
            consumer
                .run_until(
                    handler_fn(|d, _cx| async move {
                        match (&d.payload[..], d.attempt) {
                            (b"bad", _) => Err(HandlerError::permanent("bad")),
                            (b"fails once", 1) => Err(HandlerError::transient("later")),
                            _ => Ok(()),
                        }
                    }),
                    async move { status.idle(Duration::from_millis(300)).await },
                )
                .await
                .unwrap()
        })
    });
    assert_eq!(
        totals.total(names::QUEUE_SECONDS),
        4,
        "one sample per handling"
    );
    let highest = totals.highest(names::QUEUE_SECONDS);
    assert!(
        (300..60_000).contains(&highest),
        "the longest wait was {highest} ms, not the 300 ms the messages waited"
    );
    let otel = [
        ("messaging.consumer.group.name", "billing"),
        ("messaging.destination.name", "orders"),
        ("messaging.system", "memory"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = otel.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    assert_eq!(
        totals.get(
            names::OTEL_CONSUMED_MESSAGES,
            &with(&[("messaging.operation.name", "receive")])
        ),
        4
    );
    let process = |error: Option<&'static str>| {
        let mut extra = vec![("messaging.operation.name", "process")];
        extra.extend(error.map(|e| ("error.type", e)));
        totals.get(names::OTEL_PROCESS_DURATION, &with(&extra))
    };
    assert_eq!(process(None), 2, "the two successes");
    assert_eq!(process(Some("transient")), 1);
    assert_eq!(process(Some("permanent")), 1);
}

#[test]
fn otel_names_are_off_by_default() {
    let totals = ByKey::default();
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("ok"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&totals, || {
        runtime.block_on(async {
            let consumer = Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20)));
            let status = consumer.status();
            consumer
                .run_until(handler_fn(|_d, _cx| async { Ok(()) }), async move {
                    status.idle(Duration::from_millis(200)).await
                })
                .await
                .unwrap()
        })
    });
    assert_eq!(totals.total(names::RECEIVED), 1);
    assert!(
        totals
            .keys()
            .iter()
            .all(|(name, _)| !name.starts_with("messaging.")),
        "{:?}",
        totals.keys()
    );
}
