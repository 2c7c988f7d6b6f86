//! `ackstack dlq` on SQS (`SQS_ENDPOINT`, default the local moto server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ackstack_core::{Consumer, Headers, Message, Publish, handler_fn};
use ackstack_sqs::attrs::attribute_bytes;
use ackstack_sqs::testing::{self, TestQueue};
use ackstack_sqs::{SqsPublisher, SqsSource};
use aws_sdk_sqs::Client;
use bytes::Bytes;
use common::Fixture;

struct Sqs {
    client: Client,
    queue: TestQueue,
    /// Where the command reaches SQS (the fixture itself always talks to it directly).
    endpoint: String,
}

impl Sqs {
    async fn new() -> Sqs {
        Sqs::create(false).await
    }

    async fn create(fifo: bool) -> Sqs {
        let client = testing::client().await;
        let queue = TestQueue::create(&client, "cli", fifo).await.unwrap();
        Sqs {
            client,
            queue,
            endpoint: testing::endpoint(),
        }
    }
}

impl Fixture for Sqs {
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "sqs".into(),
            "--queue".into(),
            self.queue.name.clone(),
            "--sqs-endpoint".into(),
            self.endpoint.clone(),
            "--region".into(),
            "us-east-1".into(),
        ]
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ]
    }

    fn binary_payloads(&self) -> bool {
        false
    }

    async fn dead_letter(&self, messages: Vec<Message>) {
        let published = messages.len();
        let want = self.dead_letters().await + published;
        let publisher = SqsPublisher::new(self.client.clone(), self.queue.url.clone());
        for m in messages {
            publisher.publish(m).await.unwrap();
        }
        let mut config = self.queue.config(Duration::from_secs(30));
        config.wait_time_seconds = 1;
        let source = SqsSource::from_client(self.client.clone(), config)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        // Counted from the consumer's own decisions rather than by listing the dead-letter
        // queue over and over (a scan of a thousand letters competes with the consumer for
        // the endpoint); once all are decided, idle means their copies are confirmed.
        let decided = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = decided.clone();
        let consumer = Consumer::new(source)
            .max_attempts(1)
            .concurrency(32)
            .inspect(move |_d, outcome| {
                if matches!(outcome, ackstack_core::Outcome::DeadLetter(_)) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            });
        let status = consumer.status();
        let summary = consumer
            .run_until(handler_fn(|d, _cx| common::fail(d)), async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                while decided.load(Ordering::SeqCst) < published
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                status.idle(Duration::from_secs(1)).await;
            })
            .await
            .unwrap();
        let got = self.dead_letters().await;
        assert!(got >= want, "{got} of {want} dead-lettered: {summary:?}");
        // A message published twice (a publish whose answer was lost, sent again by the SDK)
        // can still be on the work queue when the consumer stops at `want` dead letters.
        // Taken away, so that the scenarios find on the work queue only what they sent.
        let left = self.drain_work(usize::MAX).await;
        if !left.is_empty() {
            eprintln!("the setup left {} message(s) on the work queue", left.len());
        }
        if got > want {
            // At least once: SendMessage to the dead-letter queue landed but its answer did
            // not (the SDK or the runner sent it again), or a lease ran out before the delete.
            eprintln!(
                "{} dead letters more than messages after {:?}: {summary:?}",
                got - want,
                started.elapsed()
            );
        }
    }

    /// Receives and deletes until `expected` arrived, or two receives in a row came back empty
    /// and the queue holds nothing in flight either (a receive whose answer was lost leaves
    /// its messages invisible until their timeout). A message SQS handed out twice (one
    /// message id) is one message on the queue and is counted once.
    async fn drain_work(&self, expected: usize) -> Vec<(Bytes, Headers)> {
        let mut got = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut empty = 0;
        // A deadline that moves with progress: a slow endpoint (moto on a busy machine) takes
        // minutes over a thousand messages, and that is no reason to stop reading.
        let patience = Duration::from_secs(60);
        let mut deadline = std::time::Instant::now() + patience;
        while got.len() < expected && std::time::Instant::now() < deadline {
            let want = (expected - got.len()).min(10);
            let batch = testing::drain(&self.client, &self.queue.url, want, Duration::from_secs(1))
                .await
                .unwrap();
            empty = if batch.is_empty() {
                empty + 1
            } else {
                deadline = std::time::Instant::now() + patience;
                0
            };
            for m in batch {
                if m.message_id
                    .as_ref()
                    .is_none_or(|id| ids.insert(id.clone()))
                {
                    got.push(m);
                } else {
                    eprintln!("SQS handed out {:?} a second time", m.message_id);
                }
            }
            if empty >= 2 && self.queue.approximate_count(&self.client).await.unwrap() == 0 {
                break;
            }
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "the drain read nothing for {patience:?} and stopped at {} message(s)",
                got.len()
            );
        }
        got.into_iter()
            .map(|m| {
                let headers: Headers = m
                    .message_attributes()
                    .map(|attrs| {
                        attrs
                            .iter()
                            .map(|(k, v)| (k.clone(), attribute_bytes(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    Bytes::from(m.body.unwrap_or_default().into_bytes()),
                    headers,
                )
            })
            .collect()
    }

    async fn dead_letters(&self) -> usize {
        let dlq = TestQueue {
            url: self.queue.dlq_url.clone(),
            ..self.queue.clone()
        };
        dlq.approximate_count(&self.client).await.unwrap() as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_list_show_and_filters() {
    common::list_show_and_filters(&Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_groups_replay_and_purge() {
    common::groups_replay_and_purge(&Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_replay_loop_guard_and_purge() {
    common::replay_loop_guard_and_purge(&Sqs::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_replay_of_1000_survives_sigkill() {
    common::replay_survives_sigkill(&Sqs::new().await, 1000, 100, Some(5)).await;
}

/// A FIFO dead-letter queue hands out nothing more of a message group while one of its
/// letters is held: a listing of twelve letters in one group reaches ten, and says so (exit
/// code 3); a purge, removing each, reaches them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_fifo_letters_out_of_reach_are_reported() {
    let fx = Sqs::create(true).await;
    let messages = (0..12)
        .map(|i| common::message(format!("fifo {i:02}")).key("one-group"))
        .collect();
    fx.dead_letter(messages).await;
    assert_eq!(fx.dead_letters().await, 12);
    let listed = common::ackstack(&fx, &["dlq", "list", "--json"]);
    assert_eq!(listed.code, Some(3), "{listed:?}");
    let shown = listed.json_lines().len();
    assert!(shown < 12, "the group's head blocks the rest: {listed:?}");
    assert!(
        listed
            .stderr
            .contains(&format!("{} letter(s) in", 12 - shown)),
        "{listed:?}"
    );
    let purged = common::ackstack(&fx, &["dlq", "purge", "--yes"]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    assert!(purged.text().contains("purged 12"), "{purged:?}");
    assert_eq!(fx.dead_letters().await, 0);
}

/// A proxy on 127.0.0.1 in front of `upstream` that passes every request on and every answer
/// back, but for the first `SendMessage`: that request reaches SQS, and the proxy closes the
/// connection instead of answering, as when an answer is lost on the way.
fn losing_first_send_answer(upstream: &str) -> String {
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let lost = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (upstream, lost) = (upstream.clone(), lost.clone());
            std::thread::spawn(move || relay(client, &upstream, &lost));
        }
    });
    format!("http://{addr}")
}

/// Relays one client connection's requests, one at a time, over one upstream connection.
fn relay(client: TcpStream, upstream: &str, lost: &AtomicBool) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let server = TcpStream::connect(upstream)?;
    let mut from_server = BufReader::new(server.try_clone()?);
    let mut to_server = server;
    while let Some(request) = read_http(&mut from_client)? {
        to_server.write_all(&request)?;
        let Some(answer) = read_http(&mut from_server)? else {
            return Ok(());
        };
        let send = String::from_utf8_lossy(&request)
            .lines()
            .any(|l| l.eq_ignore_ascii_case("x-amz-target: AmazonSQS.SendMessage"));
        if send && !lost.swap(true, Ordering::SeqCst) {
            return Ok(()); // the answer is dropped with both connections
        }
        to_client.write_all(&answer)?;
    }
    Ok(())
}

/// One HTTP/1.1 message (head and a `content-length` body), or `None` at the end of the
/// stream.
fn read_http(from: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if from.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        message.extend_from_slice(line.as_bytes());
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
            assert!(
                !name.eq_ignore_ascii_case("transfer-encoding")
                    && !name.eq_ignore_ascii_case("expect"),
                "the proxy relays content-length bodies only: {line:?}"
            );
        }
        if line == "\r\n" {
            break;
        }
    }
    let start = message.len();
    message.resize(start + length, 0);
    from.read_exact(&mut message[start..])?;
    Ok(Some(message))
}

/// A replay whose `SendMessage` answer is lost: the SDK sends it again, SQS holds the message
/// twice, and the command says so (the letter is removed once, after the confirmed send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_a_send_retried_after_a_lost_answer_is_reported() {
    let mut fx = Sqs::new().await;
    fx.dead_letter(vec![common::message("order L")]).await;
    fx.endpoint = losing_first_send_answer(&testing::endpoint());
    let replayed = common::ackstack(&fx, &["dlq", "replay"]);
    assert_eq!(replayed.code, Some(0), "{replayed:?}");
    assert!(
        replayed.stderr.contains("it may be there twice")
            && replayed
                .stderr
                .contains("1 of them may be on their queue twice"),
        "{replayed:?}"
    );
    assert_eq!(fx.dead_letters().await, 0);
    let back = fx.drain_work(3).await;
    assert_eq!(back.len(), 2, "the lost answer's copy and the retry's");
    assert!(back.iter().all(|(payload, _)| payload == "order L"));
}

/// A letter another reader holds (as a receive whose answer was lost holds it) is out of a
/// standard queue's scan too: the listing shows the rest and says one was out of reach (exit
/// code 3); once the letter is free again, a listing shows all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_a_letter_held_elsewhere_is_reported_out_of_reach() {
    let fx = Sqs::new().await;
    let messages = (0..3)
        .map(|i| common::message(format!("held {i}")))
        .collect();
    fx.dead_letter(messages).await;
    let held = fx
        .client
        .receive_message()
        .queue_url(&fx.queue.dlq_url)
        .max_number_of_messages(1)
        .wait_time_seconds(1)
        .visibility_timeout(300)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(held.len(), 1);
    let listed = common::ackstack(&fx, &["dlq", "list", "--json"]);
    assert_eq!(listed.code, Some(3), "{listed:?}");
    assert_eq!(listed.json_lines().len(), 2, "{listed:?}");
    assert!(listed.stderr.contains("1 letter(s) in"), "{listed:?}");
    fx.client
        .change_message_visibility()
        .queue_url(&fx.queue.dlq_url)
        .receipt_handle(held[0].receipt_handle().unwrap())
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();
    let listed = common::ackstack(&fx, &["dlq", "list", "--json"]);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert_eq!(listed.json_lines().len(), 3, "{listed:?}");
}
