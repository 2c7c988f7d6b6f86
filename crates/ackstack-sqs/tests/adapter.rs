//! Adapter-level tests against the SQS endpoint (moto by default; `SQS_ENDPOINT` overrides).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use ackstack_core::{
    DeadLetter, DeadLetterReason, ErrorKind, Failure, Message, Publish, Received, Settle,
    SettleError, Settled, Source,
};
use ackstack_sqs::testing::{self, TestQueue};
use ackstack_sqs::{
    Client, DEAD_LETTER_ATTRIBUTE, DROPPED_DISPLACED, DROPPED_ERROR_TRUNCATED, DeadLetterRecord,
    SqsConfig, SqsError, SqsPublisher, SqsSource, SqsToken, message_size,
};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out");
}

async fn setup(prefix: &str, fifo: bool, visibility: Duration) -> (Client, TestQueue, SqsSource) {
    let client = testing::client().await;
    let queue = TestQueue::create(&client, prefix, fifo).await.unwrap();
    let source = SqsSource::from_client(client.clone(), queue.config(visibility))
        .await
        .unwrap();
    (client, queue, source)
}

/// Receives until `n` deliveries arrived or `deadline` passed.
async fn receive_n(
    source: &mut SqsSource,
    n: usize,
    deadline: Duration,
) -> Vec<Received<SqsToken>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < deadline {
        out.extend(source.receive(n - out.len()).await.unwrap());
    }
    out
}

fn string_attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

fn failure() -> Failure {
    Failure::new(ErrorKind::Permanent, "cannot decode")
}

