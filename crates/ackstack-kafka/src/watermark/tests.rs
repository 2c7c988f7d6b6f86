//! Unit tests of `watermark.rs`.

use super::*;

/// What `take_commits` returns, without the metadata.
fn commits(a: &mut Assignments, all: bool) -> Vec<(String, i32, i64)> {
    a.take_commits(all)
        .into_iter()
        .map(|c| (c.topic, c.partition, c.position))
        .collect()
}

/// One assigned partition `t`/0 and its generation.
fn assigned() -> (Assignments, Generation) {
    let mut a = Assignments::new();
    let g = a.assign("t", 0);
    (a, g)
}

#[test]
fn empty_has_nothing_to_commit() {
    let (a, _) = assigned();
    assert_eq!(a.committable("t", 0), None);
    assert_eq!(a.committable("t", 1), None, "not assigned");
}

#[test]
fn in_order_completion_moves_one_past_the_last() {
    let (mut a, g) = assigned();
    for o in 0..5 {
        a.track("t", 0, o);
    }
    // Pinned at the first record before anything completed.
    assert_eq!(a.committable("t", 0), Some(0));
    for o in 0..5 {
        assert_eq!(a.complete("t", 0, o, g), Ok(()));
        assert_eq!(a.committable("t", 0), Some(o + 1));
    }
}

#[test]
fn out_of_order_completion_never_passes_an_unfinished_offset() {
    let (mut a, g) = assigned();
    for o in 10..20 {
        a.track("t", 0, o);
    }
    // Complete everything except 13, in reverse order.
    for o in (10..20).rev().filter(|&o| o != 13) {
        a.complete("t", 0, o, g).unwrap();
        let pos = a.committable("t", 0).unwrap();
        assert!(pos <= 13, "position {pos} passed unfinished offset 13");
    }
    assert_eq!(a.committable("t", 0), Some(13));
    a.complete("t", 0, 13, g).unwrap();
    assert_eq!(a.committable("t", 0), Some(20));
}

#[test]
fn gaps_are_tolerated() {
    let (mut a, g) = assigned();
    // Offsets 3, 4 and 8 do not exist (compaction, transaction markers).
    for o in [0, 1, 2, 5, 6, 7, 9] {
        a.track("t", 0, o);
    }
    for o in [9, 7, 6, 5, 2, 1] {
        a.complete("t", 0, o, g).unwrap();
    }
    assert_eq!(a.committable("t", 0), Some(0));
    a.complete("t", 0, 0, g).unwrap();
    assert_eq!(a.committable("t", 0), Some(10));
    // A gap right below the lowest offset in flight is passed.
    a.track("t", 0, 15);
    assert_eq!(a.committable("t", 0), Some(15));
}

#[test]
fn duplicate_or_unknown_completion_changes_nothing() {
    let (mut a, g) = assigned();
    a.track("t", 0, 1);
    a.track("t", 0, 2);
    assert_eq!(a.complete("t", 0, 2, g), Ok(()));
    assert_eq!(
        a.complete("t", 0, 2, g),
        Ok(()),
        "accepted, changes nothing"
    );
    assert_eq!(
        a.complete("t", 0, 99, g),
        Ok(()),
        "accepted, changes nothing"
    );
    assert_eq!(a.committable("t", 0), Some(1));
    a.complete("t", 0, 1, g).unwrap();
    assert_eq!(a.committable("t", 0), Some(3), "99 was never in flight");
}

#[test]
fn old_generation_cannot_move_the_new_position() {
    let mut a = Assignments::new();
    let g1 = a.assign("t", 0);
    a.track("t", 0, 0);
    a.track("t", 0, 1);
    assert_eq!(a.complete("t", 0, 0, g1), Ok(()));
    // Revoked with offset 1 still in flight: only 1 may be committed.
    assert_eq!(a.revoke("t", 0).map(|c| c.position), Some(1));
    assert_eq!(a.complete("t", 0, 1, g1), Err(Stale));
    // Assigned again: the new generation starts where the broker resumes (offset 1).
    let g2 = a.assign("t", 0);
    assert_ne!(g1, g2);
    assert_eq!(a.track("t", 0, 1), Some(g2));
    a.track("t", 0, 2);
    // A late completion of offset 1 from the old generation is refused...
    assert_eq!(a.complete("t", 0, 1, g1), Err(Stale));
    assert_eq!(a.complete("t", 0, 2, g1), Err(Stale));
    assert_eq!(a.committable("t", 0), Some(1));
    // ...while the new generation's own completions count.
    assert_eq!(a.complete("t", 0, 2, g2), Ok(()));
    assert_eq!(a.committable("t", 0), Some(1));
    assert_eq!(a.complete("t", 0, 1, g2), Ok(()));
    assert_eq!(a.committable("t", 0), Some(3));
    assert!(a.is_current("t", 0, g2));
    assert!(!a.is_current("t", 0, g1));
}

