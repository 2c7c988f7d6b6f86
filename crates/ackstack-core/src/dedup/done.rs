//! Done marks written right before their delivery's ack batch.
//!
//! A delivery acked by its handler must have its key marked done before the broker hears the
//! ack (a redelivery after the ack would otherwise run again). Under the runner, the layer
//! does not write the mark itself: it leaves a [`DoneMark`] in the delivery's
//! [`Context`](crate::Context), the runner queues it with the ack, and the acker writes the
//! marks of one ack batch together ([`write_all`]), right before that batch goes to the
//! broker. A pipelining store (Redis) sends them in one round trip, so a done mark costs a
//! fraction of a round trip per message instead of one.

use std::sync::Arc;
use std::time::Duration;

use super::{DedupStore, ShowKey};

/// A key to mark done once its handler succeeded.
pub(crate) struct DoneMark {
    pub(crate) store: Arc<dyn DedupStore>,
    pub(crate) key: Vec<u8>,
    pub(crate) token: String,
    pub(crate) ttl: Duration,
}

impl std::fmt::Debug for DoneMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DoneMark({})", ShowKey(&self.key))
    }
}

impl DoneMark {
    /// Replaces the claim by the done marker. A failure is logged, not returned: the effect
    /// happened, so acking is still right (a later duplicate may run again).
    pub(crate) async fn write(&self) {
        self.log(self.store.complete(&self.key, &self.token, self.ttl).await);
    }

    fn log(&self, answer: Result<bool, super::DedupError>) {
        match answer {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key = %ShowKey(&self.key), "dedup claim had lapsed before completion")
            }
            Err(err) => {
                tracing::warn!(error = %err, key = %ShowKey(&self.key), "could not mark the dedup key done")
            }
        }
    }
}

/// Writes every mark and waits for all of them: marks of one store and TTL (normally all of
/// them) in one [`DedupStore::complete_all`] call.
pub(crate) async fn write_all(marks: &[DoneMark]) {
    let mut rest = marks;
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|m| Arc::ptr_eq(&m.store, &first.store) && m.ttl == first.ttl)
            .count();
        let (group, tail) = rest.split_at(same);
        if let [one] = group {
            one.write().await;
        } else {
            let pairs: Vec<(&[u8], &str)> = group
                .iter()
                .map(|m| (&m.key[..], m.token.as_str()))
                .collect();
            let answers = first.store.complete_all(&pairs, first.ttl).await;
            for (mark, answer) in group.iter().zip(answers) {
                mark.log(answer);
            }
        }
        rest = tail;
    }
}
