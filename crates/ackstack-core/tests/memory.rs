//! The in-memory broker's at-least-once behaviour, through the Source/Settle contract.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ackstack_core::memory::MemoryBroker;
use ackstack_core::{DeadLetter, ErrorKind, Failure, Message, Settle, Settled, Source};
use bytes::Bytes;

#[tokio::test(start_paused = true)]
async fn unacked_delivery_comes_back_after_the_visibility_timeout_with_attempt_plus_one() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let mut source = broker
        .source("q")
        .visibility_timeout(Duration::from_secs(10));
    let first = source.receive(10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery.attempt, 1);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        source.receive(10).await.unwrap().is_empty(),
        "still invisible before the timeout"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = source.receive(10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].delivery.attempt, 2);
    assert_eq!(again[0].delivery.payload, first[0].delivery.payload);
    // The first receipt is stale now: acking it must fail, not remove the redelivered message.
    let settler = source.settler();
    let report = settler.ack(vec![first[0].token]).await;
    assert_eq!(report.acked, 0);
    assert!(report.failed[0].1.is_lease_lost());
    assert_eq!(broker.len("q"), 1);
    let report = settler.ack(vec![again[0].token]).await;
    assert_eq!(report.acked, 1);
    assert!(broker.is_empty("q"));
}

#[tokio::test(start_paused = true)]
async fn retry_is_not_redelivered_before_its_delay() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m"));
    let mut source = broker.source("q");
    let got = source.receive(1).await.unwrap().pop().unwrap();
    let settler = source.settler();
    let failure = Failure::new(ErrorKind::Transient, "later");
    let settled = settler
        .retry(got.token, &got.delivery, Duration::from_secs(5), &failure)
        .await
        .unwrap();
    assert_eq!(settled, Settled::Done);
    let start = tokio::time::Instant::now();
    let again = loop {
        let batch = source.receive(1).await.unwrap();
        if let Some(r) = batch.into_iter().next() {
            break r;
        }
    };
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "came back after {:?}",
        start.elapsed()
    );
    assert_eq!(again.delivery.attempt, 2);
}

#[tokio::test]
async fn dead_letter_keeps_payload_and_headers_byte_for_byte() {
    let broker = MemoryBroker::new();
    let payload = Bytes::from_static(&[0, 159, 146, 150, 255, b'{']);
    broker.publish(
        "q",
        Message::new(payload.clone())
            .header("bin", Bytes::from_static(&[0xff, 0x00, 0x01]))
            .header("text", "héllo")
            .message_id("id-7"),
    );
    let mut source = broker.source("q");
    let got = source.receive(1).await.unwrap().pop().unwrap();
    let settler = source.settler();
    let letter = DeadLetter::new(&got.delivery, Failure::new(ErrorKind::Permanent, "bad"));
    let settled = settler
        .dead_letter(got.token, &got.delivery, &letter)
        .await
        .unwrap();
    let Settled::AckOriginal(token) = settled else {
        panic!("dead letter must ask for the ack")
    };
    assert_eq!(broker.len("q"), 1, "the original stays until acked");
    assert_eq!(settler.ack(vec![token]).await.acked, 1);
    let dl = broker.dead_letters("q");
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].payload, payload);
    assert_eq!(
        dl[0].headers.get("bin").unwrap(),
        &Bytes::from_static(&[0xff, 0x00, 0x01])
    );
    assert_eq!(dl[0].headers.get_str("text"), Some("héllo"));
    assert_eq!(
        dl[0].headers.get_str("x-ackstack-dl-message-id"),
        Some("id-7")
    );
    assert_eq!(dl[0].headers.get_str("x-ackstack-dl-attempts"), Some("1"));
}
