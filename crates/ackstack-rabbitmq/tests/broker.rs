//! Adapter-level tests against the real RabbitMQ at `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use ackstack_core::deadletter::{ATTEMPT_HEADER, CRASHES_HEADER, FIRST_FAILURE_HEADER};
use ackstack_core::{
    Armed, DeadLetter, DeadLetterMetadata, Delivery, ErrorKind, Failure, Message, Publish,
    Received, Settle, Settled, Source, SourceError,
};
use ackstack_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use ackstack_rabbitmq::{
    Fetched, ORIGINAL_EXPIRATION_HEADER, RabbitConfig, RabbitPublisher, RabbitSettler,
    RabbitSource, RabbitToken, text_value,
};
use bytes::Bytes;
use common::{receive_n, retry_and_ack, url};

mod common;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn config(prefix: &str) -> RabbitConfig {
    common::config(url(), prefix, &[500, 1500])
}

/// Closes the source's connection from the broker side with `rabbitmqctl close_connection`.
/// Returns false when rabbitmqctl is unavailable or the connection was not found.
fn close_from_server(connection_name: &str) -> bool {
    let Ok(out) = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
    else {
        return false;
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    let needle = format!("\"{connection_name}\"");
    let mut closed = false;
    for line in listing.lines().filter(|l| l.contains(&needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "ackstack test: server-side close"])
            .status();
        closed |= status.map(|s| s.success()).unwrap_or(false);
    }
    if !closed {
        eprintln!("connection {connection_name} not found in:\n{listing}");
    }
    closed
}

/// Closes the source's connection from the server, or from the client when rabbitmqctl is
/// not usable here (printed, so the test log says which one ran).
async fn kill_connection(source: &mut RabbitSource) {
    if close_from_server(&source.connection_name()) {
        eprintln!("closed {} with rabbitmqctl", source.connection_name());
    } else {
        eprintln!("rabbitmqctl unavailable: closing from the client side instead");
        source.disconnect().await;
    }
}

/// Dead-letters `delivery` (permanent failure `reason`), acks the original once the copy is
/// confirmed, and reads the copy back from the DLQ; returns it with the decision.
async fn dead_letter_confirmed(
    settler: &RabbitSettler,
    publisher: &RabbitPublisher,
    token: RabbitToken,
    delivery: &Delivery,
    reason: &str,
) -> (Fetched, DeadLetter) {
    let letter = DeadLetter::new(delivery, Failure::new(ErrorKind::Permanent, reason));
    let Settled::AckOriginal(token) = settler.dead_letter(token, delivery, &letter).await.unwrap()
    else {
        panic!("expected AckOriginal");
    };
    assert!(settler.ack(vec![token]).await.failed.is_empty());
    let copy = publisher
        .get_dead_letter()
        .await
        .unwrap()
        .expect("a DLQ copy");
    (copy, letter)
}

