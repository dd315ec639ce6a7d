//! LISTEN on a dedicated connection (outside the pool) and turn notifications into wake-ups.
//! The connection reconnects by itself with capped backoff; workers also poll, so a gap only
//! delays work, never loses it.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use super::NOTIFY_CHANNEL;

pub async fn run(
    url: String,
    ca_file: Option<PathBuf>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let cfg: Result<tokio_postgres::Config, _> = url.parse();
        let outcome = match cfg {
            Err(e) => Err(anyhow::anyhow!("bad database URL: {e}")),
            Ok(cfg) => match crate::store::tls_connector(&cfg, ca_file.as_deref()) {
                Err(e) => Err(e),
                Ok(Some(tls)) => match cfg.connect(tls).await {
                    Ok((c, conn)) => Ok(session(c, conn, &wake, &mut shutdown, &mut backoff).await),
                    Err(e) => Err(e.into()),
                },
                Ok(None) => match cfg.connect(NoTls).await {
                    Ok((c, conn)) => Ok(session(c, conn, &wake, &mut shutdown, &mut backoff).await),
                    Err(e) => Err(e.into()),
                },
            },
        };
        match outcome {
            Ok(Stop::Shutdown) => return,
            Ok(Stop::Lost) => {}
            Err(e) => tracing::warn!(error = %e, "job listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

enum Stop {
    Shutdown,
    Lost,
}

/// One connected session: LISTEN, then forward notifications until the connection ends.
async fn session<S, T>(
    client: Client,
    mut conn: Connection<S, T>,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Stop
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "job listener connection failed");
                    break;
                }
            }
        }
    });
    let stop = match client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
    {
        Ok(()) => {
            tracing::debug!("listening for job notifications");
            *backoff = Duration::from_millis(500);
            // Anything enqueued while we were disconnected: look now.
            wake.notify_one();
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(()) => wake.notify_one(),
                        None => break Stop::Lost,
                    },
                    _ = shutdown.changed() => break Stop::Shutdown,
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed");
            Stop::Lost
        }
    };
    driver.abort();
    stop
}
