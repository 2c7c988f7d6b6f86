//! docs/DLQ.md's worked example of `ackstack dlq`, step by step: the order example dead-letters
//! A-1004 (too few attempts), `ackstack dlq list` shows it, `ackstack dlq replay` sends it
//! back, and a consume-only run charges it once.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`), and the `ackstack` binary, which
//! `cargo test --workspace` builds beside `orders` (crate ackstack-cli).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ackstack_testkit::unique_name;

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to its end (killing it after two minutes).
fn run(mut cmd: Command) -> Ran {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn ackstack_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_orders")).with_file_name("ackstack");
    assert!(
        path.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build it",
        path.display()
    );
    path
}

fn ackstack(args: &[&str]) -> Ran {
    let mut cmd = Command::new(ackstack_binary());
    cmd.args(args);
    if let Ok(url) = std::env::var("AMQP_URL") {
        cmd.args(["--amqp-url", &url]);
    }
    run(cmd)
}

#[test]
fn a_dead_lettered_order_is_replayed_after_the_fix_and_charged_once() {
    let queue = unique_name("shop");
    let first = run(common::orders_command(&[
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--max-attempts",
        "2",
    ]));
    assert_eq!(first.code, Some(0), "{first:?}");
    assert!(
        first
            .stdout
            .contains("dead_lettered order_id=A-1004 attempt=2"),
        "{first:?}"
    );

    let listed = ackstack(&["dlq", "list", "--broker", "rabbitmq", "--queue", &queue]);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert!(listed.stdout.starts_with("MESSAGE ID"), "{listed:?}");
    assert_eq!(
        listed.stdout.lines().count(),
        3,
        "two dead letters: {listed:?}"
    );
    assert!(listed.stdout.contains("payment provider"), "{listed:?}");

    let replayed = ackstack(&[
        "dlq",
        "replay",
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--grep",
        "payment provider",
    ]);
    assert_eq!(replayed.code, Some(0), "{replayed:?}");
    assert!(
        replayed.stdout.contains("replayed 1 dead letter"),
        "{replayed:?}"
    );

    let second = run(common::orders_command(&[
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--consume-only",
        "--exit-when-idle",
        "3",
    ]));
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(
        second.stdout.contains("acked order_id=A-1004 attempt=3"),
        "{second:?}"
    );
    assert!(
        second.stdout.contains("ledger order_id=A-1004 count=1"),
        "charged once: {second:?}"
    );

    // The malformed body is still there; purge it.
    let purged = ackstack(&[
        "dlq",
        "purge",
        "--broker",
        "rabbitmq",
        "--queue",
        &queue,
        "--error-kind",
        "permanent",
        "--yes",
    ]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    assert!(purged.stdout.contains("purged 1"), "{purged:?}");
}
