//! The in-memory broker: no server, nothing persisted; dead letters go to `<queue>-dlq` inside
//! the same process.

use ackstack::MemoryBroker;
use ackstack::memory::{MemoryPublisher, MemorySource};

use crate::{CONSUMER_NAME, Options};

/// A fresh broker's source and publisher for `--queue`.
pub fn connect(opts: &Options) -> (MemorySource, MemoryPublisher) {
    let broker = MemoryBroker::new();
    let source = broker.source(&opts.queue).consumer_name(CONSUMER_NAME);
    (source, broker.publisher(&opts.queue))
}
