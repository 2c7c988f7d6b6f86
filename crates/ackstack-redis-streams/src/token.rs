//! [`RedisStreamsToken`]: what settling one delivery needs (its entry id).

use std::sync::Arc;

/// The handle of one stream entry handed to this consumer: its id and the group's count of
/// its deliveries.
#[derive(Clone, Debug)]
pub struct RedisStreamsToken {
    pub(crate) id: Arc<str>,
    pub(crate) delivered: u64,
}

impl RedisStreamsToken {
    /// The entry's id in the stream.
    pub fn entry_id(&self) -> &str {
        &self.id
    }

    /// How often the group has handed the entry out, this time included.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}
