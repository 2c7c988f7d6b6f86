//! Dead-letter copies the broker would refuse for good, against the real RabbitMQ at
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`): a content header over the
//! negotiated `frame_max`, and a publish the broker closes the channel over
//! (`PRECONDITION_FAILED`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use ackstack_core::{
    DeadLetter, DeadLetterMetadata, ErrorKind, Failure, Received, Settle, SettleError, Settled,
    Source,
};
use ackstack_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use ackstack_rabbitmq::{
    DROPPED_ERROR_TRUNCATED, DROPPED_HEADER, RabbitPublisher, RabbitSource, text_value,
};
use bytes::Bytes;
use common::{config, receive_n, unique, url};

mod common;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A low `frame_max` (the server's minimum is 4096), so that headers can fill a frame.
const FRAME_MAX: usize = 8192;

fn with_frame_max(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}frame_max={FRAME_MAX}")
}

/// Original headers of `filler` bytes in one long string, plus typed values.
fn original_headers(filler: usize) -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongLongInt(-3));
    let mut headers = FieldTable::default();
    headers.insert("int".into(), AMQPValue::LongInt(42));
    headers.insert("table".into(), AMQPValue::FieldTable(nested));
    headers.insert(
        "big".into(),
        AMQPValue::LongString(LongString::from(vec![b'h'; filler])),
    );
    headers
}

#[tokio::test]
async fn dead_letter_copy_over_frame_max_is_shortened_and_keeps_payload_and_headers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config(with_frame_max(&url()), "dl-frame-fit", &[500]);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        // About 7 KB of headers: the original fits 8192, its copy with ~1.4 KB of metadata
        // (a 1000-byte error message) does not.
        let headers = original_headers(7000);
        let payload = Bytes::from(vec![7u8; 20_000]);
        publisher
            .publish_raw(
                &config.queue,
                payload.clone(),
                headers.clone(),
                Some("id-fit".into()),
            )
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().expect("one delivery");
        let message = "e".repeat(1000);
        let letter = DeadLetter::new(
            &delivery,
            Failure::new(ErrorKind::Permanent, message.clone()),
        );
        let settled = settler.dead_letter(token, &delivery, &letter).await;
        let Ok(Settled::AckOriginal(token)) = settled else {
            panic!(
                "expected AckOriginal, got {:?}",
                settled.err().map(|f| f.error)
            );
        };
        assert!(settler.ack(vec![token]).await.failed.is_empty());

        let copy = publisher
            .get_dead_letter()
            .await
            .unwrap()
            .expect("a DLQ copy");
        assert_eq!(copy.payload, payload);
        for (name, value) in &headers {
            assert_eq!(copy.header(name.as_str()).as_ref(), Some(value), "{name}");
        }
        assert_eq!(
            copy.header(DROPPED_HEADER),
            Some(text_value(DROPPED_ERROR_TRUNCATED))
        );
        let meta = DeadLetterMetadata::from_headers(&copy.headers).expect("metadata");
        assert!(
            meta.error_message.len() < message.len(),
            "error message not shortened: {} bytes",
            meta.error_message.len()
        );
        assert!(meta.error_message.starts_with('e'));
        let mut expected = letter.metadata(&delivery);
        expected.error_message = meta.error_message.clone();
        assert_eq!(meta, expected);
        assert_eq!(publisher.queue_len(&config.queue).await.unwrap(), 0);
        source.disconnect().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn dead_letter_of_headers_that_fill_the_frame_is_rejected_and_not_acked() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = config(with_frame_max(&url()), "dl-frame-full", &[500]);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        // The original's content header is a few dozen bytes under 8192: no metadata fits.
        let headers = original_headers(FRAME_MAX - 150);
        let payload = Bytes::from_static(b"full");
        publisher
            .publish_raw(&config.queue, payload.clone(), headers.clone(), None)
            .await
            .unwrap();
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().expect("one delivery");
        let generation = token.generation();
        let letter = DeadLetter::new(&delivery, Failure::new(ErrorKind::Permanent, "bad"));
        let failure = match settler.dead_letter(token, &delivery, &letter).await {
            Ok(_) => panic!("a copy that cannot fit the frame was published"),
            Err(failure) => failure,
        };
        assert!(
            matches!(failure.error, SettleError::Rejected(_)),
            "expected Rejected, got {:?}",
            failure.error
        );
        // Nothing was sent that could break the connection: the token is still settleable.
        assert!(failure.token.is_live());
        assert_eq!(settler.stats().ack_frames, 0);
        settler.release(failure.token).await;
        let again = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let again = again.into_iter().next().expect("the original comes back");
        assert_eq!(again.delivery.payload, payload);
        assert_eq!(again.token.generation(), generation);
        assert_eq!(
            again.token.properties().headers().as_ref(),
            Some(&headers),
            "original headers changed"
        );
        assert!(publisher.get_dead_letter().await.unwrap().is_none());
        source.disconnect().await;
    })
    .await
    .unwrap();
}

/// A broker user that exists for one test; deleted on drop.
struct TempUser {
    name: String,
}

impl TempUser {
    /// Creates a user with full permissions on `/`, or `None` when rabbitmqctl is not usable.
    fn create(password: &str) -> Option<TempUser> {
        let name = unique("user");
        let ok = |args: &[&str]| {
            Command::new("rabbitmqctl")
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        if !ok(&["add_user", &name, password]) {
            return None;
        }
        let user = TempUser { name };
        if !ok(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]) {
            return None;
        }
        Some(user)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// Publishes `body` to `queue` as guest with the `user_id` property `guest`.
async fn publish_with_user_id(queue: &str, body: &[u8]) {
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
        .with_user_id("guest".into());
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    connection.close(200, "done".into()).await.unwrap();
}

/// RabbitMQ validates the `user_id` property against the publishing connection's user and
/// closes the channel with `PRECONDITION_FAILED` when they differ. A consumer running as
/// another user than the message's publisher can therefore never store its dead-letter copy
/// (the copy keeps the property): `Rejected`, not a transient broker error.
#[tokio::test]
async fn dead_letter_refused_with_precondition_failed_is_rejected() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let base = url();
        if !base.contains("guest:guest@") {
            eprintln!("skipped: AMQP_URL does not use guest:guest, cannot derive a second user");
            return;
        }
        let password = "ackstack-test-password";
        let Some(user) = TempUser::create(password) else {
            eprintln!("skipped: rabbitmqctl cannot create a test user here");
            return;
        };
        let other = base.replace("guest:guest@", &format!("{}:{password}@", user.name));
        let config = config(other, "dl-user-id", &[500]);
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        publish_with_user_id(&config.queue, b"from guest").await;
        let mut source = RabbitSource::connect(config.clone()).await.unwrap();
        let settler = source.settler();
        let got = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        let Received {
            delivery, token, ..
        } = got.into_iter().next().expect("one delivery");
        let letter = DeadLetter::new(&delivery, Failure::new(ErrorKind::Permanent, "bad"));
        let failure = match settler.dead_letter(token, &delivery, &letter).await {
            Ok(_) => panic!("the broker accepted a copy with another user's user_id"),
            Err(failure) => failure,
        };
        assert!(
            matches!(failure.error, SettleError::Rejected(_)),
            "expected Rejected, got {:?}",
            failure.error
        );
        // Only the publish channel was closed: the delivery can still be released.
        assert!(failure.token.is_live());
        settler.release(failure.token).await;
        let again = receive_n(&mut source, 1, Duration::from_secs(10)).await;
        assert_eq!(
            again.first().map(|r| r.delivery.payload.clone()),
            Some(Bytes::from_static(b"from guest"))
        );
        assert!(publisher.get_dead_letter().await.unwrap().is_none());
        source.disconnect().await;
        drop(user);
    })
    .await
    .unwrap();
}
