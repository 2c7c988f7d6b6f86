//! The conformance suite on the in-memory broker with the Redis dedup store at `REDIS_URL`
//! (default the local server), so the dedup checks run against real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use ackstack_redis::{RedisDedupConfig, RedisDedupStore};
use ackstack_testkit::{MemoryHarness, run_all, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dedup_store_conforms() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = RedisDedupConfig::new(url);
    config.key_prefix = format!("{}:", unique_name("conformance"));
    let store = RedisDedupStore::connect(config).await.unwrap();
    run_all(MemoryHarness::new().with_dedup_store(Arc::new(store)))
        .await
        .assert_passed();
}
