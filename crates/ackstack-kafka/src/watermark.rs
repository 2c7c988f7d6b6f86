//! Per-partition watermarks tied to the assignment generation.
//!
//! Kafka commits one position per partition: "everything before this offset is done". With
//! concurrent, out-of-order completion, that position must never pass an offset that is still
//! in flight (invariant 8 in docs/CONTRACT.md). Each assigned partition keeps one core
//! [`Watermark`]: offsets are tracked when received and completed when acked,
//! and the partition's commit position is the watermark's
//! [`resume_position`](Watermark::resume_position): the lowest offset still in flight, or one
//! past the highest completed offset when nothing is in flight. Only offsets actually received
//! are tracked, so gaps (compacted records, transaction markers) never hold the position back.
//!
//! [`Assignments`] is the Kafka-specific layer on top: one watermark per assigned partition
//! together with the assignment's generation. A partition that is revoked and assigned again
//! gets a new generation and a fresh watermark, so completions that arrive late from the
//! previous generation are refused ([`Stale`]) instead of moving the new position.
//!
//! Each partition also keeps its crash [`Marks`], which every commit of it carries (see
//! `marks.rs`), and the suspects recovered from them at assignment.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ackstack_core::Watermark;
use ackstack_core::adapter::Generation;

use crate::marks::Marks;

/// The smallest and largest step `s` is raised by (see [`Assignments::raise_started`]).
const MIN_CHUNK: i64 = 32;
const MAX_CHUNK: i64 = 4096;
/// Raises closer together than this double the step; further apart than `SLOW_RAISES`,
/// halve it: a few synchronous commits a second at most, and few suspects after a crash.
const FAST_RAISES: Duration = Duration::from_millis(250);
const SLOW_RAISES: Duration = Duration::from_secs(2);

/// One commit to send: a partition's position and the metadata it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset to read.
    pub position: i64,
    /// The partition's crash marks ([`Marks::encode`]).
    pub metadata: String,
    /// The `started_below` those marks carry.
    pub started_below: Option<i64>,
}

/// What [`Assignments::raise_started`] asks of the commits before a record is handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raise {
    /// Nothing: the confirmed mark covers it with room to spare, or a raise is asked for.
    Covered,
    /// The confirmed mark covers it; a raise was asked for, to be committed meanwhile.
    Ahead,
    /// The confirmed mark does not cover it: a synchronous commit must carry the raise first.
    Now,
}

/// What [`Assignments::arm`] made of a suspect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arming {
    /// Marked as running alone (to be committed before it runs), after `crashes` crashes.
    Run {
        /// Its earlier runs alone that ended with the process dead.
        crashes: u32,
    },
    /// It took the process down `crashes` times running alone: give up on it.
    GiveUp {
        /// Its runs alone that ended with the process dead.
        crashes: u32,
    },
}

/// A completion for a partition that is no longer assigned to us in the generation the
/// delivery was received in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale;

/// One assigned partition: its generation, watermark and last committed position.
#[derive(Clone, Debug)]
struct Entry {
    generation: Generation,
    watermark: Watermark,
    committed: Option<i64>,
    /// What the partition's commits record (see `marks.rs`).
    marks: Marks,
    /// Records below it were handed out by an earlier owner, maybe unsettled: suspects.
    suspect_below: Option<i64>,
    /// The marks changed since the last commit.
    dirty: bool,
    /// How far the next raise of `started_below` goes beyond the record that needs it.
    chunk: i64,
    last_raise: Option<Instant>,
    /// The `started_below` a synchronous commit confirmed (or the one recovered).
    durable_started: Option<i64>,
}

impl Entry {
    fn new(generation: Generation) -> Self {
        Entry {
            generation,
            watermark: Watermark::new(),
            committed: None,
            marks: Marks::default(),
            suspect_below: None,
            dirty: false,
            chunk: MIN_CHUNK,
            last_raise: None,
            durable_started: None,
        }
    }

