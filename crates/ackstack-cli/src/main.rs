//! `ackstack`: dead-letter tooling for the queues ackstack consumers write to.
//!
//! ```text
//! ackstack dlq list   --broker rabbitmq --queue orders            # a table of orders-dlq
//! ackstack dlq groups --broker rabbitmq --queue orders            # the causes, with counts
//! ackstack dlq show   --broker rabbitmq --queue orders A-1001     # one letter in full
//! ackstack dlq replay --broker rabbitmq --queue orders --dry-run  # what would be sent back
//! ackstack dlq replay --broker rabbitmq --queue orders            # send them back
//! ackstack dlq purge  --broker sqs --queue orders --until 30d     # remove old ones
//! ```
//!
//! `letter.rs` is a dead letter on any broker, its filters and how it is printed; `groups.rs`
//! the letters grouped by cause; `run.rs` the subcommands, written once over the [`run::DeadLetters`] scan that `rabbitmq.rs`,
//! `sqs.rs`, `kafka.rs`, `nats.rs` and `redis_streams.rs` implement; `cli.rs` the flags and
//! the config file.

mod cli;
mod groups;
mod kafka;
mod letter;
mod nats;
mod outbox;
mod rabbitmq;
mod redis_streams;
mod run;
mod sqs;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Broker, Cli, Command, Dlq, FileConfig, Resolved};
use crate::letter::{Filter, Letter, LetterJson};
use crate::run::{CliError, DeadLetters, Progress, ReplayOptions, Report};

/// Exit code: some selected letters were skipped.
const SKIPPED: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ackstack: error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(CliError::Usage(e)) => {
            eprintln!("ackstack: error: {e}");
            ExitCode::from(2)
        }
        Err(CliError::Broker(e)) => {
            eprintln!("ackstack: error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let file = FileConfig::load(cli.config.as_ref())?;
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ackstack",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(dlq) => dead_letters(*dlq, &file).await,
        Command::Outbox(command) => outbox::run(command).await,
    }
}

/// The broker-independent half of each subcommand, handed the broker's scan.
enum Job {
    /// `list`, or with `grouped` `groups`: the same scan, printed per letter or per cause.
    List {
        filter: Filter,
        json: bool,
        grouped: bool,
    },
    Show {
        id: String,
        raw: bool,
        json: bool,
    },
    Replay {
        filter: Filter,
        options: ReplayOptions,
    },
    Purge {
        filter: Filter,
        yes: bool,
    },
}

