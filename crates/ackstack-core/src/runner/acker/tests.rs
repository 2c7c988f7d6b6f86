//! The acker's tests: batching, flushing, ordering and backpressure, under tokio's paused
//! clock where they wait.

#![allow(clippy::unwrap_used)]

use super::super::test_settler::Recording;
use super::*;

fn noop() -> Arc<Metrics> {
    Arc::new(Metrics::detached())
}

#[tokio::test(start_paused = true)]
async fn ack_batches_never_exceed_the_batch_size_and_flush_within_the_max_delay() {
    let settler = Recording::default();
    let acker = BatchAcker::spawn(
        settler.clone(),
        10,
        Duration::from_millis(100),
        1,
        64,
        noop(),
    );
    let queue = acker.queue();
    let started = Instant::now();
    for i in 0..25 {
        queue.push(i).await;
    }
    let pushed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;
    {
        let batches = settler.batches.lock().unwrap();
        let sizes: Vec<_> = batches.iter().map(|b| b.0).collect();
        assert_eq!(
            sizes,
            vec![10, 10, 5],
            "full batches at once, the rest within the delay"
        );
        assert!(batches[2].1 - pushed_at <= Duration::from_millis(100));
        assert!(
            batches[..2]
                .iter()
                .all(|b| b.1 - started < Duration::from_millis(100)),
            "a full batch does not wait for the delay"
        );
    }
    queue.push(99).await;
    drop(queue);
    acker.shutdown().await;
    let batches = settler.batches.lock().unwrap();
    assert_eq!(batches.last().unwrap().0, 1, "flushed on shutdown");
    assert!(batches.iter().all(|b| b.0 <= 10));
}

#[tokio::test(start_paused = true)]
async fn acks_queued_one_by_one_go_as_soon_as_they_fill_a_batch() {
    let settler = Recording::default();
    let acker = BatchAcker::spawn(
        settler.clone(),
        10,
        Duration::from_secs(3600),
        1,
        64,
        noop(),
    );
    let queue = acker.queue();
    let started = Instant::now();
    for i in 0..10 {
        assert!(queue.push(i).await);
        // The acker takes each ack before the next one comes.
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let batches = settler.batches.lock().unwrap().clone();
    assert_eq!(
        batches.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![10],
        "the tenth ack completed the batch"
    );
    assert!(batches[0].1 - started < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_flush_sends_what_is_queued_at_once_and_answers_once_it_is_acked() {
    let settler = Recording::default();
    let acker = BatchAcker::spawn(
        settler.clone(),
        10,
        Duration::from_secs(3600),
        2,
        64,
        noop(),
    );
    let queue = acker.queue();
    let started = Instant::now();
    for i in 0..3 {
        assert!(queue.push(i).await);
    }
    assert!(queue.flush().await);
    {
        let batches = settler.batches.lock().unwrap();
        assert_eq!(
            batches.iter().map(|b| b.0).sum::<usize>(),
            3,
            "acked before the flush answered"
        );
        assert!(
            batches
                .iter()
                .all(|b| b.1 - started < Duration::from_secs(1)),
            "without waiting for the batch delay"
        );
    }
    assert!(
        queue.flush().await,
        "a flush with nothing queued answers too"
    );
    drop(queue);
    acker.shutdown().await;
}

/// A settler that tracks positions (RabbitMQ's delivery tags) can ack cumulatively only
/// up to its lowest unfinished position: a call started before the one gathered ahead
/// of it holds its tags back (and, past half the prefetch, makes them go one frame
/// each). On one worker thread tokio runs the task spawned last first, so calls spawned
/// one after another started in reverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn ack_calls_start_in_the_order_their_batches_were_gathered() {
    let settler = Recording::default();
    let firsts = settler.firsts.clone();
    // On the worker, so that the acker runs only once all 40 are queued.
    tokio::spawn(async move {
        let acker = BatchAcker::spawn(settler, 10, Duration::from_secs(5), 4, 64, noop());
        let queue = acker.queue();
        for i in 0..40 {
            assert!(queue.push(i).await);
        }
        drop(queue);
        acker.shutdown().await;
    })
    .await
    .unwrap();
    assert_eq!(*firsts.lock().unwrap(), vec![0, 10, 20, 30]);
}

#[tokio::test]
async fn a_panicking_ack_call_is_counted_failed_and_the_acker_goes_on() {
    let settler = Recording::default();
    settler.panic_once.store(true, Ordering::Release);
    let acker = BatchAcker::spawn(settler, 10, Duration::from_millis(10), 2, 64, noop());
    let queue = acker.queue();
    for i in 0..20 {
        assert!(queue.push(i).await);
    }
    drop(queue);
    let stats = acker.stats().clone();
    acker.shutdown().await;
    assert_eq!(
        stats.failed.load(Ordering::Acquire),
        10,
        "the panicked batch"
    );
    assert_eq!(stats.acked.load(Ordering::Acquire), 10, "the next batch");
}

#[tokio::test(start_paused = true)]
async fn a_full_ack_queue_pushes_back_instead_of_growing() {
    let stuck = Recording {
        stuck: true,
        ..Recording::default()
    };
    let acker = BatchAcker::spawn(stuck, 4, Duration::from_millis(10), 1, 8, noop());
    let queue = acker.queue();
    let mut accepted = 0;
    for i in 0..100 {
        match tokio::time::timeout(Duration::from_secs(1), queue.push(i)).await {
            Ok(true) => accepted += 1,
            _ => break,
        }
    }
    // One batch in flight (4), one being gathered (4) and the queue's capacity (8).
    assert!(
        accepted <= 16,
        "accepted {accepted} tokens while acks were stuck"
    );
}
