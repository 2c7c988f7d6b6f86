//! Runs an example's binary the way a user or an orchestrator does, with a time limit, and
//! returns what it printed. Shared by the examples' tests (`#[path]`-included).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use ackstack::Message;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A finished run.
pub struct Run {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Run {
    /// How many stdout lines contain every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> usize {
        self.stdout
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .count()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A running example.
pub struct Running {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

fn reader(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Starts `bin` with `env` added to the environment, its output captured.
pub fn start<K: AsRef<str>, V: AsRef<str>>(bin: &str, env: &[(K, V)]) -> Running {
    let mut child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let stdout = reader(child.stdout.take().unwrap());
    let stderr = reader(child.stderr.take().unwrap());
    Running {
        child,
        stdout,
        stderr,
    }
}

impl Running {
    /// Sends SIGTERM, as an orchestrator stopping the service does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the exit, killing the process (and failing) after `limit`.
    pub fn finish(mut self, limit: Duration) -> Run {
        let deadline = Instant::now() + limit;
        let (code, killed) = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break (status.code(), false);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break (self.child.wait().unwrap().code(), true);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let run = Run {
            code,
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        };
        assert!(!killed, "still running after {limit:?}: {run:?}");
        run
    }
}

/// Runs `bin` to its end.
pub fn run<K: AsRef<str>, V: AsRef<str>>(bin: &str, env: &[(K, V)], limit: Duration) -> Run {
    start(bin, env).finish(limit)
}

/// An order message as the broker examples expect it: JSON, with an `idempotency-key` header
/// (their dedup key) and the order id as the ordering key.
pub fn order(id: &str) -> Message {
    Message::new(format!(r#"{{"order_id":"{id}","amount_cents":1250}}"#))
        .header("idempotency-key", id.to_string())
        .key(id.to_string())
}

/// What the broker examples' tests publish: three orders, a duplicate of one, and a body that
/// is not an order.
pub fn sample_orders() -> Vec<Message> {
    let mut messages: Vec<Message> = ["A-1", "A-2", "A-3", "A-2"]
        .into_iter()
        .map(order)
        .collect();
    messages.push(Message::new("not an order"));
    messages
}

/// A broker example's run over [`sample_orders`] with Redis dedup: exit 0, each order processed
/// once, the duplicate deduplicated, the bad body dead-lettered: three handled successfully.
pub fn assert_sample_orders_handled(run: &Run) {
    assert_eq!(run.code, Some(0), "{run:?}");
    for id in ["A-1", "A-2", "A-3"] {
        let processed = run.lines_with(&["order processed", &format!("order_id={id}")]);
        assert_eq!(processed, 1, "{id}: {run:?}");
    }
    let stopped = [
        "consumer stopped",
        "received=5",
        "succeeded=3",
        "dead_lettered=1",
        "deduplicated=1",
    ];
    assert_eq!(run.lines_with(&stopped), 1, "{run:?}");
}