#[tokio::test]
async fn receive_and_ack_deletes() {
    bounded(async {
        let (client, queue, mut source) = setup("ack", false, Duration::from_secs(30)).await;
        let publisher = SqsPublisher::for_source(&source);
        for i in 0..15 {
            publisher
                .publish(Message::new(format!("m{i}")).header("n", i.to_string()))
                .await
                .unwrap();
        }
        let got = receive_n(&mut source, 15, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 15);
        for r in &got {
            let d = &r.delivery;
            assert_eq!(d.attempt, 1);
            assert_eq!(d.origin.broker, "sqs");
            assert_eq!(&*d.origin.queue, queue.name.as_str());
            assert!(d.message_id.is_some());
            let n = d.headers.get_str("n").unwrap();
            assert_eq!(std::str::from_utf8(&d.payload).unwrap(), format!("m{n}"));
            assert_eq!(
                d.headers.get_str("x-sqs-ApproximateReceiveCount"),
                Some("1")
            );
        }
        let stats_before = source.stats();
        let tokens: Vec<SqsToken> = got.into_iter().map(|r| r.token).collect();
        let report = source.settler().ack(tokens).await;
        assert_eq!(report.acked, 15);
        assert!(report.failed.is_empty());
        let stats = source.stats();
        assert_eq!(
            stats.delete_batch_calls - stats_before.delete_batch_calls,
            2
        );
        assert_eq!(stats.deleted, 15);
        assert_eq!(stats.send_calls, 15);
        assert_eq!(queue.approximate_count(&client).await.unwrap(), 0);
        assert!(source.receive(10).await.unwrap().is_empty());
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn receive_returns_within_the_wait_time_when_idle() {
    bounded(async {
        let (client, queue, mut source) = setup("idle", false, Duration::from_secs(30)).await;
        let start = Instant::now();
        assert!(source.receive(10).await.unwrap().is_empty());
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        let caps = source.capabilities();
        assert_eq!(caps.max_ack_batch, 10);
        assert_eq!(caps.lease, Some(Duration::from_secs(30)));
        assert_eq!(caps.max_retry_delay, Duration::from_secs(12 * 3600));
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn missing_queue_is_a_typed_error() {
    bounded(async {
        let client = testing::client().await;
        let config = SqsConfig::queue(testing::unique_name("missing")).with_wait_time_seconds(1);
        match SqsSource::from_client(client, config).await {
            Err(e @ SqsError::QueueNotFound(_)) => {
                assert!(e.is_permanent(), "no retry creates the queue: {e}")
            }
            other => panic!("expected QueueNotFound, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_queue_sqs_refuses_to_create_is_a_permanent_error() {
    bounded(async {
        let client = testing::client().await;
        let config = SqsConfig::queue("orders.v2")
            .with_create_queues(true)
            .with_wait_time_seconds(1);
        match SqsSource::from_client(client, config).await {
            Err(e) => assert!(e.is_permanent(), "{e:?}"),
            Ok(_) => panic!("SQS created a queue with an invalid name"),
        }
        let timeout = SqsError::Timeout {
            operation: "GetQueueUrl",
            after: Duration::from_secs(1),
        };
        assert!(
            !timeout.is_permanent(),
            "an endpoint that does not answer is waited for"
        );
    })
    .await;
}

#[tokio::test]
async fn unacked_comes_back_after_visibility_with_attempt_2() {
    bounded(async {
        let (client, queue, mut source) = setup("redeliver", false, Duration::from_secs(1)).await;
        SqsPublisher::for_source(&source)
            .publish(Message::new("again"))
            .await
            .unwrap();
        let first = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].delivery.attempt, 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].delivery.attempt, 2, "ApproximateReceiveCount");
        assert_eq!(second[0].delivery.message_id, first[0].delivery.message_id);
        let report = source.settler().ack(vec![second[0].token.clone()]).await;
        assert_eq!(report.acked, 1);
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn retry_hides_the_message_until_the_delay() {
    bounded(async {
        let (client, queue, mut source) = setup("retry", false, Duration::from_secs(30)).await;
        SqsPublisher::for_source(&source)
            .publish(Message::new("later"))
            .await
            .unwrap();
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let settler = source.settler();
        let start = Instant::now();
        let settled = settler
            .retry(r.token, &r.delivery, Duration::from_secs(3), &failure())
            .await
            .unwrap();
        assert!(matches!(settled, Settled::Done));
        // Not visible before the delay.
        let mut back = Vec::new();
        while back.is_empty() && start.elapsed() < Duration::from_secs(15) {
            back = source.receive(1).await.unwrap();
            if back.is_empty() {
                continue;
            }
            assert!(
                start.elapsed() >= Duration::from_millis(2500),
                "came back after {:?}, before the 3 s delay",
                start.elapsed()
            );
        }
        assert_eq!(back.len(), 1, "the retried message must come back");
        assert_eq!(back[0].delivery.attempt, 2);
        assert_eq!(back[0].delivery.payload, r.delivery.payload);
        settler.ack(vec![back.remove(0).token]).await;
        assert!(source.stats().change_visibility_calls >= 1);
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn extend_keeps_the_message_invisible_past_its_timeout() {
    bounded(async {
        let (client, queue, mut source) = setup("extend", false, Duration::from_secs(2)).await;
        SqsPublisher::for_source(&source)
            .publish(Message::new("long job"))
            .await
            .unwrap();
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let start = Instant::now();
        let settler = source.settler();
        settler
            .extend(&r.token, Duration::from_secs(6))
            .await
            .unwrap();
        // Past the original 2 s timeout: still invisible.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let during = source.receive(1).await.unwrap();
        assert!(during.is_empty(), "visible after {:?}", start.elapsed());
        // After the extension lapses it comes back.
        let back = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(back.len(), 1);
        assert!(start.elapsed() >= Duration::from_millis(5500));
        // The superseded token still acks on moto only; ack the fresh one.
        assert_eq!(settler.ack(vec![back[0].token.clone()]).await.acked, 1);
        queue.delete(&client).await;
    })
    .await;
}

/// An extension with a receipt handle from an earlier receive.
///
/// Real SQS rejects it (`InvalidParameterValue`: "Message does not exist or is not available
/// for visibility timeout change") → `LeaseLost`. moto accepts every handle the message ever
/// had while it exists, so there the stale extension succeeds; once the message is deleted
/// through the current handle, moto answers `ReceiptHandleIsInvalid` → `LeaseLost` on both.
#[tokio::test]
async fn extend_with_a_stale_handle_reports_lease_lost() {
    bounded(async {
        let (client, queue, mut source) = setup("stale", false, Duration::from_secs(1)).await;
        SqsPublisher::for_source(&source)
            .publish(Message::new("contended"))
            .await
            .unwrap();
        let old = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let new = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        assert_eq!(new.delivery.attempt, 2);
        let settler = source.settler();
        match settler.extend(&old.token, Duration::from_secs(10)).await {
            Err(SettleError::LeaseLost(_)) => {} // real SQS
            Ok(()) => {}                         // moto: old handles stay valid
            Err(other) => panic!("unexpected error {other:?}"),
        }
        // The other consumer finishes and deletes it.
        assert_eq!(settler.ack(vec![new.token]).await.acked, 1);
        let lost_before = source.stats().lease_lost;
        let err = settler
            .extend(&old.token, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(err.is_lease_lost(), "{err:?}");
        let failed = settler
            .retry(old.token, &old.delivery, Duration::from_secs(5), &failure())
            .await
            .unwrap_err();
        assert!(failed.error.is_lease_lost(), "{:?}", failed.error);
        assert!(source.stats().lease_lost >= lost_before + 2);
        // A garbage handle is lost too, never a panic.
        let garbage = SqsToken::from_receipt_handle("not-a-receipt-handle");
        assert!(
            settler
                .extend(&garbage, Duration::from_secs(5))
                .await
                .unwrap_err()
                .is_lease_lost()
        );
        // Acking a message that is already gone counts as acked (SQS and moto answer success).
        let again = settler.ack(vec![failed.token]).await;
        assert_eq!(again.acked, 1, "{:?}", again.failed);
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn delete_batch_partial_failure_loses_nothing() {
    bounded(async {
        let (client, queue, mut source) = setup("partial", false, Duration::from_secs(30)).await;
        let publisher = SqsPublisher::for_source(&source);
        for i in 0..3 {
            publisher
                .publish(Message::new(format!("p{i}")))
                .await
                .unwrap();
        }
        let got = receive_n(&mut source, 3, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 3);
        let mut tokens = Vec::new();
        for (i, r) in got.into_iter().enumerate() {
            tokens.push(r.token);
            tokens.push(SqsToken::from_receipt_handle(format!("bogus-{i}")));
        }
        let report = source.settler().ack(tokens).await;
        assert_eq!(report.acked, 3);
        assert_eq!(report.failed.len(), 3);
        for (token, error) in &report.failed {
            assert!(token.receipt_handle().starts_with("bogus-"));
            assert!(error.is_lease_lost(), "{error:?}");
        }
        let stats = source.stats();
        assert_eq!(stats.ack_failures, 3);
        assert_eq!(stats.deleted, 3);
        assert_eq!(
            stats.delete_batch_calls, 1,
            "lease-lost entries are not retried"
        );
        assert_eq!(queue.approximate_count(&client).await.unwrap(), 0);
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn release_makes_the_message_visible_at_once() {
    bounded(async {
        let (client, queue, mut source) = setup("release", false, Duration::from_secs(30)).await;
        SqsPublisher::for_source(&source)
            .publish(Message::new("give back"))
            .await
            .unwrap();
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let settler = source.settler();
        settler.release(r.token).await;
        let back = receive_n(&mut source, 1, Duration::from_secs(5)).await;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].delivery.attempt, 2);
        settler.ack(vec![back[0].token.clone()]).await;
        queue.delete(&client).await;
    })
    .await;
}

async fn send_raw(
    client: &Client,
    url: &str,
    body: &str,
    attrs: &HashMap<String, MessageAttributeValue>,
) {
    client
        .send_message()
        .queue_url(url)
        .message_body(body)
        .set_message_attributes(Some(attrs.clone()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn dead_letter_copy_keeps_payload_attributes_and_metadata() {
    bounded(async {
        let (client, queue, mut source) = setup("dlq", false, Duration::from_secs(30)).await;
        let mut attrs = HashMap::new();
        attrs.insert("text".to_string(), string_attr("héllo"));
        attrs.insert(
            "count".to_string(),
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value("42.50")
                .build()
                .unwrap(),
        );
        attrs.insert(
            "blob".to_string(),
            MessageAttributeValue::builder()
                .data_type("Binary.custom")
                .binary_value(Blob::new(vec![0u8, 0xff, 0x10]))
                .build()
                .unwrap(),
        );
        // Metadata from an earlier dead-lettering, to be replaced.
        attrs.insert(
            DEAD_LETTER_ATTRIBUTE.to_string(),
            string_attr(r#"{"old":true}"#),
        );
        let body = "{\"order\": 7, \"note\": \"ünïcode\"}";
        send_raw(&client, &queue.url, body, &attrs).await;

        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        assert_eq!(
            r.delivery.headers.get("blob").unwrap().as_ref(),
            &[0u8, 0xff, 0x10]
        );
        let letter = DeadLetter::new(&r.delivery, failure());
        let settler = source.settler();
        let settled = settler
            .dead_letter(r.token, &r.delivery, &letter)
            .await
            .unwrap();
        let Settled::AckOriginal(token) = settled else {
            panic!("expected AckOriginal");
        };
        assert_eq!(settler.ack(vec![token]).await.acked, 1);
        assert_eq!(queue.approximate_count(&client).await.unwrap(), 0);

        let copies = queue
            .read_dead_letters(&client, 1, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(copies.len(), 1);
        let copy = &copies[0];
        assert_eq!(copy.body(), Some(body));
        let copy_attrs = copy.message_attributes().unwrap();
        assert_eq!(copy_attrs.len(), 4);
        for name in ["text", "count", "blob"] {
            let (a, b) = (&attrs[name], &copy_attrs[name]);
            assert_eq!(a.data_type(), b.data_type(), "{name}");
            assert_eq!(a.string_value(), b.string_value(), "{name}");
            assert_eq!(
                a.binary_value().map(|b| b.as_ref().to_vec()),
                b.binary_value().map(|b| b.as_ref().to_vec()),
                "{name}"
            );
        }
        let record = DeadLetterRecord::from_attributes(copy_attrs).unwrap();
        let meta = record.metadata;
        assert_eq!(meta.reason, DeadLetterReason::Permanent);
        assert_eq!(meta.error_message, "cannot decode");
        assert_eq!(meta.attempts, 1);
        assert_eq!(meta.broker, "sqs");
        assert_eq!(meta.queue, queue.name);
        assert_eq!(meta.consumer, "ackstack-test");
        assert_eq!(meta.message_id, r.delivery.message_id);
        assert!(record.displaced.is_empty());
        assert_eq!(source.stats().dead_lettered, 1);
        queue.delete(&client).await;
    })
    .await;
}

/// SQS allows 10 attributes. An original with 10 of its own keeps 9 on the copy; the one whose
/// name sorts last moves into the metadata JSON and can be restored exactly.
#[tokio::test]
async fn dead_letter_with_ten_attributes_displaces_one_losslessly() {
    bounded(async {
        let (client, queue, mut source) = setup("dlq10", false, Duration::from_secs(30)).await;
        let mut attrs: HashMap<String, MessageAttributeValue> = (0..9)
            .map(|i| (format!("attr{i}"), string_attr(&format!("value {i}"))))
            .collect();
        attrs.insert(
            "zz-binary".to_string(),
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(vec![1, 2, 0xfe]))
                .build()
                .unwrap(),
        );
        send_raw(&client, &queue.url, "ten", &attrs).await;
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let letter = DeadLetter::new(&r.delivery, failure());
        let settler = source.settler();
        let Settled::AckOriginal(token) = settler
            .dead_letter(r.token, &r.delivery, &letter)
            .await
            .unwrap()
        else {
            panic!("expected AckOriginal");
        };
        settler.ack(vec![token]).await;
        let copies = queue
            .read_dead_letters(&client, 1, Duration::from_secs(10))
            .await
            .unwrap();
        let copy_attrs = copies[0].message_attributes().unwrap();
        assert_eq!(copy_attrs.len(), 10);
        assert!(!copy_attrs.contains_key("zz-binary"));
        let record = DeadLetterRecord::from_attributes(copy_attrs).unwrap();
        assert_eq!(record.displaced.len(), 1);
        let restored = record.restore(copy_attrs);
        assert_eq!(restored.len(), 10);
        for (name, value) in &attrs {
            assert_eq!(restored[name].data_type(), value.data_type(), "{name}");
            assert_eq!(
                restored[name].string_value(),
                value.string_value(),
                "{name}"
            );
            assert_eq!(
                restored[name].binary_value().map(|b| b.as_ref().to_vec()),
                value.binary_value().map(|b| b.as_ref().to_vec()),
                "{name}"
            );
        }
        queue.delete(&client).await;
    })
    .await;
}

#[tokio::test]
async fn fifo_round_trip_with_group_ids() {
    bounded(async {
        let (client, queue, mut source) = setup("fifo", true, Duration::from_secs(30)).await;
        assert!(queue.name.ends_with(".fifo"));
        let publisher = SqsPublisher::for_source(&source);
        assert!(publisher.is_fifo());
        for i in 0u32..4 {
            let group = if i.is_multiple_of(2) {
                "g-even"
            } else {
                "g-odd"
            };
            publisher
                .publish(
                    Message::new(format!("f{i}"))
                        .key(group)
                        .header("i", i.to_string()),
                )
                .await
                .unwrap();
        }
        let got = receive_n(&mut source, 4, Duration::from_secs(15)).await;
        assert_eq!(got.len(), 4);
        let mut per_group: HashMap<String, Vec<String>> = HashMap::new();
        for r in &got {
            let key = std::str::from_utf8(r.delivery.key.as_ref().unwrap())
                .unwrap()
                .to_string();
            let i: u32 = r.delivery.headers.get_str("i").unwrap().parse().unwrap();
            assert_eq!(
                key,
                if i.is_multiple_of(2) {
                    "g-even"
                } else {
                    "g-odd"
                }
            );
            per_group
                .entry(key)
                .or_default()
                .push(String::from_utf8(r.delivery.payload.to_vec()).unwrap());
        }
        assert_eq!(
            per_group["g-even"],
            vec!["f0", "f2"],
            "order within a group"
        );
        assert_eq!(per_group["g-odd"], vec!["f1", "f3"]);

        // Dead-letter one of them: the FIFO DLQ copy keeps its group.
        let mut got = got.into_iter();
        let first = got.next().unwrap();
        let letter = DeadLetter::new(&first.delivery, failure());
        let settler = source.settler();
        let Settled::AckOriginal(token) = settler
            .dead_letter(first.token, &first.delivery, &letter)
            .await
            .unwrap()
        else {
            panic!("expected AckOriginal");
        };
        let mut tokens = vec![token];
        tokens.extend(got.map(|r| r.token));
        assert_eq!(settler.ack(tokens).await.acked, 4);
        let copies = queue
            .read_dead_letters(&client, 1, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(copies.len(), 1);
        let group = copies[0]
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
            .cloned();
        assert_eq!(
            group.as_deref(),
            first
                .delivery
                .key
                .as_ref()
                .map(|k| std::str::from_utf8(k).unwrap())
        );
        queue.delete(&client).await;
    })
    .await;
}

/// Sets the dead-letter queue's `MaximumMessageSize` (SQS's lowest allowed value is 1024).
async fn limit_dead_letter_queue(client: &Client, queue: &TestQueue, bytes: usize) {
    client
        .set_queue_attributes()
        .queue_url(&queue.dlq_url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::MaximumMessageSize,
            bytes.to_string(),
        )
        .send()
        .await
        .unwrap();
}

/// The original fits the dead-letter queue's 1024-byte limit, but its copy would not: the
/// metadata JSON, the displaced eleventh attribute and a long error message push it over.
/// The copy is shrunk (displaced attribute and most of the error message left out, both
/// recorded) and stays within the limit; body and the other attributes are unchanged.
#[tokio::test]
async fn dead_letter_over_the_size_limit_only_by_our_metadata_is_shrunk_to_fit() {
    bounded(async {
        let client = testing::client().await;
        let queue = TestQueue::create(&client, "dlqfit", false).await.unwrap();
        limit_dead_letter_queue(&client, &queue, 1024).await;
        let mut source =
            SqsSource::from_client(client.clone(), queue.config(Duration::from_secs(30)))
                .await
                .unwrap();
        let mut attrs: HashMap<String, MessageAttributeValue> = (0..9)
            .map(|i| (format!("a{i}"), string_attr("v")))
            .collect();
        attrs.insert("zz-displaced".to_string(), string_attr(&"d".repeat(300)));
        let body = "b".repeat(400);
        assert!(message_size(&body, &attrs) <= 1024);
        send_raw(&client, &queue.url, &body, &attrs).await;
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let long_error = "decoding failed at field \"total\"; ".repeat(20);
        let letter = DeadLetter::new(&r.delivery, Failure::new(ErrorKind::Permanent, &long_error));
        let settler = source.settler();
        let Settled::AckOriginal(token) = settler
            .dead_letter(r.token, &r.delivery, &letter)
            .await
            .unwrap()
        else {
            panic!("expected AckOriginal");
        };
        assert_eq!(settler.ack(vec![token]).await.acked, 1);
        let copies = queue
            .read_dead_letters(&client, 1, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(copies.len(), 1);
        let copy = &copies[0];
        let copy_attrs = copy.message_attributes().unwrap();
        let size = message_size(copy.body().unwrap(), copy_attrs);
        assert!(
            size <= 1024,
            "the copy is {size} bytes; SQS would refuse it"
        );
        assert_eq!(copy.body(), Some(body.as_str()));
        for i in 0..9 {
            let name = format!("a{i}");
            assert_eq!(copy_attrs[&name].string_value(), Some("v"), "{name}");
            assert_eq!(copy_attrs[&name].data_type(), "String", "{name}");
        }
        assert!(!copy_attrs.contains_key("zz-displaced"));
        let record = DeadLetterRecord::from_attributes(copy_attrs).unwrap();
        assert_eq!(
            record.dropped,
            vec![
                DROPPED_DISPLACED.to_string(),
                DROPPED_ERROR_TRUNCATED.to_string()
            ]
        );
        assert!(record.displaced.is_empty());
        let kept = record.metadata.error_message.trim_end_matches('…');
        assert!(!kept.is_empty() && letter.failure.message.starts_with(kept));
        assert_eq!(record.metadata.queue, queue.name);
        queue.delete(&client).await;
    })
    .await;
}

/// A body that alone nearly fills the dead-letter queue's limit leaves no room for the
/// metadata even shrunk: `dead_letter` refuses it for good (`Rejected`), sends nothing, and
/// the original stays in its queue to be received again.
#[tokio::test]
async fn dead_letter_that_cannot_fit_even_shrunk_is_rejected_and_the_original_stays() {
    bounded(async {
        let client = testing::client().await;
        let queue = TestQueue::create(&client, "dlqbig", false).await.unwrap();
        limit_dead_letter_queue(&client, &queue, 1024).await;
        let mut source =
            SqsSource::from_client(client.clone(), queue.config(Duration::from_secs(30)))
                .await
                .unwrap();
        let body = "b".repeat(1000);
        send_raw(&client, &queue.url, &body, &HashMap::new()).await;
        let r = receive_n(&mut source, 1, Duration::from_secs(10))
            .await
            .remove(0);
        let letter = DeadLetter::new(&r.delivery, failure());
        let settler = source.settler();
        let failed = settler
            .dead_letter(r.token, &r.delivery, &letter)
            .await
            .expect_err("a copy that cannot fit must not be reported as stored");
        assert!(
            matches!(failed.error, SettleError::Rejected(_)),
            "{:?}",
            failed.error
        );
        assert_eq!(source.stats().dead_lettered, 0);
        // Not acked: released, it is received again, and nothing reached the DLQ.
        settler.release(failed.token).await;
        let again = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].delivery.payload.as_ref(), body.as_bytes());
        assert_eq!(again[0].delivery.attempt, 2);
        let copies = queue
            .read_dead_letters(&client, 1, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(copies.is_empty());
        queue.delete(&client).await;
    })
    .await;
}

/// Two sends of one message (an outbox relay's resend) carry the publisher's id, not SQS's
/// `MessageId` (new for each send), so a consumer deduplicating by message id sees one id.
#[tokio::test]
async fn the_publishers_message_id_survives_each_send() {
    bounded(async {
        let (client, queue, mut source) = setup("msgid", false, Duration::from_secs(30)).await;
        let publisher = SqsPublisher::for_source(&source);
        for _ in 0..2 {
            publisher
                .publish(Message::new("twice").message_id("outbox-7"))
                .await
                .unwrap();
        }
        publisher.publish(Message::new("no id")).await.unwrap();
        // A copied header does not beat the message's own id.
        publisher
            .publish(
                Message::new("copied")
                    .header(ackstack_sqs::MESSAGE_ID_ATTRIBUTE, "stale")
                    .message_id("fresh"),
            )
            .await
            .unwrap();
        // Ten headers leave no room: sent all the same, with SQS's id.
        let mut full = Message::new("full").message_id("no-room");
        for i in 0..10 {
            full = full.header(format!("h{i}"), "v");
        }
        publisher.publish(full).await.unwrap();
        let got = receive_n(&mut source, 5, Duration::from_secs(20)).await;
        let mut ids: Vec<(String, String)> = got
            .iter()
            .map(|r| {
                let d = &r.delivery;
                (
                    String::from_utf8(d.payload.to_vec()).unwrap(),
                    d.message_id.clone().unwrap(),
                )
            })
            .collect();
        ids.sort();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[0], ("copied".into(), "fresh".into()));
        assert_eq!(ids[1].0, "full");
        assert_eq!(ids[1].1.len(), 36, "SQS's MessageId: {ids:?}");
        // Without one, SQS's own MessageId (a UUID).
        assert_eq!(ids[2].0, "no id");
        assert_eq!(ids[2].1.len(), 36);
        assert_eq!(ids[3], ("twice".into(), "outbox-7".into()));
        assert_eq!(ids[4], ("twice".into(), "outbox-7".into()));
        queue.delete(&client).await;
    })
    .await;
}
