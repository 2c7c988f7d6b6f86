//! A batch handler writing to PostgreSQL: one multi-row `INSERT` per batch of up to 100
//! deliveries instead of one statement per message, and still an outcome for each delivery.
//!
//! ```text
//! cargo run -p example-bulk-insert
//! ```
//!
//! It needs PostgreSQL at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`,
//! the database of `docker compose up -d postgres`). It writes to a temporary table, which
//! lives as long as its connection: runs never meet and nothing is left behind. A service
//! writes to an ordinary table the same way.
//!
//! The in-memory queue holds 250 sensor readings (`sensor-7,21.5`, the message id as the row
//! id) and two payloads that are not readings. `run_batches_until` gathers deliveries into
//! batches (`BatchConfig`: at most 100, waiting at most 50 ms for more after the first) and
//! calls the handler once per batch. The handler:
//!
//! - parses each delivery; one that does not parse fails alone, permanently: it is
//!   dead-lettered with its own metadata, and the rest of its batch is written;
//! - writes the parsed rows with one statement,
//!   `INSERT ... VALUES ($1, $2, $3), ($4, $5, $6), ... ON CONFLICT (id) DO NOTHING`;
//! - when that statement fails, fails the whole batch transiently: every delivery of it is
//!   retried with backoff, and none is acked.
//!
//! A delivery is acked only after the statement holding its row has committed. A crash between
//! the commit and the ack brings its message back; the row id is the message id, so the second
//! insert of the row does nothing, and no reading is ever stored twice.
//!
//! The concurrency (200) is two batches' worth: the next batch fills while one is written.
//! What it prints (the number of batches depends on timing; typically 3, of 100, 100 and 52):
//!
//! ```text
//! batches=3 rows=250 dead_lettered=2
//! dead letter: oops (not `sensor,value`: "oops")
//! dead letter: sensor-9,not-a-number (bad value in "sensor-9,not-a-number": invalid float literal)
//! table rows=250
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ackstack::batch::{Batch, BatchConfig, BatchResults, batch_handler_fn};
use ackstack::{Consumer, DeadLetterMetadata, Delivery, HandlerError, MemoryBroker, Message};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

const READINGS: usize = 250;

/// One row of the table.
struct Reading {
    id: String,
    sensor: String,
    value: f64,
}

/// A delivery's row; a payload that is not `sensor,value` is a permanent failure.
fn parse(delivery: &Delivery) -> Result<Reading, HandlerError> {
    let text = std::str::from_utf8(&delivery.payload).map_err(HandlerError::permanent)?;
    let (sensor, value) = text
        .split_once(',')
        .ok_or_else(|| HandlerError::permanent(format!("not `sensor,value`: {text:?}")))?;
    let value = value
        .trim()
        .parse::<f64>()
        .map_err(|e| HandlerError::permanent(format!("bad value in {text:?}: {e}")))?;
    let id = delivery
        .message_id
        .clone()
        .ok_or_else(|| HandlerError::permanent("no message id"))?;
    Ok(Reading {
        id,
        sensor: sensor.to_string(),
        value,
    })
}

/// Writes `rows` with one statement; returns how many were new. Three parameters a row:
/// PostgreSQL's limit of 65535 parameters a statement allows batches of up to 21845 rows.
async fn insert(client: &Client, rows: &[Reading]) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut sql = String::from("INSERT INTO bulk_insert_readings (id, sensor, value) VALUES ");
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 3);
    for (i, row) in rows.iter().enumerate() {
        let n = i * 3;
        let sep = if i == 0 { "" } else { ", " };
        sql.push_str(&format!("{sep}(${}, ${}, ${})", n + 1, n + 2, n + 3));
        params.push(&row.id);
        params.push(&row.sensor);
        params.push(&row.value);
    }
    // A row already there (a redelivery after a crash) is not written again.
    sql.push_str(" ON CONFLICT (id) DO NOTHING");
    client.execute(&sql, &params).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL at {url}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("PostgreSQL connection failed: {e}");
        }
    });
    client
        .batch_execute(
            "CREATE TEMPORARY TABLE bulk_insert_readings (
                 id text PRIMARY KEY,
                 sensor text NOT NULL,
                 value double precision NOT NULL
             )",
        )
        .await?;
    let client = Arc::new(client);

    let broker = MemoryBroker::new();
    for n in 0..READINGS {
        let reading = format!("sensor-{},{}", n % 10, 20.0 + (n % 7) as f64 / 2.0);
        let message = Message::new(reading).message_id(format!("reading-{n}"));
        broker.publish("readings", message);
    }
    for bad in ["oops", "sensor-9,not-a-number"] {
        let message = Message::new(bad).message_id(format!("bad-{bad}"));
        broker.publish("readings", message);
    }

    let consumer = Consumer::new(broker.source("readings")).concurrency(200);
    let status = consumer.status();
    // How many times the handler was called, and how many rows it wrote.
    let calls = Arc::new(AtomicUsize::new(0));
    let inserted = Arc::new(AtomicU64::new(0));
    let (db, counted, written_total) = (client.clone(), calls.clone(), inserted.clone());
    let handler = batch_handler_fn(move |batch: Batch| {
        // The closure's future owns what it uses: clones of the shared client and counters.
        let (db, calls, inserted) = (db.clone(), counted.clone(), written_total.clone());
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            // Success for every delivery, but those that do not parse.
            let mut results = BatchResults::succeeded(batch.len());
            let mut rows = Vec::with_capacity(batch.len());
            for (index, delivery) in batch.deliveries().enumerate() {
                match parse(delivery) {
                    Ok(row) => rows.push(row),
                    Err(error) => {
                        results.fail(index, error);
                    }
                }
            }
            // One statement for the batch: if it fails, no row of it was written, and `Err`
            // fails every delivery of the batch (transient: each is retried with backoff).
            match insert(&db, &rows).await {
                Ok(written) => {
                    inserted.fetch_add(written, Ordering::Relaxed);
                    Ok(results)
                }
                Err(e) => Err(HandlerError::transient(e)),
            }
        }
    });
    let batches = BatchConfig {
        max_size: 100,
        max_wait: Duration::from_millis(50),
    };
    let summary = consumer
        .run_batches_until(handler, batches, async move {
            status.idle(Duration::from_millis(500)).await
        })
        .await?;

    let calls = calls.load(Ordering::Relaxed);
    let rows = inserted.load(Ordering::Relaxed);
    println!(
        "batches={calls} rows={rows} dead_lettered={}",
        summary.dead_lettered
    );
    for letter in broker.dead_letters("readings") {
        let why = DeadLetterMetadata::from_headers(&letter.headers)
            .map(|m| m.error_message)
            .unwrap_or_default();
        println!(
            "dead letter: {} ({why})",
            String::from_utf8_lossy(&letter.payload)
        );
    }
    let stored: i64 = client
        .query_one("SELECT count(*) FROM bulk_insert_readings", &[])
        .await?
        .try_get(0)?;
    println!("table rows={stored}");

    if rows != READINGS as u64 || stored != READINGS as i64 || summary.dead_lettered != 2 {
        return Err(format!(
            "expected {READINGS} rows and 2 dead letters; got rows={rows}, table rows={stored}, \
             dead_lettered={}",
            summary.dead_lettered
        )
        .into());
    }
    Ok(())
}
