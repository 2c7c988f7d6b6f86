//! Kafka (librdkafka's mock cluster unless `KAFKA_BROKERS` is set): rdkafka's StreamConsumer by
//! hand (async commit per message; auto-commit, the at-most-once ceiling) against ackstack's
//! KafkaSource under the consumer.
//!
//! The topic is produced once; every loop reads all of it from the start with a fresh
//! consumer group, so every loop sees the same records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_kafka::{KafkaConfig, KafkaSource, MESSAGE_ID_HEADER};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::common::{
    Counts, Dedup, LoopEnd, Progress, Sample, budget, measure, payload, run_ackstack, unique,
};
use crate::driver::{Loop, LoopStore, Store, interleave, store_rows};
use crate::memory::{bare_config, full_config};
use crate::report::{Role, Series};
use crate::{Options, Stores};

/// Handlers at once in ackstack's consumer.
const CONCURRENCY: usize = 64;
/// Records per partition at most (the mock keeps about 18,000 records of 256 B).
const PER_PARTITION: u64 = 10_000;

struct Cluster {
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
    brokers: String,
    topic: String,
    partitions: i32,
}

fn kerr(context: &str) -> impl Fn(rdkafka::error::KafkaError) -> String + '_ {
    move |e| format!("{context}: {e}")
}

impl Cluster {
    async fn start(n: u64) -> Result<Self, String> {
        let partitions = i32::try_from(n.div_ceil(PER_PARTITION).max(4)).unwrap_or(4);
        let topic = unique("ackstack-bench");
        let (mock, brokers) = match std::env::var("KAFKA_BROKERS") {
            Ok(b) if !b.trim().is_empty() => (None, b),
            _ => {
                let mock = MockCluster::new(1).map_err(kerr("mock cluster"))?;
                let brokers = mock.bootstrap_servers();
                (Some(mock), brokers)
            }
        };
        match &mock {
            Some(m) => {
                m.create_topic(&topic, partitions, 1)
                    .map_err(kerr("create topic"))?;
                m.create_topic(&format!("{topic}-dlq"), 1, 1)
                    .map_err(kerr("create topic"))?;
            }
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .map_err(kerr("admin client"))?;
                let dlq = format!("{topic}-dlq");
                let topics = [
                    NewTopic::new(&topic, partitions, TopicReplication::Fixed(1)),
                    NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
                ];
                tokio::time::timeout(
                    Duration::from_secs(30),
                    admin.create_topics(&topics, &AdminOptions::new()),
                )
                .await
                .map_err(|_| "create topics timed out".to_string())?
                .map_err(kerr("create topics"))?;
            }
        }
        let cluster = Cluster {
            _mock: mock,
            brokers,
            topic,
            partitions,
        };
        cluster.produce(n).await?;
        Ok(cluster)
    }

    async fn produce(&self, n: u64) -> Result<(), String> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .create()
            .map_err(kerr("producer"))?;
        let mut pending = Vec::with_capacity(1000);
        for i in 0..n {
            let body = payload(i);
            let key = i.to_string();
            let id = format!("{}-{i}", self.topic);
            let partition = i32::try_from(i % self.partitions as u64).unwrap_or(0);
            let record = FutureRecord::to(&self.topic)
                .payload(&body)
                .key(&key)
                .partition(partition)
                .headers(OwnedHeaders::new().insert(Header {
                    key: MESSAGE_ID_HEADER,
                    value: Some(&id),
                }));
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| format!("produce: {e}"))?;
            pending.push(delivery);
            if pending.len() >= 1000 || i + 1 == n {
                for d in pending.drain(..) {
                    tokio::time::timeout(Duration::from_secs(30), d)
                        .await
                        .map_err(|_| "delivery report timed out".to_string())?
                        .map_err(|_| "producer dropped".to_string())?
                        .map_err(|(e, _)| format!("delivery: {e}"))?;
                }
            }
        }
        Ok(())
    }

    fn config(&self, group: &str) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.brokers, group, &self.topic)
            .property("fetch.wait.max.ms", "100")
            .property("heartbeat.interval.ms", "500");
        c.session_timeout = Duration::from_secs(6);
        if let Some(b) = std::env::var("BENCH_KAFKA_BUFFER")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            c.buffer = b;
        }
        c
    }

    /// The sum of the group's committed offsets over all partitions.
    async fn committed(&self, group: &str) -> Result<i64, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .create()
            .map_err(kerr("consumer"))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| format!("committed: {e}"))?
        .map_err(kerr("committed"))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }
}