#[test]
fn take_commits_reports_only_progress() {
    let mut a = Assignments::new();
    let g = a.assign("t", 0);
    a.assign("t", 1);
    assert!(commits(&mut a, false).is_empty());
    a.track("t", 0, 5);
    a.complete("t", 0, 5, g).unwrap();
    assert_eq!(commits(&mut a, false), vec![("t".to_string(), 0, 6)]);
    assert!(commits(&mut a, false).is_empty());
    assert_eq!(commits(&mut a, true), vec![("t".to_string(), 0, 6)]);
    assert_eq!(a.revoke("t", 0).map(|c| c.position), Some(6));
    assert_eq!(a.track("t", 0, 7), None, "no longer assigned");
    assert_eq!(a.len(), 1);
}

#[test]
fn take_commits_never_returns_a_position_below_the_last_taken() {
    let (mut a, g) = assigned();
    for o in 0..5 {
        a.track("t", 0, o);
        a.complete("t", 0, o, g).unwrap();
    }
    assert_eq!(commits(&mut a, false), vec![("t".to_string(), 0, 5)]);
    // A lower offset turns up in flight (a record fetched again): its position is older
    // than what was committed, so it is not committed, not even by a full flush.
    a.track("t", 0, 3);
    assert_eq!(a.committable("t", 0), Some(3));
    assert_eq!(
        commits(&mut a, true),
        vec![("t".to_string(), 0, 5)],
        "a full flush commits the last position again, never 3"
    );
    assert!(commits(&mut a, false).is_empty());
    a.complete("t", 0, 3, g).unwrap();
    assert_eq!(commits(&mut a, true), vec![("t".to_string(), 0, 5)]);
}

#[test]
fn rewind_starts_a_generation_that_holds_the_position_until_it_is_read_again() {
    let (mut a, g) = assigned();
    for o in 0..5 {
        a.track("t", 0, o);
    }
    a.complete("t", 0, 0, g).unwrap();
    a.complete("t", 0, 2, g).unwrap();
    // 1 is released: read again from it.
    assert_eq!(a.rewind_position("t", 0, g), Ok(Some(1)));
    let g2 = a.rewind("t", 0, g, 1).unwrap();
    assert_ne!(g, g2);
    assert!(!a.is_current("t", 0, g));
    assert_eq!(a.complete("t", 0, 3, g), Err(Stale), "old tokens are stale");
    assert_eq!(a.rewind("t", 0, g, 1), Err(Stale));
    assert_eq!(a.rewind_position("t", 0, g), Err(Stale));
    assert_eq!(a.committable("t", 0), Some(1));
    // A record fetched before the seek (offset 4) completes first: the position holds at 1.
    a.track("t", 0, 4);
    a.complete("t", 0, 4, g2).unwrap();
    assert_eq!(a.committable("t", 0), Some(1));
    for o in 1..4 {
        a.track("t", 0, o);
    }
    for o in 1..4 {
        a.complete("t", 0, o, g2).unwrap();
    }
    assert_eq!(a.committable("t", 0), Some(5));
}
#[test]
fn recovered_marks_make_suspects_and_count_the_run_alone_that_died() {
    let (mut a, g) = assigned();
    a.recover("t", 0, Marks::recover("ackstack1;s=8;a=5;c=5:1").unwrap());
    assert!(a.is_suspect("t", 0, 4));
    assert!(a.is_suspect("t", 0, 7));
    assert!(!a.is_suspect("t", 0, 8));
    a.track("t", 0, 5);
    assert_eq!(a.arm("t", 0, 5, g, 3), Ok(Arming::Run { crashes: 2 }));
    let commit = a.take_commits(false).pop().unwrap();
    assert_eq!(commit.metadata, "ackstack1;s=8;a=5;c=5:2");
    assert_eq!(a.arm("t", 0, 5, g, 2), Ok(Arming::GiveUp { crashes: 2 }));
    assert!(a.step_aside("t", 0, 5));
    assert!(!a.step_aside("t", 0, 5), "already stepped aside");
    assert_eq!(
        a.take_commits(false).pop().unwrap().metadata,
        "ackstack1;s=8;c=5:2"
    );
    assert!(a.take_commits(false).is_empty(), "nothing changed since");
    a.complete("t", 0, 5, g).unwrap();
    assert_eq!(
        a.take_commits(false).pop().unwrap().metadata,
        "ackstack1;s=8",
        "a count passed by the position is dropped"
    );
    assert_eq!(a.arm("t", 0, 5, Generation::default(), 3), Err(Stale));
}

