//! What each subcommand does, on any broker: the [`DeadLetters`] a broker module implements,
//! and `list`, `show`, `replay` and `purge` written once over it.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::letter::{Filter, Letter};

/// Why the command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The broker refused, failed or could not be reached (exit code 1).
    #[error("{0}")]
    Broker(String),
    /// The arguments or the config file cannot work (exit code 2).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// A broker error with context.
    pub fn broker(what: &str, err: impl std::fmt::Display) -> Self {
        CliError::Broker(format!("{what}: {err}"))
    }
}

/// `call`, bounded by `timeout`; its error or the timeout is a [`CliError::Broker`] that
/// names the broker and `what` (the call).
pub async fn bounded<T, E: std::fmt::Display>(
    broker: &str,
    what: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CliError::broker(&format!("{broker} {what}"), e)),
        Err(_) => Err(CliError::Broker(format!(
            "{broker} {what}: timed out after {timeout:?}"
        ))),
    }
}

/// A dead letter found by a scan, with the broker's handle for it.
pub struct Found<H> {
    /// The letter.
    pub letter: Letter,
    /// What the broker needs to republish, remove or keep it.
    pub handle: H,
}

/// How a confirmed republish went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Sent in one attempt.
    Once,
    /// Confirmed after the client sent it again because an earlier attempt went unanswered
    /// (SQS: the SDK retried `SendMessage`): the earlier attempt may have landed too, so the
    /// message may be on the queue twice.
    Retried,
}

/// One broker's dead-letter queue, read as a scan: every letter there was when the scan
/// began, each once, without taking it away from other readers beyond what the broker forces
/// (held back for the scan's length at most).
pub trait DeadLetters {
    /// The broker's handle for one found letter.
    type Handle;

    /// The next letter, or `None` at the end.
    fn next(&mut self) -> impl Future<Output = Result<Option<Found<Self::Handle>>, CliError>>;

    /// Sends the letter's original payload and headers (metadata removed, `replays` recorded)
    /// to `queue`, and returns once the broker confirmed it.
    fn republish(
        &mut self,
        handle: &Self::Handle,
        queue: &str,
        replays: u32,
    ) -> impl Future<Output = Result<Sent, CliError>>;

    /// Removes the letter from the dead-letter queue.
    fn remove(&mut self, handle: Self::Handle) -> impl Future<Output = Result<(), CliError>>;

    /// Whether removing the letter can be recorded now. Asked before a replay sends its copy,
    /// so that a letter whose removal could not be recorded is never sent (it would be sent
    /// again on every run). Kafka records removals past a kept letter in its commit metadata,
    /// which has a size limit; every other broker can always remove.
    fn can_remove(&self, handle: &Self::Handle) -> bool {
        let _ = handle;
        true
    }

    /// Leaves the letter where it is.
    fn keep(&mut self, handle: Self::Handle) -> impl Future<Output = Result<(), CliError>>;

    /// Ends the scan, giving back what was kept.
    fn finish(self) -> impl Future<Output = Result<(), CliError>>;

    /// Once [`next`](DeadLetters::next) said the end: how many letters the queue held at the
    /// start that the scan could not reach. SQS hands out no letter another reader holds
    /// (or a receive whose answer was lost took) until its visibility timeout ends, and a FIFO
    /// queue nothing more of a message group while one of its letters is held, so the
    /// letters behind a kept one are out of reach until it is removed.
    fn unreached(&self) -> u64 {
        0
    }
}

/// Runs `body` over the scan, then ends it (also when `body` failed, so that what was held
/// is given back); `body`'s error wins over `finish`'s.
async fn scanned<D: DeadLetters, T>(
    mut dlq: D,
    body: impl AsyncFnOnce(&mut D) -> Result<T, CliError>,
) -> Result<T, CliError> {
    let result = body(&mut dlq).await;
    let finished = dlq.finish().await;
    let value = result?;
    finished?;
    Ok(value)
}

/// What `list` found.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The selected letters.
    pub letters: Vec<Letter>,
    /// Letters the scan could not reach ([`DeadLetters::unreached`]).
    pub unreached: u64,
}

/// The letters `filter` selects, up to its limit; nothing is removed.
pub async fn list<D: DeadLetters>(dlq: D, filter: &Filter) -> Result<Listing, CliError> {
    scanned(dlq, async |dlq: &mut D| {
        let mut out = Listing::default();
        while filter.limit.is_none_or(|l| out.letters.len() < l) {
            let Some(found) = dlq.next().await? else {
                out.unreached = dlq.unreached();
                break;
            };
            let selected = filter.matches(&found.letter);
            dlq.keep(found.handle).await?;
            if selected {
                out.letters.push(found.letter);
            }
        }
        Ok(out)
    })
    .await
}

/// How `replay` goes about it.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// Send here instead of each letter's original queue.
    pub to: Option<String>,
    /// Skip letters already replayed this often.
    pub max_replays: u32,
    /// Replay them anyway.
    pub force: bool,
    /// Print what would be sent; send and remove nothing.
    pub dry_run: bool,
    /// At most this many per second.
    pub rate: Option<f64>,
}

