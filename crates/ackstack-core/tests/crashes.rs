//! Invariant 2 for attempts that end with the process dead: a delivery the broker handed out
//! before without a settlement (a suspect) runs alone, after `Settle::arm`; a suspect given
//! up on, and a delivery that arrives past its attempt limit, are dead-lettered without
//! running. The brokers' own crash suites (a child process that aborts) are in
//! `integration-tests/tests/poison.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::memory::{MemorySettler, MemorySource, MemoryToken};
use ackstack_core::{
    AckReport, Alone, Armed, Backoff, Capabilities, Consumer, DeadLetter, DeadLetterMetadata,
    DeadLetterReason, Delivery, Failure, MemoryBroker, Message, Origin, Received, Settle,
    SettleError, SettleFailure, Settled, Source, SourceError, Summary, handler_fn,
};

mod common;
use common::until;

/// A memory source on which deliveries whose payload starts with `s` are suspects, and
/// whose payload starts with `past` arrive at attempt 9; its settler gives up on suspects
/// whose payload starts with `s-poison` (as if they had crashed twice alone).
struct Suspects {
    inner: MemorySource,
    settler: ArmingSettler,
    /// Retries in place and runs suspects alone among attempts (as Kafka does), instead of
    /// counting receives (as SQS does).
    among_attempts: bool,
}

#[derive(Clone)]
struct ArmingSettler {
    inner: MemorySettler,
    armed: Arc<Mutex<Vec<String>>>,
    /// What happened, in order: handler attempts, and the acks and steps aside of armed
    /// suspects.
    log: Arc<Mutex<Vec<String>>>,
    /// The armed suspects' tokens and payloads.
    names: Arc<Mutex<Vec<(MemoryToken, String)>>>,
}

impl ArmingSettler {
    fn note(&self, what: &str, token: &MemoryToken) {
        let names = self.names.lock().unwrap();
        if let Some((_, body)) = names.iter().find(|(t, _)| t == token) {
            self.log.lock().unwrap().push(format!("{what} {body}"));
        }
    }
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

impl Source for Suspects {
    type Token = MemoryToken;
    type Settler = ArmingSettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        let batch = self.inner.receive(max).await?;
        Ok(batch
            .into_iter()
            .map(|mut r| {
                let body = text(&r.delivery);
                if body.starts_with("past") {
                    r.delivery.attempt = 9;
                }
                r.suspect = body.starts_with('s');
                r
            })
            .collect())
    }
    fn settler(&self) -> ArmingSettler {
        self.settler.clone()
    }
    fn capabilities(&self) -> Capabilities {
        if self.among_attempts {
            return self
                .inner
                .capabilities()
                .with_in_place_retry()
                .with_alone(Alone::Attempts);
        }
        // Its attempt number counts receives, as SQS's does.
        self.inner
            .capabilities()
            .with_careful_receives(Duration::from_millis(1))
    }
    fn origin(&self) -> Origin {
        self.inner.origin()
    }
}

impl Settle for ArmingSettler {
    type Token = MemoryToken;
    async fn ack(&self, tokens: Vec<MemoryToken>) -> AckReport<MemoryToken> {
        for t in &tokens {
            self.note("ack", t);
        }
        self.inner.ack(tokens).await
    }
    async fn step_aside(&self, token: &MemoryToken) -> Result<(), SettleError> {
        self.note("step-aside", token);
        Ok(())
    }
    async fn retry(
        &self,
        token: MemoryToken,
        d: &Delivery,
        after: Duration,
        f: &Failure,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.inner.retry(token, d, after, f).await
    }
    async fn dead_letter(
        &self,
        token: MemoryToken,
        d: &Delivery,
        l: &DeadLetter,
    ) -> Result<Settled<MemoryToken>, SettleFailure<MemoryToken>> {
        self.inner.dead_letter(token, d, l).await
    }
    async fn extend(&self, token: &MemoryToken, by: Duration) -> Result<(), SettleError> {
        self.inner.extend(token, by).await
    }
    async fn release(&self, token: MemoryToken) {
        self.inner.release(token).await
    }
    async fn arm(
        &self,
        token: MemoryToken,
        delivery: &Delivery,
        give_up_at: u32,
    ) -> Result<Armed<MemoryToken>, SettleFailure<MemoryToken>> {
        let body = text(delivery);
        self.armed.lock().unwrap().push(body.clone());
        self.names.lock().unwrap().push((token, body.clone()));
        self.log.lock().unwrap().push(format!("arm {body}"));
        if body.starts_with("s-poison") {
            return Ok(Armed::GiveUp {
                token,
                crashes: give_up_at,
            });
        }
        Ok(Armed::Run { token, crashes: 0 })
    }
}

