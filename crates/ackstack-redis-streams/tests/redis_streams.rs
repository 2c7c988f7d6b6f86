//! What is particular to Redis Streams, against the Redis at `REDIS_URL` (default the local
//! one): streams and groups a team already has, entries of other producers, a crashed
//! consumer's entries, and settling steps that are atomic and fenced by the holder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ackstack_core::{
    Consumer, ErrorKind, Failure, HandlerError, Received, Settle, SettleError, Source, handler_fn,
};
use ackstack_redis_streams::redis::{self, Value};
use ackstack_redis_streams::{RedisStreamsConfig, RedisStreamsError, RedisStreamsSource};
use ackstack_testkit::unique_name;

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn conn() -> redis::aio::ConnectionManager {
    redis::Client::open(url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

fn config(stream: &str) -> RedisStreamsConfig {
    let mut config = RedisStreamsConfig::new(url(), stream);
    config.lease = Duration::from_secs(1);
    config.block = Duration::from_millis(200);
    config
}

async fn query<T: redis::FromRedisValue>(cmd: &mut redis::Cmd) -> T {
    cmd.query_async(&mut conn().await).await.unwrap()
}

/// `XADD stream * fields...`, as another producer would.
async fn add(stream: &str, fields: &[(&str, String)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(value);
    }
    let _: String = query(&mut cmd).await;
}

/// Entries pending for `group` (XPENDING's summary count).
async fn pending(stream: &str, group: &str) -> i64 {
    let summary: Value = query(redis::cmd("XPENDING").arg(stream).arg(group)).await;
    match summary {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// Receives until `n` deliveries came (or 10 s passed).
async fn receive_n(
    source: &mut RedisStreamsSource,
    n: usize,
) -> Vec<Received<ackstack_redis_streams::RedisStreamsToken>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(source.receive(n - got.len()).await.unwrap());
    }
    got
}

/// A stream another producer writes (plain fields, no payload field) and a group the team
/// created: adopted with `create` off, every field reaching the handler as a header, every
/// entry acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_and_group_are_adopted() {
    let stream = unique_name("adopted");
    for i in 0..3 {
        add(
            &stream,
            &[("order", i.to_string()), ("amount", "9.50".into())],
        )
        .await;
    }
    let _: Value = query(
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg("billing")
            .arg("0"),
    )
    .await;
    let mut c = config(&stream);
    c.group = "billing".into();
    c.create = false;
    let source = RedisStreamsSource::connect(c).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, s2) = (seen.clone(), seen.clone());
    let summary = Consumer::new(source)
        .run_until(
            handler_fn(move |d, _cx| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push((
                        d.headers.get_str("order").map(str::to_string),
                        d.headers.get_str("amount").map(str::to_string),
                        d.payload.is_empty(),
                        d.message_id.clone(),
                    ));
                    Ok::<(), HandlerError>(())
                }
            }),
            async move {
                // The run acks what its handlers finished before it stops.
                while s2.lock().unwrap().len() < 3 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(summary.acked, 3, "{summary:?}");
    let mut seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    // Handled three at a time: in any order.
    seen.sort();
    for (i, (order, amount, empty, id)) in seen.iter().enumerate() {
        assert_eq!(order.as_deref(), Some(i.to_string().as_str()));
        assert_eq!(amount.as_deref(), Some("9.50"));
        assert!(empty, "no payload field: an empty payload");
        assert!(id.as_deref().unwrap().starts_with(&format!("{stream}:")));
    }
    assert_eq!(pending(&stream, "billing").await, 0);
}

/// A missing group with `create` off, and a key that is not a stream, are topology errors
/// that say so; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_adopted_is_refused_clearly() {
    let stream = unique_name("absent");
    let mut c = config(&stream);
    c.create = false;
    let err = RedisStreamsSource::connect(c).await.unwrap_err();
    assert!(matches!(err, RedisStreamsError::Topology(_)), "{err}");
    assert!(err.is_permanent());
    let exists: i64 = query(redis::cmd("EXISTS").arg(&stream)).await;
    assert_eq!(exists, 0, "nothing created");

    let _: () = query(redis::cmd("SET").arg(&stream).arg("a string")).await;
    let err = RedisStreamsSource::connect(config(&stream))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a stream"), "{err}");
}

