//! The command line: subcommands, flags, environment fallbacks and the config file.

use std::path::PathBuf;
use std::time::Duration;

use ackstack_core::ErrorKind;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::letter::{Filter, parse_time};
use crate::run::CliError;

const AFTER_HELP: &str = "\
EXAMPLES:
    ackstack dlq list --broker rabbitmq --queue orders
    ackstack dlq list --broker sqs --queue orders --error-kind permanent --since 2h --json
    ackstack dlq show --broker rabbitmq --queue orders A-1001
    ackstack dlq replay --broker rabbitmq --queue orders --grep 'payment provider' --dry-run
    ackstack dlq replay --broker sqs --queue orders --rate 50
    ackstack dlq list --broker nats --queue orders
    ackstack dlq replay --broker redis-streams --queue orders --redis-url redis://127.0.0.1:6379
    ackstack dlq purge --broker rabbitmq --queue orders --until 2026-11-01 --yes
    ackstack outbox status --database-url postgres://app@db/app
    ackstack outbox parked --json
    ackstack outbox retry --id 812,813
    ackstack completions bash > /etc/bash_completion.d/ackstack

CONFIGURATION:
    Flags win over environment variables (AMQP_URL, SQS_ENDPOINT and the AWS chain:
    AWS_REGION, AWS_PROFILE, credentials; KAFKA_BROKERS; NATS_URL; REDIS_URL), which win over
    --config FILE, a TOML file with [rabbitmq], [sqs], [kafka], [nats] and [redis_streams]
    tables holding the adapters' own config fields (RabbitConfig, SqsConfig, KafkaConfig,
    NatsConfig, RedisStreamsConfig). Credentials are never printed.

