//! The suite against the in-memory broker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_conforms() {
    ackstack_testkit::run_all(ackstack_testkit::MemoryHarness::new())
        .await
        .assert_passed();
}