    /// Nothing more is handed out from this generation, and nothing it handed out took the
    /// process down: `started_below` comes back to the position, or to the suspects an
    /// earlier owner left beyond it, so that the next owner runs alone only those; a run alone
    /// cut short (at the shutdown deadline) is no crash either.
    fn stop_handing_out(&mut self) {
        if self.marks.alone.take().is_some() {
            self.dirty = true;
        }
        let Some(position) = self.position() else {
            return;
        };
        let below = self.suspect_below.map_or(position, |s| s.max(position));
        if self.marks.started_below != Some(below) {
            self.marks.started_below = Some(below);
            self.dirty = true;
        }
    }

    /// Asks for `started_below` a chunk beyond `offset`; the chunk doubles when asks come
    /// quickly and halves when they come slowly.
    fn ask_raise(&mut self, offset: i64) {
        let now = Instant::now();
        if let Some(last) = self.last_raise {
            let since = now.duration_since(last);
            if since < FAST_RAISES {
                self.chunk = (self.chunk * 2).min(MAX_CHUNK);
            } else if since > SLOW_RAISES {
                self.chunk = (self.chunk / 2).max(MIN_CHUNK);
            }
        }
        self.last_raise = Some(now);
        let asked = offset.saturating_add(self.chunk);
        self.marks.started_below = Some(self.marks.started_below.map_or(asked, |s| s.max(asked)));
        self.dirty = true;
    }

    /// The position a commit now carries: never below one taken before.
    fn position(&self) -> Option<i64> {
        match (self.watermark.resume_position(), self.committed) {
            (Some(p), Some(c)) => Some(p.max(c)),
            (p, c) => p.or(c),
        }
    }
}

/// Watermarks of every assigned partition, each tied to its assignment generation.
#[derive(Debug, Default)]
pub struct Assignments {
    topics: HashMap<String, HashMap<i32, Entry>>,
    /// The last generation started (of any partition).
    last_generation: Generation,
}

impl Assignments {
    /// No partitions assigned.
    pub fn new() -> Self {
        Assignments::default()
    }

    /// Starts a new generation of `topic`/`partition` with an empty watermark and returns the
    /// generation. Any earlier generation of the partition becomes stale.
    pub fn assign(&mut self, topic: &str, partition: i32) -> Generation {
        self.last_generation = self.last_generation.next();
        let generation = self.last_generation;
        self.topics
            .entry(topic.to_string())
            .or_default()
            .insert(partition, Entry::new(generation));
        generation
    }

    /// Takes over the crash marks an earlier owner of the partition committed (read with its
    /// committed offset at assignment): its records below their `s` are suspects.
    pub(crate) fn recover(&mut self, topic: &str, partition: i32, marks: Marks) {
        if let Some(entry) = self.assigned_mut(topic, partition) {
            entry.suspect_below = marks.started_below;
            entry.durable_started = marks.started_below;
            entry.marks = marks;
            entry.dirty = true;
        }
    }

    /// Whether the record at `offset` is a suspect (see [`Assignments::recover`]).
    pub(crate) fn is_suspect(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.topics
            .get(topic)
            .and_then(|p| p.get(&partition))
            .is_some_and(|e| {
                e.suspect_below.is_some_and(|s| offset < s) || e.marks.crashes.contains_key(&offset)
            })
    }

    /// Before the record at `offset` is handed to a handler: asks for the partition's
    /// `started_below` a chunk beyond it once the record comes within half a chunk of what
    /// was asked for, and says whether a synchronous commit must carry that before the record
    /// is handed out ([`Raise::Now`]: the record is not below the confirmed mark), or may
    /// carry it meanwhile ([`Raise::Ahead`]).
    pub(crate) fn raise_started(&mut self, topic: &str, partition: i32, offset: i64) -> Raise {
        let Some(entry) = self.assigned_mut(topic, partition) else {
            return Raise::Covered;
        };
        let asked = entry
            .marks
            .started_below
            .is_some_and(|s| offset.saturating_add(entry.chunk / 2) < s);
        if !asked {
            entry.ask_raise(offset);
        }
        if entry.durable_started.is_some_and(|s| offset < s) {
            if asked { Raise::Covered } else { Raise::Ahead }
        } else {
            Raise::Now
        }
    }