async fn dead_letters(dlq: Dlq, file: &FileConfig) -> Result<ExitCode, CliError> {
    let (target, job) = match dlq {
        Dlq::List {
            target,
            filter,
            json,
        } => (
            target,
            Job::List {
                filter: filter.filter(),
                json,
                grouped: false,
            },
        ),
        Dlq::Groups {
            target,
            filter,
            json,
        } => (
            target,
            Job::List {
                filter: filter.filter(),
                json,
                grouped: true,
            },
        ),
        Dlq::Show {
            target,
            id,
            raw,
            json,
        } => (target, Job::Show { id, raw, json }),
        Dlq::Replay {
            target,
            filter,
            to,
            max_replays,
            force,
            dry_run,
            rate,
        } => (
            target,
            Job::Replay {
                filter: filter.filter(),
                options: ReplayOptions {
                    to,
                    max_replays,
                    force,
                    dry_run,
                    rate,
                },
            },
        ),
        Dlq::Purge {
            target,
            filter,
            yes,
        } => (
            target,
            Job::Purge {
                filter: filter.filter(),
                yes,
            },
        ),
    };
    let resolved = target.resolve(file)?;
    match job {
        Job::Purge { filter, yes: false } => {
            // Count first, ask, then purge what the same filter selects.
            let n = with_scan(&resolved, Scan::List(filter.clone())).await?;
            let Outcome::Letters(listing) = n else {
                return Err(CliError::Usage("internal: purge count".into()));
            };
            warn_unreached(listing.unreached, &resolved);
            let letters = listing.letters;
            if letters.is_empty() {
                println!("nothing to purge in {}", resolved.dlq);
                return Ok(ExitCode::SUCCESS);
            }
            if !std::io::stdin().is_terminal() {
                return Err(CliError::Usage(format!(
                    "purge would remove {} dead letter(s) from {}; there is no terminal to \
                     confirm on: give --yes",
                    letters.len(),
                    resolved.dlq
                )));
            }
            if !confirm(&format!(
                "purge {} dead letter(s) from {} for good? [y/N] ",
                letters.len(),
                resolved.dlq
            )) {
                eprintln!("not purged");
                return Ok(ExitCode::SUCCESS);
            }
            finish(with_scan(&resolved, Scan::Purge(filter)).await?, &resolved)
        }
        Job::Purge { filter, yes: true } => {
            finish(with_scan(&resolved, Scan::Purge(filter)).await?, &resolved)
        }
        Job::List {
            filter,
            json,
            grouped,
        } => {
            let Outcome::Letters(listing) = with_scan(&resolved, Scan::List(filter)).await? else {
                return Err(CliError::Usage("internal: list".into()));
            };
            if grouped {
                print_groups(&groups::groups(&listing.letters), json)?;
            } else {
                print_list(&listing.letters, json)?;
            }
            Ok(if warn_unreached(listing.unreached, &resolved) {
                ExitCode::from(SKIPPED)
            } else {
                ExitCode::SUCCESS
            })
        }
        Job::Show { id, raw, json } => {
            let filter = Filter {
                message_id: Some(id.clone()),
                limit: Some(1),
                ..Filter::default()
            };
            let Outcome::Letters(listing) = with_scan(&resolved, Scan::List(filter)).await? else {
                return Err(CliError::Usage("internal: show".into()));
            };
            let Some(letter) = listing.letters.first() else {
                warn_unreached(listing.unreached, &resolved);
                return Err(CliError::Usage(format!(
                    "no dead letter {id} in {}",
                    resolved.dlq
                )));
            };
            print_one(letter, raw, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Job::Replay { filter, options } => finish(
            with_scan(&resolved, Scan::Replay(filter, options)).await?,
            &resolved,
        ),
    }
}

/// What to do with a scan.
enum Scan {
    List(Filter),
    Replay(Filter, ReplayOptions),
    Purge(Filter),
}

/// What a scan gave.
enum Outcome {
    Letters(run::Listing),
    Report(Report, &'static str),
}

async fn with_scan(resolved: &Resolved, scan: Scan) -> Result<Outcome, CliError> {
    match resolved.broker {
        Broker::Rabbitmq => {
            let dlq =
                rabbitmq::RabbitDlq::open(&resolved.amqp_url, &resolved.dlq, resolved.timeout)
                    .await?;
            perform(dlq, scan).await
        }
        Broker::Sqs => {
            let client = ackstack_sqs::build_client(&resolved.sqs).await;
            let dlq =
                sqs::SqsDlq::open(client, &resolved.dlq, resolved.visibility, resolved.timeout)
                    .await?;
            perform(dlq, scan).await
        }
        Broker::Kafka => {
            let Some(brokers) = &resolved.kafka_brokers else {
                return Err(CliError::Usage(
                    "--kafka-brokers LIST (or KAFKA_BROKERS) is required for Kafka".into(),
                ));
            };
            let properties = &resolved.kafka_properties;
            let dlq = kafka::KafkaDlq::open(brokers, properties, &resolved.dlq, resolved.timeout)?;
            perform(dlq, scan).await
        }
        Broker::Nats => {
            let dlq =
                nats::NatsDlq::open(&resolved.nats_url, &resolved.dlq, resolved.timeout).await?;
            perform(dlq, scan).await
        }
        Broker::RedisStreams => {
            let dlq = redis_streams::StreamsDlq::open(
                &resolved.redis_url,
                &resolved.dlq,
                &resolved.payload_field,
                resolved.timeout,
            )
            .await?;
            perform(dlq, scan).await
        }
    }
}

async fn perform<D: DeadLetters>(dlq: D, scan: Scan) -> Result<Outcome, CliError> {
    match scan {
        Scan::List(filter) => Ok(Outcome::Letters(run::list(dlq, &filter).await?)),
        Scan::Replay(filter, options) => {
            let progress = Progress::new(filter.limit.map(|l| l as u64), options.dry_run);
            let report = run::replay(dlq, &filter, &options, &progress).await;
            progress.finish();
            Ok(Outcome::Report(
                report?,
                if options.dry_run {
                    "would replay"
                } else {
                    "replayed"
                },
            ))
        }
        Scan::Purge(filter) => {
            let progress = Progress::new(filter.limit.map(|l| l as u64), false);
            let report = run::purge(dlq, &filter, &progress).await;
            progress.finish();
            Ok(Outcome::Report(report?, "purged"))
        }
    }
}

/// Prints the report line and picks the exit code.
fn finish(outcome: Outcome, resolved: &Resolved) -> Result<ExitCode, CliError> {
    let Outcome::Report(report, verb) = outcome else {
        return Err(CliError::Usage("internal: report".into()));
    };
    let n = if verb == "would replay" {
        report.would
    } else {
        report.done
    };
    println!(
        "{verb} {n} dead letter(s) from {}; skipped {} (loop guard) and {} (no original queue)",
        resolved.dlq, report.skipped_loop, report.skipped_unknown
    );
    if report.retried > 0 {
        eprintln!(
            "note: {} of them may be on their queue twice: a send was retried after an \
             attempt went unanswered",
            report.retried
        );
    }
    warn_unreached(report.unreached, resolved);
    Ok(if report.skipped() {
        ExitCode::from(SKIPPED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Says on stderr that `unreached` letters were out of the scan's reach; whether any were.
fn warn_unreached(unreached: u64, resolved: &Resolved) -> bool {
    if unreached > 0 {
        eprintln!(
            "note: {unreached} letter(s) in {} were out of reach: held by another reader (or \
             by a receive whose answer was lost) until their visibility timeout ends, or, in a \
             FIFO queue, behind a letter of their message group that this scan held. Replay or \
             purge the letters shown, then run again.",
            resolved.dlq
        );
    }
    unreached > 0
}

fn print_list(letters: &[Letter], json: bool) -> Result<(), CliError> {
    let text = if json {
        json_lines(letters.iter().map(|l| LetterJson::new(l, false)))?
    } else {
        letter::table(letters)
    };
    write_stdout(text.as_bytes())
}

fn print_groups(groups: &[groups::Group], json: bool) -> Result<(), CliError> {
    let text = if json {
        json_lines(groups)?
    } else {
        groups::table(groups)
    };
    write_stdout(text.as_bytes())
}

fn print_one(letter: &Letter, raw: bool, json: bool) -> Result<(), CliError> {
    if raw {
        return write_stdout(&letter.payload);
    }
    let text = if json {
        serde_json::to_string_pretty(&LetterJson::new(letter, true))
            .map_err(|e| CliError::Broker(format!("json: {e}")))?
            + "\n"
    } else {
        letter::page(letter)
    };
    write_stdout(text.as_bytes())
}

/// One JSON object per line, for `--json`.
pub(crate) fn json_lines<T: serde::Serialize>(
    items: impl IntoIterator<Item = T>,
) -> Result<String, CliError> {
    let mut text = String::new();
    for item in items {
        text +=
            &serde_json::to_string(&item).map_err(|e| CliError::Broker(format!("json: {e}")))?;
        text.push('\n');
    }
    Ok(text)
}

pub(crate) fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    std::io::stdout()
        .lock()
        .write_all(bytes)
        .map_err(|e| CliError::Broker(format!("stdout: {e}")))
}

/// Asks on the terminal; anything but `y`/`yes` is no.
fn confirm(question: &str) -> bool {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}
