//! Trace context from the producer (feature `otel`): a delivery's W3C `traceparent` and
//! `tracestate` headers (AMQP headers, SQS message attributes, Kafka headers) become the
//! OpenTelemetry parent of its `delivery` span, through
//! [tracing-opentelemetry](https://docs.rs/tracing-opentelemetry). Install its layer in your
//! subscriber; without it this does nothing.
//!
//! Retry and dead-letter copies carry the original headers, so every attempt of a message and
//! its dead letter belong to the producer's trace.

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::delivery::Headers;

/// The W3C trace context header naming the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Makes the trace context in `headers`, if any, the parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, headers: &Headers) {
    let Some(parent) = headers.get_str(TRACEPARENT) else {
        return;
    };
    let Some(remote) = parse_traceparent(parent, headers.get_str(TRACESTATE)) else {
        tracing::debug!(
            traceparent = parent,
            "ignoring an invalid traceparent header"
        );
        return;
    };
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// Parses a `traceparent` value (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`) and an
/// optional `tracestate`; `None` for a malformed value, an all-zero id or version `ff`. A
/// malformed `tracestate` is dropped, as the W3C recommendation says.
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_values_parse() {
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61rcWkgMzE"),
        );
        let sc = sc.expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        assert_eq!(sc.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            Some("not a trace state"),
        )
        .expect("a bad tracestate is dropped, not the parent");
        assert!(!sc.is_sampled());
    }
}