fn suspects(broker: &MemoryBroker) -> (Suspects, Arc<Mutex<Vec<String>>>) {
    let inner = broker.source("q");
    let armed = Arc::new(Mutex::new(Vec::new()));
    let settler = ArmingSettler {
        inner: inner.settler(),
        armed: armed.clone(),
        log: Arc::default(),
        names: Arc::default(),
    };
    let source = Suspects {
        inner,
        settler,
        among_attempts: false,
    };
    (source, armed)
}

#[tokio::test]
async fn a_suspect_runs_alone_after_it_was_armed() {
    let broker = MemoryBroker::new();
    for i in 0..30 {
        broker.publish("q", Message::new(format!("m{i}")));
        if i % 10 == 5 {
            broker.publish("q", Message::new(format!("s{i}")));
        }
    }
    let (source, armed) = suspects(&broker);
    let running = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicUsize::new(0));
    let (r, o, h) = (running.clone(), overlaps.clone(), handled.clone());
    let b = broker.clone();
    let summary = Consumer::new(source)
        .concurrency(8)
        .run_until(
            handler_fn(move |d, _cx| {
                let (r, o, h) = (r.clone(), o.clone(), h.clone());
                async move {
                    let body = text(&d);
                    let others = r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if body.starts_with('s') && (others > 0 || r.load(Ordering::SeqCst) > 1) {
                        o.lock().unwrap().push(body);
                    }
                    r.fetch_sub(1, Ordering::SeqCst);
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 33, "{summary:?}");
    assert!(
        overlaps.lock().unwrap().is_empty(),
        "suspects ran beside other deliveries: {:?}",
        overlaps.lock().unwrap()
    );
    let mut armed = armed.lock().unwrap().clone();
    armed.sort();
    assert_eq!(armed, vec!["s15", "s25", "s5"], "each suspect armed once");
}

/// Runs a consumer of [`suspects`] with at most `max_attempts` attempts and a handler that
/// succeeds, until the queue is empty; returns its summary and the payloads the handler was
/// called with, in call order.
async fn run_recording(broker: &MemoryBroker, max_attempts: u32) -> (Summary, Vec<String>) {
    let (source, _) = suspects(broker);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let b = broker.clone();
    let summary = Consumer::new(source)
        .max_attempts(max_attempts)
        .run_until(
            handler_fn(move |d, _cx| {
                c.lock().unwrap().push(text(&d));
                async { Ok(()) }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    let calls = calls.lock().unwrap().clone();
    (summary, calls)
}

#[tokio::test]
async fn a_suspect_given_up_on_is_dead_lettered_as_crashed_without_running() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("m1"));
    broker.publish("q", Message::new("s-poison").message_id("poison"));
    broker.publish("q", Message::new("m2"));
    let (summary, mut calls) = run_recording(&broker, 3).await;
    calls.sort();
    assert_eq!(calls, vec!["m1", "m2"], "the poison is never run again");
    assert_eq!(summary.dead_lettered, 1);
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.reason, DeadLetterReason::Crashed);
    assert_eq!(
        meta.attempts, 3,
        "two crashes alone and the one that made it a suspect"
    );
    assert_eq!(meta.message_id.as_deref(), Some("poison"));
}

#[tokio::test]
async fn a_delivery_past_its_attempt_limit_is_dead_lettered_without_running() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("past-limit"));
    broker.publish("q", Message::new("ok"));
    let (_, calls) = run_recording(&broker, 5).await;
    assert_eq!(calls, vec!["ok"]);
    let letters = broker.dead_letters("q");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetterMetadata::from_headers(&letters[0].headers).unwrap();
    assert_eq!(meta.reason, DeadLetterReason::MaxAttempts);
    assert!(
        meta.error_message.contains("without a settlement"),
        "{meta:?}"
    );
    assert_eq!(meta.attempts, 9);
}

