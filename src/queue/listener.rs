//! LISTEN on a dedicated connection (outside the pool) and turn notifications into wake-ups.
//! A notification carries the seconds until the earliest job its statement queued becomes
//! runnable (migration 0015): 0 wakes the worker now, a later time is kept as a timer, so a job
//! any process scheduled ahead runs at its time rather than at the next poll. The connection
//! reconnects by itself with capped backoff; workers also poll, so a gap only delays work,
//! never loses it.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

use super::NOTIFY_CHANNEL;

pub async fn run(
    url: String,
    ca_file: Option<PathBuf>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    // Future wake-ups survive a reconnect.
    let mut timers = Timers::default();
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
                    Ok((c, conn)) => {
                        Ok(session(c, conn, &wake, &mut timers, &mut shutdown, &mut backoff).await)
                    }
                    Err(e) => Err(e.into()),
                },
                Ok(None) => match cfg.connect(NoTls).await {
                    Ok((c, conn)) => {
                        Ok(session(c, conn, &wake, &mut timers, &mut shutdown, &mut backoff).await)
                    }
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

/// Most future wake-ups kept; past that the latest are dropped (polling finds their jobs).
const MAX_TIMERS: usize = 4096;

/// The instants at which jobs announced by notifications become runnable.
#[derive(Default)]
struct Timers(BTreeSet<Instant>);

impl Timers {
    /// Remember a job runnable `secs` from now (a notification's payload).
    fn add(&mut self, secs: Duration) {
        // A little late rather than early: the claim compares `run_at` with the database's
        // clock, and a wake-up before it would find nothing.
        self.0
            .insert(Instant::now() + secs + Duration::from_millis(5));
        if self.0.len() > MAX_TIMERS {
            self.0.pop_last();
        }
    }

    fn next(&self) -> Option<Instant> {
        self.0.first().copied()
    }

    /// Forget every instant that has come.
    fn fire(&mut self) {
        let now = Instant::now();
        while self.0.first().is_some_and(|t| *t <= now) {
            self.0.pop_first();
        }
    }
}

/// The delay a notification announces: `None` means runnable now (also for a payload this
/// version does not understand, such as an older version's job kind).
fn announced(payload: &str) -> Option<Duration> {
    payload
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// One connected session: LISTEN, then forward notifications until the connection ends.
async fn session<S, T>(
    client: Client,
    mut conn: Connection<S, T>,
    wake: &Notify,
    timers: &mut Timers,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Stop
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Duration>>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(announced(n.payload())).is_err() {
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
                let next = timers.next();
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(None) => wake.notify_one(),
                        Some(Some(delay)) => timers.add(delay),
                        None => break Stop::Lost,
                    },
                    _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                        timers.fire();
                        wake.notify_one();
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_announces_now_or_a_delay() {
        assert_eq!(announced("0"), None);
        assert_eq!(announced("0.000"), None);
        assert_eq!(
            announced("noop"),
            None,
            "an older version's payload wakes at once"
        );
        assert_eq!(announced("NaN"), None);
        assert_eq!(announced("2.5"), Some(Duration::from_millis(2500)));
    }

    #[tokio::test]
    async fn timers_keep_the_earliest_and_forget_what_has_come() {
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        t.add(Duration::from_secs(60));
        t.add(Duration::from_millis(1));
        let first = t.next().unwrap();
        assert!(first < Instant::now() + Duration::from_secs(1));
        tokio::time::sleep_until(first).await;
        t.fire();
        assert!(t.next().unwrap() > Instant::now() + Duration::from_secs(30));
        for _ in 0..MAX_TIMERS + 10 {
            t.add(Duration::from_secs(1));
        }
        assert_eq!(t.0.len(), MAX_TIMERS);
    }
}