#[tokio::test]
async fn receive_and_ack_removes_the_message() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("ack");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher
            .publish(Message::new("hello").header("h", "v").message_id("m-1"))
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        let d = &got[0].delivery;
        assert_eq!(d.payload, Bytes::from_static(b"hello"));
        assert_eq!(d.headers.get_str("h"), Some("v"));
        assert_eq!(d.message_id.as_deref(), Some("m-1"));
        assert_eq!(d.attempt, 1);
        assert_eq!(d.origin.broker, "rabbitmq");
        assert_eq!(&*d.origin.queue, config.queue.as_str());
        let token = got.into_iter().next().unwrap().token;
        let report = settler.ack(vec![token]).await;
        assert_eq!(report.acked, 1);
        assert!(report.failed.is_empty());
        assert_eq!(settler.stats().ack_frames, 1);
        // Nothing comes back after the channel closes.
        let again = back_after_disconnect(&mut source).await;
        assert!(again.is_empty(), "acked message was redelivered");
        assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn unacked_message_comes_back_after_channel_close() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("unacked");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher
            .publish(Message::new(Bytes::from_static(&[0, 159, 146, 150])).header("k", "v1"))
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let first = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(first.len(), 1);
        assert_eq!(source.generation(), Some(1));
        source.disconnect().await;
        let second = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(second.len(), 1);
        assert_eq!(source.generation(), Some(2));
        assert_eq!(second[0].delivery.payload, first[0].delivery.payload);
        assert_eq!(second[0].delivery.headers, first[0].delivery.headers);
        // The old token is from a dead channel: LeaseLost, and no frame is sent.
        let old = first.into_iter().next().unwrap().token;
        let frames = settler.stats().ack_frames;
        let report = settler.ack(vec![old]).await;
        assert_eq!(report.acked, 0);
        assert!(report.failed[0].1.is_lease_lost());
        assert_eq!(settler.stats().ack_frames, frames);
        let report = settler
            .ack(vec![second.into_iter().next().unwrap().token])
            .await;
        assert_eq!(report.acked, 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn retry_goes_through_the_delay_bucket_with_attempts_2_and_3() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("retry");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher
            .publish(Message::new("again").header("app", "kept"))
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();

        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        assert_eq!(delivery.attempt, 1);
        let failure = Failure::new(ErrorKind::Transient, "try later");
        // 1s rounds up to the 1500ms bucket.
        let start = Instant::now();
        retry_and_ack(&settler, token, &delivery, Duration::from_secs(1), &failure).await;
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let waited = start.elapsed();
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        assert!(
            waited >= Duration::from_millis(1500),
            "came back after {waited:?}"
        );
        assert_eq!(delivery.attempt, 2);
        assert_eq!(delivery.payload, Bytes::from_static(b"again"));
        assert_eq!(delivery.headers.get_str("app"), Some("kept"));
        assert_eq!(delivery.headers.get_str(ATTEMPT_HEADER), Some("2"));
        let first_failure = delivery
            .headers
            .get_str(FIRST_FAILURE_HEADER)
            .unwrap()
            .to_string();

        // Zero delay rounds up to the smallest bucket (500ms).
        let start = Instant::now();
        let later = Failure::new(ErrorKind::Transient, "still failing");
        retry_and_ack(&settler, token, &delivery, Duration::ZERO, &later).await;
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert!(start.elapsed() >= Duration::from_millis(500));
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        assert_eq!(delivery.attempt, 3);
        assert_eq!(
            delivery.headers.get_str(FIRST_FAILURE_HEADER),
            Some(first_failure.as_str()),
            "first failure time is kept"
        );
        assert!(settler.ack(vec![token]).await.failed.is_empty());
        for bucket in &config.delay_buckets {
            let q = config.delay_queue_name(*bucket);
            assert_eq!(publisher.queue_len(&q).await.unwrap(), 0);
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dead_letter_copy_keeps_payload_and_typed_headers_and_adds_metadata() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("dlq");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongLongInt(-3));
        let mut headers = FieldTable::default();
        headers.insert("int".into(), AMQPValue::LongInt(42));
        headers.insert("flag".into(), AMQPValue::Boolean(true));
        headers.insert("table".into(), AMQPValue::FieldTable(nested));
        headers.insert(
            "binary".into(),
            AMQPValue::LongString(LongString::from(vec![0u8, 255, 10])),
        );
        headers.insert("text".into(), text_value("héllo"));
        headers.insert("x-ackstack-dl-reason".into(), text_value("stale"));
        headers.insert("x-ackstack-dl-bogus".into(), text_value("old"));
        let payload = Bytes::from_static(b"\x00not json\xff");
        publisher
            .publish_raw(
                &config.queue,
                payload.clone(),
                headers.clone(),
                Some("id-9".into()),
            )
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        let (copy, letter) =
            dead_letter_confirmed(&settler, &publisher, token, &delivery, "bad input").await;
        assert_eq!(copy.payload, payload);
        assert_eq!(
            copy.properties.message_id().as_ref().unwrap().as_str(),
            "id-9"
        );
        for (name, value) in &headers {
            if name.as_str().starts_with("x-ackstack-dl-") {
                continue;
            }
            assert_eq!(copy.header(name.as_str()).as_ref(), Some(value), "{name}");
        }
        assert!(copy.header("x-ackstack-dl-bogus").is_none());
        let meta = DeadLetterMetadata::from_headers(&copy.headers).expect("metadata");
        assert_eq!(meta, letter.metadata(&delivery));
        assert_eq!(meta.error_message, "bad input");
        assert_eq!(meta.queue, config.queue);
        assert_eq!(meta.message_id.as_deref(), Some("id-9"));
        assert!(publisher.get_dead_letter().await.unwrap().is_none());
        assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn batch_ack_uses_few_frames_and_never_passes_an_unfinished_tag() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("batch");
        config.prefetch = 100;
        config.held_ack_delay = Duration::from_secs(1);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        for i in 1..=20 {
            publisher
                .publish(Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 20, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 20);
        // m5 stays unfinished; the others complete in batches of 5.
        let mut straggler = None;
        let mut batch = Vec::new();
        for r in got {
            if r.delivery.payload == "m5" {
                straggler = Some(r);
                continue;
            }
            batch.push(r.token);
            if batch.len() == 5 {
                let report = settler.ack(std::mem::take(&mut batch)).await;
                assert_eq!(report.acked, 5);
            }
        }
        let report = settler.ack(batch).await;
        assert!(report.failed.is_empty());
        let stats = settler.stats();
        assert_eq!(
            stats.multiple_ack_frames, 1,
            "only m1..m4 can be acked cumulatively"
        );
        assert_eq!(
            stats.ack_frames, 16,
            "m6..m20 held above m5 are acked one by one after held_ack_delay"
        );
        assert_eq!(stats.acked_tokens, 19);
        let straggler = straggler.unwrap();

        // Close the channel with m5 unfinished: m5 must come back; the acked ones must not.
        source.disconnect().await;
        let mut back = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        for i in 21..=35 {
            publisher
                .publish(Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
        back.extend(receive_n(&mut source, 15, Duration::from_secs(10)).await);
        let payloads: BTreeSet<String> = back
            .iter()
            .map(|r| String::from_utf8(r.delivery.payload.to_vec()).unwrap())
            .collect();
        assert!(payloads.contains("m5"), "the unfinished message was acked");
        for i in (1..=4).chain(6..=20) {
            assert!(!payloads.contains(&format!("m{i}")), "m{i} came back");
        }
        assert_eq!(back.len(), 16, "m5 redelivered, m21..m35 new: {payloads:?}");
        assert!(
            settler.ack(vec![straggler.token]).await.failed[0]
                .1
                .is_lease_lost()
        );

        // Now everything completes out of order in concurrent batches of 4, as the runner's
        // parallel ack calls do: far fewer frames than acks.
        let before = settler.stats().ack_frames;
        let mut tokens: Vec<_> = back.into_iter().map(|r| r.token).collect();
        tokens.reverse();
        let calls = tokens.chunks(4).map(|chunk| settler.ack(chunk.to_vec()));
        for report in futures::future::join_all(calls).await {
            assert!(report.failed.is_empty());
        }
        settler.flush().await;
        let frames = settler.stats().ack_frames - before;
        assert!(frames < 16, "{frames} frames for 16 deliveries");
        assert!(frames >= 1);
        let again = back_after_disconnect(&mut source).await;
        assert!(again.is_empty(), "everything was acked");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn server_side_connection_close_loses_nothing_and_the_source_recovers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("serverclose");
        config.prefetch = 10;
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        let total = 30;
        for i in 0..total {
            publisher
                .publish(Message::new(format!("p{i}")))
                .await
                .unwrap();
        }
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let mut done = BTreeSet::new();
        let mut lost_tokens = Vec::new();
        let mut killed = false;
        let mut disconnects = 0;
        let deadline = Instant::now() + Duration::from_secs(40);
        while done.len() < total && Instant::now() < deadline {
            let batch = match source.receive(5).await {
                Ok(b) => b,
                Err(SourceError::Disconnected(_)) => {
                    disconnects += 1;
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            for r in batch {
                let p = String::from_utf8(r.delivery.payload.to_vec()).unwrap();
                if !killed && done.len() >= 8 {
                    // Kill the connection with this delivery still unacked.
                    kill_connection(&mut source).await;
                    killed = true;
                    // Give the client a moment to notice.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    lost_tokens.push(r.token);
                    continue;
                }
                let report = settler.ack(vec![r.token]).await;
                if report.failed.is_empty() {
                    done.insert(p);
                } else {
                    assert!(report.failed[0].1.is_lease_lost());
                }
            }
        }
        settler.flush().await;
        assert!(killed);
        assert_eq!(done.len(), total, "lost messages");
        assert!(disconnects >= 1, "the source reported the disconnect");
        assert!(source.generation() >= Some(2));
        assert!(settler.stats().connects >= 2);
        for token in lost_tokens {
            let report = settler.ack(vec![token]).await;
            assert!(report.failed[0].1.is_lease_lost());
        }
        assert!(back_after_disconnect(&mut source).await.is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn settling_a_token_of_a_dead_channel_is_lease_lost() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("stale");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        for i in 0..3 {
            publisher
                .publish(Message::new(format!("s{i}")))
                .await
                .unwrap();
        }
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let old = receive_n(&mut source, 3, Duration::from_secs(10)).await;
        assert_eq!(old.len(), 3);
        kill_connection(&mut source).await;
        // The source notices, reconnects and gets all three again on generation 2.
        let new = receive_n(&mut source, 3, Duration::from_secs(15)).await;
        assert_eq!(new.len(), 3);
        assert!(new.iter().all(|r| r.token.generation() == 2));
        let frames = settler.stats();
        let mut old = old.into_iter();
        let a = old.next().unwrap();
        let report = settler.ack(vec![a.token]).await;
        assert!(report.failed[0].1.is_lease_lost());
        let b = old.next().unwrap();
        let failure = Failure::new(ErrorKind::Transient, "x");
        let err = settler
            .retry(b.token, &b.delivery, Duration::ZERO, &failure)
            .await
            .unwrap_err();
        assert!(err.error.is_lease_lost());
        let c = old.next().unwrap();
        let letter = DeadLetter::new(&c.delivery, failure.clone());
        let err = settler
            .dead_letter(c.token, &c.delivery, &letter)
            .await
            .unwrap_err();
        assert!(err.error.is_lease_lost());
        settler.release(err.token).await;
        let after = settler.stats();
        assert_eq!(
            after.ack_frames, frames.ack_frames,
            "no frame for a stale token"
        );
        assert_eq!(after.nack_frames, frames.nack_frames);
        assert_eq!(publisher.queue_len(&config.dlq_name()).await.unwrap(), 0);
        // The live ones ack fine; release puts one back.
        let mut new = new.into_iter();
        let keep = new.next().unwrap();
        settler.release(keep.token).await;
        assert_eq!(settler.stats().nack_frames, after.nack_frames + 1);
        let tokens: Vec<_> = new.map(|r| r.token).collect();
        assert!(settler.ack(tokens).await.failed.is_empty());
        let back = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(back[0].delivery.payload, keep.delivery.payload);
        let token = back.into_iter().next().unwrap().token;
        assert!(
            settler
                .extend(&token, Duration::from_secs(30))
                .await
                .is_ok()
        );
        assert!(settler.ack(vec![token]).await.failed.is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn quorum_redeliveries_are_suspects_not_attempts() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("quorum");
        config.queue_type = ackstack_rabbitmq::QueueType::Quorum;
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher.publish(Message::new("q1")).await.unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let first = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(first[0].delivery.attempt, 1);
        assert!(!first[0].suspect);
        source.disconnect().await;
        let second = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        // The broker's x-delivery-count rose, but the handler never ran: no attempt used,
        // and the delivery runs alone as a suspect.
        assert_eq!(
            second[0].delivery.headers.get_str("x-delivery-count"),
            Some("1")
        );
        assert_eq!(
            second[0].delivery.attempt, 1,
            "x-delivery-count is no attempt"
        );
        assert!(second[0].suspect && second[0].token.redelivered());
        let Received {
            delivery, token, ..
        } = second.into_iter().next().unwrap();
        let failure = Failure::new(ErrorKind::Transient, "later");
        retry_and_ack(&settler, token, &delivery, Duration::ZERO, &failure).await;
        let third = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(
            third[0].delivery.attempt, 2,
            "our header carries the attempt"
        );
        assert!(!third[0].suspect, "a retry copy is a new message");
        let token = third.into_iter().next().unwrap().token;
        assert!(settler.ack(vec![token]).await.failed.is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_released_delivery_comes_back_a_suspect_with_its_attempt_unchanged() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("quorum-release");
        config.queue_type = ackstack_rabbitmq::QueueType::Quorum;
        config.delivery_limit = Some(10);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher.publish(Message::new("r1")).await.unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let first = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(first.len(), 1);
        let Received { token, .. } = first.into_iter().next().unwrap();
        settler.release(token).await;
        assert_eq!(settler.stats().nack_frames, 1);
        // `basic.reject requeue=true`: the broker counts it (x-delivery-count), the attempt
        // number does not, and the delivery comes back a suspect.
        let second = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(second.len(), 1, "the released delivery came back");
        assert_eq!(second[0].delivery.payload, "r1");
        assert_eq!(second[0].delivery.attempt, 1);
        assert_eq!(
            second[0].delivery.headers.get_str("x-delivery-count"),
            Some("1")
        );
        assert!(second[0].suspect);
        let token = second.into_iter().next().unwrap().token;
        assert!(settler.ack(vec![token]).await.failed.is_empty());
    })
    .await
    .unwrap();
}

/// Arms `received` as the runner does before a run alone, with `give_up_at` 2 (max attempts 3).
async fn arm(settler: &RabbitSettler, received: Received<RabbitToken>) -> Armed<RabbitToken> {
    assert!(received.suspect, "only suspects are armed");
    settler
        .arm(received.token, &received.delivery, 2)
        .await
        .unwrap()
}

/// Arms a suspect that must be moved to the queue of runs alone, and acks its original once
/// the copy is confirmed.
async fn moved(settler: &RabbitSettler, received: Received<RabbitToken>) {
    let Armed::Moved(Settled::AckOriginal(token)) = arm(settler, received).await else {
        panic!("a suspect to be moved to run alone was not");
    };
    assert!(settler.ack(vec![token]).await.failed.is_empty());
}

/// Arms a suspect that must run now with `crashes` counted, and acks it as a run that
/// succeeded.
async fn runs_and_succeeds(settler: &RabbitSettler, received: Received<RabbitToken>, crashes: u32) {
    let Armed::Run {
        token,
        crashes: counted,
    } = arm(settler, received).await
    else {
        panic!("a suspect to run did not");
    };
    assert_eq!(counted, crashes, "crashes counted");
    assert!(settler.ack(vec![token]).await.failed.is_empty());
}

/// Publishes `messages` to a fresh queue and receives them, then the consumer's connection
/// goes as a crash would take it: they come back redelivered.
async fn received_when_the_consumer_died(
    prefix: &str,
    messages: Vec<Message>,
) -> (RabbitConfig, RabbitPublisher, RabbitSource, RabbitSettler) {
    let config = config(prefix);
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    let n = messages.len();
    for message in messages {
        publisher.publish(message).await.unwrap();
    }
    let mut source = RabbitSource::connect(config.clone()).await.unwrap();
    let settler = source.settler();
    let first = receive_n(&mut source, n, Duration::from_secs(10)).await;
    assert_eq!(first.len(), n);
    assert!(first.iter().all(|r| !r.suspect));
    source.disconnect().await;
    (config, publisher, source, settler)
}

/// Receives one delivery within 10 s.
async fn receive_one(source: &mut RabbitSource) -> Received<RabbitToken> {
    let mut got = receive_n(source, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "nothing received");
    got.remove(0)
}

#[tokio::test]
async fn a_suspect_runs_alone_from_its_own_queue_and_its_crashes_are_counted_there() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // The consumer dies with all three in flight: all come back suspects.
        let messages = ["p", "g1", "g2"].map(Message::new).to_vec();
        let (config, publisher, mut source, settler) =
            received_when_the_consumer_died("alone", messages).await;
        let back = receive_n(&mut source, 3, Duration::from_secs(10)).await;
        assert_eq!(back.len(), 3);
        for received in back {
            assert!(received.suspect && !received.token.is_alone());
            moved(&settler, received).await;
        }
        assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
        assert_eq!(
            publisher
                .queue_len(&config.alone_queue_name())
                .await
                .unwrap(),
            3
        );
        // One at a time, and only while nothing else is in flight.
        let p = receive_one(&mut source).await;
        assert_eq!(p.delivery.payload, "p");
        assert!(p.suspect && p.token.is_alone() && !p.token.redelivered());
        let busy = receive_n(&mut source, 1, Duration::from_millis(600)).await;
        assert!(
            busy.is_empty(),
            "a second suspect was handed out beside the first"
        );
        let Armed::Run { crashes: 0, .. } = arm(&settler, p).await else {
            panic!("a suspect got for the first time runs");
        };
        // Its run alone takes the process down.
        source.disconnect().await;
        let p = receive_one(&mut source).await;
        assert_eq!(p.delivery.payload, "p");
        assert!(p.token.is_alone() && p.token.redelivered());
        // One crash alone: moved again with its count.
        moved(&settler, p).await;
        // The innocent ones run alone once each.
        for good in ["g1", "g2"] {
            let g = receive_one(&mut source).await;
            assert_eq!(g.delivery.payload, good);
            runs_and_succeeds(&settler, g, 0).await;
        }
        let p = receive_one(&mut source).await;
        assert_eq!(p.delivery.payload, "p");
        assert_eq!(
            p.delivery.headers.get_str(CRASHES_HEADER),
            Some("1"),
            "the count travels with the copy"
        );
        let Armed::Run { crashes: 1, .. } = arm(&settler, p).await else {
            panic!("runs again, one crash counted");
        };
        source.disconnect().await;
        let p = receive_one(&mut source).await;
        let Armed::GiveUp { token, crashes: 2 } = arm(&settler, p).await else {
            panic!("two crashes alone: given up on");
        };
        drop(token);
        source.disconnect().await;
        // Nothing else is left anywhere but the given-up one, back in the queue of runs alone.
        assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
        assert_eq!(
            publisher
                .queue_len(&config.alone_queue_name())
                .await
                .unwrap(),
            1
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_released_suspect_goes_back_to_run_alone_without_a_crash_counted() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_, _, mut source, settler) =
            received_when_the_consumer_died("alone-release", vec![Message::new("s")]).await;
        moved(&settler, receive_one(&mut source).await).await;
        // Got, then given back unrun (a shutdown while it waited for its dedup store): not
        // a crash.
        let got = receive_one(&mut source).await;
        assert!(got.token.is_alone());
        settler.release(got.token).await;
        let again = receive_one(&mut source).await;
        assert!(again.token.is_alone() && !again.token.redelivered());
        runs_and_succeeds(&settler, again, 0).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_suspect_waits_for_deliveries_of_a_lost_channel_still_running() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("alone-lost");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publisher.publish(Message::new("s")).await.unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        // A delivery of the first channel still runs here when the channel is lost.
        let running = receive_one(&mut source).await;
        source.disconnect().await;
        moved(&settler, receive_one(&mut source).await).await;
        let beside = receive_n(&mut source, 1, Duration::from_millis(600)).await;
        assert!(
            beside.is_empty(),
            "a suspect was handed out beside a delivery still running"
        );
        // Its run ends (its ack is refused: its channel is gone).
        assert_eq!(settler.ack(vec![running.token]).await.acked, 0);
        let alone = receive_one(&mut source).await;
        assert!(alone.token.is_alone());
        runs_and_succeeds(&settler, alone, 0).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn later_deliveries_of_a_suspects_key_wait_behind_it_to_run_alone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (_, publisher, mut source, settler) =
            received_when_the_consumer_died("alone-key", vec![Message::new("k1").key("k")]).await;
        // k1 comes back redelivered; k2 is new, of the same key; o is new, of another.
        publisher
            .publish(Message::new("k2").key("k"))
            .await
            .unwrap();
        publisher
            .publish(Message::new("o").key("other"))
            .await
            .unwrap();
        let back = receive_n(&mut source, 3, Duration::from_secs(10)).await;
        let seen: Vec<(&str, bool)> = back
            .iter()
            .map(|r| (std::str::from_utf8(&r.delivery.payload).unwrap(), r.suspect))
            .collect();
        assert_eq!(seen, [("k1", true), ("k2", true), ("o", false)]);
        for received in back {
            if received.suspect {
                moved(&settler, received).await;
            } else {
                assert!(settler.ack(vec![received.token]).await.failed.is_empty());
            }
        }
        for body in ["k1", "k2"] {
            let got = receive_one(&mut source).await;
            assert_eq!(got.delivery.payload, body, "in their order");
            runs_and_succeeds(&settler, got, 0).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn release_of_a_straggler_acks_the_completed_tags_held_above_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("release-held");
        config.prefetch = 100;
        // Longer than the test: only the release can unblock the held acks.
        config.held_ack_delay = Duration::from_secs(60);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        for i in 1..=5 {
            publisher
                .publish(Message::new(format!("h{i}")))
                .await
                .unwrap();
        }
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 5, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 5);
        let mut got = got.into_iter();
        let straggler = got.next().unwrap();
        assert_eq!(straggler.delivery.payload, "h1");
        // h2..h5 complete while h1 is still in flight: held back, no frame yet; the ack call
        // waits for one.
        let held: Vec<_> = got.map(|r| r.token).collect();
        let waiting = tokio::spawn({
            let settler = settler.clone();
            async move { settler.ack(held).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(settler.stats().ack_frames, 0, "held behind the straggler");
        settler.release(straggler.token).await;
        let report = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the release did not send the held acks")
            .unwrap();
        assert_eq!(report.acked, 4);
        let stats = settler.stats();
        assert_eq!(stats.nack_frames, 1);
        assert_eq!(stats.ack_frames, 1, "the release unblocked the held acks");
        assert_eq!(stats.multiple_ack_frames, 1);
        // No further ack call (an idle queue): close the channel. Only h1 may come back.
        source.disconnect().await;
        let back = receive_n(&mut source, 5, Duration::from_secs(3)).await;
        let payloads: Vec<String> = back
            .iter()
            .map(|r| String::from_utf8(r.delivery.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(payloads, vec!["h1".to_string()], "held acks were lost");
        let token = back.into_iter().next().unwrap().token;
        assert!(settler.ack(vec![token]).await.failed.is_empty());
    })
    .await
    .unwrap();
}

/// Publishes `body` to `queue` with the per-message TTL property `expiration` (milliseconds
/// as text), persistent, and waits for the confirm.
async fn publish_with_expiration(queue: &str, body: &str, expiration: &str) {
    use ackstack_rabbitmq::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use ackstack_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
    let connection = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_expiration(expiration.into());
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn dead_letter_of_an_expiring_message_outlives_the_ttl_and_records_the_expiration() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("dl-expiration");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        // Consuming before the publish: the message is delivered at once, well within its TTL.
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        publish_with_expiration(&config.queue, "short-lived", "1000").await;
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        assert_eq!(
            token.properties().expiration().as_ref().map(|e| e.as_str()),
            Some("1000")
        );
        let letter = DeadLetter::new(&delivery, Failure::new(ErrorKind::Permanent, "bad"));
        let Settled::AckOriginal(token) = settler
            .dead_letter(token, &delivery, &letter)
            .await
            .unwrap()
        else {
            panic!("expected AckOriginal");
        };
        assert!(settler.ack(vec![token]).await.failed.is_empty());
        // Well past the publisher's TTL: the dead letter must still be there.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let copy = publisher
            .get_dead_letter()
            .await
            .unwrap()
            .expect("the dead letter expired in the DLQ");
        assert_eq!(copy.payload, "short-lived");
        assert!(copy.properties.expiration().is_none());
        assert_eq!(
            copy.headers.get_str(ORIGINAL_EXPIRATION_HEADER),
            Some("1000")
        );
        assert!(DeadLetterMetadata::from_headers(&copy.headers).is_some());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn retry_copy_of_an_expiring_message_waits_its_full_delay_and_keeps_the_expiration() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("retry-expiration");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        // A TTL far shorter than the 1500 ms bucket the retry goes to.
        publish_with_expiration(&config.queue, "retry-me", "200").await;
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().unwrap();
        let failure = Failure::new(ErrorKind::Transient, "later");
        let start = Instant::now();
        retry_and_ack(&settler, token, &delivery, Duration::from_secs(1), &failure).await;
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let waited = start.elapsed();
        let Received {
            delivery, token, ..
        } = got.into_iter().next().expect("the retry came back");
        assert!(
            waited >= Duration::from_millis(1500),
            "the copy's own TTL cut the 1500 ms delay short: back after {waited:?}"
        );
        assert_eq!(delivery.attempt, 2);
        assert_eq!(delivery.payload, "retry-me");
        assert!(token.properties().expiration().is_none());
        assert_eq!(
            delivery.headers.get_str(ORIGINAL_EXPIRATION_HEADER),
            Some("200")
        );
        // Dead-lettering the retry copy still records the publisher's expiration.
        let (copy, _) =
            dead_letter_confirmed(&settler, &publisher, token, &delivery, "give up").await;
        assert!(copy.properties.expiration().is_none());
        assert_eq!(
            copy.headers.get_str(ORIGINAL_EXPIRATION_HEADER),
            Some("200")
        );
    })
    .await
    .unwrap();
}

/// Publishes `n` messages `<prefix>1..=<prefix>n` and receives them all.
/// Closes the source's channel and returns what the broker redelivers within 1.5 s: every
/// delivery still unacked, none of those acked.
async fn back_after_disconnect(source: &mut RabbitSource) -> Vec<Received<RabbitToken>> {
    source.disconnect().await;
    receive_n(source, 1, Duration::from_millis(1500)).await
}

async fn publish_and_receive(
    config: &RabbitConfig,
    prefix: &str,
    n: usize,
) -> (RabbitSource, Vec<Received<RabbitToken>>) {
    let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    for i in 1..=n {
        publisher
            .publish(Message::new(format!("{prefix}{i}")))
            .await
            .unwrap();
    }
    let mut source = RabbitSource::connect(config.clone()).await.unwrap();
    let got = receive_n(&mut source, n, Duration::from_secs(10)).await;
    assert_eq!(got.len(), n);
    (source, got)
}

#[tokio::test]
async fn acks_held_above_a_straggler_are_sent_within_held_ack_delay_and_counted_when_sent() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("held-delay");
        // Far from the starvation threshold (half the window): only the delay sends them.
        config.prefetch = 100;
        config.held_ack_delay = Duration::from_millis(300);
        let (mut source, got) = publish_and_receive(&config, "d", 5).await;
        let settler = source.settler();
        let mut got = got.into_iter();
        let straggler = got.next().unwrap();
        assert_eq!(straggler.delivery.payload, "d1");
        // d2..d5 complete while d1 is still in flight.
        let report = settler.ack(got.map(|r| r.token).collect()).await;
        assert_eq!(report.acked, 4);
        assert!(report.failed.is_empty());
        let stats = settler.stats();
        assert_eq!(
            stats.ack_frames, 4,
            "the held acks were never sent: {stats:?}"
        );
        assert_eq!(stats.multiple_ack_frames, 0, "d1 is unfinished: {stats:?}");
        assert_eq!(stats.late_ack_frames, 4, "{stats:?}");
        assert_eq!(stats.pressure_ack_frames, 0, "{stats:?}");
        assert_eq!(stats.acked_tokens, 4, "{stats:?}");
        // The broker has them: only the straggler comes back after the channel closes.
        source.disconnect().await;
        let back = receive_n(&mut source, 5, Duration::from_secs(3)).await;
        let payloads: Vec<_> = back.iter().map(|r| r.delivery.payload.clone()).collect();
        assert_eq!(payloads, vec![Bytes::from_static(b"d1")]);
        let token = back.into_iter().next().unwrap().token;
        assert!(settler.ack(vec![token]).await.failed.is_empty());
    })
    .await
    .unwrap();
}

/// Held acks that would reach half the prefetch window go one by one at once, but only as
/// many as keep the held ones below it: the rest wait for the straggler (here, for the
/// delay).
#[tokio::test]
async fn acks_held_up_to_half_the_window_go_one_by_one_only_as_far_as_needed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("held-pressure");
        config.prefetch = 8; // at most 3 held
        config.held_ack_delay = Duration::from_millis(300);
        let (mut source, got) = publish_and_receive(&config, "p", 8).await;
        let settler = source.settler();
        let mut got = got.into_iter();
        let straggler = got.next().unwrap();
        let report = settler.ack(got.map(|r| r.token).collect()).await;
        assert_eq!(report.acked, 7);
        let stats = settler.stats();
        assert_eq!(stats.pressure_ack_frames, 4, "p2..p5 at once: {stats:?}");
        assert_eq!(
            stats.late_ack_frames, 3,
            "p6..p8 after the delay: {stats:?}"
        );
        assert_eq!(stats.multiple_ack_frames, 0, "{stats:?}");
        assert!(settler.ack(vec![straggler.token]).await.failed.is_empty());
        assert!(
            back_after_disconnect(&mut source).await.is_empty(),
            "everything was acked"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn held_acks_ride_the_cumulative_ack_when_the_straggler_completes_and_count_only_then() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut config = config("held-gap");
        config.prefetch = 100;
        // Much longer than the test: the held acks can only go with the straggler's ack.
        config.held_ack_delay = Duration::from_secs(60);
        let (mut source, got) = publish_and_receive(&config, "g", 5).await;
        let settler = source.settler();
        let mut got = got.into_iter();
        let straggler = got.next().unwrap();
        let held: Vec<_> = got.map(|r| r.token).collect();
        let waiting = tokio::spawn({
            let settler = settler.clone();
            async move { settler.ack(held).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stats = settler.stats();
        assert_eq!(stats.ack_frames, 0, "held behind the straggler: {stats:?}");
        assert_eq!(
            stats.acked_tokens, 0,
            "held acks counted before any frame was sent: {stats:?}"
        );
        // The gap clears: one multiple ack covers the straggler and everything held above it.
        let report = settler.ack(vec![straggler.token]).await;
        assert_eq!(report.acked, 1);
        let held_report = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the held acks were not released by the cumulative ack")
            .unwrap();
        assert_eq!(held_report.acked, 4);
        assert!(held_report.failed.is_empty());
        let stats = settler.stats();
        assert_eq!(stats.ack_frames, 1, "{stats:?}");
        assert_eq!(stats.multiple_ack_frames, 1, "{stats:?}");
        assert_eq!(stats.acked_tokens, 5, "{stats:?}");
        assert!(
            back_after_disconnect(&mut source).await.is_empty(),
            "everything was acked"
        );
    })
    .await
    .unwrap();
}

/// What the broker can never take is refused for good (the outbox relay parks it).
#[tokio::test]
async fn a_message_rabbitmq_cannot_carry_is_refused_for_good() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config("refused");
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        // A message id is an AMQP short string: at most 255 bytes.
        let err = publisher
            .publish(Message::new("x").message_id("i".repeat(300)))
            .await
            .unwrap_err();
        assert!(err.is_refused(), "{err}");
        // The publisher still works for the next message.
        publisher.publish(Message::new("fine")).await.unwrap();
    })
    .await
    .unwrap();
}
