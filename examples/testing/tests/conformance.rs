//! The conformance suite on the toy adapter: what an adapter author's test looks like.
//!
//! A [`Harness`] tells the suite how to reach the broker: make a fresh queue, start a
//! consumer on it as a new process would, publish to it, and read its dead letters once.
//! `run_all` then drives the adapter through the real runner, check by check, and the report
//! names each check that failed and why.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ackstack::MemoryBroker;
use ackstack::memory::MemoryPublisher;
use ackstack_testkit::{DeadLetterCopy, Harness, TestQueue, run_all, unique_name};
use example_testing::toy::ToySource;

#[derive(Default)]
struct Toy {
    broker: MemoryBroker,
    /// How many dead letters of each queue were returned already (reads must not repeat).
    returned: Mutex<HashMap<String, usize>>,
}

impl Harness for Toy {
    type Source = ToySource;
    type Publisher = MemoryPublisher;

    fn name(&self) -> &'static str {
        "toy"
    }

    async fn create(&self, lease: Duration) -> TestQueue {
        TestQueue {
            name: unique_name("toy"),
            lease,
        }
    }

    async fn source(&self, queue: &TestQueue) -> ToySource {
        ToySource::new(&self.broker, &queue.name, queue.lease)
    }

    async fn publisher(&self, queue: &TestQueue) -> MemoryPublisher {
        self.broker.publisher(&queue.name)
    }

    async fn read_dead_letters(&self, queue: &TestQueue) -> Vec<DeadLetterCopy> {
        let all = self.broker.dead_letters(&queue.name);
        let mut returned = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        let seen = returned.entry(queue.name.clone()).or_default();
        let new: Vec<_> = all.into_iter().skip(*seen).collect();
        *seen += new.len();
        new.into_iter()
            .filter_map(|m| DeadLetterCopy::from_headers(m.payload, m.headers))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_toy_adapter_passes_the_conformance_suite() {
    run_all(Toy::default()).await.assert_passed();
}
