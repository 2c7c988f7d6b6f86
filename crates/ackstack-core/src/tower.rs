//! Interoperability with [tower](https://docs.rs/tower) (feature `tower`).
//!
//! - [`service_handler`] makes a [`Handler`] of a `tower::Service<Delivery>`, so the tower
//!   middleware a service already uses (timeouts, rate and concurrency limits, load shedding)
//!   applies to message handling too.
//! - ackstack's built-in layers ([`RetryLayer`], [`DedupLayer`]) also implement `tower_layer::Layer`, so they compose
//!   with `tower_layer::Stack` or `tower::ServiceBuilder` like any other layer. What they wrap
//!   is still a [`Process`], not a `Service`: a process is called through
//!   `&self` by many deliveries at once and returns an [`Outcome`](crate::Outcome) that the
//!   runner settles, with no `poll_ready` step, so that the per-message path needs neither a
//!   clone of the stack nor a lock.
//!
//! ```
//! use std::time::Duration;
//!
//! use ackstack_core::tower::service_handler;
//! use ackstack_core::{Consumer, Delivery, HandlerError, MemoryBroker, Message};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Message::new("A-1"));
//!
//! // An existing tower service, with the middleware it already has.
//! let service = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(5))
//!     .concurrency_limit(16)
//!     .service_fn(|delivery: Delivery| async move {
//!         assert_eq!(&delivery.payload[..], b"A-1");
//!         Ok::<(), HandlerError>(())
//!     });
//!
//! let consumer = Consumer::new(broker.source("orders"));
//! let idle = consumer.status();
//! let summary = consumer
//!     .run_until(service_handler(service), async move {
//!         idle.idle(Duration::from_millis(200)).await
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(summary.acked, 1);
//! # }
//! ```

use std::future::poll_fn;

use tower_service::Service;

use crate::Delivery;
use crate::dedup::{Dedup, DedupLayer};
use crate::error::{BoxError, HandlerError};
use crate::handler::{Context, Handler, Process};
use crate::retry::{Retry, RetryLayer};

/// A [`Handler`] that calls a `tower::Service<Delivery>`; see [`service_handler`].
#[derive(Debug)]
pub struct ServiceHandler<S> {
    service: tokio::sync::Mutex<S>,
}

/// Makes a [`Handler`] of `service`.
///
/// One instance of the service serves every delivery, as one instance serves every request of
/// a server: for each delivery the handler waits for `poll_ready` (holding the service, so a
/// concurrency or rate limit pushes back on the consumer), then `call`s it with a clone of the
/// delivery and awaits the response without holding the service, so calls run concurrently up
/// to the consumer's `concurrency`.
///
/// The rule is a handler's: an error of the service that is a [`HandlerError`] (boxed, as
/// `tower`'s middleware boxes errors) keeps its kind and requested delay; any other error (a
/// `tower` timeout, an overloaded load shedder, your own error type) is transient: the
/// delivery is retried with backoff.
///
/// tower treats an error from `poll_ready` as "this service is gone"; here every delivery
/// polls it again, so a service that stays broken (a `Buffer` whose worker died) fails each
/// delivery transiently until its attempts run out. Build the service so that readiness
/// errors are temporary, or stop the consumer when they are not.
pub fn service_handler<S>(service: S) -> ServiceHandler<S>
where
    S: Service<Delivery, Response = ()> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    ServiceHandler {
        service: tokio::sync::Mutex::new(service),
    }
}

fn handler_error(err: impl Into<BoxError>) -> HandlerError {
    HandlerError::from_boxed(err.into())
}

impl<S> Handler for ServiceHandler<S>
where
    S: Service<Delivery, Response = ()> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    async fn handle(&self, delivery: &Delivery, _cx: &Context) -> Result<(), HandlerError> {
        let response = {
            let mut service = self.service.lock().await;
            poll_fn(|task| service.poll_ready(task))
                .await
                .map_err(handler_error)?;
            service.call(delivery.clone())
        };
        response.await.map_err(handler_error)
    }
}

impl<P: Process> tower_layer::Layer<P> for RetryLayer {
    type Service = Retry<P>;
    fn layer(&self, inner: P) -> Retry<P> {
        crate::Layer::layer(self, inner)
    }
}

impl<P: Process> tower_layer::Layer<P> for DedupLayer {
    type Service = Dedup<P>;
    fn layer(&self, inner: P) -> Dedup<P> {
        crate::Layer::layer(self, inner)
    }
}