#[test]
fn started_below_is_raised_ahead_and_only_when_needed() {
    let (mut a, _) = assigned();
    a.track("t", 0, 0);
    // Nothing confirmed: the first record waits for a synchronous commit.
    assert_eq!(a.raise_started("t", 0, 0), Raise::Now);
    assert!(a.raise_pending());
    let commits = a.take_commits(true);
    assert_eq!(commits[0].metadata, format!("ackstack1;s={MIN_CHUNK}"));
    a.confirmed(&commits);
    assert!(!a.raise_pending());
    assert_eq!(a.raise_started("t", 0, 1), Raise::Covered);
    // Within half a chunk of the mark: a raise is asked for, committed meanwhile.
    let half = MIN_CHUNK / 2;
    assert_eq!(a.raise_started("t", 0, half), Raise::Ahead);
    assert!(a.raise_pending());
    assert_eq!(a.raise_started("t", 0, half + 1), Raise::Covered);
    // Beyond what was confirmed, before the commit was answered: it must wait.
    assert_eq!(a.raise_started("t", 0, MIN_CHUNK), Raise::Now);
    // Asked again at once: the step doubled.
    let commits = a.take_commits(true);
    assert_eq!(
        commits[0].metadata,
        format!("ackstack1;s={}", half + 2 * MIN_CHUNK)
    );
    a.confirmed(&commits);
    assert_eq!(a.raise_started("t", 0, MIN_CHUNK), Raise::Covered);
    assert_eq!(a.raise_started("t", 1, 0), Raise::Covered, "not assigned");
}

#[test]
fn a_revoke_ends_the_run_alone_and_a_rewind_keeps_the_marks() {
    let (mut a, g) = assigned();
    a.recover("t", 0, Marks::recover("ackstack1;s=4").unwrap());
    for o in 0..3 {
        a.track("t", 0, o);
    }
    a.arm("t", 0, 1, g, 3).unwrap();
    let g2 = a.rewind("t", 0, g, 1).unwrap();
    assert!(a.is_suspect("t", 0, 2), "still a suspect after the rewind");
    assert_eq!(a.rewind_position("t", 0, g2), Ok(Some(1)));
    let commit = a.revoke("t", 0).unwrap();
    assert_eq!(commit.position, 1);
    assert_eq!(commit.metadata, "ackstack1;s=4", "a revoke is no crash");
}

#[test]
fn a_clean_stop_leaves_only_the_suspects_it_was_given() {
    let (mut a, g) = assigned();
    for o in 0..4 {
        a.track("t", 0, o);
        a.raise_started("t", 0, o);
    }
    a.complete("t", 0, 0, g).unwrap();
    a.stop_handing_out();
    let commit = a.take_commits(true).pop().unwrap();
    assert_eq!(
        (commit.position, commit.metadata.as_str()),
        (1, "ackstack1;s=1")
    );
    // Given suspects up to 6 by an earlier owner: they stay suspects; one of them cut
    // short in its run alone is no crash.
    a.recover("t", 0, Marks::recover("ackstack1;s=6").unwrap());
    a.arm("t", 0, 1, g, 3).unwrap();
    a.stop_handing_out();
    let commit = a.take_commits(true).pop().unwrap();
    assert_eq!(commit.metadata, "ackstack1;s=6");
    let commit = a.revoke("t", 0).unwrap();
    assert_eq!(commit.metadata, "ackstack1;s=6");
}
