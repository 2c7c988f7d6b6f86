//! Typed payload decoding: a payload that does not decode is a permanent failure.

use serde::de::DeserializeOwned;

use crate::delivery::Delivery;
use crate::error::{ErrorKind, HandlerError};

/// A payload that is not valid JSON for the expected type.
#[derive(Debug, thiserror::Error)]
#[error("payload is not a valid {type_name}")]
pub struct DecodeError {
    type_name: &'static str,
    #[source]
    source: serde_json::Error,
}

/// Decodes the delivery's payload as JSON into `T`; failure is a [`HandlerError`] of kind
/// [`ErrorKind::Permanent`] (retrying cannot fix a malformed message), so `?` in a handler
/// dead-letters it.
///
/// ```
/// use ackstack_core::{Delivery, Origin, decode::json};
///
/// #[derive(Debug, serde::Deserialize)]
/// struct Order { order_id: String }
///
/// let good = Delivery::new(r#"{"order_id":"A-1"}"#, Origin::new("memory", "orders", "doc"));
/// assert_eq!(json::<Order>(&good).unwrap().order_id, "A-1");
/// let bad = Delivery::new("{not json", Origin::new("memory", "orders", "doc"));
/// assert_eq!(json::<Order>(&bad).unwrap_err().kind(), ackstack_core::ErrorKind::Permanent);
/// ```
pub fn json<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, HandlerError> {
    serde_json::from_slice(&delivery.payload).map_err(|source| {
        HandlerError::new(
            ErrorKind::Permanent,
            DecodeError {
                type_name: std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message"),
                source,
            },
        )
    })
}

/// Whether `err` (or anything in its chain) is a decode error; a ready-made check for
/// [`Consumer::classify`](crate::Consumer::classify) hooks.
pub fn is_decode_error(err: &HandlerError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.inner());
    while let Some(e) = cur {
        if e.is::<DecodeError>() || e.is::<serde_json::Error>() {
            return true;
        }
        cur = e.source();
    }
    false
}
