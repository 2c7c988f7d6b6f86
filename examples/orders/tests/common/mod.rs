//! Shared test setup: settings from the environment and the example's PostgreSQL ledger.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ackstack::postgres::tokio_postgres::Client;

/// The `orders` binary with `args`, its output piped, and none of the variables that would
/// change what it connects to (`REDIS_URL`, `KAFKA_BROKERS`, `DATABASE_URL`) nor `RUST_LOG`.
pub fn orders_command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_orders"));
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("KAFKA_BROKERS")
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// The variable `name`, or `default` when it is unset or blank.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// `DATABASE_URL`, default the local test database.
pub fn database_url() -> String {
    env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
}

/// The example's PostgreSQL ledger of `queue`: `order_id -> count`.
pub async fn pg_charges(client: &Client, queue: &str) -> BTreeMap<String, u64> {
    let rows = client
        .query(
            "SELECT order_id, count FROM ackstack_example_charges WHERE queue = $1",
            &[&queue],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let count: i32 = r.get(1);
            (r.get::<_, String>(0), u64::try_from(count).unwrap())
        })
        .collect()
}

/// SplitMix64: small, seedable, good enough to pick kill points and shuffle a plan.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// How long one `rabbitmqctl` call may take before the test fails.
pub const RABBITMQCTL_LIMIT: Duration = Duration::from_secs(30);

/// Runs `rabbitmqctl args` and returns its standard output; fails the test when it fails or
/// takes longer than [`RABBITMQCTL_LIMIT`] (the child is killed then).
pub fn rabbitmqctl(args: &[&str]) -> String {
    let mut child = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("this test needs rabbitmqctl on the PATH");
    // Read both pipes on threads: a long listing would fill a pipe and stall the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        text
    });
    let deadline = Instant::now() + RABBITMQCTL_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rabbitmqctl {args:?}: no answer within {RABBITMQCTL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        status.success(),
        "rabbitmqctl {args:?} failed ({status}): {err}"
    );
    out
}

/// Closes every RabbitMQ connection of the example on `queue` (its consumer and its
/// publisher, named `example-orders-<queue>-*`) with `rabbitmqctl close_connection`, waiting
/// up to 20 s for one to exist. Returns how many were closed.
pub fn close_rabbit_connections(queue: &str) -> usize {
    // The `name` column is the peer address; the name the client gave is the
    // `connection_name` of its client properties.
    let prefix = format!("example-orders-{queue}-");
    let needle = format!("{{\"connection_name\",\"{prefix}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = rabbitmqctl(&[
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ]);
        let pids: Vec<String> = listing
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(_, properties)| properties.contains(&needle))
            .map(|(pid, _)| pid.trim().to_string())
            .collect();
        if !pids.is_empty() {
            for pid in &pids {
                rabbitmqctl(&["close_connection", pid, "a crash test drops it"]);
            }
            return pids.len();
        }
        assert!(
            Instant::now() < deadline,
            "no RabbitMQ connection named {prefix}*: {listing}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