/// What `replay` (or `purge`) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Letters sent back (or purged), confirmed and removed.
    pub done: u64,
    /// Letters that would be sent (dry run).
    pub would: u64,
    /// Letters skipped by the loop guard.
    pub skipped_loop: u64,
    /// Letters skipped because no destination is known (no metadata and no `--to`).
    pub skipped_unknown: u64,
    /// Letters the scan could not reach ([`DeadLetters::unreached`]).
    pub unreached: u64,
    /// Letters left because their removal could not be recorded ([`DeadLetters::can_remove`]):
    /// the run stopped at the first.
    pub stopped_unrecordable: u64,
    /// Of `done`, letters whose send was retried after an unanswered attempt
    /// ([`Sent::Retried`]): each may be on its queue twice.
    pub retried: u64,
}

impl Report {
    /// Whether some selected letters were skipped, or some letters out of reach (exit
    /// code 3).
    pub fn skipped(&self) -> bool {
        self.skipped_loop + self.skipped_unknown + self.unreached + self.stopped_unrecordable > 0
    }
}

/// Sends each selected letter back, removing it only after the broker confirmed the copy.
pub async fn replay<D: DeadLetters>(
    dlq: D,
    filter: &Filter,
    options: &ReplayOptions,
    progress: &Progress,
) -> Result<Report, CliError> {
    let pace = options
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    scanned(dlq, async |dlq: &mut D| {
        let mut report = Report::default();
        let mut selected = 0usize;
        let mut next_send = Instant::now();
        while filter.limit.is_none_or(|l| selected < l) {
            let Some(found) = dlq.next().await? else {
                report.unreached = dlq.unreached();
                break;
            };
            if !filter.matches(&found.letter) {
                dlq.keep(found.handle).await?;
                continue;
            }
            selected += 1;
            let letter = &found.letter;
            if letter.replays >= options.max_replays && !options.force {
                progress.line(&format!(
                    "skipped {} (replayed {} times already; --force to send it anyway)",
                    letter.id, letter.replays
                ));
                report.skipped_loop += 1;
                dlq.keep(found.handle).await?;
                continue;
            }
            let Some(queue) = letter
                .destination(options.to.as_deref())
                .map(str::to_string)
            else {
                progress.line(&format!(
                    "skipped {} (no original queue recorded; give --to)",
                    letter.id
                ));
                report.skipped_unknown += 1;
                dlq.keep(found.handle).await?;
                continue;
            };
            if options.dry_run {
                progress.line(&format!(
                    "would replay {} to {queue} ({} bytes, replay {})",
                    letter.id,
                    letter.payload.len(),
                    letter.replays + 1
                ));
                report.would += 1;
                dlq.keep(found.handle).await?;
                continue;
            }
            if !dlq.can_remove(&found.handle) {
                progress.line(&stopped_unrecordable(&letter.id));
                report.stopped_unrecordable += 1;
                dlq.keep(found.handle).await?;
                break;
            }
            if let Some(pace) = pace {
                tokio::time::sleep_until(next_send.into()).await;
                next_send = Instant::now() + pace;
            }
            let sent = dlq
                .republish(&found.handle, &queue, letter.replays + 1)
                .await?;
            if sent == Sent::Retried {
                // Said at once, so that a run killed later has told it too.
                progress.line(&format!(
                    "note: the send of {} to {queue} was retried after an unanswered attempt; \
                     it may be there twice",
                    letter.id
                ));
                report.retried += 1;
            }
            // Confirmed: only now is the dead letter removed. A crash in between leaves it
            // in place, to be sent again: a duplicate, never a loss.
            let id = found.letter.id.clone();
            dlq.remove(found.handle).await?;
            report.done += 1;
            progress.done(&format!("replayed {id} to {queue}"));
        }
        Ok(report)
    })
    .await
}

/// Removes each selected letter.
pub async fn purge<D: DeadLetters>(
    dlq: D,
    filter: &Filter,
    progress: &Progress,
) -> Result<Report, CliError> {
    scanned(dlq, async |dlq: &mut D| {
        let mut report = Report::default();
        while filter.limit.is_none_or(|l| report.done < l as u64) {
            let Some(found) = dlq.next().await? else {
                report.unreached = dlq.unreached();
                break;
            };
            if !filter.matches(&found.letter) {
                dlq.keep(found.handle).await?;
                continue;
            }
            let id = found.letter.id.clone();
            if !dlq.can_remove(&found.handle) {
                progress.line(&stopped_unrecordable(&id));
                report.stopped_unrecordable += 1;
                dlq.keep(found.handle).await?;
                break;
            }
            dlq.remove(found.handle).await?;
            report.done += 1;
            progress.done(&format!("purged {id}"));
        }
        Ok(report)
    })
    .await
}

/// What a run says when it stops at a letter whose removal cannot be recorded.
fn stopped_unrecordable(id: &str) -> String {
    format!(
        "stopped at {id}: its removal cannot be recorded (too many letters removed past a kept \
         one); replay or purge the kept letters first, or run without a filter"
    )
}

/// Progress on stderr: a bar with count, rate and ETA on a terminal, plain lines otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress over about `total` letters (a spinner when unknown).
    pub fn new(total: Option<u64>, quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let style = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} letters  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress { bar: Some(bar) }
    }

    /// One letter done.
    pub fn done(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.inc(1),
            None => eprintln!("{line}"),
        }
    }

    /// A note about one letter.
    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
