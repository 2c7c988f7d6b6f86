//! A settler for the runner's unit tests: records ack batches and lease extensions.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::{
    AckReport, DeadLetter, Delivery, Failure, Settle, SettleError, SettleFailure, Settled,
};

/// Records the size and arrival of each ack batch and the token of each extension; its acks
/// never complete when `stuck`, and each extension takes `extend_takes`.
#[derive(Clone, Default)]
pub(super) struct Recording {
    pub(super) batches: Arc<Mutex<Vec<(usize, Instant)>>>,
    /// The first token of each ack call, recorded when the call starts (its first poll).
    pub(super) firsts: Arc<Mutex<Vec<u32>>>,
    /// When set, the next ack call panics (and clears it).
    pub(super) panic_once: Arc<AtomicBool>,
    pub(super) extended: Arc<Mutex<Vec<u32>>>,
    pub(super) stuck: bool,
    pub(super) extend_takes: Duration,
}

impl Recording {
    /// How many times `token`'s lease was extended.
    pub(super) fn extensions_of(&self, token: u32) -> usize {
        let extended = self.extended.lock().unwrap();
        extended.iter().filter(|&&t| t == token).count()
    }
}

impl Settle for Recording {
    type Token = u32;
    async fn ack(&self, tokens: Vec<u32>) -> AckReport<u32> {
        if self.panic_once.swap(false, Ordering::AcqRel) {
            panic!("ack call panicked on purpose");
        }
        if let Some(first) = tokens.first() {
            self.firsts.lock().unwrap().push(*first);
        }
        if self.stuck {
            std::future::pending::<()>().await;
        }
        self.batches
            .lock()
            .unwrap()
            .push((tokens.len(), Instant::now()));
        AckReport::all(tokens.len())
    }
    async fn retry(
        &self,
        t: u32,
        _: &Delivery,
        _: Duration,
        _: &Failure,
    ) -> Result<Settled<u32>, SettleFailure<u32>> {
        Ok(Settled::AckOriginal(t))
    }
    async fn dead_letter(
        &self,
        t: u32,
        _: &Delivery,
        _: &DeadLetter,
    ) -> Result<Settled<u32>, SettleFailure<u32>> {
        Ok(Settled::AckOriginal(t))
    }
    async fn extend(&self, token: &u32, _: Duration) -> Result<(), SettleError> {
        tokio::time::sleep(self.extend_takes).await;
        self.extended.lock().unwrap().push(*token);
        Ok(())
    }
}