    /// Whether a partition asked for a `started_below` no synchronous commit confirmed yet.
    pub(crate) fn raise_pending(&self) -> bool {
        self.topics
            .values()
            .flat_map(HashMap::values)
            .any(|e| e.marks.started_below > e.durable_started)
    }

    /// A synchronous commit of `commits` was answered: their marks are durable.
    pub(crate) fn confirmed(&mut self, commits: &[Commit]) {
        for c in commits {
            if let Some(entry) = self.assigned_mut(&c.topic, c.partition) {
                entry.durable_started = c.started_below;
            }
        }
    }

    /// The marks of `commits` did not reach the broker: the next commit carries them again.
    pub(crate) fn unsent(&mut self, commits: &[Commit]) {
        for c in commits {
            if let Some(entry) = self.assigned_mut(&c.topic, c.partition) {
                entry.dirty = true;
            }
        }
    }

    /// At a clean stop, after the last ack: see `Entry::stop_handing_out`.
    pub(crate) fn stop_handing_out(&mut self) {
        for entry in self.topics.values_mut().flat_map(HashMap::values_mut) {
            entry.stop_handing_out();
        }
    }

    /// Prepares the suspect at `offset` for its run alone: gives up on it after `give_up_at`
    /// crashes, or marks it as running alone (to be committed before it runs).
    pub(crate) fn arm(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: Generation,
        give_up_at: u32,
    ) -> Result<Arming, Stale> {
        let entry = self.entry_mut(topic, partition, generation)?;
        let crashes = entry.marks.crashes(offset);
        if crashes >= give_up_at {
            return Ok(Arming::GiveUp { crashes });
        }
        entry.marks.alone = Some(offset);
        entry.dirty = true;
        Ok(Arming::Run { crashes })
    }

    /// Ends the run alone of the record at `offset`, if it is the one marked; returns whether
    /// the marks changed.
    pub(crate) fn step_aside(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        let Some(entry) = self.assigned_mut(topic, partition) else {
            return false;
        };
        if entry.marks.alone != Some(offset) {
            return false;
        }
        entry.marks.alone = None;
        entry.dirty = true;
        true
    }