/// Entries a consumer read and never settled (it crashed) are taken over by another once
/// idle for the lease, with their delivery counted (attempt 2) and run as suspects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_entries_are_taken_over() {
    let stream = unique_name("crashed");
    let _ = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    for i in 0..2 {
        add(&stream, &[("payload", format!("m{i}"))]).await;
    }
    // The consumer that dies: it reads both and is gone.
    let _: Value = query(
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("ackstack")
            .arg("dead")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">"),
    )
    .await;
    let mut source = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    let got = receive_n(&mut source, 2).await;
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.delivery.attempt, 2, "the crashed delivery counts");
        assert!(r.suspect, "it may have been the crash");
    }
    let settler = source.settler();
    let tokens = got.into_iter().map(|r| r.token).collect();
    let report = settler.ack(tokens).await;
    assert_eq!(report.acked, 2);
    assert_eq!(pending(&stream, "ackstack").await, 0);
}

/// A retry is one step: the delayed copy is stored and the original acked together, the copy
/// comes back after its delay with the next attempt; a retry of an entry another consumer
/// took over changes nothing and says the lease was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_atomic_and_fenced_by_the_holder() {
    let stream = unique_name("retry");
    let mut source = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    for i in 0..2 {
        let fields = [
            ("payload", format!("m{i}")),
            ("message-id", format!("id-{i}")),
        ];
        add(&stream, &fields).await;
    }
    let backlog = source.settler().backlog().await.map(|b| b.total);
    assert_eq!(backlog, Some(2), "the group's lag before anything was read");
    let mut got = receive_n(&mut source, 2).await;
    assert_eq!(got.len(), 2);
    let settler = source.settler();
    let failure = Failure::new(ErrorKind::Transient, "downstream busy");

    // Another consumer takes the second over: our retry of it is refused, nothing written.
    let lost = got.pop().unwrap();
    let _: Value = query(
        redis::cmd("XCLAIM")
            .arg(&stream)
            .arg("ackstack")
            .arg("other")
            .arg(0)
            .arg(lost.token.entry_id()),
    )
    .await;
    let refused = settler
        .retry(lost.token, &lost.delivery, Duration::ZERO, &failure)
        .await
        .map(drop)
        .unwrap_err();
    assert!(
        matches!(refused.error, SettleError::LeaseLost(_)),
        "{:?}",
        refused.error
    );
    let delayed = format!("{stream}:delayed");
    let copies: i64 = query(redis::cmd("ZCARD").arg(&delayed)).await;
    assert_eq!(copies, 0, "no copy of an entry we no longer hold");

    // Ours: the copy stored, the original acked, one step.
    let ours = got.pop().unwrap();
    settler
        .retry(
            ours.token,
            &ours.delivery,
            Duration::from_millis(300),
            &failure,
        )
        .await
        .map(drop)
        .unwrap();
    let copies: i64 = query(redis::cmd("ZCARD").arg(&delayed)).await;
    assert_eq!(copies, 1);
    assert_eq!(
        pending(&stream, "ackstack").await,
        1,
        "only the taken-over one"
    );

    let back = receive_n(&mut source, 1).await;
    assert_eq!(back.len(), 1);
    let d = &back[0].delivery;
    assert_eq!(d.payload.as_ref(), b"m0");
    assert_eq!(d.attempt, 2);
    assert_eq!(d.message_id.as_deref(), Some("id-0"));
    assert!(!back[0].suspect, "a copy's first delivery is no crash");
    let copies: i64 = query(redis::cmd("ZCARD").arg(&delayed)).await;
    assert_eq!(copies, 0, "moved back");
}

