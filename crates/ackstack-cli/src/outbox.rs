//! `ackstack outbox`: what an operator needs of a PostgreSQL transactional outbox: how far
//! behind it is, which rows are parked and why, and putting them back in line.

use std::process::ExitCode;

use ackstack_postgres::{PgInbox, PgInboxConfig};
use serde::Serialize;

use crate::cli::{OutboxCommand, OutboxTarget};
use crate::letter::{cut, format_time, millis};
use crate::run::CliError;
use crate::{json_lines, write_stdout};

/// Runs one `ackstack outbox` subcommand.
pub async fn run(command: OutboxCommand) -> Result<ExitCode, CliError> {
    match command {
        OutboxCommand::Status { target, json } => {
            let status = open(&target)?
                .outbox_status()
                .await
                .map_err(|e| CliError::broker("outbox status", e))?;
            let oldest = status.oldest_pending.map(|d| d.as_secs_f64());
            let text = if json {
                json_lines([StatusJson {
                    table: &target.table,
                    pending: status.pending,
                    oldest_pending_seconds: oldest,
                    parked: status.parked,
                }])?
            } else {
                format!(
                    "outbox={} pending={} oldest_pending={} parked={}\n",
                    target.table,
                    status.pending,
                    oldest.map_or_else(|| "-".to_string(), |s| format!("{s:.1}s")),
                    status.parked
                )
            };
            write_stdout(text.as_bytes())?;
        }
        OutboxCommand::Parked {
            target,
            limit,
            json,
        } => {
            let rows = open(&target)?
                .outbox_parked(limit)
                .await
                .map_err(|e| CliError::broker("outbox parked", e))?;
            let text = if json {
                json_lines(rows.iter().map(|row| ParkedJson {
                    id: row.id,
                    destination: &row.destination,
                    message_id: &row.message_id,
                    key: row.key.as_deref().map(|k| k.escape_ascii().to_string()),
                    attempts: row.attempts,
                    last_error: row.last_error.as_deref(),
                    created_at: format_time(millis(row.created_at)),
                    parked_at: format_time(millis(row.parked_at)),
                }))?
            } else {
                let mut text = format!(
                    "{:>10}  {:<20}  {:<20}  {:>8}  {:<20}  {}\n",
                    "ID", "DESTINATION", "KEY", "ATTEMPTS", "PARKED", "LAST ERROR"
                );
                for row in &rows {
                    let key = row
                        .key
                        .as_deref()
                        .map_or_else(|| "-".to_string(), |k| k.escape_ascii().to_string());
                    text += &format!(
                        "{:>10}  {:<20}  {:<20}  {:>8}  {:<20}  {}\n",
                        row.id,
                        cut(&row.destination, 20),
                        cut(&key, 20),
                        row.attempts,
                        format_time(millis(row.parked_at)),
                        cut(row.last_error.as_deref().unwrap_or("-"), 80)
                    );
                }
                text += &format!("{} parked row(s) in {}\n", rows.len(), target.table);
                text
            };
            write_stdout(text.as_bytes())?;
        }
        OutboxCommand::Retry { target, ids, all } => {
            let inbox = open(&target)?;
            let ids = (!all).then_some(ids.as_slice());
            let n = inbox
                .outbox_retry(ids)
                .await
                .map_err(|e| CliError::broker("outbox retry", e))?;
            write_stdout(format!("retried {n} parked row(s) in {}\n", target.table).as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The outbox of `target` (the inbox table is not used).
fn open(target: &OutboxTarget) -> Result<PgInbox, CliError> {
    let config = PgInboxConfig::new("ackstack-cli")
        .table("ackstack_cli_unused_inbox")
        .outbox_table(target.table.clone());
    PgInbox::new(&target.database_url, config).map_err(|e| CliError::Usage(e.to_string()))
}

#[derive(Serialize)]
struct StatusJson<'a> {
    table: &'a str,
    pending: u64,
    oldest_pending_seconds: Option<f64>,
    parked: u64,
}

#[derive(Serialize)]
struct ParkedJson<'a> {
    id: i64,
    destination: &'a str,
    message_id: &'a str,
    key: Option<String>,
    attempts: i32,
    last_error: Option<&'a str>,
    created_at: String,
    parked_at: String,
}
