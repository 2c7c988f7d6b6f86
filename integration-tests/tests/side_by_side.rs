//! A rolling deploy onto ackstack (invariant 14, docs/MIGRATING.md): on each broker, the
//! team's "old" consumer, written here with the bare client as a team would have it, and an
//! ackstack consumer run at once on one queue or group while messages flow; then the old one
//! stops. Every message is handled, and none twice beyond what the broker redelivered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{Consumer, Delivery, HandlerError, Message, Publish, Source, handler_fn};

mod common;
use common::eventually;

/// Messages published in each of the three phases: before ackstack starts, while both run,
/// and after the old consumer stopped.
const PER_PHASE: u32 = 40;
const TOTAL: u32 = 3 * PER_PHASE;

/// Who handled what.
#[derive(Default)]
struct Ledger {
    handled: Mutex<BTreeMap<u32, Vec<&'static str>>>,
    /// Messages the broker may hand out again: the old consumer handled them but its
    /// acknowledgement did not land.
    unsettled: Mutex<Vec<u32>>,
}

impl Ledger {
    fn record(&self, body: &[u8], by: &'static str) -> u32 {
        let id: u32 = std::str::from_utf8(body).unwrap().parse().unwrap();
        self.handled.lock().unwrap().entry(id).or_default().push(by);
        id
    }

    fn by(&self, who: &str) -> usize {
        let handled = self.handled.lock().unwrap();
        handled.values().flatten().filter(|w| **w == who).count()
    }

    fn all_handled(&self) -> bool {
        self.handled.lock().unwrap().len() == TOTAL as usize
    }

    /// Every message handled; twice only where the old consumer's acknowledgement failed;
    /// both consumers took part.
    fn check(&self) {
        let handled = self.handled.lock().unwrap();
        let missing: Vec<u32> = (0..TOTAL).filter(|id| !handled.contains_key(id)).collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        let unsettled = self.unsettled.lock().unwrap();
        let twice: Vec<(&u32, &Vec<&str>)> = handled
            .iter()
            .filter(|(id, by)| by.len() > 1 && !unsettled.contains(id))
            .collect();
        assert!(twice.is_empty(), "handled twice: {twice:?}");
        drop(handled);
        assert!(self.by("old") > 0 && self.by("ackstack") > 0);
    }
}

/// Publishes message `id` (its body), keyed by one of 8 customers.
async fn publish(publisher: &impl Publish, id: u32) {
    let message = Message::new(id.to_string()).key(format!("customer-{}", id % 8));
    publisher.publish(message).await.unwrap();
}

/// The three phases: `connect` makes the ackstack consumer's source (run until the end), and
/// `stop_old` tells the old one to stop.
async fn rolling_deploy<F, S>(
    ledger: &Arc<Ledger>,
    publisher: &impl Publish,
    stop_old: Arc<AtomicBool>,
    connect: F,
) where
    F: AsyncFnOnce() -> S,
    S: Source,
{
    for id in 0..PER_PHASE {
        publish(publisher, id).await;
    }
    assert!(
        eventually(Duration::from_secs(30), || ledger.by("old") > 0).await,
        "the old consumer handles"
    );
    let ackstack = run_ackstack(connect().await, ledger.clone());
    for id in PER_PHASE..2 * PER_PHASE {
        publish(publisher, id).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop_old.store(true, Ordering::SeqCst);
    for id in 2 * PER_PHASE..TOTAL {
        publish(publisher, id).await;
    }
    assert!(
        eventually(Duration::from_secs(60), || ledger.all_handled()).await,
        "{} of {TOTAL} handled",
        ledger.handled.lock().unwrap().len()
    );
    // Anything handed out twice would arrive within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ackstack.abort();
    ledger.check();
}

/// Runs an ackstack consumer on `source`, recording into `ledger`, until aborted.
fn run_ackstack<S: Source>(source: S, ledger: Arc<Ledger>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let handler = handler_fn(move |delivery: Delivery, _cx| {
            let ledger = ledger.clone();
            async move {
                ledger.record(&delivery.payload, "ackstack");
                Ok::<(), HandlerError>(())
            }
        });
        let _ = Consumer::new(source)
            .run_until(handler, std::future::pending())
            .await;
    })
}