EXIT CODES:
    0 done, 1 broker error, 2 bad arguments, 3 some selected messages were skipped (the loop
    guard, or no original queue known) or some letters were out of reach (SQS hands out no
    letter another reader holds, and a FIFO queue nothing more of a message group behind a
    letter the scan keeps), or the run stopped at a letter whose removal cannot be recorded
    (Kafka: too many letters removed past a kept one for the commit's metadata).";

/// ackstack: dead-letter tooling for RabbitMQ, Amazon SQS, Kafka, NATS JetStream and Redis
/// Streams.
#[derive(Parser, Debug)]
#[command(
    name = "ackstack",
    version,
    about = "ackstack: list, inspect, replay and purge the dead letters ackstack consumers wrote.",
    after_help = AFTER_HELP,
    max_term_width = 100
)]
pub struct Cli {
    /// A TOML file with [rabbitmq], [sqs], [kafka], [nats] and [redis_streams] tables (the
    /// adapters' config fields)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Dead letters: list, show, replay, purge
    #[command(subcommand)]
    Dlq(Box<Dlq>),
    /// The PostgreSQL transactional outbox: status, parked rows, retry
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Prints a shell completion script
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// Where the outbox is.
#[derive(Args, Debug, Clone)]
pub struct OutboxTarget {
    /// The database (`postgres://...`; `sslmode` and `sslrootcert` are honoured)
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,
    /// The outbox table, optionally schema-qualified
    #[arg(long, default_value = "ackstack_outbox", value_name = "TABLE")]
    pub table: String,
}

/// `ackstack outbox ...`
#[derive(Subcommand, Debug)]
pub enum OutboxCommand {
    /// Rows pending, the oldest pending row's age, rows parked
    Status {
        #[command(flatten)]
        target: OutboxTarget,
        /// One JSON object instead of the line
        #[arg(long)]
        json: bool,
    },
    /// The parked rows (refused for good by the broker, or past the relay's attempt limit)
    Parked {
        #[command(flatten)]
        target: OutboxTarget,
        /// At most this many rows, oldest first
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Puts parked rows back in line for the relays (attempts reset)
    Retry {
        #[command(flatten)]
        target: OutboxTarget,
        /// The row ids to retry (as `parked` lists them); repeat or separate with commas
        #[arg(
            long = "id",
            value_delimiter = ',',
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<i64>,
        /// Every parked row
        #[arg(long)]
        all: bool,
    },
}

/// `ackstack dlq ...`
#[derive(Subcommand, Debug)]
pub enum Dlq {
    /// A table of the dead letters of a queue (nothing is removed)
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Dead letters grouped by cause (error kind and normalised message): count, first and
    /// last seen, a sample; replay or purge a group with --group FP
    Groups {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of the table
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: payload (text, or hex when binary), original headers, metadata
    Show {
        #[command(flatten)]
        target: Target,
        /// The message id (as `list` shows it)
        id: String,
        /// The payload alone, byte for byte, to stdout
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        /// As JSON
        #[arg(long)]
        json: bool,
    },
    /// Sends dead letters back to their original queue (or --to), then removes them
    Replay {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// Send to this queue (Kafka: topic) instead of each letter's original one
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
        /// Skip letters already replayed this many times
        #[arg(long, value_name = "N", default_value = "3")]
        max_replays: u32,
        /// Replay letters past --max-replays too
        #[arg(long)]
        force: bool,
        /// Print what would be sent; send and remove nothing
        #[arg(long)]
        dry_run: bool,
        /// At most N letters per second (e.g. 50 or 50/s)
        #[arg(long, value_name = "N/s", value_parser = rate)]
        rate: Option<f64>,
    },
    /// Removes dead letters for good
    Purge {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        filter: FilterArgs,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
}

/// Which broker and queue.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// rabbitmq | sqs | kafka | nats | redis-streams
    #[arg(long, value_enum, value_name = "NAME")]
    pub broker: Option<Broker>,
    /// The work queue (Kafka: topic; NATS, Redis: stream) whose dead letters to read: NAME-dlq
    /// unless --dlq says
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// The dead-letter queue (Kafka: topic), when not the queue's default
    #[arg(long, value_name = "NAME")]
    pub dlq: Option<String>,
    /// RabbitMQ [env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// SQS endpoint override, for an emulator or a VPC endpoint [env SQS_ENDPOINT]
    #[arg(long, value_name = "URL")]
    pub sqs_endpoint: Option<String>,
    /// AWS region [env AWS_REGION, the aws-config chain]
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Kafka bootstrap servers [env KAFKA_BROKERS]
    #[arg(long, value_name = "LIST")]
    pub kafka_brokers: Option<String>,
    /// NATS [env NATS_URL; default nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Redis holding the streams [env REDIS_URL; default redis://127.0.0.1:6379]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// How long one broker call may take (at most a day)
    #[arg(long, value_name = "SECS", default_value = "10")]
    pub timeout_secs: u64,
    /// SQS: how long letters stay invisible to other readers during a scan at most
    #[arg(long, value_name = "SECS", default_value = "120")]
    pub visibility_secs: u64,
}

/// The filters every subcommand but `show` takes.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only transient or permanent failures
    #[arg(long, value_enum, value_name = "KIND")]
    pub error_kind: Option<Kind>,
    /// Only letters that last failed at or after TIME (RFC 3339 like 2026-12-02T18:00:00Z or
    /// 2026-12-02T19:00:00+01:00, UTC when it has no offset; a date like 2026-12-02; or an age
    /// like 2h)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<u64>,
    /// Only letters that last failed before TIME
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<u64>,
    /// Only the letter with this message id
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// Only letters whose error message contains TEXT
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only letters of the failure group FP (as `groups` shows it)
    #[arg(long, value_name = "FP")]
    pub group: Option<String>,
    /// At most N letters
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

impl FilterArgs {
    /// The filter these flags describe.
    pub fn filter(&self) -> Filter {
        Filter {
            error_kind: self.error_kind.map(|k| match k {
                Kind::Transient => ErrorKind::Transient,
                Kind::Permanent => ErrorKind::Permanent,
            }),
            since_ms: self.since,
            until_ms: self.until,
            message_id: self.message_id.clone(),
            grep: self.grep.clone(),
            group: self.group.clone(),
            limit: self.limit,
        }
    }
}

/// A broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Broker {
    /// RabbitMQ
    Rabbitmq,
    /// Amazon SQS
    Sqs,
    /// Apache Kafka
    Kafka,
    /// NATS JetStream
    Nats,
    /// Redis Streams
    RedisStreams,
}

/// An error kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Retried until the attempts ran out
    Transient,
    /// Dead-lettered at once
    Permanent,
}

/// The longest `--timeout-secs` taken: a day.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// The slowest rate taken: one letter a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;

fn rate(text: &str) -> Result<f64, String> {
    let n = text.trim().trim_end_matches("/s");
    match n.parse::<f64>() {
        Ok(r) if r >= MIN_RATE && r.is_finite() => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate like 50 or 50/s (at least one letter a day)"
        )),
    }
}

