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

use ackstack_core::metrics as names;
use ackstack_core::{Backoff, Consumer, HandlerError, MemoryBroker, Message, handler_fn};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Records counter totals, gauge values and histogram sample counts by metric name.
#[derive(Clone, Default)]
struct Totals(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

#[derive(Default)]
struct Cell(AtomicU64);

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
        self.0.fetch_add(value as u64, Ordering::SeqCst);
    }
    fn decrement(&self, value: f64) {
        self.0.fetch_sub(value as u64, Ordering::SeqCst);
    }
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::SeqCst);
    }
}
impl HistogramFn for Cell {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Totals {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        self.0
            .lock()
            .unwrap()
            .entry(key.name().to_string())
            .or_default()
            .clone()
    }
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Totals {
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
    let totals = Totals::default();
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
    assert_eq!(totals.get(names::RECEIVED), summary.received);
    assert_eq!(totals.get(names::RECEIVED), 6);
    assert_eq!(
        totals.get(names::ACKED),
        4,
        "three successes and the dead-lettered original"
    );
    assert_eq!(totals.get(names::RETRIED), 2);
    assert_eq!(totals.get(names::DEAD_LETTERED), 1);
    assert_eq!(totals.get(names::HANDLER_PANICS), 1);
    assert_eq!(
        totals.get(names::HANDLER_SECONDS),
        6,
        "one latency sample per delivery"
    );
    assert_eq!(totals.get(names::IN_FLIGHT), 0, "the gauge returns to zero");

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
