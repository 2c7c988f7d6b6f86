//! The Redis dedup store against a real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
//! Every test uses its own key prefix; the restart test runs its own `redis-server` on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ackstack_core::dedup::{Claim, DedupStore};
mod common;
use common::{OwnRedis, free_port, redis_url, unique_prefix};

use ackstack_redis::{DONE_MARKER, PipelineConfig, RedisDedupConfig, RedisDedupStore};

async fn store(test: &str) -> RedisDedupStore {
    let config = RedisDedupConfig::new(redis_url()).key_prefix(unique_prefix(test));
    RedisDedupStore::connect(config).await.unwrap()
}

async fn raw_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn raw_get(url: &str, key: &str) -> (Option<String>, i64) {
    let mut c = raw_conn(url).await;
    let value: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    (value, pttl)
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn claim_complete_then_done() {
    let store = store("done").await;
    assert_eq!(
        store.claim(b"order-1", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    match store.claim(b"order-1", "b", LEASE).await.unwrap() {
        Claim::Busy {
            expires_in: Some(left),
        } => assert!(left <= LEASE && left > Duration::from_secs(20), "{left:?}"),
        other => panic!("expected busy with a lease, got {other:?}"),
    }
    assert!(store.complete(b"order-1", "a", TTL).await.unwrap());
    assert_eq!(
        store.claim(b"order-1", "b", LEASE).await.unwrap(),
        Claim::Done
    );
    assert_eq!(
        store.claim(b"order-1", "a", LEASE).await.unwrap(),
        Claim::Done
    );

    // The done marker is stored under the prefix, with the TTL.
    let (value, pttl) = raw_get(&redis_url(), &store.redis_key(b"order-1")).await;
    assert_eq!(value.as_deref(), Some(DONE_MARKER));
    assert!(pttl > 50_000 && pttl <= 60_000, "{pttl}");
    // Completing again (the claim is gone) changes nothing.
    assert!(!store.complete(b"order-1", "a", TTL).await.unwrap());
}

#[tokio::test]
async fn release_lets_a_second_claim_succeed() {
    let store = store("release").await;
    assert_eq!(
        store.claim(b"k", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    store.release(b"k", "a").await.unwrap();
    assert_eq!(
        store.claim(b"k", "b", LEASE).await.unwrap(),
        Claim::Acquired
    );
    let (value, _) = raw_get(&redis_url(), &store.redis_key(b"k")).await;
    assert_eq!(value.as_deref(), Some("b"));
}

#[tokio::test]
async fn a_foreign_token_cannot_complete_release_or_extend() {
    let store = store("foreign").await;
    let key = store.redis_key(b"k");
    assert_eq!(
        store
            .claim(b"k", "a", Duration::from_secs(10))
            .await
            .unwrap(),
        Claim::Acquired
    );
    assert!(!store.complete(b"k", "b", TTL).await.unwrap());
    assert!(
        !store
            .extend(b"k", "b", Duration::from_secs(100))
            .await
            .unwrap()
    );
    store.release(b"k", "b").await.unwrap();
    assert!(!store.try_release(b"k", "b").await.unwrap());
    let (value, pttl) = raw_get(&redis_url(), &key).await;
    assert_eq!(
        value.as_deref(),
        Some("a"),
        "b's calls left a's claim alone"
    );
    assert!(pttl <= 10_000, "b's extend did not apply: {pttl}");
    assert!(matches!(
        store.claim(b"k", "b", LEASE).await.unwrap(),
        Claim::Busy { .. }
    ));

    // The owner can extend, then complete.
    assert!(
        store
            .extend(b"k", "a", Duration::from_secs(100))
            .await
            .unwrap()
    );
    let (_, pttl) = raw_get(&redis_url(), &key).await;
    assert!(pttl > 90_000, "{pttl}");
    assert!(store.complete(b"k", "a", TTL).await.unwrap());
    assert_eq!(store.claim(b"k", "b", LEASE).await.unwrap(), Claim::Done);
}

#[tokio::test]
async fn done_keys_expire_after_their_ttl() {
    let store = store("ttl").await;
    assert_eq!(
        store.claim(b"k", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    assert!(
        store
            .complete(b"k", "a", Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert_eq!(store.claim(b"k", "b", LEASE).await.unwrap(), Claim::Done);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.claim(b"k", "b", LEASE).await.unwrap(),
        Claim::Acquired
    );
}

#[tokio::test]
async fn a_killed_workers_claim_expires_and_another_takes_over() {
    let store = store("lease").await;
    let lease = Duration::from_millis(400);
    // Worker A claims, then "dies": it never completes, releases or extends.
    assert_eq!(
        store.claim(b"k", "a", lease).await.unwrap(),
        Claim::Acquired
    );
    let Claim::Busy {
        expires_in: Some(left),
    } = store.claim(b"k", "b", LEASE).await.unwrap()
    else {
        panic!("expected busy");
    };
    assert!(left <= lease);
    // Worker B retries until the lease lapses (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.claim(b"k", "b", LEASE).await.unwrap() {
            Claim::Acquired => break,
            Claim::Busy { .. } => {
                assert!(Instant::now() < deadline, "lease never lapsed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("nobody completed the key: {other:?}"),
        }
    }
    // A comes back (a zombie): it can no longer touch B's claim.
    assert!(!store.extend(b"k", "a", LEASE).await.unwrap());
    assert!(!store.complete(b"k", "a", TTL).await.unwrap());
    assert!(store.complete(b"k", "b", TTL).await.unwrap());
    assert_eq!(store.claim(b"k", "c", LEASE).await.unwrap(), Claim::Done);
}

#[tokio::test]
async fn claiming_again_with_the_same_token_is_idempotent() {
    let store = store("reclaim").await;
    assert_eq!(
        store.claim(b"k", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        store.claim(b"k", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    assert!(matches!(
        store.claim(b"k", "b", LEASE).await.unwrap(),
        Claim::Busy { .. }
    ));
}

#[tokio::test]
async fn two_concurrent_claimers_exactly_one_acquires() {
    // Two stores with their own connections, like two consumer processes.
    let prefix = unique_prefix("race");
    let config = RedisDedupConfig::new(redis_url()).key_prefix(prefix);
    let one = Arc::new(RedisDedupStore::connect(config.clone()).await.unwrap());
    let two = Arc::new(RedisDedupStore::connect(config).await.unwrap());
    for round in 0..100 {
        let key = format!("key-{round}");
        let (a, b) = tokio::join!(
            one.claim(key.as_bytes(), "worker-1", LEASE),
            two.claim(key.as_bytes(), "worker-2", LEASE)
        );
        let claims = [a.unwrap(), b.unwrap()];
        let acquired = claims.iter().filter(|c| **c == Claim::Acquired).count();
        let busy = claims
            .iter()
            .filter(|c| matches!(c, Claim::Busy { .. }))
            .count();
        assert_eq!((acquired, busy), (1, 1), "round {round}: {claims:?}");
    }
}

#[tokio::test]
async fn long_and_binary_keys_are_hashed_under_the_prefix() {
    let store = store("hash").await;
    let long = "x".repeat(500);
    let binary = "line\nbreak\u{0}";
    for key in [long.as_str(), binary] {
        let redis_key = store.redis_key(key.as_bytes());
        assert!(
            redis_key.contains(":h:") && redis_key.len() < 200,
            "{redis_key}"
        );
        assert_eq!(
            store.claim(key.as_bytes(), "a", LEASE).await.unwrap(),
            Claim::Acquired
        );
        assert!(store.complete(key.as_bytes(), "a", TTL).await.unwrap());
        let (value, _) = raw_get(&redis_url(), &redis_key).await;
        assert_eq!(value.as_deref(), Some(DONE_MARKER));
    }
    // The reserved marker is refused as a token.
    assert!(store.claim(b"k", DONE_MARKER, LEASE).await.is_err());
}

#[tokio::test]
async fn concurrent_calls_share_round_trips() {
    let store = Arc::new(store("pipeline").await);
    let before = store.stats();
    let callers = 64;
    let keys_per_caller = 20;
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..keys_per_caller {
                let key = format!("c{caller}-k{i}");
                let token = format!("t{caller}-{i}");
                assert_eq!(
                    store.claim(key.as_bytes(), &token, LEASE).await.unwrap(),
                    Claim::Acquired
                );
                assert!(store.complete(key.as_bytes(), &token, TTL).await.unwrap());
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("calls finished in time");
    let after = store.stats();
    let operations = after.operations - before.operations;
    let round_trips = after.round_trips - before.round_trips;
    assert_eq!(operations, (callers * keys_per_caller * 2) as u64);
    assert!(after.commands - before.commands >= operations);
    eprintln!("{callers} callers: {operations} calls in {round_trips} round trips");
    // 64 concurrent callers: pipelines of many calls each. Well below one round trip per call.
    assert!(
        round_trips * 8 <= operations,
        "{round_trips} round trips for {operations} calls"
    );
    assert_eq!(after.failed_round_trips, 0);
}

/// The done marks of one ack batch, from one caller, go in one pipeline; each answer is its
/// own (a mark whose claim another token holds is refused).
#[tokio::test]
async fn complete_all_sends_the_marks_of_one_caller_in_one_round_trip() {
    let store = store("complete-all").await;
    let keys: Vec<String> = (0..50).map(|i| format!("all-{i}")).collect();
    for key in &keys {
        assert_eq!(
            store.claim(key.as_bytes(), "mine", LEASE).await.unwrap(),
            Claim::Acquired
        );
    }
    assert_eq!(
        store.claim(b"all-theirs", "theirs", LEASE).await.unwrap(),
        Claim::Acquired
    );
    let mut marks: Vec<(&[u8], &str)> = keys.iter().map(|k| (k.as_bytes(), "mine")).collect();
    marks.push((b"all-theirs", "mine"));
    let before = store.stats();
    let answers = store.complete_all(&marks, TTL).await;
    let after = store.stats();
    assert_eq!(answers.len(), 51);
    assert!(answers[..50].iter().all(|a| matches!(a, Ok(true))));
    assert!(
        matches!(answers[50], Ok(false)),
        "another token's claim is left alone"
    );
    assert_eq!(after.round_trips - before.round_trips, 1);
    for key in &keys {
        assert_eq!(
            store.claim(key.as_bytes(), "again", LEASE).await.unwrap(),
            Claim::Done
        );
    }
}

#[tokio::test]
async fn max_batch_bounds_pipeline_size() {
    let config = RedisDedupConfig::new(redis_url())
        .key_prefix(unique_prefix("batch"))
        .pipeline(PipelineConfig::default().max_batch(4));
    let store = Arc::new(RedisDedupStore::connect(config).await.unwrap());
    let mut tasks = Vec::new();
    for caller in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim(format!("k{caller}").as_bytes(), "t", LEASE)
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Claim::Acquired);
    }
    let stats = store.stats();
    // 32 claims in pipelines of at most 4 (plus at most one script reload per pipeline).
    assert!(stats.round_trips >= 8, "{stats:?}");
}

#[tokio::test]
async fn redis_restart_fails_fast_then_recovers_with_the_same_store() {
    let port = free_port();
    let mut server = OwnRedis::start(port);
    server.wait_ready().await;

    let timeout = Duration::from_millis(500);
    let config = RedisDedupConfig::new(server.url())
        .key_prefix(unique_prefix("restart"))
        .timeout(timeout)
        .connect_timeout(Duration::from_millis(200));
    let concrete = Arc::new(RedisDedupStore::connect(config).await.unwrap());
    let store: Arc<dyn DedupStore> = concrete.clone();
    assert_eq!(
        store.claim(b"before", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );

    server.kill();

    // While Redis is down every call fails, and fails within the timeout (plus scheduling slack).
    for i in 0..5 {
        let started = Instant::now();
        let result = store
            .claim(format!("down-{i}").as_bytes(), "a", LEASE)
            .await;
        let took = started.elapsed();
        assert!(result.is_err(), "call {i} succeeded with redis down");
        eprintln!(
            "call {i} with redis down failed after {took:?}: {:?}",
            result.err()
        );
        assert!(
            took < timeout + Duration::from_millis(500),
            "call {i} took {took:?}"
        );
    }
    let err = store.complete(b"before", "a", TTL).await.unwrap_err();
    assert!(err.to_string().contains("dedup store error"), "{err}");

    // Same port, same store: calls succeed again once the connection manager reconnects.
    let _server = {
        let restarted = OwnRedis::start(port);
        restarted.wait_ready().await;
        restarted
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store
            .claim(format!("after-{attempt}").as_bytes(), "a", LEASE)
            .await
        {
            Ok(claim) => {
                assert_eq!(claim, Claim::Acquired);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        store
            .complete(format!("after-{attempt}").as_bytes(), "a", TTL)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .claim(format!("after-{attempt}").as_bytes(), "b", LEASE)
            .await
            .unwrap(),
        Claim::Done
    );
    // Nothing was persisted (--save ""): the pre-restart claim is gone.
    assert_eq!(
        store.claim(b"before", "b", LEASE).await.unwrap(),
        Claim::Acquired
    );

    // Scripts lost from the server's cache (as after a restart) are reloaded on NOSCRIPT: one
    // extra round trip with the four SCRIPT LOADs and the rerun call.
    let mut raw = raw_conn(&_server.url()).await;
    flush_scripts(&mut raw).await;
    let before = concrete.stats();
    assert!(store.release(b"before", "b").await.is_ok());
    let after = concrete.stats();
    assert_eq!(
        after.round_trips - before.round_trips,
        2,
        "{before:?} {after:?}"
    );
    assert_eq!(
        after.commands - before.commands,
        1 + 4 + 1,
        "{before:?} {after:?}"
    );
    assert_eq!(
        store.claim(b"before", "c", LEASE).await.unwrap(),
        Claim::Acquired,
        "the rerun release deleted b's claim"
    );

    // A claim goes first as a plain SET NX: one round trip for a new key. A key that exists
    // needs the claim script too (two round trips), and after a flush of the scripts, three.
    let before = concrete.stats();
    assert_eq!(
        store.claim(b"fresh", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    let after = concrete.stats();
    assert_eq!(
        (
            after.round_trips - before.round_trips,
            after.commands - before.commands
        ),
        (1, 1)
    );
    let before = concrete.stats();
    assert_eq!(
        store.claim(b"fresh", "a", LEASE).await.unwrap(),
        Claim::Acquired,
        "our own claim, again"
    );
    let after = concrete.stats();
    assert_eq!(
        (
            after.round_trips - before.round_trips,
            after.commands - before.commands
        ),
        (2, 2)
    );
    flush_scripts(&mut raw).await;
    let before = concrete.stats();
    assert!(matches!(
        store.claim(b"fresh", "b", LEASE).await.unwrap(),
        Claim::Busy { .. }
    ));
    let after = concrete.stats();
    assert_eq!(
        (
            after.round_trips - before.round_trips,
            after.commands - before.commands
        ),
        (3, 1 + 1 + 4 + 1),
        "SET NX, the script (no script), then the loads and the script"
    );
}

/// A Redis that accepts connections and never answers: every call fails with a timeout at its
/// own deadline, neither later (also the calls queued behind a pipeline that waits for it:
/// callers keep no timer of their own) nor earlier (a pipeline is not cut short for all its
/// calls at its oldest call's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_behind_a_stalled_pipeline_fail_by_their_own_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(400);
    let config = RedisDedupConfig::new(format!("redis://127.0.0.1:{port}"))
        .key_prefix(unique_prefix("stalled"))
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10));
    let store = Arc::new(RedisDedupStore::new_lazy(config).unwrap());
    let mut calls = Vec::new();
    for (i, delay) in [0u64, 100, 300, 390].into_iter().enumerate() {
        let store = store.clone();
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let started = Instant::now();
            let result = store.claim(format!("k{i}").as_bytes(), "a", LEASE).await;
            (result.map_err(|e| e.to_string()), started.elapsed())
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (result, took) = call.await.unwrap();
        let Err(error) = result else {
            panic!("call {i} succeeded against a silent server")
        };
        assert!(
            error.contains("redis dedup call timed out"),
            "call {i}: {error}"
        );
        assert!(
            took < timeout + Duration::from_millis(250),
            "call {i} took {took:?}, past its {timeout:?}"
        );
        assert!(
            took > timeout - Duration::from_millis(50),
            "call {i} failed after {took:?}, before its {timeout:?}"
        );
    }
    silent.abort();
}

#[tokio::test]
async fn bad_urls_are_config_errors_without_the_password() {
    for url in [
        "http://u:secret@host",
        "redis://u:secret@",
        "not a url secret",
    ] {
        let err = RedisDedupStore::new_lazy(RedisDedupConfig::new(url)).unwrap_err();
        assert!(
            matches!(err, ackstack_redis::RedisDedupError::Config(_)),
            "{url}: {err:?}"
        );
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    #[cfg(feature = "tls")]
    {
        // rediss:// is accepted (TLS is compiled in with the default `tls` feature); the store
        // prints no password.
        let store =
            RedisDedupStore::new_lazy(RedisDedupConfig::new("rediss://u:secret@127.0.0.1:1"))
                .unwrap();
        assert!(!format!("{store:?}").contains("secret"));
        // A TLS handshake against a closed port fails fast, as an error.
        let config = RedisDedupConfig::new("rediss://u:secret@127.0.0.1:1")
            .timeout(Duration::from_millis(300));
        let store = RedisDedupStore::new_lazy(config).unwrap();
        let err = store.claim(b"k", "a", LEASE).await.unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        // Against a plaintext server the handshake fails: an error, never a plaintext
        // fallback.
        let plain = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let config = RedisDedupConfig::new(plain.replacen("redis://", "rediss://", 1))
            .timeout(Duration::from_secs(2));
        let store = RedisDedupStore::new_lazy(config.clone()).unwrap();
        assert!(store.claim(b"k", "a", LEASE).await.is_err());
        // At start, the error says what the mistake probably is.
        let err = RedisDedupStore::connect(config).await.unwrap_err();
        assert!(
            matches!(err, ackstack_redis::RedisDedupError::TlsTimeout { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not speak TLS"), "{err}");
    }
}

/// Empties Redis's script cache, as a restart does.
async fn flush_scripts(raw: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(raw)
        .await
        .unwrap();
}

#[cfg(feature = "tls")]
/// Writes a throwaway CA and a server certificate for 127.0.0.1 into `dir` with `openssl`.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=ackstack-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn rediss_with_a_password_and_a_private_ca() {
    let dir = std::env::temp_dir().join(unique_prefix("tls").replace(':', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    make_certs(&dir);
    let port = free_port();
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .args([
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = OwnRedis {
        port,
        child: Some(child),
    };
    let url = format!("rediss://:s3cret@127.0.0.1:{port}");
    let config = RedisDedupConfig::new(url.clone())
        .key_prefix(unique_prefix("tls"))
        .tls_ca_file(path("ca.crt"));
    // Wait for the server with the store itself (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match RedisDedupStore::connect(config.clone()).await {
            Ok(store) => break store,
            Err(e) => {
                assert!(Instant::now() < deadline, "no TLS connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(!format!("{store:?} {config:?}").contains("s3cret"));
    assert_eq!(
        store.claim(b"k", "a", LEASE).await.unwrap(),
        Claim::Acquired
    );
    assert!(store.complete(b"k", "a", TTL).await.unwrap());
    assert_eq!(store.claim(b"k", "b", LEASE).await.unwrap(), Claim::Done);

    // A wrong password is refused at connect, without echoing the password.
    let wrong = RedisDedupConfig::new(format!("rediss://:wrongpw@127.0.0.1:{port}"))
        .tls_ca_file(path("ca.crt"))
        .timeout(Duration::from_millis(500));
    let err = RedisDedupStore::connect(wrong).await.unwrap_err();
    assert!(!err.to_string().contains("wrongpw"), "{err}");
    // Without the private CA the server's certificate is not trusted.
    let untrusted = RedisDedupConfig::new(url).timeout(Duration::from_millis(500));
    assert!(RedisDedupStore::connect(untrusted).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