async fn raw(
    cluster: &Cluster,
    group: &str,
    progress: Arc<Progress>,
    tuned: bool,
) -> Result<LoopEnd, String> {
    let mut cc = cluster.config(group).consumer_config();
    if tuned {
        cc.set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "true");
    }
    let consumer: StreamConsumer = cc.create().map_err(kerr("consumer"))?;
    consumer
        .subscribe(&[cluster.topic.as_str()])
        .map_err(kerr("subscribe"))?;
    let mut commits = 0u64;
    while !progress.is_done() {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .map_err(|_| format!("no record for 20 s after {}", progress.handled()))?
            .map_err(kerr("recv"))?;
        progress
            .process(m.payload().unwrap_or_default(), false)
            .map_err(|e| e.to_string())?;
        if !tuned {
            consumer
                .commit_message(&m, CommitMode::Async)
                .map_err(kerr("commit"))?;
            commits += 1;
        }
    }
    // Closing (leave the group, final commits) counts, as the consumer's shutdown does.
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .map_err(|e| format!("close: {e}"))?;
    Ok(LoopEnd {
        end: Instant::now(),
        counts: Counts {
            calls: (!tuned).then_some(commits),
            ..Counts::default()
        },
    })
}

async fn adapter(
    cluster: &Cluster,
    group: &str,
    progress: Arc<Progress>,
    full: bool,
    dedup: Dedup,
) -> Result<LoopEnd, String> {
    let config = cluster.config(group);
    let source = KafkaSource::new(&config).map_err(|e| format!("KafkaSource: {e}"))?;
    let stats = source.stats();
    let consumer_config = if full {
        full_config(CONCURRENCY, 64)
    } else {
        bare_config(CONCURRENCY, 64)
    };
    let end = run_ackstack(source, consumer_config, dedup, &progress, false).await?;
    Ok(LoopEnd {
        end,
        counts: Counts {
            calls: Some(stats.commits()),
            ..Counts::default()
        },
    })
}

async fn one(
    cluster: &Cluster,
    kind: Loop,
    n: u64,
    opts: &Options,
    stores: &Stores,
) -> Result<Sample, String> {
    let group = unique("bench-group");
    let store = LoopStore::open(kind, stores, CONCURRENCY).await?;
    let dedup = store.dedup();
    let progress = Progress::new(n);
    let p = progress.clone();
    let g = group.clone();
    let mut sample = measure(&progress, budget(n, opts.timeout_secs), async move {
        match kind {
            Loop::RawNaive => raw(cluster, &g, p, false).await,
            Loop::RawTuned => raw(cluster, &g, p, true).await,
            Loop::Bare | Loop::Batches | Loop::Serial(_) => {
                adapter(cluster, &g, p, false, dedup).await
            }
            Loop::Full(_) => adapter(cluster, &g, p, true, dedup).await,
        }
    })
    .await;
    store.finish(&mut sample).await;
    let sample = sample?;
    if !matches!(kind, Loop::RawNaive | Loop::RawTuned) {
        let committed = cluster.committed(&group).await?;
        if committed != n as i64 {
            return Err(format!(
                "committed offsets sum to {committed}, expected {n}"
            ));
        }
    }
    Ok(sample)
}

/// The Kafka rows, rounds interleaved.
pub async fn run(opts: &Options, stores: &Stores) -> Result<Vec<Series>, String> {
    let n = opts.messages.unwrap_or(10_000);
    let cluster = Cluster::start(n).await?;
    let where_ = if cluster._mock.is_some() {
        "mock cluster"
    } else {
        "KAFKA_BROKERS"
    };
    let what = "offset commit calls (fetches are librdkafka's own and not counted; – where the client or adapter does not expose a count)";
    let mut loops = vec![
        (
            Loop::RawNaive,
            Series::new(
                "kafka",
                "raw naive",
                Role::RawNaive,
                what,
                n,
                format!(
                    "rdkafka StreamConsumer ({where_}, {} partitions), decode, async commit per message",
                    cluster.partitions
                ),
            ),
        ),
        (
            Loop::RawTuned,
            Series::new(
                "kafka",
                "raw tuned",
                Role::RawTuned,
                what,
                n,
                "rdkafka StreamConsumer, decode, enable.auto.commit (at-most-once ceiling)",
            ),
        ),
        (
            Loop::Bare,
            Series::new(
                "kafka",
                "ackstack adapter",
                Role::Ackstack,
                what,
                n,
                format!(
                    "KafkaSource + Consumer defaults (concurrency {CONCURRENCY}, watermark commits every 1000 acks or 1 s), decode; no dedup"
                ),
            ),
        ),
        (
            Loop::Full(Store::Memory),
            Series::new(
                "kafka",
                "ackstack full",
                Role::Ackstack,
                what,
                n,
                "all layers (in-place retry/dead-letter, batch ack, lease keeper if the adapter reports a lease) + dedup in MemoryDedupStore",
            ),
        ),
    ];
    loops.extend(store_rows("kafka", what, n, stores, false));
    let cluster = &cluster;
    Ok(interleave(opts, "kafka", loops, |kind| {
        one(cluster, kind, n, opts, stores)
    })
    .await)
}
