//! Every SQS call is bounded by `SqsConfig::operation_timeout`: against an endpoint that
//! accepts connections and never answers, each call fails with a timeout instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use ackstack_core::{
    DeadLetter, Delivery, ErrorKind, Failure, Message, Origin, Publish, Settle, SettleError, Source,
};
use ackstack_sqs::{Client, SqsConfig, SqsError, SqsPublisher, SqsSource, SqsToken};
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::Region;

/// The configured timeout of every test.
const TIMEOUT: Duration = Duration::from_millis(800);
/// What "returns in time" means: generous, far below "hangs".
const BOUND: Duration = Duration::from_secs(8);

/// An endpoint on 127.0.0.1 that accepts TCP connections, keeps them open and never answers.
fn stalled_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

async fn stalled_client() -> (Client, String) {
    let endpoint = stalled_endpoint();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .test_credentials()
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .load()
        .await;
    (Client::new(&config), endpoint)
}

/// A source on the stalled endpoint; queue URLs are given, the redrive policy is not read and
/// the visibility timeout is configured (not read from the queue), so connecting makes no call
/// that must answer.
async fn stalled_source() -> SqsSource {
    let (client, endpoint) = stalled_client().await;
    let mut config = SqsConfig::queue_url(format!("{endpoint}/123456789012/stalled"))
        .with_dead_letter_queue(format!("{endpoint}/123456789012/stalled-dlq"))
        .with_wait_time_seconds(1)
        .with_visibility_timeout(Duration::from_secs(30))
        .with_operation_timeout(TIMEOUT);
    config.redrive = ackstack_sqs::Redrive::Ignore;
    SqsSource::from_client(client, config).await.unwrap()
}

/// Runs `f`, failing the test if it does not finish within `BOUND`.
async fn in_time<T>(what: &str, f: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = tokio::time::timeout(BOUND * 3, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung on a stalled endpoint"));
    let took = start.elapsed();
    assert!(took < BOUND, "{what} took {took:?}");
    out
}

fn delivery() -> Delivery {
    Delivery::new("body", Origin::new("sqs", "stalled", "test"))
}

fn assert_timeout(e: &SettleError) {
    assert!(matches!(e, SettleError::Broker(_)), "{e:?}");
    assert!(e.to_string().contains("no answer within"), "{e}");
}

#[tokio::test]
async fn change_message_visibility_on_a_stalled_endpoint_times_out() {
    let source = stalled_source().await;
    let settler = source.settler();
    let token = SqsToken::from_receipt_handle("handle-1");
    let extended = in_time("extend", settler.extend(&token, Duration::from_secs(30))).await;
    assert_timeout(&extended.unwrap_err());
    let failure = Failure::new(ErrorKind::Transient, "later");
    let retried = in_time(
        "retry",
        settler.retry(token.clone(), &delivery(), Duration::from_secs(5), &failure),
    )
    .await;
    assert_timeout(&retried.unwrap_err().error);
    in_time("release", settler.release(token)).await;
    assert_eq!(source.stats().change_visibility_calls, 3);
}

#[tokio::test]
async fn delete_message_batch_on_a_stalled_endpoint_times_out() {
    let source = stalled_source().await;
    let settler = source.settler();
    let tokens = vec![
        SqsToken::from_receipt_handle("handle-1"),
        SqsToken::from_receipt_handle("handle-2"),
    ];
    // Each try is bounded; the transient failure is retried a few times, then reported.
    let report = tokio::time::timeout(Duration::from_secs(60), settler.ack(tokens))
        .await
        .expect("ack hung on a stalled endpoint");
    assert_eq!(report.acked, 0);
    assert_eq!(report.failed.len(), 2);
    for (_, e) in &report.failed {
        assert!(matches!(e, SettleError::Broker(_)), "{e:?}");
    }
    assert!(source.stats().delete_batch_calls >= 1);
}

#[tokio::test]
async fn send_message_on_a_stalled_endpoint_times_out() {
    let source = stalled_source().await;
    let settler = source.settler();
    let d = delivery();
    let letter = DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "bad"));
    let token = SqsToken::from_receipt_handle("handle-1");
    let sent = in_time("dead_letter", settler.dead_letter(token, &d, &letter)).await;
    assert_timeout(&sent.unwrap_err().error);
    let published = in_time(
        "publish",
        SqsPublisher::for_source(&source).publish(Message::new("m")),
    )
    .await;
    assert!(
        published
            .unwrap_err()
            .to_string()
            .contains("no answer within")
    );
}

#[tokio::test]
async fn receive_on_a_stalled_endpoint_reports_a_disconnect_in_time() {
    let mut source = stalled_source().await;
    // A one-second long poll plus the operation timeout.
    let received = in_time("receive", source.receive(10)).await;
    assert!(received.is_err());
}

#[tokio::test]
async fn connecting_by_queue_name_on_a_stalled_endpoint_times_out() {
    let (client, _) = stalled_client().await;
    let config = SqsConfig::queue("stalled").with_operation_timeout(TIMEOUT);
    let connected = in_time("connect", SqsSource::from_client(client, config)).await;
    match connected {
        Err(SqsError::Timeout { operation, after }) => {
            assert_eq!(operation, "GetQueueUrl");
            assert_eq!(after, TIMEOUT);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}