/// The config file: each table holds the adapter's own config fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// RabbitMQ's config (`uri`, `queue`, `dlq`, ...).
    pub rabbitmq: Option<ackstack_rabbitmq::RabbitConfig>,
    /// SQS's config (`queue_name`, `dead_letter_queue`, `endpoint`, `region`, ...).
    pub sqs: Option<ackstack_sqs::SqsConfig>,
    /// Kafka's config (`brokers`, `group_id`, `topic`, `dlq_topic`, ...).
    pub kafka: Option<ackstack_kafka::KafkaConfig>,
    /// NATS's config (`url`, `stream`, `dlq_stream`, ...).
    pub nats: Option<ackstack_nats::NatsConfig>,
    /// Redis Streams' config (`url`, `stream`, `dlq_stream`, ...).
    pub redis_streams: Option<ackstack_redis_streams::RedisStreamsConfig>,
}

impl FileConfig {
    /// Reads `path` (nothing when `None`).
    pub fn load(path: Option<&PathBuf>) -> Result<Self, CliError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))?;
        FileConfig::parse(&text)
            .map_err(|e| CliError::Usage(format!("--config {}: {e}", path.display())))
    }

    /// Parses a config file's text. The error names the line and what is wrong, never the
    /// line's text: it may hold a password.
    fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .and_then(|span| text.get(..span.start))
                .map(|before| before.matches('\n').count() + 1);
            match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            }
        })
    }
}

