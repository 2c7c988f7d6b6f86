//! The order example: a consumer that charges orders reliably.
