//! The lease keeper's unit tests.

#![allow(clippy::unwrap_used)]

use super::super::test_settler::Recording;
use super::*;

const LEASE: Duration = Duration::from_secs(10);

fn keeper(settler: &Recording) -> LeaseKeeper<u32> {
    let watch = Watch {
        metrics: Arc::new(Metrics::detached()),
        stats: Arc::default(),
    };
    LeaseKeeper::spawn(
        settler.clone(),
        LEASE,
        LeaseConfig::default(),
        watch,
        Arc::default(),
    )
}

fn batch(tokens: &[u32]) -> Vec<u32> {
    tokens.to_vec()
}

#[tokio::test(start_paused = true)]
async fn only_deliveries_still_in_flight_when_the_first_extension_is_due_are_extended() {
    let settler = Recording::default();
    let keeper = keeper(&settler);
    let mut guards = keeper.hold_batch(Instant::now(), batch(&[1, 2, 3, 4]));
    let done_early = guards.next().unwrap();
    let kept = guards.next().unwrap();
    let released_early = guards.next().unwrap();
    // The fourth guard is never taken: the batch's guards dropped mark it done.
    drop(guards);
    drop(done_early);
    released_early.release().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        settler.extensions_of(2),
        1,
        "the delivery in flight is extended at 70%"
    );
    for done in [1, 3, 4] {
        assert_eq!(
            settler.extensions_of(done),
            0,
            "token {done} was done before"
        );
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        settler.extensions_of(2),
        2,
        "and again at 70% of the extended lease"
    );
    assert!(!kept.is_lost());
    drop(kept);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(settler.extensions_of(2), 2, "dropped: no more extensions");
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_deliveries_are_all_done_is_forgotten_at_once() {
    let settler = Recording::default();
    let keeper = keeper(&settler);
    let mut guards = keeper.hold_batch(Instant::now(), batch(&[1, 2, 3]));
    let first = guards.next().unwrap();
    let second = guards.next().unwrap();
    let batch = Arc::downgrade(&first.batch);
    drop(guards);
    drop(first);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(batch.upgrade().is_some(), "one delivery still in flight");
    second.release().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        batch.upgrade().is_none(),
        "the keeper let go of the batch long before its first extension was due"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(settler.extended.lock().unwrap().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn releasing_a_kept_lease_waits_for_its_extension_in_flight() {
    let settler = Recording {
        extend_takes: Duration::from_secs(2),
        ..Recording::default()
    };
    let keeper = keeper(&settler);
    let mut guards = keeper.hold_batch(Instant::now(), batch(&[7]));
    let guard = guards.next().unwrap();
    // The extension starts at 7 s and ends at 9 s.
    tokio::time::sleep(Duration::from_millis(7500)).await;
    assert_eq!(settler.extensions_of(7), 0, "still on its way");
    guard.release().await;
    assert_eq!(
        settler.extensions_of(7),
        1,
        "the release answered after the extension landed"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(settler.extensions_of(7), 1);
}

#[tokio::test(start_paused = true)]
async fn a_kept_lease_that_lapses_fires_its_token_and_is_lost() {
    let settler = Recording {
        // Longer than what is left of the lease at 70%.
        extend_takes: Duration::from_secs(5),
        ..Recording::default()
    };
    let keeper = keeper(&settler);
    let mut guards = keeper.hold_batch(Instant::now(), [9]);
    let guard = guards.next().unwrap();
    let cancel = guard.cancel();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(guard.is_lost());
    assert!(cancel.is_cancelled());
    assert!(
        cancel.token().is_cancelled(),
        "a token made afterwards is cancelled too"
    );
}
