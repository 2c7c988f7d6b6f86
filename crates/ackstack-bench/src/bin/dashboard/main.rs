//! Draws the main panels of `deploy/grafana/ackstack-dashboard.json` from a real run, without
//! Grafana: a consumer on RabbitMQ handles a steady stream of orders while its payment
//! provider goes down for a while (the kill switch trips, the backlog grows, then drains);
//! its Prometheus recorder is scraped once a second, the panels' queries are evaluated over
//! the scrapes (rates over 5 s, `histogram_quantile` over the latency buckets) and the
//! picture is written as SVG.
//!
//! ```text
//! cargo run -p ackstack-bench --bin dashboard -- --out docs/dashboard.svg
//! ```
//!
//! Flags: `--out PATH` (default `docs/dashboard.svg`), `--secs N` (length of the run, default
//! 90), `--rate N` (orders per second, default 200). `AMQP_URL` names the broker (default
//! the local RabbitMQ).

use std::time::{Duration, Instant};

use ackstack_core::{
    Backoff, Consumer, ConsumerConfig, Delivery, HandlerError, KillSwitchConfig, Message, Publish,
    handler_fn,
};
use ackstack_rabbitmq::{RabbitConfig, RabbitPublisher, RabbitSource};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// When the payment provider is down, as fractions of the run.
const OUTAGE: (f64, f64) = (0.33, 0.5);

struct Args {
    out: String,
    secs: u64,
    rate: u64,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        out: "docs/dashboard.svg".into(),
        secs: 90,
        rate: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| format!("{flag}: {value:?} is not a number from 1 to 100000"))
        };
        match flag.as_str() {
            "--out" => args.out = value.clone(),
            "--secs" => args.secs = number()?,
            "--rate" => args.rate = number()?,
            _ => return Err(format!("unknown flag {flag} (--out, --secs, --rate)")),
        }
    }
    Ok(args)
}

/// A reproducible number from a message's sequence number and attempt (splitmix64).
fn mix(seq: u64, attempt: u32) -> u64 {
    let mut z = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(attempt));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payment call: a few milliseconds, now and then a slow one, 3% transient failures, one
/// malformed order in 200, and nothing but failures while the provider is down.
async fn charge(delivery: Delivery, outage: (Instant, Instant)) -> Result<(), HandlerError> {
    let seq: u64 = std::str::from_utf8(&delivery.payload)
        .ok()
        .and_then(|s| s.strip_prefix("order "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| HandlerError::permanent("malformed order"))?;
    let h = mix(seq, delivery.attempt);
    let millis = if h.is_multiple_of(50) {
        40 + h % 80
    } else {
        2 + h % 8
    };
    tokio::time::sleep(Duration::from_millis(millis)).await;
    let now = Instant::now();
    if now >= outage.0 && now < outage.1 {
        return Err(HandlerError::transient("payment provider unavailable"));
    }
    if seq % 200 == 7 {
        return Err(HandlerError::permanent("card number malformed"));
    }
    if (h >> 8) % 100 < 3 {
        return Err(HandlerError::transient("payment provider timed out"));
    }
    Ok(())
}

mod scrape;
mod svg;

use scrape::{Scrape, parse};
use svg::{panels, svg};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in ackstack_core::metrics::HISTOGRAM_BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    let uri = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let queue = format!("dashboard-{}", std::process::id());
    let config = RabbitConfig::new(uri, queue.clone());
    let publisher = RabbitPublisher::connect(config.clone()).await?;
    let source = RabbitSource::connect(config.clone()).await?;

    let mut kill_switch = KillSwitchConfig::default();
    kill_switch.window = Duration::from_secs(10);
    kill_switch.activation = 20;
    kill_switch.trip = 0.5;
    kill_switch.cooldown = Duration::from_secs(5);
    kill_switch.probes = 3;
    kill_switch.count_permanent = false;
    let mut consumer_config = ConsumerConfig::default();
    consumer_config.backlog_interval = Duration::from_secs(1);
    consumer_config.kill_switch = Some(kill_switch);
    let consumer = Consumer::new(source)
        .config(consumer_config)
        .concurrency(16)
        .name("payments")
        .max_attempts(4)
        .backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(2),
        ));
    let control = consumer.control();

    let start = Instant::now();
    let run = Duration::from_secs(args.secs);
    let outage = (start + run.mul_f64(OUTAGE.0), start + run.mul_f64(OUTAGE.1));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(consumer.run_until(
        handler_fn(move |d, _cx| charge(d, outage)),
        async move {
            let _ = stopped.await;
        },
    ));
    let pace = Duration::from_secs_f64(1.0 / args.rate as f64);
    let publishing = tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for seq in 0u64.. {
            if next.duration_since(start.into()) >= run {
                break;
            }
            tokio::time::sleep_until(next).await;
            next += pace;
            if let Err(e) = publisher
                .publish(Message::new(format!("order {seq}")))
                .await
            {
                eprintln!("publish: {e}");
            }
        }
    });

    let mut scrapes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..=args.secs {
        tick.tick().await;
        scrapes.push(Scrape {
            at: Instant::now(),
            samples: parse(&handle.render()),
        });
    }
    let _ = publishing.await;
    let _ = stop.send(());
    let summary = consumer.await??;
    let caption = format!(
        "ackstack on RabbitMQ: {} orders/s, payment provider down from {:.0}s to {:.0}s; \
         kill switch opened {} times",
        args.rate,
        OUTAGE.0 * args.secs as f64,
        OUTAGE.1 * args.secs as f64,
        control.trips()
    );
    let picture = svg(&panels(&scrapes), args.secs as usize, OUTAGE, &caption);
    std::fs::write(&args.out, picture).map_err(|e| format!("{}: {e}", args.out))?;
    println!("{caption}\n{summary:?}\nwrote {}", args.out);
    delete_queues(&config).await;
    Ok(())
}

/// Deletes the run's work, dead-letter and delay queues (errors ignored: they are the run's
/// own, uniquely named).
async fn delete_queues(config: &RabbitConfig) {
    use lapin::options::QueueDeleteOptions;
    let Ok(Ok(connection)) = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&config.uri, lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for name in config.declared_queues() {
        if let Ok(name) = lapin::types::ShortString::try_new(name) {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                channel.queue_delete(name, QueueDeleteOptions::default()),
            )
            .await;
        }
    }
}
