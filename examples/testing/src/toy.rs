//! A toy adapter: the shape of an adapter for a broker of your own, here over the in-memory
//! broker so that it runs anywhere.
//!
//! An adapter is two types. A [`Source`] receives batches of deliveries, each with the
//! broker's handle for it (its token: a delivery tag, a receipt handle, an offset); a
//! [`Settle`] handle, shared by every delivery in flight, acks, retries, dead-letters and
//! extends them by token. The runner decides *what* happens to a delivery; the adapter only
//! says *how* its broker does it. The conformance suite (`tests/conformance.rs`) checks that
//! it does so without breaking an invariant.

use std::time::Duration;

use ackstack::adapter::{
    AckReport, Capabilities, DeadLetter, Received, Settle, SettleError, SettleFailure, Settled,
    Source, SourceError,
};
use ackstack::memory::{MemorySettler, MemorySource, MemoryToken};
use ackstack::{Delivery, Failure, MemoryBroker};

/// The toy broker's handle for one delivery.
#[derive(Clone, Debug)]
pub struct ToyToken(MemoryToken);

/// Receives from one queue of a [`MemoryBroker`].
pub struct ToySource {
    inner: MemorySource,
}

impl ToySource {
    /// A consumer of `queue` whose deliveries are leased for `lease`.
    pub fn new(broker: &MemoryBroker, queue: &str, lease: Duration) -> Self {
        ToySource {
            inner: broker.source(queue).visibility_timeout(lease),
        }
    }
}

impl Source for ToySource {
    type Token = ToyToken;
    type Settler = ToySettler;

    async fn receive(&mut self, max: usize) -> Result<Vec<Received<ToyToken>>, SourceError> {
        let batch = self.inner.receive(max).await?;
        Ok(batch
            .into_iter()
            .map(|received| {
                let mut delivery = received.delivery;
                delivery.origin.broker = "toy";
                Received::new(delivery, ToyToken(received.token)).suspect(received.suspect)
            })
            .collect())
    }

    fn settler(&self) -> ToySettler {
        ToySettler {
            inner: self.inner.settler(),
        }
    }

    /// What the broker can do: the runner and the suite adapt to it (a broker without leases
    /// skips the lease checks; one without delayed redelivery retries in place).
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// Settles the deliveries of a [`ToySource`].
#[derive(Clone)]
pub struct ToySettler {
    inner: MemorySettler,
}

/// Maps the inner broker's settlement result to this adapter's tokens.
fn wrap(
    result: Result<Settled<MemoryToken>, SettleFailure<MemoryToken>>,
) -> Result<Settled<ToyToken>, SettleFailure<ToyToken>> {
    match result {
        Ok(Settled::Done) => Ok(Settled::Done),
        Ok(Settled::AckOriginal(token)) => Ok(Settled::AckOriginal(ToyToken(token))),
        Err(failure) => Err(SettleFailure::new(ToyToken(failure.token), failure.error)),
    }
}

impl Settle for ToySettler {
    type Token = ToyToken;

    async fn ack(&self, tokens: Vec<ToyToken>) -> AckReport<ToyToken> {
        let report = self
            .inner
            .ack(tokens.into_iter().map(|t| t.0).collect())
            .await;
        AckReport {
            acked: report.acked,
            failed: report
                .failed
                .into_iter()
                .map(|(t, e)| (ToyToken(t), e))
                .collect(),
        }
    }

    async fn retry(
        &self,
        token: ToyToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<ToyToken>, SettleFailure<ToyToken>> {
        wrap(self.inner.retry(token.0, delivery, after, failure).await)
    }

    // Its capabilities are the in-memory broker's, which defers (`Capabilities::defers`):
    // without this, a deferral would fall back to a retry and use an attempt, and the
    // conformance suite's deferral checks would say so.
    async fn defer(
        &self,
        token: ToyToken,
        delivery: &Delivery,
        after: Duration,
        failure: &Failure,
    ) -> Result<Settled<ToyToken>, SettleFailure<ToyToken>> {
        wrap(self.inner.defer(token.0, delivery, after, failure).await)
    }

    async fn dead_letter(
        &self,
        token: ToyToken,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<Settled<ToyToken>, SettleFailure<ToyToken>> {
        wrap(self.inner.dead_letter(token.0, delivery, letter).await)
    }

    async fn extend(&self, token: &ToyToken, by: Duration) -> Result<(), SettleError> {
        self.inner.extend(&token.0, by).await
    }

    async fn release(&self, token: ToyToken) {
        self.inner.release(token.0).await
    }
}
