//! Adapter-level tests against librdkafka's mock cluster (or `KAFKA_BROKERS`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ackstack_core::deadletter::ATTEMPT_HEADER;
use ackstack_core::{
    DeadLetter, DeadLetterMetadata, ErrorKind, Failure, Message, Publish, Settle, SettleError,
    Settled, Source,
};
use ackstack_kafka::{
    DROPPED_ERROR_TRUNCATED, DROPPED_HEADER, KafkaError, KafkaPublisher, KafkaSource, read_topic,
};
use ackstack_testkit::unique_name;
use common::{kafka, receive_for, receive_n};

const WAIT: Duration = Duration::from_secs(30);

fn ids(received: &[ackstack_core::Received<ackstack_kafka::KafkaToken>]) -> Vec<i64> {
    received.iter().map(|r| r.token.offset()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_n_consume_ack_all_commits_n() {
    let k = kafka();
    let topic = unique_name("all");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    const N: usize = 500;
    k.produce(&topic, N, 1).await;

    let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let settler = source.settler();
    let got = receive_n(&mut source, N, WAIT).await;
    assert_eq!(got.len(), N);
    let offsets: BTreeSet<i64> = ids(&got).into_iter().collect();
    assert_eq!(offsets.len(), N, "no duplicates");
    let first = &got[0].delivery;
    assert_eq!(first.origin.broker, "kafka");
    assert_eq!(first.origin.partition, Some(0));
    assert_eq!(first.origin.offset, Some(0));
    assert_eq!(first.key.as_deref(), Some(&b"k-0"[..]));
    assert_eq!(first.headers.get_str("seq"), Some("0"));
    assert_eq!(first.attempt, 1);

    let tokens: Vec<_> = got.into_iter().map(|r| r.token).collect();
    for chunk in tokens.chunks(100) {
        let report = settler.ack(chunk.to_vec()).await;
        assert_eq!(report.acked, chunk.len());
        assert!(report.failed.is_empty());
    }
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![N as i64]);
    // Five ack calls of 100: far fewer commit requests than records.
    let commits = source.stats().commits();
    assert!(
        (1..=6).contains(&commits),
        "{commits} commits for {N} records"
    );
    assert_eq!(settler.stats().commits(), commits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completion_never_commits_past_an_unfinished_offset() {
    let k = kafka();
    let topic = unique_name("ooo");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 10, 1).await;

    let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let settler = source.settler();
    let got = receive_n(&mut source, 10, WAIT).await;
    assert_eq!(got.len(), 10);
    let mut tokens: Vec<_> = got.into_iter().map(|r| r.token).collect();
    tokens.reverse();
    let unfinished = tokens.iter().position(|t| t.offset() == 3).unwrap();
    let held = tokens.remove(unfinished);
    for t in tokens {
        assert_eq!(settler.ack(vec![t]).await.acked, 1);
        let pos = source.committable(&topic, 0).unwrap();
        assert!(pos <= 3, "watermark {pos} passed unfinished offset 3");
    }
    // Time-based commits run meanwhile; a synchronous flush too: still 3.
    tokio::time::sleep(Duration::from_millis(500)).await;
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![3]);

    assert_eq!(settler.ack(vec![held]).await.acked, 1);
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_commit_happens_without_flush() {
    let k = kafka();
    let topic = unique_name("timed");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 5, 1).await;

    let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let settler = source.settler();
    let got = receive_n(&mut source, 5, WAIT).await;
    settler
        .ack(got.into_iter().map(|r| r.token).collect())
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if k.committed(&group, &topic, 1).await == vec![5] {
            break;
        }
        assert!(Instant::now() < deadline, "no commit within 10s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_after_partial_run_gets_only_the_uncommitted() {
    let k = kafka();
    let topic = unique_name("partial");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 20, 1).await;

    {
        let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 20, WAIT).await;
        assert_eq!(got.len(), 20);
        // Ack 0..12 and, out of order, 15 and 17: the watermark stops at 12.
        let acked: Vec<_> = got
            .into_iter()
            .map(|r| r.token)
            .filter(|t| t.offset() < 12 || t.offset() == 15 || t.offset() == 17)
            .collect();
        settler.ack(acked).await;
        settler.flush().await;
        source.close().await;
    }
    assert_eq!(k.committed(&group, &topic, 1).await, vec![12]);

    let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let got = receive_n(&mut source, 8, WAIT).await;
    let more = receive_for(&mut source, Duration::from_secs(2)).await;
    let offsets: Vec<i64> = ids(&got).into_iter().chain(ids(&more)).collect();
    assert_eq!(offsets, (12..20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_record_lands_in_dlq_with_metadata_and_its_offset_passes() {
    let k = kafka();
    let topic = unique_name("dl");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    let config = k.config(&group, &topic);
    let dlq = config.dlq_topic();
    assert_eq!(dlq, format!("{topic}-dlq"));
    k.create_topic(&dlq, 1).await;

    let publisher = KafkaPublisher::new(&k.brokers, &topic).unwrap();
    publisher
        .publish(
            Message::new(&b"\x00poison\xff"[..])
                .key("order-7")
                .message_id("id-7")
                .header("app", "kept")
                .header("x-ackstack-dl-reason", "old metadata")
                .header(ATTEMPT_HEADER, "4"),
        )
        .await
        .unwrap();
    publisher.publish(Message::new("fine")).await.unwrap();

    let mut source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let mut got = receive_n(&mut source, 2, WAIT).await;
    assert_eq!(got.len(), 2);
    let second = got.pop().unwrap();
    let first = got.pop().unwrap();
    let d = first.delivery;
    assert_eq!(d.attempt, 4, "attempt from our header");
    assert_eq!(d.message_id.as_deref(), Some("id-7"));

    let letter = DeadLetter::new(&d, Failure::new(ErrorKind::Permanent, "cannot decode"));
    let settled = settler.dead_letter(first.token, &d, &letter).await.unwrap();
    let Settled::AckOriginal(token) = settled else {
        panic!("dead-letter must hand the original back for ack");
    };
    assert_eq!(settler.ack(vec![token, second.token]).await.acked, 2);
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![2]);

    let copies = read_topic(&k.brokers, &dlq, 1, WAIT).await.unwrap();
    assert_eq!(copies.len(), 1);
    let c = &copies[0];
    assert_eq!(&c.payload[..], b"\x00poison\xff");
    assert_eq!(c.key.as_deref(), Some(&b"order-7"[..]));
    assert_eq!(c.headers.get_str("app"), Some("kept"));
    assert_eq!(c.headers.get_str(ATTEMPT_HEADER), Some("4"));
    assert_eq!(c.message_id.as_deref(), Some("id-7"));
    let reasons = c
        .headers
        .iter()
        .filter(|(n, _)| *n == "x-ackstack-dl-reason")
        .count();
    assert_eq!(reasons, 1, "earlier metadata replaced, not repeated");
    let meta = DeadLetterMetadata::from_headers(&c.headers).expect("metadata headers");
    assert_eq!(meta.error_message, "cannot decode");
    assert_eq!(meta.attempts, 4);
    assert_eq!(meta.broker, "kafka");
    assert_eq!(meta.queue, topic);
    assert_eq!(meta.partition, Some(0));
    assert_eq!(meta.offset, Some(0));
    assert_eq!(meta.message_id.as_deref(), Some("id-7"));
    assert_eq!(meta.consumer, group);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_leaves_the_record_uncommitted_and_the_lease_is_ownership() {
    let k = kafka();
    let topic = unique_name("retry");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 2, 1).await;

    let mut config = k.config(&group, &topic);
    let mut source = KafkaSource::new(&config).unwrap();
    assert!(
        !source.capabilities().broker_delay,
        "Kafka retries in place"
    );
    assert_eq!(
        source.capabilities().lease,
        Some(Duration::from_secs(10)),
        "partition ownership is reported as a lease, checked by extend"
    );
    assert!(source.capabilities().max_ack_batch >= 1000);
    config.ownership_check = Duration::from_secs(3);
    assert_eq!(
        KafkaSource::new(&config).unwrap().capabilities().lease,
        Some(Duration::from_secs(3))
    );
    let settler = source.settler();
    let mut got = receive_n(&mut source, 2, WAIT).await;
    assert_eq!(got.len(), 2);
    let second = got.pop().unwrap();
    let first = got.pop().unwrap();
    settler
        .extend(&first.token, Duration::from_secs(30))
        .await
        .unwrap();
    let failure = Failure::new(ErrorKind::Transient, "later");
    let retried = settler
        .retry(
            first.token,
            &first.delivery,
            Duration::from_secs(1),
            &failure,
        )
        .await
        .unwrap();
    assert_eq!(retried, Settled::Done);
    assert_eq!(settler.ack(vec![second.token]).await.acked, 1);
    settler.flush().await;
    // The position stays at 0: offset 0 is still in flight (retrying), so acking 1 moved nothing.
    assert_eq!(k.committed(&group, &topic, 1).await, vec![0]);
    assert_eq!(source.committable(&topic, 0), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_reads_the_record_again_and_unfreezes_the_partition() {
    let k = kafka();
    let topic = unique_name("rel");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 4, 1).await;

    let mut source = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let settler = source.settler();
    let mut got = receive_n(&mut source, 4, WAIT).await;
    assert_eq!(ids(&got), vec![0, 1, 2, 3]);
    let fourth = got.pop().unwrap();
    let third = got.pop().unwrap();
    let second = got.pop().unwrap();
    let first = got.pop().unwrap();
    // 0 completes, 2 completes, 1 is released, 3 is still in flight.
    assert_eq!(settler.ack(vec![first.token, third.token]).await.acked, 2);
    let stale = fourth.token.clone();
    settler.release(second.token.clone()).await;
    // The partition is read again from the released offset 1 in a new generation.
    let again = receive_n(&mut source, 3, WAIT).await;
    assert_eq!(
        ids(&again),
        vec![1, 2, 3],
        "read again from the released record"
    );
    assert_eq!(again[0].delivery.payload, second.delivery.payload);
    assert!(
        again
            .iter()
            .all(|r| r.token.generation() > stale.generation())
    );
    // The old generation is over: its tokens are stale, and extend reports the lost lease.
    assert!(
        settler
            .extend(&stale, Duration::from_secs(10))
            .await
            .unwrap_err()
            .is_lease_lost()
    );
    let report = settler.ack(vec![stale]).await;
    assert!(report.failed[0].1.is_lease_lost());
    // Releasing a stale token again does nothing.
    settler.release(second.token).await;
    let tokens: Vec<_> = again.into_iter().map(|r| r.token).collect();
    assert_eq!(settler.ack(tokens).await.acked, 3);
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![4]);
    assert!(
        receive_for(&mut source, Duration::from_secs(2))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_fails_with_lease_lost_once_the_partition_is_revoked() {
    let k = kafka();
    let topic = unique_name("own");
    let group = unique_name("g");
    k.create_topic(&topic, 2).await;
    k.produce(&topic, 2, 2).await;

    let mut a = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let settler = a.settler();
    let held = receive_n(&mut a, 2, WAIT).await;
    assert_eq!(held.len(), 2, "the first member owns both partitions");
    for r in &held {
        settler
            .extend(&r.token, Duration::from_secs(10))
            .await
            .expect("current partition: the lease holds");
    }
    // A second member joins: one partition moves to it.
    let mut b = KafkaSource::new(&k.config(&group, &topic)).unwrap();
    let moved = receive_n(&mut b, 1, Duration::from_secs(60)).await;
    assert_eq!(moved.len(), 1, "the second member got a partition");
    let moved_partition = moved[0].token.partition();
    common::eventually(WAIT, "first member down to one partition", || {
        a.assigned_partitions() == 1
    })
    .await;
    let lost = held
        .iter()
        .find(|r| r.token.partition() == moved_partition)
        .unwrap();
    let err = settler
        .extend(&lost.token, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    assert!(
        settler.ack(vec![lost.token.clone()]).await.failed[0]
            .1
            .is_lease_lost()
    );
    // The new owner's token is current.
    let b_settler = b.settler();
    b_settler
        .extend(&moved[0].token, Duration::from_secs(10))
        .await
        .expect("the new owner holds the lease");
    assert_eq!(b_settler.ack(vec![moved[0].token.clone()]).await.acked, 1);
    b_settler.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_to_a_second_member_loses_nothing() {
    let k = kafka();
    let topic = unique_name("rebal");
    let group = unique_name("g");
    const PARTITIONS: i32 = 4;
    const N: usize = 400;
    k.create_topic(&topic, PARTITIONS).await;
    k.produce(&topic, N, PARTITIONS).await;

    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stale = Arc::new(Mutex::new(0usize));
    let deadline = Instant::now() + Duration::from_secs(90);

    let member = |slow: bool| {
        let config = k.config(&group, &topic);
        let done = done.clone();
        let stale = stale.clone();
        async move {
            let mut source = KafkaSource::new(&config).unwrap();
            let settler = source.settler();
            while done.lock().unwrap().len() < N && Instant::now() < deadline {
                let batch = source.receive(20).await.unwrap();
                if slow {
                    // Keep work in flight across the rebalance.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let payloads: Vec<String> = batch
                    .iter()
                    .map(|r| String::from_utf8(r.delivery.payload.to_vec()).unwrap())
                    .collect();
                let tokens = batch.into_iter().map(|r| r.token).collect::<Vec<_>>();
                let report = settler.ack(tokens.clone()).await;
                let failed: HashSet<_> = report.failed.iter().map(|(t, _)| t.clone()).collect();
                for e in &report.failed {
                    assert!(e.1.is_lease_lost());
                }
                *stale.lock().unwrap() += failed.len();
                let mut d = done.lock().unwrap();
                for (t, p) in tokens.iter().zip(payloads) {
                    if !failed.contains(t) {
                        d.insert(p);
                    }
                }
            }
            settler.flush().await;
            // Keep the member (and its assignment) until both are finished.
            tokio::time::sleep(Duration::from_secs(1)).await;
            source.close().await;
        }
    };

    let a = tokio::spawn(member(true));
    // Let the first member take every partition and make progress, then join a second one.
    common::eventually(WAIT, "first member progress", || {
        done.lock().unwrap().len() >= 40
    })
    .await;
    let b = tokio::spawn(member(false));
    tokio::time::timeout(Duration::from_secs(120), async {
        a.await.unwrap();
        b.await.unwrap();
    })
    .await
    .expect("members finished");

    let d = done.lock().unwrap().clone();
    assert_eq!(d.len(), N, "every record acked by some member");
    for i in 0..N {
        assert!(d.contains(&format!("m-{i}")));
    }
    let committed = k.committed(&group, &topic, PARTITIONS).await;
    assert_eq!(committed, vec![(N as i64) / PARTITIONS as i64; 4]);
    eprintln!("acks refused as stale: {}", stale.lock().unwrap());
}

/// The dead-letter producer's `message.max.bytes` in the size-limit tests (librdkafka's
/// minimum is 1000).
const SMALL_MAX_MESSAGE: usize = 4096;

/// The original (3,500-byte payload) fits `message.max.bytes`, but its copy with a long error
/// message in the metadata would not: librdkafka refuses it (`MSG_SIZE_TOO_LARGE`), and the
/// copy is produced again with the error message cut, marked in the dropped header. Payload,
/// key and original headers are unchanged, and the offset passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_over_message_max_bytes_only_by_our_metadata_is_shrunk_to_fit() {
    let k = kafka();
    let topic = unique_name("dlfit");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    let config = k
        .config(&group, &topic)
        .property("message.max.bytes", SMALL_MAX_MESSAGE.to_string());
    k.create_topic(&config.dlq_topic(), 1).await;
    let payload: Vec<u8> = (0..3500u32).map(|i| (i % 251) as u8).collect();
    KafkaPublisher::new(&k.brokers, &topic)
        .unwrap()
        .publish(
            Message::new(payload.clone())
                .key("k-1")
                .header("app", "kept"),
        )
        .await
        .unwrap();
    let mut source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let r = receive_n(&mut source, 1, WAIT).await.remove(0);
    let long_error = "field \"total\" is not a number; ".repeat(30);
    let letter = DeadLetter::new(&r.delivery, Failure::new(ErrorKind::Permanent, &long_error));
    let settled = settler
        .dead_letter(r.token, &r.delivery, &letter)
        .await
        .expect("a copy that fits once shrunk is produced");
    let Settled::AckOriginal(token) = settled else {
        panic!("dead-letter must hand the original back for ack");
    };
    assert_eq!(settler.ack(vec![token]).await.acked, 1);
    settler.flush().await;
    assert_eq!(k.committed(&group, &topic, 1).await, vec![1]);

    let copies = read_topic(&k.brokers, &config.dlq_topic(), 1, WAIT)
        .await
        .unwrap();
    assert_eq!(copies.len(), 1);
    let c = &copies[0];
    assert_eq!(&c.payload[..], &payload[..], "payload byte for byte");
    assert_eq!(c.key.as_deref(), Some(&b"k-1"[..]));
    assert_eq!(c.headers.get_str("app"), Some("kept"));
    assert_eq!(
        c.headers.get_str(DROPPED_HEADER),
        Some(DROPPED_ERROR_TRUNCATED)
    );
    let meta = DeadLetterMetadata::from_headers(&c.headers).expect("metadata headers");
    let kept = meta.error_message.trim_end_matches('…');
    assert!(kept.len() < letter.failure.message.len());
    assert!(letter.failure.message.starts_with(kept));
    assert_eq!(meta.offset, Some(0));
}

/// A payload that alone fills `message.max.bytes` cannot be dead-lettered however the
/// metadata is cut: `dead_letter` fails with `Rejected` (librdkafka's `MSG_SIZE_TOO_LARGE`,
/// for good), the offset does not pass, and a release reads the record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_that_cannot_fit_message_max_bytes_is_rejected_and_not_committed() {
    let k = kafka();
    let topic = unique_name("dlbig");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    let config = k
        .config(&group, &topic)
        .property("message.max.bytes", SMALL_MAX_MESSAGE.to_string());
    k.create_topic(&config.dlq_topic(), 1).await;
    let payload = vec![7u8; SMALL_MAX_MESSAGE];
    KafkaPublisher::new(&k.brokers, &topic)
        .unwrap()
        .publish(Message::new(payload.clone()))
        .await
        .unwrap();
    let mut source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let r = receive_n(&mut source, 1, WAIT).await.remove(0);
    let letter = DeadLetter::new(&r.delivery, Failure::new(ErrorKind::Permanent, "bad"));
    let failed = settler
        .dead_letter(r.token, &r.delivery, &letter)
        .await
        .expect_err("a copy that can never fit must not be reported as produced");
    assert!(
        matches!(failed.error, SettleError::Rejected(_)),
        "{:?}",
        failed.error
    );
    settler.flush().await;
    let committed = k.committed(&group, &topic, 1).await;
    assert!(
        committed[0] <= 0,
        "the offset must not pass the record: {committed:?}"
    );
    settler.release(failed.token).await;
    let again = receive_n(&mut source, 1, WAIT).await;
    assert_eq!(ids(&again), vec![0], "the record is read again");
    assert_eq!(&again[0].delivery.payload[..], &payload[..]);
    assert!(
        read_topic(&k.brokers, &config.dlq_topic(), 1, Duration::from_secs(3))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A broker that answers a synchronous commit only after 6 s: `commit_now` gives up after
/// `commit_timeout` (1 s) with `CommitTimeout` instead of waiting, and nothing stays locked
/// behind it: once the broker answers promptly again, periodic commits carry later acks and
/// `commit_now` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_commit_now_gives_up_within_commit_timeout_and_periodic_commits_resume() {
    let k = kafka();
    let Some(mock) = k.mock() else {
        eprintln!("needs the mock cluster's fault injection; skipped against KAFKA_BROKERS");
        return;
    };
    let topic = unique_name("stall");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 3, 1).await;
    let mut config = k.config(&group, &topic);
    config.commit_timeout = Duration::from_secs(1);
    // Long enough that the slow broker does not end the member's session.
    config.session_timeout = Duration::from_secs(30);
    let mut source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let mut got = receive_n(&mut source, 3, WAIT).await;
    assert_eq!(ids(&got), vec![0, 1, 2]);
    let third = got.pop().unwrap();
    let second = got.pop().unwrap();
    let first = got.pop().unwrap();
    assert_eq!(settler.ack(vec![first.token]).await.acked, 1);
    assert_eq!(settler.commit_now().await.unwrap(), 1);

    mock.broker_round_trip_time(1, Duration::from_secs(6))
        .unwrap();
    assert_eq!(settler.ack(vec![second.token]).await.acked, 1);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), settler.commit_now())
        .await
        .expect("commit_now must return");
    let took = started.elapsed();
    assert!(
        matches!(result, Err(KafkaError::CommitTimeout(_))),
        "{result:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(4), "gave up only after {took:?}");

    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let commits_before = settler.stats().commits();
    assert_eq!(settler.ack(vec![third.token]).await.acked, 1);
    let deadline = Instant::now() + WAIT;
    loop {
        if k.committed(&group, &topic, 1).await == vec![3] {
            break;
        }
        assert!(Instant::now() < deadline, "periodic commits did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(settler.stats().commits() > commits_before);
    settler
        .commit_now()
        .await
        .expect("commit_now succeeds again");
}

/// Flow control stops reading a partition's own queue while the runner has no room; it never
/// pauses the partition (a pause throws away librdkafka's prefetched records). A one-record
/// buffer and a reader that takes its time still get every record once, in offset order per
/// partition, with no pause at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_stops_reading_without_pausing_and_keeps_each_partitions_order() {
    let k = kafka();
    let topic = unique_name("flow");
    let group = unique_name("g");
    k.create_topic(&topic, 3).await;
    const N: usize = 600;
    k.produce(&topic, N, 3).await;

    let mut config = k.config(&group, &topic);
    config.buffer = 1;
    let mut source = KafkaSource::new(&config).unwrap();
    let settler = source.settler();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < N && Instant::now() < deadline {
        let batch = source.receive(7).await.unwrap();
        // The channel stays full while the reader dawdles.
        tokio::time::sleep(Duration::from_millis(1)).await;
        got.extend(batch);
    }
    assert_eq!(got.len(), N, "every record arrives");
    let mut last: std::collections::HashMap<i32, i64> = Default::default();
    for r in &got {
        let p = r.delivery.origin.partition.unwrap();
        let o = r.token.offset();
        if let Some(prev) = last.insert(p, o) {
            assert!(o > prev, "partition {p}: offset {o} after {prev}");
        }
    }
    assert_eq!(source.stats().pauses(), 0, "no partition was paused");
    let report = settler
        .ack(got.into_iter().map(|r| r.token).collect())
        .await;
    assert_eq!(report.acked, N);
    settler.flush().await;
    let committed: i64 = k.committed(&group, &topic, 3).await.iter().sum();
    assert_eq!(committed, N as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_committed_offsets_continues_from_them() {
    // The team's current consumer (a plain client) committed offset 6 of 10; ackstack joins the
    // same group with auto.offset.reset=earliest and must continue at 6, not start over.
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let k = kafka();
    let topic = unique_name("history");
    let group = unique_name("g");
    k.create_topic(&topic, 1).await;
    k.produce(&topic, 10, 1).await;
    let old: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut position = rdkafka::TopicPartitionList::new();
    position
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(6))
        .unwrap();
    old.commit(&position, CommitMode::Sync).unwrap();
    drop(old);
    assert_eq!(k.committed(&group, &topic, 1).await, vec![6]);

    let config = k.config(&group, &topic);
    assert_eq!(config.auto_offset_reset, "earliest");
    let mut source = KafkaSource::new(&config).unwrap();
    let got = receive_n(&mut source, 4, WAIT).await;
    assert_eq!(
        ids(&got),
        vec![6, 7, 8, 9],
        "continued from the committed offset"
    );
    assert!(
        receive_for(&mut source, Duration::from_secs(1))
            .await
            .is_empty(),
        "nothing before the committed offset is read again"
    );
}

#[test]
fn an_invalid_configuration_is_a_permanent_error_at_once() {
    // A property librdkafka does not know: no retry can fix it, so a consumer waiting for its
    // cluster at start-up must stop on it instead of waiting.
    let k = kafka();
    let config = k
        .config(&unique_name("g"), &unique_name("t"))
        .property("no.such.property", "1");
    let err = KafkaSource::new(&config).expect_err("an unknown property is refused");
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("no.such.property"), "{err}");
    let unreachable = KafkaError::CommitTimeout(Duration::from_secs(1));
    assert!(!unreachable.is_permanent());
}