/// Where suspects run alone among attempts (Kafka): a suspect waits for the attempts running
/// now, not for a delivery sleeping between retries in place; no attempt starts beside its
/// attempts; its ack is sent before it steps aside; and when an attempt fails, it steps
/// aside for its retry's wait, so that others run meanwhile, and is armed again before its
/// next attempt.
#[tokio::test]
async fn a_suspect_runs_alone_among_attempts_without_waiting_for_retries_in_place() {
    let broker = MemoryBroker::new();
    broker.publish("q", Message::new("f-slow"));
    for i in 0..6 {
        broker.publish("q", Message::new(format!("m{i}")));
    }
    broker.publish("q", Message::new("s-fails-once"));
    broker.publish("q", Message::new("s-ok"));
    let (mut source, _) = suspects(&broker);
    source.among_attempts = true;
    let log = source.settler.log.clone();
    let running = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(Mutex::new(Vec::new()));
    let (r, o, l) = (running.clone(), overlaps.clone(), log.clone());
    let b = broker.clone();
    let summary = Consumer::new(source)
        .concurrency(4)
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(300), Duration::from_millis(300))
                .no_jitter(),
        )
        .run_until(
            handler_fn(move |d, _cx| {
                let (r, o, l) = (r.clone(), o.clone(), l.clone());
                async move {
                    let body = text(&d);
                    let name = format!("{body}#{}", d.attempt);
                    let others = r.fetch_add(1, Ordering::SeqCst);
                    l.lock().unwrap().push(format!("start {name}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if body.starts_with('s') && (others > 0 || r.load(Ordering::SeqCst) > 1) {
                        o.lock().unwrap().push(name.clone());
                    }
                    l.lock().unwrap().push(format!("end {name}"));
                    r.fetch_sub(1, Ordering::SeqCst);
                    let fails = (body == "f-slow" && d.attempt < 3)
                        || (body == "s-fails-once" && d.attempt == 1);
                    if fails {
                        return Err(ackstack_core::HandlerError::transient("not yet"));
                    }
                    Ok(())
                }
            }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    assert_eq!(summary.succeeded, 9, "{summary:?}");
    assert!(
        overlaps.lock().unwrap().is_empty(),
        "attempts ran beside a suspect's: {:?}",
        overlaps.lock().unwrap()
    );
    let log = log.lock().unwrap().clone();
    let at = |what: &str| {
        log.iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("no {what:?} in {log:?}"))
    };
    assert!(
        at("start s-ok#1") < at("start f-slow#2"),
        "a suspect waited for a retry's backoff: {log:?}"
    );
    assert!(at("end s-ok#1") < at("ack s-ok"), "{log:?}");
    assert!(at("ack s-ok") < at("step-aside s-ok"), "{log:?}");
    let aside = at("step-aside s-fails-once");
    assert!(at("end s-fails-once#1") < aside, "{log:?}");
    let second = at("start s-fails-once#2");
    assert!(aside < second, "{log:?}");
    assert!(
        log[aside..second].iter().any(|e| e.starts_with("start ")),
        "nothing ran while the suspect waited for its retry: {log:?}"
    );
    // Its retry runs alone too, armed again first: a crash in it counts.
    let rearmed = log.iter().rposition(|e| e == "arm s-fails-once").unwrap();
    assert!(aside < rearmed && rearmed < second, "{log:?}");
}

/// A memory source whose broker counts receives, with a careful period of a minute, that
/// records how many deliveries each receive asked for.
struct Careful {
    inner: MemorySource,
    from_start: bool,
    asked: Arc<Mutex<Vec<usize>>>,
}

impl Source for Careful {
    type Token = MemoryToken;
    type Settler = MemorySettler;
    async fn receive(&mut self, max: usize) -> Result<Vec<Received<MemoryToken>>, SourceError> {
        self.asked.lock().unwrap().push(max);
        let batch = self.inner.receive(max).await?;
        Ok(batch
            .into_iter()
            .map(|r| {
                let suspect = text(&r.delivery).starts_with('s');
                r.suspect(suspect)
            })
            .collect())
    }
    fn settler(&self) -> MemorySettler {
        self.inner.settler()
    }
    fn capabilities(&self) -> Capabilities {
        let caps = self
            .inner
            .capabilities()
            .with_careful_receives(Duration::from_secs(60));
        if self.from_start {
            caps
        } else {
            caps.without_careful_start()
        }
    }
}

/// What each receive asked for in a run over 20 deliveries, the 11th a suspect.
async fn receives(from_start: bool) -> Vec<usize> {
    let broker = MemoryBroker::new();
    for i in 0..20 {
        let body = if i == 10 {
            "s10".to_string()
        } else {
            format!("m{i}")
        };
        broker.publish("q", Message::new(body));
    }
    let asked = Arc::new(Mutex::new(Vec::new()));
    let source = Careful {
        inner: broker.source("q"),
        from_start,
        asked: asked.clone(),
    };
    let b = broker.clone();
    Consumer::new(source)
        .concurrency(8)
        .run_until(
            handler_fn(|_d, _cx| async { Ok(()) }),
            until(move || b.is_empty("q")),
        )
        .await
        .unwrap();
    asked.lock().unwrap().clone()
}

/// Careful receives (one at a time) run from the start unless the adapter says it knows no
/// suspect can be waiting; after a suspect they run either way.
#[tokio::test]
async fn careful_receives_from_the_start_only_where_asked() {
    let careful = receives(true).await;
    assert!(careful.iter().all(|&n| n == 1), "{careful:?}");
    let after_suspect = receives(false).await;
    assert!(
        after_suspect[0] > 1,
        "batches from the start: {after_suspect:?}"
    );
    let last = after_suspect.last().copied();
    assert_eq!(
        last,
        Some(1),
        "one at a time after the suspect: {after_suspect:?}"
    );
}
