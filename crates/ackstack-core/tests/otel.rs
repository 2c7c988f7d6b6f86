//! Feature `otel`: a delivery's `traceparent`/`tracestate` headers make its `delivery` span a
//! child of the producer's span, for every attempt (the retry copy keeps the headers), checked
//! with OpenTelemetry's in-memory span exporter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::{Backoff, Consumer, HandlerError, MemoryBroker, Message, handler_fn};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

#[test]
fn the_producers_trace_context_is_the_parent_of_every_attempt() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ackstack-test")));
    let broker = MemoryBroker::new();
    broker.publish(
        "q",
        Message::new("traced")
            .message_id("t-1")
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
            .header("tracestate", "vendor=abc"),
    );
    broker.publish("q", Message::new("untraced").message_id("u-1"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let consumer =
                Consumer::new(broker.source("q").poll_wait(Duration::from_millis(20))).backoff(
                    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10)),
                );
            let status = consumer.status();
            consumer
                .run_until(
                    handler_fn(|d, _cx| async move {
                        if d.attempt == 1 {
                            Err(HandlerError::transient("first attempt fails"))
                        } else {
                            Ok(())
                        }
                    }),
                    async move { status.idle(Duration::from_millis(200)).await },
                )
                .await
                .unwrap();
        })
    });
    provider.force_flush().unwrap();
    let spans: Vec<_> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "delivery")
        .collect();
    assert_eq!(spans.len(), 4, "two messages, two attempts each");
    let traced: Vec<_> = spans
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == TRACE_ID)
        .collect();
    assert_eq!(
        traced.len(),
        2,
        "both attempts of the traced message join its trace"
    );
    for span in traced {
        assert_eq!(span.parent_span_id.to_string(), PARENT_ID);
        assert_eq!(span.span_context.trace_state().get("vendor"), Some("abc"));
    }
    let untraced = spans
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() != TRACE_ID)
        .count();
    assert_eq!(
        untraced, 2,
        "a message without trace context starts its own trace"
    );
}
