//! The shutdown signal a service passes to [`Consumer::run_until`](crate::Consumer::run_until).

/// Completes when the process is asked to stop: Ctrl-C (SIGINT), or SIGTERM on Unix (what
/// Kubernetes, systemd and Docker send before they kill a process).
///
/// Pass it to [`Consumer::run_until`](crate::Consumer::run_until): the consumer then stops
/// receiving, drains what is in flight up to its shutdown deadline, flushes its acks, and
/// returns its summary. A signal whose handler cannot be installed is logged and not waited
/// for; the other one still is.
///
/// ```no_run
/// # async fn demo() -> Result<(), ackstack_core::ConsumerError> {
/// use ackstack_core::{Consumer, MemoryBroker, handler_fn, shutdown_signal};
///
/// let broker = MemoryBroker::new();
/// let summary = Consumer::new(broker.source("jobs"))
///     .run_until(handler_fn(|_delivery, _cx| async { Ok(()) }), shutdown_signal())
///     .await?;
/// println!("acked {} before stopping", summary.acked);
/// # Ok(())
/// # }
/// ```
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
