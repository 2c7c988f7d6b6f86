//! The `ackstack dlq` scenarios, written once and run on each broker by `rabbitmq.rs`,
//! `sqs.rs` and `kafka.rs`: real dead letters made by a consumer, then the command driven as
//! a script drives it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ackstack_core::deadletter::METADATA_PREFIX;
use ackstack_core::{Headers, Message};
use bytes::Bytes;

/// One broker's side of the scenarios.
pub trait Fixture {
    /// The flags naming the broker, its connection and the work queue.
    fn args(&self) -> Vec<String>;
    /// Environment for the command (credentials for the SQS emulator).
    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Whether payloads may be any bytes (SQS bodies are text).
    fn binary_payloads(&self) -> bool {
        true
    }
    /// An error message as the broker's dead letters carry it (NATS headers write line breaks
    /// as `\r` and `\n`).
    fn shown_error(&self, error: String) -> String {
        error
    }
    /// Publishes `messages` to the work queue and runs a consumer until every one of them is
    /// dead-lettered: a payload starting with `transient` fails transiently (one attempt
    /// allowed), any other permanently, with the error `cannot charge <payload>`.
    /// Dead-lettering is at least once: a copy the broker took but whose confirmation was
    /// lost is sent again, so under load a message can be there twice; scenarios that count
    /// letters count what [`letters_by_error`] finds rather than assume one each.
    fn dead_letter(&self, messages: Vec<Message>) -> impl Future<Output = ()>;
    /// Takes what is on the work queue: up to `expected` messages, waiting a few seconds.
    fn drain_work(&self, expected: usize) -> impl Future<Output = Vec<(Bytes, Headers)>>;
    /// How many dead letters there are (visible to a new reader).
    fn dead_letters(&self) -> impl Future<Output = usize>;
}

/// The scenarios' handler: every message fails, transiently if its payload says so, with
/// [`charge_error`].
pub async fn fail(d: ackstack_core::Delivery) -> Result<(), ackstack_core::HandlerError> {
    let error = charge_error(&d.payload);
    if d.payload.starts_with(b"transient") {
        Err(ackstack_core::HandlerError::transient(error))
    } else {
        Err(ackstack_core::HandlerError::permanent(error))
    }
}

/// Runs a consumer over `source` whose handler fails the payloads of `batch` (see [`fail`])
/// and acks any other (replays drained earlier are on the stream too: the service takes those
/// as fixed), until `fx` counts `want` dead letters; then checks that it does.
pub async fn fail_batch<S: ackstack_core::Source>(
    fx: &impl Fixture,
    source: S,
    batch: std::collections::HashSet<Bytes>,
    want: usize,
) {
    let batch = std::sync::Arc::new(batch);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        ackstack_core::Consumer::new(source)
            .max_attempts(1)
            .concurrency(32)
            .run_until(
                ackstack_core::handler_fn(move |d, _cx| {
                    let ours = batch.contains(&d.payload);
                    async move { if ours { fail(d).await } else { Ok(()) } }
                }),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while fx.dead_letters().await < want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    assert_eq!(fx.dead_letters().await, want);
}

/// The error message the scenarios' handler fails `payload` with.
pub fn charge_error(payload: &[u8]) -> String {
    format!("cannot charge {}", String::from_utf8_lossy(payload))
}

/// The id `list` shows for the letter of `payload` (brokers name letters differently: AMQP
/// message id, SQS `MessageId`, Kafka partition and offset).
pub fn find_id(fx: &impl Fixture, payload: &[u8]) -> String {
    let run = ackstack(fx, &["dlq", "list", "--json"]);
    let want = fx.shown_error(charge_error(payload));
    run.json_lines()
        .iter()
        .find(|l| l["metadata"]["error_message"].as_str() == Some(want.as_str()))
        .and_then(|l| l["id"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no letter for {want:?}: {run:?}"))
}

/// The message id the scenarios give a payload.
pub fn id_for(payload: &[u8]) -> String {
    let hex: String = payload
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("m-{hex}")
}

/// A message with `payload`, its id and a header of its own.
pub fn message(payload: impl Into<Bytes>) -> Message {
    let payload = payload.into();
    Message::new(payload.clone())
        .message_id(id_for(&payload))
        .header("x-tenant", "acme")
}

/// A finished run of the command.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// `--json` lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.text(),
            self.stderr
        )
    }
}