/// Where to connect and what to read, once flags, environment and file are combined.
#[derive(Clone)]
pub struct Resolved {
    /// The broker.
    pub broker: Broker,
    /// The dead-letter queue to read.
    pub dlq: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// SQS settings.
    pub sqs: ackstack_sqs::SqsConfig,
    /// Kafka bootstrap servers.
    pub kafka_brokers: Option<String>,
    /// librdkafka properties of the file's `[kafka]` table (TLS, SASL).
    pub kafka_properties: std::collections::BTreeMap<String, String>,
    /// NATS URL.
    pub nats_url: String,
    /// Redis URL of the streams.
    pub redis_url: String,
    /// The field that carries a stream entry's payload (`[redis_streams] payload_field`).
    pub payload_field: String,
    /// Per-call timeout.
    pub timeout: Duration,
    /// SQS scan visibility.
    pub visibility: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Target {
    /// Combines the flags with the environment and the config file.
    pub fn resolve(&self, file: &FileConfig) -> Result<Resolved, CliError> {
        let broker = match self.broker {
            Some(b) => b,
            None => {
                let given: Vec<Broker> = [
                    (file.rabbitmq.is_some(), Broker::Rabbitmq),
                    (file.sqs.is_some(), Broker::Sqs),
                    (file.kafka.is_some(), Broker::Kafka),
                    (file.nats.is_some(), Broker::Nats),
                    (file.redis_streams.is_some(), Broker::RedisStreams),
                ]
                .into_iter()
                .filter_map(|(on, b)| on.then_some(b))
                .collect();
                match given[..] {
                    [one] => one,
                    _ => {
                        return Err(CliError::Usage(
                            "--broker rabbitmq|sqs|kafka|nats|redis-streams is required".into(),
                        ));
                    }
                }
            }
        };
        let mut sqs = file.sqs.clone().unwrap_or_default();
        let (file_queue, file_dlq) = match broker {
            Broker::Rabbitmq => match &file.rabbitmq {
                Some(c) => (Some(c.queue.clone()), Some(c.dlq_name())),
                None => (None, None),
            },
            Broker::Sqs => (sqs.queue_name.clone(), sqs.dead_letter_queue.clone()),
            Broker::Kafka => match &file.kafka {
                Some(c) => (Some(c.topic.clone()), Some(c.dlq_topic())),
                None => (None, None),
            },
            Broker::Nats => match &file.nats {
                Some(c) => (Some(c.stream.clone()), Some(c.dlq_stream())),
                None => (None, None),
            },
            Broker::RedisStreams => match &file.redis_streams {
                Some(c) => (Some(c.stream.clone()), Some(c.dlq_stream())),
                None => (None, None),
            },
        };
        // The file's dead-letter queue belongs to the file's queue.
        let file_dlq = file_dlq.filter(|_| self.queue.is_none() || self.queue == file_queue);
        let queue = self.queue.clone().or(file_queue);
        let dlq = match (self.dlq.clone().or(file_dlq), &queue) {
            (Some(dlq), _) => dlq,
            (None, Some(q)) => default_dlq(broker, q),
            (None, None) => {
                return Err(CliError::Usage(
                    "--queue NAME (or --dlq NAME) is required".into(),
                ));
            }
        };
        if let Some(e) = self.sqs_endpoint.clone().or_else(|| env("SQS_ENDPOINT")) {
            sqs.endpoint = Some(e);
        }
        if let Some(r) = self.region.clone() {
            sqs.region = Some(r);
        }
        Ok(Resolved {
            broker,
            dlq,
            amqp_url: self
                .amqp_url
                .clone()
                .or_else(|| env("AMQP_URL"))
                .or_else(|| file.rabbitmq.as_ref().map(|c| c.uri.clone()))
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            sqs,
            kafka_brokers: self
                .kafka_brokers
                .clone()
                .or_else(|| env("KAFKA_BROKERS"))
                .or_else(|| file.kafka.as_ref().map(|c| c.brokers.clone())),
            kafka_properties: file
                .kafka
                .as_ref()
                .map(|c| c.properties.clone())
                .unwrap_or_default(),
            nats_url: self
                .nats_url
                .clone()
                .or_else(|| env("NATS_URL"))
                .or_else(|| file.nats.as_ref().map(|c| c.url.clone()))
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            redis_url: self
                .redis_url
                .clone()
                .or_else(|| env("REDIS_URL"))
                .or_else(|| file.redis_streams.as_ref().map(|c| c.url.clone()))
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            payload_field: file.redis_streams.as_ref().map_or_else(
                || ackstack_redis_streams::PAYLOAD_FIELD.to_string(),
                |c| c.payload_field.clone(),
            ),
            timeout: Duration::from_secs(self.timeout_secs.clamp(1, MAX_TIMEOUT_SECS)),
            visibility: Duration::from_secs(self.visibility_secs.clamp(1, 43_200)),
        })
    }
}

/// The dead-letter queue ackstack's adapters use by default for `queue`.
fn default_dlq(broker: Broker, queue: &str) -> String {
    match (broker, queue.strip_suffix(".fifo")) {
        (Broker::Sqs, Some(base)) => format!("{base}-dlq.fifo"),
        _ => format!("{queue}-dlq"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_commands_of_the_docs_parse() {
        let page = include_str!("../../../docs/OPERATIONS.md");
        let commands: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("ackstack outbox "))
            .map(|l| l.split(" #").next().unwrap_or(l).trim())
            .collect();
        assert_eq!(commands.len(), 3, "{commands:?}");
        for command in commands {
            let parsed = Cli::try_parse_from(command.split_whitespace());
            assert!(
                matches!(
                    &parsed,
                    Ok(Cli {
                        command: Command::Outbox(_),
                        ..
                    })
                ),
                "{command}: {parsed:?}"
            );
        }
    }

    #[test]
    fn a_bad_config_file_is_reported_without_its_text() {
        let text = "[rabbitmq]\nuri = amqp://guest:s3cret@127.0.0.1:5672\n";
        let error = FileConfig::parse(text).unwrap_err();
        assert!(error.starts_with("line 2: "), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn rates_are_positive_and_not_absurdly_slow() {
        assert_eq!(rate("50/s"), Ok(50.0));
        assert_eq!(rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "1e-30", "NaN", "inf", "fast"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
    }
}
