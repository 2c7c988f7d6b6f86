//! The relay's `LISTEN` connection: a connection of its own (a pooled one drops
//! notifications), turning each notification into a wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Connection};

use crate::error::describe;
use crate::inbox::Listen;
#[cfg(feature = "tls")]
use crate::tls::SslMode;

/// Connects, listens on `channel` and wakes `wake` on every notification, until the
/// connection fails. `listening` is true while the `LISTEN` is in place.
pub(crate) async fn listen(
    params: &Listen,
    channel: &str,
    wake: &Notify,
    listening: &AtomicBool,
) -> Result<(), String> {
    // Connecting (TCP, TLS, authentication) is bounded as a whole.
    let within = answer_within(params);
    let late = || format!("no connection within {within:?}");
    #[cfg(feature = "tls")]
    if params.tls.mode != SslMode::Disable {
        let connector = crate::tls::connector(&params.tls).map_err(|e| e.to_string())?;
        let connected = tokio::time::timeout(within, params.pg.connect(connector))
            .await
            .map_err(|_| late())?;
        return drive(params, connected, channel, wake, listening).await;
    }
    let connected = tokio::time::timeout(within, params.pg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| late())?;
    drive(params, connected, channel, wake, listening).await
}

/// How long connecting, and then the `LISTEN`, may take.
fn answer_within(params: &Listen) -> Duration {
    params
        .pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10))
        + Duration::from_secs(5)
}

async fn drive<S, T>(
    params: &Listen,
    connected: Result<(Client, Connection<S, T>), tokio_postgres::Error>,
    channel: &str,
    wake: &Notify,
    listening: &AtomicBool,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (client, mut connection) = connected.map_err(|e| describe(&e))?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    // The channel is the outbox table's name, checked to be letters, digits, `_` and `.`.
    let sql = format!("LISTEN \"{channel}\"");
    let mut subscribe = std::pin::pin!(client.batch_execute(&sql));
    let mut subscribed = false;
    let within = answer_within(params);
    let mut unanswered = std::pin::pin!(tokio::time::sleep(within));
    loop {
        tokio::select! {
            () = &mut unanswered, if !subscribed => {
                return Err(format!("LISTEN not answered within {within:?}"));
            }
            done = &mut subscribe, if !subscribed => {
                done.map_err(|e| describe(&e))?;
                subscribed = true;
                listening.store(true, Ordering::Relaxed);
                // Rows may have committed before the LISTEN took effect.
                wake.notify_one();
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(describe(&err)),
                None => return Err("the connection closed".into()),
            },
        }
    }
}
