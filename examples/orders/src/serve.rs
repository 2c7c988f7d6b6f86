//! `--metrics-addr HOST:PORT`: a Prometheus recorder for ackstack's metrics, and a small HTTP
//! endpoint serving them at `/metrics` beside the consumer's health at `/health`.
//!
//! `/health` answers 200 while the consumer is healthy or degraded and 503 while it is
//! unhealthy or not yet started (still waiting for its broker, Redis or PostgreSQL), with
//! [`ackstack::Health`] as its JSON body. The server is deliberately tiny: one request per
//! connection, `GET` only, the request head read with a size and time limit.

use std::time::Duration;

use ackstack::Status;
use ackstack::postgres::OutboxRelay;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Fatal;

/// The longest request head read, in bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long one request may take, from accepting it to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests answered at once, at most; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// How often the recorder's histograms are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Where the endpoint finds the consumer's status once it exists.
#[derive(Clone)]
pub struct Health {
    watched: watch::Sender<Watched>,
}

/// What `/health` reports on: the consumer, the outbox relay, or both.
#[derive(Clone, Default)]
struct Watched {
    consumer: Option<Status>,
    relay: Option<OutboxRelay>,
}

impl Health {
    /// Reports `status` at `/health` from now on.
    pub fn serve(&self, status: Status) {
        self.watched.send_modify(|w| w.consumer = Some(status));
    }

    /// Adds the outbox relay's counts (`outbox` in the body); with no consumer (`--relay
    /// only`), the relay's last round decides the status.
    pub fn serve_relay(&self, relay: OutboxRelay) {
        self.watched.send_modify(|w| w.relay = Some(relay));
    }
}

/// Installs the Prometheus recorder (before any consumer starts, so that its metrics are
/// registered with it) and serves `/metrics` and `/health` on `addr`.
pub async fn start(addr: &str) -> Result<Health, Fatal> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in ackstack::metrics::HISTOGRAM_BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let local = listener.local_addr()?;
    println!("serving metrics=http://{local}/metrics health=http://{local}/health");
    let (watched, watching) = watch::channel(Watched::default());
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(accept(listener, handle, watching));
    Ok(Health { watched })
}

async fn accept(
    listener: TcpListener,
    metrics: PrometheusHandle,
    status: watch::Receiver<Watched>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let metrics = metrics.clone();
                let status = status.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let answered =
                        tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics, &status));
                    match answered.await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "metrics request failed");
                        }
                        Err(_) => tracing::debug!(%peer, "metrics request timed out"),
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    status: &watch::Receiver<Watched>,
) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let (code, content_type, body) = route(&head, metrics, status);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The request line and headers, up to the blank line (or [`MAX_HEAD`] bytes).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // A blank line ends the head (clients that end lines with a bare LF too).
    while !head.windows(4).any(|w| w == b"\r\n\r\n")
        && !head.windows(2).any(|w| w == b"\n\n")
        && head.len() < MAX_HEAD
    {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// The status code, content type and body for a request head.
fn route(
    head: &[u8],
    metrics: &PrometheusHandle,
    status: &watch::Receiver<Watched>,
) -> (u16, &'static str, String) {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, "text/plain", "bad request\n".into());
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if method != b"GET" {
        return (405, "text/plain", "only GET is served\n".into());
    }
    match path {
        b"/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        b"/health" => health(status),
        _ => (404, "text/plain", "try /metrics or /health\n".into()),
    }
}

fn health(watched: &watch::Receiver<Watched>) -> (u16, &'static str, String) {
    let watched = watched.borrow().clone();
    let (code, mut body) = match (&watched.consumer, &watched.relay) {
        (Some(status), _) => {
            let health = status.health();
            let code = if health.is_unhealthy() { 503 } else { 200 };
            match serde_json::to_value(&health) {
                Ok(body) => (code, body),
                Err(_) => (503, json!({"status": "unknown", "reasons": []})),
            }
        }
        (None, Some(relay)) => match relay.stats().last_error {
            None => (200, json!({"status": "healthy", "reasons": []})),
            Some(error) => (
                503,
                json!({"status": "unhealthy", "reasons": [format!("outbox relay: {error}")]}),
            ),
        },
        (None, None) => (503, json!({"status": "starting", "reasons": []})),
    };
    if let (Some(relay), Some(fields)) = (&watched.relay, body.as_object_mut()) {
        let stats = relay.stats();
        let status = stats.status.unwrap_or_default();
        fields.insert(
            "outbox".into(),
            json!({
                "pending": stats.status.map(|_| status.pending),
                "oldest_pending_seconds": status.oldest_pending.map(|d| d.as_secs_f64()),
                "parked": stats.status.map(|_| status.parked),
                "sent": stats.sent,
                "failures": stats.failures,
                "listening": stats.listening,
            }),
        );
    }
    (code, "application/json", body.to_string())
}