fn command(fx: &impl Fixture, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ackstack"));
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    // Subcommand first, then the broker's flags.
    let split = all.len().min(2);
    let rest = all.split_off(split);
    all.extend(fx.args());
    all.extend(rest);
    cmd.args(&all)
        .env_remove("AMQP_URL")
        .env_remove("KAFKA_BROKERS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in fx.env() {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `ackstack dlq <args...>` to its end (at most 3 minutes).
pub fn ackstack(fx: &impl Fixture, args: &[&str]) -> Run {
    let child = command(fx, args).spawn().unwrap();
    wait(child, Duration::from_secs(180))
}

/// Starts `ackstack dlq <args...>`.
pub fn spawn(fx: &impl Fixture, args: &[&str]) -> Child {
    command(fx, args).spawn().unwrap()
}

/// Waits for `child`, reading its output meanwhile; kills it past `limit`.
fn wait(mut child: Child, limit: Duration) -> Run {
    use std::io::Read;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The body of the binary letter (or a text one where bodies are text).
fn odd_payload(fx: &impl Fixture) -> Bytes {
    if fx.binary_payloads() {
        Bytes::from((0..=255u8).rev().collect::<Vec<u8>>())
    } else {
        Bytes::from("control \u{1}\u{2} chars and é".as_bytes().to_vec())
    }
}

/// list (twice: it consumes nothing), show (page, json, raw byte for byte), the filters.
pub async fn list_show_and_filters(fx: &impl Fixture) {
    let odd = odd_payload(fx);
    fx.dead_letter(vec![
        message("order A"),
        message("transient order B"),
        message(odd.clone()),
    ])
    .await;
    let first = ackstack(fx, &["dlq", "list", "--json"]);
    assert_eq!(first.code, Some(0), "{first:?}");
    let letters = first.json_lines();
    assert_eq!(letters.len(), 3, "{first:?}");
    let again = ackstack(fx, &["dlq", "list", "--json"]);
    assert_eq!(
        again.json_lines().len(),
        3,
        "listing consumed nothing: {again:?}"
    );
    assert_eq!(fx.dead_letters().await, 3);
    for l in &letters {
        assert!(l["metadata"]["broker"].as_str().is_some(), "{l}");
        assert!(l["metadata"]["attempts"].as_u64().unwrap() >= 1);
        assert!(
            l["headers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| !h[0].as_str().unwrap().starts_with(METADATA_PREFIX)),
            "metadata is not shown as a header: {l}"
        );
    }

    let table = ackstack(fx, &["dlq", "list"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.text().starts_with("MESSAGE ID"), "{table:?}");
    assert_eq!(table.text().lines().count(), 4, "{table:?}");

    // show: the page, the JSON, and --raw byte for byte.
    let odd_id = find_id(fx, &odd);
    let raw = ackstack(fx, &["dlq", "show", &odd_id, "--raw"]);
    assert_eq!(raw.code, Some(0), "{raw:?}");
    assert_eq!(
        raw.stdout,
        odd.to_vec(),
        "--raw is the payload byte for byte"
    );
    let page = ackstack(fx, &["dlq", "show", &odd_id]);
    assert!(page.text().contains("x-tenant: acme"), "{page:?}");
    assert!(
        page.text().contains(", hex):"),
        "binary shown as hex: {page:?}"
    );
    let json = ackstack(fx, &["dlq", "show", &odd_id, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(shown["payload_encoding"], "hex");
    let hex: String = odd.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(shown["payload"], hex);
    let missing = ackstack(fx, &["dlq", "show", "no-such-letter"]);
    assert_eq!(missing.code, Some(2), "{missing:?}");

    // Filters select exactly what they say.
    let errors = |run: &Run| -> Vec<String> {
        let mut v: Vec<String> = run
            .json_lines()
            .iter()
            .map(|l| {
                let m = &l["metadata"]["error_message"];
                m.as_str().unwrap_or("").to_string()
            })
            .collect();
        v.sort();
        v
    };
    let transient = ackstack(fx, &["dlq", "list", "--json", "--error-kind", "transient"]);
    assert_eq!(
        errors(&transient),
        [charge_error(b"transient order B")],
        "{transient:?}"
    );
    let permanent = ackstack(fx, &["dlq", "list", "--json", "--error-kind", "permanent"]);
    assert_eq!(permanent.json_lines().len(), 2, "{permanent:?}");
    let grep = ackstack(
        fx,
        &["dlq", "list", "--json", "--grep", "cannot charge order A"],
    );
    assert_eq!(errors(&grep), [charge_error(b"order A")], "{grep:?}");
    let a = find_id(fx, b"order A");
    let by_id = ackstack(fx, &["dlq", "list", "--json", "--message-id", &a]);
    assert_eq!(errors(&by_id), [charge_error(b"order A")], "{by_id:?}");
    let limit = ackstack(fx, &["dlq", "list", "--json", "--limit", "2"]);
    assert_eq!(limit.json_lines().len(), 2, "{limit:?}");
    let future = ackstack(fx, &["dlq", "list", "--json", "--since", "2999-01-01"]);
    assert_eq!(future.json_lines().len(), 0, "{future:?}");
    let past = ackstack(
        fx,
        &[
            "dlq",
            "list",
            "--json",
            "--until",
            "2999-01-01",
            "--since",
            "1h",
        ],
    );
    assert_eq!(past.json_lines().len(), 3, "{past:?}");
    assert_eq!(fx.dead_letters().await, 3, "the filters consumed nothing");
}

/// replay: dry run first; then the selected letter goes back byte for byte with its headers,
/// no metadata and a replay count; the loop guard skips a letter replayed too often (exit
/// 3) unless --force; purge removes what it selects.
pub async fn replay_loop_guard_and_purge(fx: &impl Fixture) {
    let odd = odd_payload(fx);
    fx.dead_letter(vec![message("order C"), message(odd.clone())])
        .await;
    let dry = ackstack(fx, &["dlq", "replay", "--dry-run"]);
    assert_eq!(dry.code, Some(0), "{dry:?}");
    assert!(dry.text().contains("would replay 2"), "{dry:?}");
    assert_eq!(
        fx.dead_letters().await,
        2,
        "a dry run sends and removes nothing"
    );
    assert!(fx.drain_work(1).await.is_empty());

    let sent = ackstack(fx, &["dlq", "replay", "--message-id", &find_id(fx, &odd)]);
    assert_eq!(sent.code, Some(0), "{sent:?}");
    assert!(sent.text().contains("replayed 1"), "{sent:?}");
    let back = fx.drain_work(1).await;
    assert_eq!(back.len(), 1, "{sent:?}");
    let (payload, headers) = &back[0];
    assert_eq!(payload, &odd, "the payload goes back byte for byte");
    assert_eq!(headers.get_str("x-tenant"), Some("acme"));
    assert_eq!(headers.get_str("x-ackstack-replays"), Some("1"));
    assert!(
        headers.iter().all(|(n, _)| !n.starts_with(METADATA_PREFIX)),
        "no metadata on the replay: {headers:?}"
    );
    assert_eq!(fx.dead_letters().await, 1);

    // A message already replayed three times: the loop guard holds.
    fx.dead_letter(vec![message("order D").header("x-ackstack-replays", "3")])
        .await;
    let d = find_id(fx, b"order D");
    let guarded = ackstack(fx, &["dlq", "replay", "--message-id", &d]);
    assert_eq!(
        guarded.code,
        Some(3),
        "skipped by the loop guard: {guarded:?}"
    );
    assert!(guarded.stderr.contains("replayed 3 times"), "{guarded:?}");
    assert!(fx.drain_work(1).await.is_empty());
    let forced = ackstack(fx, &["dlq", "replay", "--message-id", &d, "--force"]);
    assert_eq!(forced.code, Some(0), "{forced:?}");
    let back = fx.drain_work(1).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].1.get_str("x-ackstack-replays"), Some("4"));

    // purge: refuses without --yes and a terminal; with --yes removes what it selects.
    let refused = ackstack(fx, &["dlq", "purge"]);
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert_eq!(fx.dead_letters().await, 1);
    let purged = ackstack(fx, &["dlq", "purge", "--yes", "--grep", "order C"]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    assert!(purged.text().contains("purged 1"), "{purged:?}");
    assert_eq!(fx.dead_letters().await, 0);
    assert!(fx.drain_work(1).await.is_empty(), "a purge sends nothing");
}

/// How many dead letters carry each error message, from `dlq list --json` (which leaves
/// them where they are).
pub fn letters_by_error(fx: &impl Fixture) -> BTreeMap<String, usize> {
    let run = ackstack(fx, &["dlq", "list", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let mut counts = BTreeMap::new();
    for line in run.json_lines() {
        let error = line["metadata"]["error_message"]
            .as_str()
            .unwrap_or_default();
        *counts.entry(error.to_string()).or_default() += 1;
    }
    counts
}

/// `n` dead letters, a replay killed with SIGKILL part-way, a second replay: every letter is
/// back on the work queue once, or twice where the kill fell between the broker's confirm
/// and the letter's removal (at most the one in flight) or where the command said a send was
/// retried after an unanswered attempt; none is lost. A message the setup dead-lettered
/// twice (see [`Fixture::dead_letter`]) is two letters and comes back twice.
///
/// `held` is how long letters the killed run had received stay held (SQS: its scan
/// visibility, given to it as `--visibility-secs`); the resumed run starts after that.
pub async fn replay_survives_sigkill(fx: &impl Fixture, n: usize, rate: u32, held: Option<u64>) {
    let messages: Vec<Message> = (0..n).map(|i| message(format!("bulk {i:05}"))).collect();
    fx.dead_letter(messages).await;
    let letters = letters_by_error(fx);
    let letter_count = |i: usize| {
        letters
            .get(&charge_error(format!("bulk {i:05}").as_bytes()))
            .copied()
            .unwrap_or(0)
    };
    assert!(
        (0..n).all(|i| letter_count(i) > 0),
        "every message dead-lettered"
    );
    // The letters the listing held are back (RabbitMQ requeues them as the command's
    // channel closes, a moment after it exits).
    let listed: usize = letters.values().sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.dead_letters().await != listed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fx.dead_letters().await,
        listed,
        "the listing gave every letter back"
    );
    let rate = rate.to_string();
    let held_secs = held.map(|s| s.to_string());
    let mut args = vec!["dlq", "replay", "--rate", &rate];
    if let Some(secs) = &held_secs {
        args.extend(["--visibility-secs", secs.as_str()]);
    }
    let mut child = spawn(fx, &args);
    let stderr = child.stderr.take().unwrap();
    let killed_said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    // Kill it part-way: after a third of the letters at the given rate.
    let part = Duration::from_secs_f64(n as f64 / 3.0 / rate.parse::<f64>().unwrap());
    std::thread::sleep(part.max(Duration::from_millis(500)));
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        still_running,
        "the first replay was still running when killed"
    );
    let killed_said = killed_said.join().unwrap();
    if let Some(secs) = held {
        std::thread::sleep(Duration::from_secs(secs + 1));
    }
    let mut said = vec![killed_said];
    let mut resumed_args = vec!["dlq", "replay"];
    if let Some(secs) = &held_secs {
        resumed_args.extend(["--visibility-secs", secs.as_str()]);
    }
    let mut resumed = ackstack(fx, &resumed_args);
    // SQS: letters a receive whose answer was lost took stay invisible until their timeout;
    // the command says they were out of reach (exit 3), and a later run gets them.
    for _ in 0..3 {
        if resumed.code != Some(3) || !resumed.stderr.contains("were out of reach") {
            break;
        }
        std::thread::sleep(Duration::from_secs(held.unwrap_or(0) + 1));
        said.push(std::mem::take(&mut resumed.stderr));
        resumed = ackstack(fx, &resumed_args);
    }
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    said.push(resumed.stderr.clone());
    // Sends the command said were retried after an unanswered attempt, in any run.
    let retried = said
        .iter()
        .map(|said| said.matches("it may be there twice").count())
        .sum::<usize>();
    assert_eq!(fx.dead_letters().await, 0, "{resumed:?}");
    let back = fx.drain_work(listed + 10).await;
    let mut counts: BTreeMap<Bytes, usize> = BTreeMap::new();
    for (payload, _) in &back {
        *counts.entry(payload.clone()).or_default() += 1;
    }
    let back_count = |i: usize| {
        counts
            .get(format!("bulk {i:05}").as_bytes())
            .copied()
            .unwrap_or(0)
    };
    let lost = (0..n).filter(|&i| back_count(i) < letter_count(i)).count();
    let twice = (0..n)
        .filter(|&i| back_count(i) == letter_count(i) + 1)
        .count();
    let more = (0..n)
        .filter(|&i| back_count(i) > letter_count(i) + 1)
        .count();
    eprintln!(
        "after SIGKILL and resume: {} back of {listed} letters ({n} messages), lost={lost} \
         twice={twice} retried sends={retried}",
        back.len()
    );
    let excess: usize = (0..n)
        .map(|i| back_count(i).saturating_sub(letter_count(i)))
        .sum();
    assert_eq!(lost, 0, "nothing lost");
    assert!(
        excess <= 1 + retried,
        "extra copies: at most the letter in flight and one per retried send, not {excess}"
    );
    assert!(
        more <= retried,
        "no letter sent back three times but where a send was retried: {more}"
    );
    assert!(
        twice <= 1 + retried,
        "at most the letter in flight twice, and those whose send was retried ({retried}), \
         not {twice}"
    );
    assert!(
        counts.keys().all(|p| p.starts_with(b"bulk ")),
        "nothing else on the work queue"
    );
}

/// `groups` shows the letters of one cause as one group, and `replay` and `purge` act on a
/// group with `--group`.
pub async fn groups_replay_and_purge(fx: &impl Fixture) {
    fx.dead_letter(vec![
        message("order 17"),
        message("order 18"),
        message("order 19"),
        message("transient order 20"),
    ])
    .await;
    let shown = ackstack(fx, &["dlq", "groups", "--json"]);
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let groups = shown.json_lines();
    assert_eq!(groups.len(), 2, "{shown:?}");
    assert_eq!(groups[0]["count"], 3, "{shown:?}");
    assert_eq!(groups[0]["error_kind"], "permanent", "{shown:?}");
    assert!(
        groups[0]["pattern"]
            .as_str()
            .is_some_and(|p| p.contains("order <n>") && !p.contains("17")),
        "{shown:?}"
    );
    assert_eq!(groups[1]["count"], 1, "{shown:?}");
    assert_eq!(groups[1]["error_kind"], "transient", "{shown:?}");
    let orders = groups[0]["fingerprint"].as_str().unwrap().to_string();
    let transient = groups[1]["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(orders, transient);
    let table = ackstack(fx, &["dlq", "groups"]);
    assert!(table.text().starts_with("GROUP"), "{table:?}");
    assert!(table.text().contains(&orders), "{table:?}");

    let listed = ackstack(fx, &["dlq", "list", "--json", "--group", &orders]);
    assert_eq!(listed.json_lines().len(), 3, "{listed:?}");
    let replayed = ackstack(fx, &["dlq", "replay", "--group", &orders]);
    assert_eq!(replayed.code, Some(0), "{replayed:?}");
    assert!(replayed.text().contains("replayed 3"), "{replayed:?}");
    let mut back: Vec<Bytes> = fx.drain_work(3).await.into_iter().map(|(p, _)| p).collect();
    back.sort();
    assert_eq!(back, ["order 17", "order 18", "order 19"], "{replayed:?}");
    assert_eq!(fx.dead_letters().await, 1);

    let purged = ackstack(fx, &["dlq", "purge", "--yes", "--group", &transient]);
    assert_eq!(purged.code, Some(0), "{purged:?}");
    assert!(purged.text().contains("purged 1"), "{purged:?}");
    assert_eq!(fx.dead_letters().await, 0);
}
