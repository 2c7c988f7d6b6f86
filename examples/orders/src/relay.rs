//! `--emit NAME`: the outbox relay that publishes the events the handler wrote in its inbox
//! transactions, to `NAME` on `--emit-broker`. With `--relay on` it runs beside the consumer
//! (and sends what is left before the program exits); with `--relay only` it runs alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack::MemoryBroker;
use ackstack::kafka::KafkaPublisher;
use ackstack::postgres::{OutboxRelay, PgInbox, RelayConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::sync::Notify;

use crate::{BrokerKind, Fatal, Options, kafka, nats, rabbitmq, redis_streams, sqs, until_up};

/// How long the relay may take, after the consumer stopped, to send what is still pending.
const FLUSH_WAIT: Duration = Duration::from_secs(15);

/// A relay ready to run, and the Kafka mock cluster its publisher talks to, if one was started.
pub struct Relay {
    /// The relay, routing `--emit` to the publisher.
    pub relay: OutboxRelay,
    /// Kept alive while the relay runs.
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Connects a publisher to `--emit` on `--emit-broker` (waiting for it as for the consumer's
/// broker) and makes the relay of `inbox`'s outbox.
pub async fn connect(opts: &Options, inbox: &PgInbox, started: Instant) -> Result<Relay, Fatal> {
    let Some(emit) = opts.emit.clone() else {
        return Err("internal: a relay without --emit".into());
    };
    let mut target = opts.clone();
    target.queue = emit.clone();
    target.broker = opts.emit_broker;
    let relay = OutboxRelay::new(inbox, RelayConfig::default())?;
    let wait = opts.connect_timeout;
    let mut mock = None;
    let relay = match opts.emit_broker {
        BrokerKind::Memory => relay.route(emit.clone(), MemoryBroker::new().publisher(&emit)),
        BrokerKind::Rabbitmq => {
            let publisher =
                until_up("RabbitMQ", started, wait, || rabbitmq::publisher(&target)).await?;
            relay.route(emit, publisher)
        }
        BrokerKind::Sqs => {
            let (_source, publisher) =
                until_up("SQS", started, wait, || sqs::connect(&target)).await?;
            relay.route(emit, publisher)
        }
        BrokerKind::Nats => {
            let (_source, publisher) =
                until_up("NATS", started, wait, || nats::connect(&target)).await?;
            relay.route(emit, publisher)
        }
        BrokerKind::RedisStreams => {
            let (_source, publisher) = until_up("Redis Streams", started, wait, || {
                redis_streams::connect(&target)
            })
            .await?;
            relay.route(emit, publisher)
        }
        BrokerKind::Kafka => {
            let brokers = match &opts.kafka_brokers {
                Some(brokers) => {
                    let properties = &opts.kafka_properties;
                    kafka::create_topics(brokers, properties, &emit, &target.dlq()).await?;
                    brokers.clone()
                }
                None => {
                    let cluster =
                        MockCluster::new(1).map_err(|e| format!("Kafka mock cluster: {e}"))?;
                    cluster.create_topic(&emit, 3, 1)?;
                    let brokers = cluster.bootstrap_servers();
                    mock = Some(cluster);
                    brokers
                }
            };
            let publisher = KafkaPublisher::with_properties(
                &brokers,
                &target.queue,
                &opts.kafka_properties,
                Duration::from_secs(30),
            )?;
            relay.route(emit, publisher)
        }
    };
    Ok(Relay { relay, _mock: mock })
}

/// The relay running in the background of the consumer.
pub struct Background {
    relay: Relay,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts the relay beside the consumer.
    pub fn spawn(self) -> Background {
        let stop = Arc::new(Notify::new());
        let relay = self.relay.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            relay
                .run_until(async move { stopped.notified().await })
                .await;
        });
        Background {
            relay: self,
            stop,
            task,
        }
    }

    /// `--relay only`: runs until interrupted, or until nothing was sent for `idle` and
    /// nothing of `--emit` is pending.
    pub async fn run_alone(self, idle: Option<Duration>) {
        let relay = self.relay.clone();
        let watch = async {
            let Some(idle) = idle else {
                return std::future::pending().await;
            };
            let mut sent = relay.stats().sent;
            let mut since = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = relay.stats().sent;
                if now != sent {
                    (sent, since) = (now, Instant::now());
                } else if since.elapsed() >= idle && relay.pending().await.is_ok_and(|n| n == 0) {
                    return;
                }
            }
        };
        let stop = async {
            tokio::select! {
                () = watch => {}
                () = crate::interrupted() => eprintln!("orders: interrupted; finishing the relay's round"),
            }
        };
        self.relay.run_until(stop).await;
        print_stats(&self.relay);
    }
}

impl Background {
    /// Stops the background relay, sends what is still pending (up to 15 s), and prints the
    /// `relay` line.
    pub async fn finish(self) {
        self.stop.notify_one();
        let _ = self.task.await;
        let relay = &self.relay.relay;
        // The deadline is checked between rounds only: a round in progress finishes, so that
        // what it published is marked sent rather than sent again later.
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut flushed = false;
        while Instant::now() < deadline {
            match relay.relay_once().await {
                Ok(round) if round.claimed > 0 => continue,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "outbox relay round failed while flushing")
                }
            }
            // Nothing to claim now: done, or rows wait for a retry or another relay.
            if relay.pending().await.is_ok_and(|n| n == 0) {
                flushed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !flushed {
            let left = relay
                .pending()
                .await
                .map_or_else(|e| format!("? ({e})"), |n| n.to_string());
            eprintln!(
                "orders: {left} event(s) still in the outbox after {FLUSH_WAIT:?}; they are committed \
                 and the next relay sends them"
            );
        }
        print_stats(relay);
    }
}

fn print_stats(relay: &OutboxRelay) {
    let stats = relay.stats();
    println!(
        "relay sent={} failures={} parked={}",
        stats.sent, stats.failures, stats.parked
    );
}
