//! `ackstack-bench`: ackstack against raw client loops, per broker, in one run.
//!
//! The method is `shared/BENCHMARKING.md`: per broker, the same queue contents (256-byte JSON
//! payloads), the same decode (a `serde_json` parse) and the same point of acknowledgement; the
//! raw client loops (naive and hand-tuned), ackstack's consumer with no layers, and all layers
//! (in-memory dedup, then Redis dedup as its own row) run interleaved for several rounds, and
//! every ratio is median over median from the same run.
//!
//! ```text
//! cargo run --release -p ackstack-bench -- [--brokers memory,rabbitmq,sqs,kafka,nats,redis-streams]
//!     [--messages N] [--rounds R] [--json PATH] [--check] [--timeout-secs S] [--concurrency N (in-memory rows)]
//! cargo run --release -p ackstack-bench -- --rss-scaling
//! valgrind --tool=callgrind target/release/ackstack-bench --callgrind publish|bare|serial|full|redis|tower --messages N
//! ```
//!
//! Brokers: RabbitMQ at `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), SQS at
//! `SQS_ENDPOINT` (default the moto server at `http://127.0.0.1:4566`), Kafka on an in-process
//! librdkafka mock cluster unless `KAFKA_BROKERS` is set, Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), PostgreSQL at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, for the inbox rows). A broker that does not answer is skipped with a note.
//!
//! Heap allocations are counted by a counting global allocator over the whole process while a
//! loop runs (client threads included); peak RSS is `VmHWM`, reset before each loop.

mod check;
mod common;
mod driver;
mod kafka;
mod memory;
mod nats;
mod rabbit;
mod redis_streams;
mod report;
mod sqs;

use std::alloc::System;
use std::time::Duration;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

use crate::report::{Row, Series};

/// The counting allocator: every heap allocation of the process goes through it.
#[global_allocator]
pub static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Command-line options.
#[derive(Clone, Debug)]
pub struct Options {
    brokers: Vec<String>,
    /// Messages per round for every broker (default: per broker).
    pub messages: Option<u64>,
    /// Rounds of interleaved loops.
    pub rounds: usize,
    json: Option<String>,
    check: bool,
    /// Time budget of one loop, overriding the default.
    pub timeout_secs: Option<u64>,
    rss_scaling: bool,
    rss_child: Option<u64>,
    callgrind: Option<String>,
    /// Installs this metrics recorder first (`prometheus`), to count what recording costs.
    recorder: Option<String>,
    /// Handlers at once in the in-memory rows (default 64).
    pub concurrency: Option<usize>,
}

const USAGE: &str = "usage: ackstack-bench [--brokers memory,rabbitmq,sqs,kafka,nats,redis-streams] [--messages N] [--rounds R] [--json PATH] [--check] [--timeout-secs S]
       ackstack-bench --rss-scaling
       ackstack-bench --callgrind publish|bare|serial|full|redis|tower [--messages N] [--recorder prometheus]";

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        brokers: vec![
            "memory".into(),
            "rabbitmq".into(),
            "sqs".into(),
            "kafka".into(),
            "nats".into(),
            "redis-streams".into(),
        ],
        messages: None,
        rounds: 5,
        json: None,
        check: false,
        timeout_secs: None,
        concurrency: None,
        rss_scaling: false,
        rss_child: None,
        callgrind: None,
        recorder: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--brokers" => {
                opts.brokers = value("--brokers")?
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect();
                for b in &opts.brokers {
                    if ![
                        "memory",
                        "rabbitmq",
                        "sqs",
                        "kafka",
                        "nats",
                        "redis-streams",
                    ]
                    .contains(&b.as_str())
                    {
                        return Err(format!("unknown broker {b:?}"));
                    }
                }
            }
            "--messages" => opts.messages = Some(number(&value("--messages")?)?),
            "--rounds" => {
                opts.rounds = usize::try_from(number(&value("--rounds")?)?.max(1)).unwrap_or(5)
            }
            "--json" => opts.json = Some(value("--json")?),
            "--concurrency" => {
                opts.concurrency =
                    Some(usize::try_from(number(&value("--concurrency")?)?.max(1)).unwrap_or(64))
            }
            "--timeout-secs" => opts.timeout_secs = Some(number(&value("--timeout-secs")?)?),
            "--rss-scaling" => opts.rss_scaling = true,
            "--check" => opts.check = true,
            "--rss-child" => opts.rss_child = Some(number(&value("--rss-child")?)?),
            "--callgrind" => opts.callgrind = Some(value("--callgrind")?),
            "--recorder" => opts.recorder = Some(value("--recorder")?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if opts.messages == Some(0) {
        return Err("--messages must be at least 1".into());
    }
    Ok(opts)
}