/// A lease is lost to a takeover even by a consumer of the same name (two replicas sharing a
/// configured name): the takeover raised the delivery count, so renewing, retrying and
/// dead-lettering the old delivery are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_by_a_consumer_of_the_same_name_is_a_lost_lease() {
    let stream = unique_name("same-name");
    let mut c = config(&stream);
    c.consumer = Some("replica".into());
    let mut source = RedisStreamsSource::connect(c).await.unwrap();
    add(&stream, &[("payload", "m".into())]).await;
    let got = receive_n(&mut source, 1).await.pop().unwrap();
    let settler = source.settler();
    settler
        .extend(&got.token, Duration::from_secs(1))
        .await
        .unwrap();
    // The other replica, same name, takes it over (XCLAIM counts a delivery).
    let _: Value = query(
        redis::cmd("XCLAIM")
            .arg(&stream)
            .arg("ackstack")
            .arg("replica")
            .arg(0)
            .arg(got.token.entry_id()),
    )
    .await;
    let lost = settler.extend(&got.token, Duration::from_secs(1)).await;
    assert!(matches!(lost, Err(SettleError::LeaseLost(_))), "{lost:?}");
    let failure = Failure::new(ErrorKind::Transient, "busy");
    let refused = settler
        .retry(got.token, &got.delivery, Duration::ZERO, &failure)
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(refused.error, SettleError::LeaseLost(_)));
    let copies: i64 = query(redis::cmd("ZCARD").arg(format!("{stream}:delayed"))).await;
    assert_eq!(copies, 0);
    assert_eq!(pending(&stream, "ackstack").await, 1, "still the other's");
}

/// An entry trimmed from the stream while its handler ran is not lost: its retry copy is
/// written all the same, and renewing its lease is not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_trimmed_while_it_runs_is_still_retried() {
    let stream = unique_name("trimmed");
    let mut source = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    add(&stream, &[("payload", "m".into())]).await;
    let got = receive_n(&mut source, 1).await.pop().unwrap();
    let _: i64 = query(redis::cmd("XTRIM").arg(&stream).arg("MAXLEN").arg(0)).await;
    let settler = source.settler();
    settler
        .extend(&got.token, Duration::from_secs(1))
        .await
        .unwrap();
    let failure = Failure::new(ErrorKind::Transient, "busy");
    settler
        .retry(got.token, &got.delivery, Duration::ZERO, &failure)
        .await
        .map(drop)
        .unwrap();
    let back = receive_n(&mut source, 1).await;
    assert_eq!(back.len(), 1, "the copy came back");
    assert_eq!(back[0].delivery.payload.as_ref(), b"m");
    assert_eq!(back[0].delivery.attempt, 2);
}

/// A delivery given back at shutdown without having run comes back with the same attempt
/// (and is no suspect); one given back after its handler ran counts the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_given_back_unrun_keeps_its_attempt() {
    let stream = unique_name("given-back");
    let mut source = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    add(&stream, &[("payload", "m".into())]).await;
    let got = receive_n(&mut source, 1).await.pop().unwrap();
    assert_eq!(got.delivery.attempt, 1);
    source.settler().release_at_shutdown(got.token).await;
    let mut next = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    let again = receive_n(&mut next, 1).await.pop().unwrap();
    assert_eq!(again.delivery.attempt, 1, "never ran: the same attempt");
    assert!(!again.suspect);
    next.settler().release(again.token).await;
    let mut third = RedisStreamsSource::connect(config(&stream)).await.unwrap();
    let counted = receive_n(&mut third, 1).await.pop().unwrap();
    assert_eq!(counted.delivery.attempt, 2, "ran: counted");
}

/// A stream another consumer group reads is refused: retry copies moved back to it would
/// reach that group too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_another_group_is_refused() {
    let stream = unique_name("shared");
    let _: Value = query(
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg("analytics")
            .arg("0")
            .arg("MKSTREAM"),
    )
    .await;
    let err = RedisStreamsSource::connect(config(&stream))
        .await
        .unwrap_err();
    assert!(matches!(err, RedisStreamsError::Topology(_)), "{err}");
    assert!(err.to_string().contains("analytics"), "{err}");
}
