//! LISTEN on a dedicated connection (outside the pool) and turn notifications into wake-ups.
//! The connection reconnects by itself with capped backoff; workers also poll, so a gap only
//! delays work, never loses it.
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_postgres::AsyncMessage;

use super::NOTIFY_CHANNEL;

pub async fn run(url: String, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
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
                match client
                    .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                    .await
                {
                    Ok(()) => {
                        tracing::debug!("listening for job notifications");
                        backoff = Duration::from_millis(500);
                        // Anything enqueued while we were disconnected: look now.
                        wake.notify_one();
                        loop {
                            tokio::select! {
                                msg = rx.recv() => match msg {
                                    Some(()) => wake.notify_one(),
                                    None => break,
                                },
                                _ = shutdown.changed() => {
                                    driver.abort();
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "job listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