fn number(s: &str) -> Result<u64, String> {
    s.replace('_', "")
        .parse()
        .map_err(|_| format!("not a number: {s:?}"))
}

/// A store the dedup rows use (Redis, PostgreSQL), and whether it answered.
#[derive(Clone, Debug)]
pub struct Target {
    name: &'static str,
    url: String,
    down: Option<String>,
}

impl Target {
    /// The store at `$env` (or `default`), probed with a TCP connect.
    fn probe(name: &'static str, env: &str, default: &str, port: u16) -> Self {
        let url = std::env::var(env).unwrap_or_else(|_| default.to_string());
        let down = match common::host_port(&url, port) {
            Some(hp) => common::tcp_reachable(&hp).err(),
            None => Some(format!("cannot parse {env} {url:?}")),
        };
        Target { name, url, down }
    }

    /// Whether its rows can run.
    pub fn available(&self) -> bool {
        self.down.is_none()
    }

    /// The URL, or why the store is unusable.
    pub fn usable(&self) -> Result<String, String> {
        match &self.down {
            None => Ok(self.url.clone()),
            Some(e) => Err(format!("{} unavailable: {e}", self.name)),
        }
    }
}

/// The stores of the dedup rows: Redis (`REDIS_URL`) and PostgreSQL (`DATABASE_URL`).
#[derive(Clone, Debug)]
pub struct Stores {
    /// Redis, for the Redis-dedup rows.
    pub redis: Target,
    /// PostgreSQL, for the transactional-inbox rows.
    pub postgres: Target,
}

impl Stores {
    fn probe() -> Self {
        Stores {
            redis: Target::probe("Redis", "REDIS_URL", "redis://127.0.0.1:6379", 6379),
            postgres: Target::probe(
                "PostgreSQL",
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/test",
                5432,
            ),
        }
    }
}

/// Cores, CPU model, date.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cores} cores, {cpu}")
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    time::OffsetDateTime::now_utc().date().to_string()
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))
}

