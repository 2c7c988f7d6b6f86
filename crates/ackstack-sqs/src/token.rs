//! [`SqsToken`]: one received message's handle.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageAttributeValue;

use crate::config::MAX_VISIBILITY;

/// A received message's handle: its receipt handle and what settling it needs later.
///
/// Cheap to clone (one `Arc`). It keeps the original message attributes exactly as SQS
/// returned them, so a dead-letter copy carries every attribute with its type (String, Number,
/// Binary, custom suffixes) unchanged.
#[derive(Clone)]
pub struct SqsToken(pub(crate) Arc<TokenInner>);

/// What a token holds.
pub(crate) struct TokenInner {
    pub(crate) receipt_handle: String,
    pub(crate) message_id: Option<String>,
    pub(crate) group_id: Option<String>,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    pub(crate) received_at: Instant,
}

impl SqsToken {
    /// A token for a receipt handle obtained elsewhere (tools, tests), with no attributes.
    pub fn from_receipt_handle(receipt_handle: impl Into<String>) -> Self {
        SqsToken(Arc::new(TokenInner {
            receipt_handle: receipt_handle.into(),
            message_id: None,
            group_id: None,
            attributes: HashMap::new(),
            received_at: Instant::now(),
        }))
    }

    /// The receipt handle of this receive.
    pub fn receipt_handle(&self) -> &str {
        &self.0.receipt_handle
    }

    /// The SQS message id.
    pub fn message_id(&self) -> Option<&str> {
        self.0.message_id.as_deref()
    }

    /// The FIFO message group id.
    pub fn message_group_id(&self) -> Option<&str> {
        self.0.group_id.as_deref()
    }

    /// The message attributes as received.
    pub fn attributes(&self) -> &HashMap<String, MessageAttributeValue> {
        &self.0.attributes
    }

    /// How much of SQS's 12-hour visibility budget (counted from this receive) is left.
    pub(crate) fn visibility_budget(&self) -> Duration {
        // One second of margin for clock skew and request latency.
        MAX_VISIBILITY
            .saturating_sub(self.0.received_at.elapsed())
            .saturating_sub(Duration::from_secs(1))
    }
}

impl fmt::Debug for SqsToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let handle = &self.0.receipt_handle;
        let short: String = handle.chars().take(16).collect();
        f.debug_struct("SqsToken")
            .field("message_id", &self.0.message_id)
            .field("receipt_handle", &format_args!("{short}…"))
            .field("attributes", &self.0.attributes.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_debug_hides_most_of_the_handle() {
        let t = SqsToken::from_receipt_handle("x".repeat(200));
        let shown = format!("{t:?}");
        assert!(shown.len() < 120, "{shown}");
        assert!(t.visibility_budget() > Duration::from_secs(43_000));
    }
}