mod rabbitmq {
    use super::*;
    use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};

    /// The old consumer: a lapin loop, prefetch 10, one ack per message after handling it.
    /// When told to stop it cancels and closes its channel; RabbitMQ requeues what it had
    /// been sent and not acknowledged.
    async fn old_consumer(url: String, queue: String, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(10, BasicQosOptions::default())
            .await
            .unwrap();
        let mut deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                "old".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while !stop.load(Ordering::SeqCst) {
            let next = tokio::time::timeout(Duration::from_millis(100), deliveries.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                continue;
            };
            let id = ledger.record(&delivery.data, "old");
            if delivery.ack(BasicAckOptions::default()).await.is_err() {
                ledger.unsettled.lock().unwrap().push(id);
            }
        }
        let _ = channel.close(200, "deployed".into()).await;
        let _ = connection.close(200, "deployed".into()).await;
    }

    #[tokio::test]
    async fn an_ackstack_consumer_takes_over_a_queue_from_a_lapin_loop() {
        let url = common::amqp_url();
        let queue = ackstack_testkit::unique_name("side-by-side");
        // The team's queue, as its service declared it.
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(300_000));
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .unwrap();

        let mut config = RabbitConfig::new(url.clone(), queue.clone());
        config.queue_expires = Some(Duration::from_secs(300));
        let publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
        let ledger = Arc::new(Ledger::default());
        let stop_old = Arc::new(AtomicBool::new(false));
        let old = tokio::spawn(old_consumer(url, queue, ledger.clone(), stop_old.clone()));
        let new = async move || RabbitSource::connect(config).await.unwrap();
        rolling_deploy(&ledger, &publisher, stop_old, new).await;
        old.await.unwrap();
        let _ = connection.close(200, "done".into()).await;
    }
}

mod sqs {
    use super::*;
    use ackstack_sqs::testing::{self, unique_name};
    use ackstack_sqs::{SqsConfig, SqsPublisher, SqsSource};
    use aws_sdk_sqs::Client;

    /// The old consumer: an aws-sdk-sqs loop that receives up to 10 messages, handles each
    /// and deletes it, and checks between receives whether to stop.
    async fn old_consumer(client: Client, url: String, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::SeqCst) {
            let Ok(out) = client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
            else {
                continue;
            };
            for message in out.messages() {
                let id = ledger.record(message.body().unwrap_or_default().as_bytes(), "old");
                let deleted = client
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(message.receipt_handle().unwrap_or_default())
                    .send()
                    .await;
                if deleted.is_err() {
                    ledger.unsettled.lock().unwrap().push(id);
                }
            }
        }
    }

    #[tokio::test]
    async fn an_ackstack_consumer_takes_over_a_queue_from_an_sdk_loop() {
        let client = testing::client().await;
        let url = client
            .create_queue()
            .queue_name(unique_name("side-by-side"))
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let ledger = Arc::new(Ledger::default());
        let stop_old = Arc::new(AtomicBool::new(false));
        let old = tokio::spawn(old_consumer(
            client.clone(),
            url.clone(),
            ledger.clone(),
            stop_old.clone(),
        ));
        let mut config = SqsConfig::queue_url(&url)
            .with_endpoint(testing::endpoint())
            .with_wait_time_seconds(1)
            .with_create_queues(true);
        config.region = Some("us-east-1".to_string());
        let new = {
            let client = client.clone();
            async move || SqsSource::from_client(client, config).await.unwrap()
        };
        let publisher = SqsPublisher::new(client.clone(), url.clone());
        rolling_deploy(&ledger, &publisher, stop_old, new).await;
        old.await.unwrap();
    }
}

mod kafka {
    use super::*;
    use ackstack_kafka::{KafkaConfig, KafkaPublisher, KafkaSource};
    use rdkafka::ClientConfig;
    use rdkafka::Message as _;
    use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};

    const TOPIC: &str = "side-by-side";
    const GROUP: &str = "billing";

    /// The old consumer: an rdkafka `StreamConsumer` in the group, auto-commit off, each
    /// record's offset committed synchronously after it is handled. When told to stop it
    /// leaves the group (dropped), and its partitions move to the ackstack consumer.
    async fn old_consumer(brokers: String, ledger: Arc<Ledger>, stop: Arc<AtomicBool>) {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", GROUP)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("fetch.wait.max.ms", "100")
            .create()
            .unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        while !stop.load(Ordering::SeqCst) {
            let next = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
            let Ok(Ok(record)) = next else {
                continue;
            };
            let id = ledger.record(record.payload().unwrap_or_default(), "old");
            if consumer.commit_message(&record, CommitMode::Sync).is_err() {
                // Its partition was taken away meanwhile (the group rebalanced as ackstack
                // joined): the new owner reads the record again.
                ledger.unsettled.lock().unwrap().push(id);
            }
        }
    }

    #[tokio::test]
    async fn an_ackstack_consumer_joins_and_takes_over_a_group_from_a_stream_consumer() {
        let (brokers, _cluster) = common::mock_cluster(TOPIC, 4);
        let ledger = Arc::new(Ledger::default());
        let stop_old = Arc::new(AtomicBool::new(false));
        let old = tokio::spawn(old_consumer(
            brokers.clone(),
            ledger.clone(),
            stop_old.clone(),
        ));
        let mut config = KafkaConfig::new(&brokers, GROUP, TOPIC);
        config.session_timeout = Duration::from_secs(6);
        config.commit_interval = Duration::from_millis(100);
        let config = config
            .property("fetch.wait.max.ms", "100")
            .property("heartbeat.interval.ms", "500");
        let new = async move || KafkaSource::new(&config).unwrap();
        let publisher = KafkaPublisher::new(&brokers, TOPIC).unwrap();
        rolling_deploy(&ledger, &publisher, stop_old, new).await;
        old.await.unwrap();
    }
}
