//! Bounded broker calls: a TCP proxy on 127.0.0.1 in front of RabbitMQ (`AMQP_HOST_PORT`,
//! default 127.0.0.1:5672) that can be frozen (accepts connections but forwards nothing), so a
//! reconnect's handshake gets no answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ackstack_core::{Message, Publish, Source, SourceError};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

mod common;

const BOUND: Duration = Duration::from_secs(1);

fn upstream() -> String {
    std::env::var("AMQP_HOST_PORT").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// Forwards connections to RabbitMQ until frozen; `cut` drops every forwarded connection.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    pumps: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    listener: JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let pumps: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let (frozen, pumps) = (frozen.clone(), pumps.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream()).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut p = pumps.lock().unwrap();
                    p.push(tokio::spawn(pump(cr, sw, frozen.clone())));
                    p.push(tokio::spawn(pump(sr, cw, frozen.clone())));
                }
            }
        });
        Proxy {
            port,
            frozen,
            pumps,
            listener: task,
        }
    }

    fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops forwarding (connections stay open; new ones are accepted but get no answer).
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Closes every connection forwarded so far.
    fn cut(&self) {
        for p in self.pumps.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.listener.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn config(proxy: &Proxy, prefix: &str) -> RabbitConfig {
    let mut c = common::config(proxy.uri(), prefix, &[500]);
    c.queue_expires = Some(Duration::from_secs(120));
    c.operation_timeout = BOUND;
    c.confirm_timeout = Duration::from_secs(2);
    c
}

/// The publisher lost its connection and the broker stopped answering: its reconnect fails
/// with a timeout within `operation_timeout` instead of waiting forever for the handshake.
#[tokio::test]
async fn publisher_reconnect_to_a_frozen_broker_fails_within_operation_timeout() {
    let proxy = Proxy::start().await;
    let publisher = RabbitPublisher::connect(config(&proxy, "pubfreeze"))
        .await
        .unwrap();
    publisher.publish(Message::new("before")).await.unwrap();
    proxy.freeze();
    proxy.cut();
    // Let the client notice that its connection is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        publisher.publish(Message::new("after")),
    )
    .await
    .expect("publish must return while the broker is frozen");
    let took = started.elapsed();
    assert!(result.is_err(), "published through a frozen broker?");
    assert!(
        took < Duration::from_secs(8),
        "returned only after {took:?}"
    );
    let error = format!("{:?}", result.unwrap_err());
    assert!(error.contains("Timeout"), "expected a timeout: {error}");
}

/// The source lost its connection and the broker stopped answering: `receive` reports the
/// disconnection, and the reconnect that follows returns an error within
/// `operation_timeout` (then keeps trying on later calls) instead of hanging.
#[tokio::test]
async fn source_reconnect_to_a_frozen_broker_returns_within_operation_timeout() {
    let proxy = Proxy::start().await;
    let mut source = RabbitSource::connect(config(&proxy, "srcfreeze"))
        .await
        .unwrap();
    proxy.freeze();
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reconnect_errors = 0;
    while reconnect_errors < 2 {
        assert!(
            Instant::now() < deadline,
            "no bounded reconnect failure seen"
        );
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(30), source.receive(10))
            .await
            .expect("receive must return while the broker is frozen");
        let took = started.elapsed();
        match result {
            Err(SourceError::Disconnected(e)) if e.to_string().contains("timed out") => {
                assert!(
                    took < Duration::from_secs(8),
                    "returned only after {took:?}"
                );
                reconnect_errors += 1;
            }
            Err(SourceError::Disconnected(_)) | Ok(_) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