fn main() {
    if std::env::var("RUST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let code = match real_main() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ackstack-bench: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main() -> Result<(), String> {
    let opts = parse_args()?;
    match opts.recorder.as_deref() {
        None => {}
        Some("prometheus") => {
            let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            for (name, buckets) in ackstack_core::metrics::HISTOGRAM_BUCKETS {
                builder = builder
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(name.to_string()),
                        buckets,
                    )
                    .map_err(|e| e.to_string())?;
            }
            let recorder = builder.build_recorder();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        }
        Some(other) => return Err(format!("unknown --recorder {other} (prometheus)")),
    }
    let rt = runtime()?;
    if let Some(mode) = &opts.callgrind {
        let n = opts.messages.unwrap_or(10_000);
        let line = rt.block_on(memory::callgrind(mode, n))?;
        println!("{line}");
        return Ok(());
    }
    if let Some(n) = opts.rss_child {
        let line = rt.block_on(memory::rss_child(n))?;
        println!("{line}");
        return Ok(());
    }
    if opts.rss_scaling {
        drop(rt);
        return rss_scaling();
    }
    let stores = Stores::probe();
    let mut rows: Vec<Row> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for (target, rows) in [
        (&stores.redis, "Redis dedup"),
        (&stores.postgres, "PostgreSQL inbox"),
    ] {
        if let Err(e) = target.usable() {
            skipped.push(format!("{rows} rows skipped: {e}"));
        }
    }
    let started = std::time::Instant::now();
    for broker in &opts.brokers {
        eprintln!("== {broker}");
        let series: Result<Vec<Series>, String> = match broker.as_str() {
            "memory" => Ok(rt.block_on(memory::run(&opts, &stores))),
            "rabbitmq" => rt.block_on(rabbit::run(&opts, &stores)),
            "sqs" => rt.block_on(sqs::run(&opts, &stores)),
            "kafka" => rt.block_on(kafka::run(&opts, &stores)),
            "nats" => rt.block_on(nats::run(&opts, &stores)),
            "redis-streams" => rt.block_on(redis_streams::run(&opts, &stores)),
            _ => Err(format!("unknown broker {broker}")),
        };
        match series {
            Ok(series) => rows.extend(report::rows(&series)),
            Err(e) => {
                eprintln!("{broker} skipped: {e}");
                skipped.push(format!("{broker} skipped: {e}"));
            }
        }
    }
    // Let client threads wind down before the runtime goes.
    rt.shutdown_timeout(Duration::from_secs(5));

    let mut out = String::new();
    out.push_str(&format!(
        "ackstack-bench, {} — {}; {} rounds interleaved; {:.0} s in all\n\n",
        today(),
        machine(),
        opts.rounds,
        started.elapsed().as_secs_f64()
    ));
    out.push_str(&report::markdown(&rows));
    out.push('\n');
    out.push_str(&report::notes(&rows));
    for s in &skipped {
        out.push_str(&format!("- {s}\n"));
    }
    out.push_str("- ratios are median over median; \"indistinguishable\" means the [worst, best] spreads overlap\n");
    out.push_str("- msg/s runs from the first message handled to the loop's end (last ack, or the consumer's return after its shutdown flush)\n");
    out.push_str("- allocs/msg: whole process (client threads included) during the loop, over messages; peak RSS: VmHWM reset before each loop, highest over rounds, process-wide (it carries heap retained from earlier loops and, for Kafka, the in-process mock cluster's log), so bounded state is shown by --rss-scaling instead\n");
    let checked = check::check(&rows, &opts.brokers);
    out.push('\n');
    out.push_str(&check::report(&checked));
    println!("{out}");

    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "date": today(),
            "machine": machine(),
            "rounds": opts.rounds,
            "rows": rows,
            "targets": checked,
            "skipped": skipped,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    let missed: Vec<&str> = checked
        .iter()
        .filter(|c| !c.met)
        .map(|c| c.target.as_str())
        .collect();
    if opts.check && !missed.is_empty() {
        return Err(format!(
            "{} target(s) missed: {}",
            missed.len(),
            missed.join("; ")
        ));
    }
    Ok(())
}

/// Runs 10^4, 10^5 and 10^6 messages through all layers, each in a child process, and prints
/// each child's peak RSS.
fn rss_scaling() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    println!(
        "Peak RSS with all layers on the in-memory broker ({}; {}), published while consumed \
         (backlog ≤ 6,000), MemoryDedupStore capacity 10,000, 1 s lease (the broker's visibility heap and the lease keeper's schedule hold an entry per delivery until its lease time, so they are bounded by throughput × lease):\n",
        today(),
        machine()
    );
    println!("| messages | peak RSS (VmHWM) MiB | RSS at end MiB | dedup keys held | seconds |");
    println!("|---|---|---|---|---|");
    for n in [10_000u64, 100_000, 1_000_000] {
        let out = std::process::Command::new(&exe)
            .arg("--rss-child")
            .arg(n.to_string())
            .output()
            .map_err(|e| format!("cannot run child: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            println!(
                "| {n} | failed: {} | | | |",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        }
        let field = |name: &str| -> String {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .unwrap_or("?")
                .to_string()
        };
        let mib = |kib: String| {
            kib.parse::<f64>()
                .map_or("?".to_string(), |k| format!("{:.1}", k / 1024.0))
        };
        println!(
            "| {n} | {} | {} | {} | {} |",
            mib(field("vmhwm_kib=")),
            mib(field("vmrss_kib=")),
            field("dedup_keys="),
            field("secs=")
        );
    }
    Ok(())
}