    /// Ends the partition's current generation. Returns its commit, to be sent (again, even
    /// if an earlier asynchronous commit carried it: that one may have failed) before the
    /// partition goes. A run alone it marked ends with it: a revoke is no crash.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<Commit> {
        let parts = self.topics.get_mut(topic)?;
        let mut entry = parts.remove(&partition)?;
        if parts.is_empty() {
            self.topics.remove(topic);
        }
        let position = entry.watermark.resume_position()?;
        entry.stop_handing_out();
        Some(Commit {
            topic: topic.to_string(),
            partition,
            position,
            metadata: entry.marks.encode(position),
            started_below: entry.marks.started_below,
        })
    }

    /// Tracks a received offset; returns the partition's current generation, or `None` when the
    /// partition is not assigned.
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Generation> {
        let entry = self.assigned_mut(topic, partition)?;
        entry.watermark.track(offset);
        Some(entry.generation)
    }

    /// Completes `offset` if `generation` is still the partition's current one.
    ///
    /// An offset of the current generation that is not in flight (a duplicate completion) is
    /// accepted and changes nothing.
    pub fn complete(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        generation: Generation,
    ) -> Result<(), Stale> {
        let entry = self.entry_mut(topic, partition, generation)?;
        entry.watermark.complete(offset);
        Ok(())
    }

    /// Whether `generation` is the partition's current generation.
    pub fn is_current(&self, topic: &str, partition: i32, generation: Generation) -> bool {
        self.topics
            .get(topic)
            .and_then(|p| p.get(&partition))
            .is_some_and(|e| e.generation == generation)
    }

    /// The partition's commit position in its current generation: its watermark's
    /// [`resume_position`](Watermark::resume_position).
    pub fn committable(&self, topic: &str, partition: i32) -> Option<i64> {
        self.topics
            .get(topic)?
            .get(&partition)?
            .watermark
            .resume_position()
    }

    /// Commits of the positions that moved past the last commit, or whose marks changed,
    /// marked as committed. With `all`, every committable position is returned even if it was
    /// committed before (for a synchronous flush that must not rely on an earlier
    /// asynchronous commit having succeeded). A position below the last one taken (the
    /// high-water mark of the partition, kept across rewinds) is never returned: commits
    /// never go backwards.
    pub fn take_commits(&mut self, all: bool) -> Vec<Commit> {
        let mut out = Vec::new();
        for (topic, parts) in &mut self.topics {
            for (&partition, entry) in parts.iter_mut() {
                let Some(position) = entry.position() else {
                    continue;
                };
                let due = match entry.committed {
                    None => true,
                    Some(c) => all || position > c || entry.dirty,
                };
                if due {
                    entry.committed = Some(position);
                    entry.dirty = false;
                    out.push(Commit {
                        topic: topic.clone(),
                        partition,
                        position,
                        metadata: entry.marks.encode(position),
                        started_below: entry.marks.started_below,
                    });
                }
            }
        }
        out
    }

    /// The position the partition would be read again from if its current generation
    /// `generation` started over: its watermark's resume position (the lowest offset in flight).
    /// `Err(Stale)` when `generation` already ended; `Ok(None)` when nothing is tracked.
    pub fn rewind_position(
        &self,
        topic: &str,
        partition: i32,
        generation: Generation,
    ) -> Result<Option<i64>, Stale> {
        match self.topics.get(topic).and_then(|p| p.get(&partition)) {
            Some(entry) if entry.generation == generation => Ok(entry.watermark.resume_position()),
            _ => Err(Stale),
        }
    }

    /// Ends generation `generation` of the partition and starts a new one whose reading was
    /// moved back to `position` (the consumer was seeked there). Returns the new generation,
    /// or `Err(Stale)` when `generation` already ended.
    ///
    /// The new watermark starts with `position` in flight, so no completion of the new
    /// generation moves the commit position past `position` before the record there is read
    /// again and completed, even if a record fetched before the seek arrives first. Tokens of
    /// the old generation become stale: their acks are refused and their records are read
    /// again.
    pub fn rewind(
        &mut self,
        topic: &str,
        partition: i32,
        generation: Generation,
        position: i64,
    ) -> Result<Generation, Stale> {
        let old = self.entry_mut(topic, partition, generation)?.clone();
        self.last_generation = self.last_generation.next();
        let generation = self.last_generation;
        let mut watermark = Watermark::new();
        watermark.track(position);
        self.topics.entry(topic.to_string()).or_default().insert(
            partition,
            Entry {
                generation,
                watermark,
                ..old
            },
        );
        Ok(generation)
    }

    /// How many partitions are assigned.
    pub fn len(&self) -> usize {
        self.topics.values().map(HashMap::len).sum()
    }

    /// Whether no partition is assigned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The partition's entry, in whatever generation.
    fn assigned_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Entry> {
        self.topics.get_mut(topic)?.get_mut(&partition)
    }

    fn entry_mut(
        &mut self,
        topic: &str,
        partition: i32,
        generation: Generation,
    ) -> Result<&mut Entry, Stale> {
        match self
            .topics
            .get_mut(topic)
            .and_then(|p| p.get_mut(&partition))
        {
            Some(entry) if entry.generation == generation => Ok(entry),
            _ => Err(Stale),
        }
    }
}

#[cfg(test)]
mod tests;
