//! Building and running the service: resolve the database (external or embedded), apply
//! migrations, assemble state, bind the listener. Tests build the same `Application` on port 0.
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, middleware::from_fn, web};
use anyhow::Context;
use deadpool_postgres::Pool;

use crate::api::{self, AppState};
use crate::auth::Verifier;
use crate::config::{Secret, Settings, decode_encryption_key};
use crate::crypto::CredentialCipher;
use crate::queue::worker::{Worker, WorkerConfig};
use crate::store::{self, embedded::EmbeddedPostgres, local_secrets};
use crate::telemetry::Metrics;

/// The HTTP server: what `actix_web::HttpServer` builds, with each connection wrapped in
/// [`api::protocol_errors::ProblemIo`] so that the answers actix's parser gives on its own (431,
/// 400, 408) are problem documents too. `HttpServer` offers no hook to wrap the socket, hence the
/// hand assembly from actix-server and actix-http, with `HttpServer`'s defaults.
fn http_server<F, T, B>(
    listener: TcpListener,
    settings: &Settings,
    app: F,
) -> anyhow::Result<Server>
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: actix_web::body::MessageBody + 'static,
{
    use actix_http::{HttpService, Protocol};
    use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
    use actix_web::dev::AppConfig;

    let addr = listener.local_addr()?;
    let builder = actix_server::Server::build();
    let shutdown = builder.graceful_shutdown_signal();
    let mut builder = builder
        .shutdown_timeout(settings.shutdown_grace_seconds)
        // actix would stop at once on SIGINT (dropping requests in flight); `serve` maps both
        // SIGINT and SIGTERM to a graceful stop instead (`stop_gracefully_on_signals`).
        .disable_signals();
    if let Some(w) = settings.http.workers {
        builder = builder.workers(w);
    }
    let builder = builder.listen("mailscope-http", listener, move || {
        let shutdown = shutdown.clone();
        let app = app().into_factory().map_err(|e| e.error_response());
        let http = HttpService::build()
            .graceful_shutdown_signal(move || {
                let shutdown = shutdown.clone();
                async move { shutdown.notified().await }
            })
            .client_disconnect_timeout(Duration::from_secs(1))
            .local_addr(addr)
            // The host of requests without a Host header (HTTP/1.0); nothing here builds URLs from it.
            .finish(map_config(app, |_| AppConfig::default()));
        fn_service(|io: tokio::net::TcpStream| async move {
            let peer = io.peer_addr().ok();
            Ok::<_, actix_http::error::DispatchError>((
                api::protocol_errors::ProblemIo::new(io),
                Protocol::Http1,
                peer,
            ))
        })
        .and_then(http)
    })?;
    Ok(builder.run())
}

/// Periodic housekeeping run by worker processes: forget expired idempotency keys and old
/// finished jobs, remove probe secrets whose check no longer runs, and make sure every tenant
/// with access grants has its credential-expiry scan queued.
async fn maintenance(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let r = state.settings.retention.clone();
    loop {
        let keys = Duration::from_secs(r.idempotency_keys_hours * 3600);
        match api::idempotency::purge_expired(&state, keys).await {
            Ok(n) if n > 0 => tracing::info!(keys = n, "purged expired idempotency keys"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed"),
        }
        let jobs = Duration::from_secs(r.finished_jobs_days * 86400);
        match crate::queue::purge_finished(&state.pool, jobs).await {
            Ok(n) if n > 0 => tracing::info!(jobs = n, "purged old finished jobs"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging finished jobs failed"),
        }
        match crate::provisioning::checks::sweep_probe_secrets(&state).await {
            Ok(n) if n > 0 => tracing::info!(secrets = n, "removed orphaned probe secrets"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping probe secrets failed"),
        }
        match crate::provisioning::grants::ensure_expiry_scans(&state).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "queueing credential expiry scans failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(900)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn build_worker(
    pool: Pool,
    state: AppState,
    settings: &Settings,
    registry: &prometheus::Registry,
    database_url: &str,
) -> anyhow::Result<Worker> {
    let w = &settings.worker;
    let cfg = WorkerConfig {
        concurrency: w.concurrency,
        per_tenant_cap: w.per_tenant_concurrency,
        lease: Duration::from_secs(w.lease_seconds),
        poll_interval: Duration::from_secs(w.poll_interval_seconds),
        shutdown_grace: Duration::from_secs(settings.shutdown_grace_seconds),
        ..WorkerConfig::default()
    };
    let mut worker = Worker::new(pool, cfg, registry, Some(database_url.to_string()))?
        .with_tls_ca_file(settings.database.tls_ca_file.clone());
    crate::jobs::register_all(&mut worker, &state);
    Ok(worker)
}

/// What `serve` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and worker in one process.
    All,
    ApiOnly,
    WorkerOnly,
}

/// The database and secrets resolved from settings (embedded cluster started if needed).
pub struct Resolved {
    pub settings: Settings,
    pub database_url: Secret,
    pub embedded: Option<EmbeddedPostgres>,
}

/// Start the embedded cluster and fill in generated local secrets when nothing is configured.
pub async fn resolve(mut settings: Settings) -> anyhow::Result<Resolved> {
    let data_dir = settings.database.data_dir.clone();
    let (database_url, embedded) = match settings.database.url.clone() {
        Some(url) => (url, None),
        None => {
            let pg = EmbeddedPostgres::start(&data_dir).await?;
            let url = pg.ensure_database().await?;
            (url, Some(pg))
        }
    };
    if settings.encryption_key.is_none() {
        settings.encryption_key = Some(local_secrets::read_or_create(
            &data_dir,
            local_secrets::ENCRYPTION_KEY_FILE,
            32,
        )?);
    }
    if settings.auth.jwks_url.is_none() && settings.auth.hs256_secret.is_none() {
        settings.auth.hs256_secret = Some(local_secrets::read_or_create(
            &data_dir,
            local_secrets::HS256_SECRET_FILE,
            48,
        )?);
    }
    // Embedded mode works without configuration, callbacks included; with an external database
    // the operator sets the secret (it must be shared with receivers, so it is theirs to choose).
    if embedded.is_some() && settings.webhooks.signing_secret.is_none() {
        let raw =
            local_secrets::read_or_create(&data_dir, crate::webhooks::SIGNING_SECRET_FILE, 32)?;
        settings.webhooks.signing_secret = Some(crate::webhooks::local_signing_secret(&raw));
    }
    Ok(Resolved {
        settings,
        database_url,
        embedded,
    })
}

/// Apply migrations on one dedicated connection (the advisory lock is per session).
pub async fn migrate(database_url: &str) -> anyhow::Result<Vec<i32>> {
    migrate_with(database_url, None).await
}

pub async fn migrate_with(
    database_url: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<i32>> {
    let (mut client, driver) = store::connect_one(database_url, ca_file)
        .await
        .context("cannot connect to the database to migrate")?;
    let applied = store::migrate::run(&mut client).await;
    drop(client);
    let _ = driver.await;
    applied
}

pub struct Application {
    port: u16,
    server: Server,
    pub pool: Pool,
    state: AppState,
    worker: Option<Worker>,
    shutdown_grace: Duration,
    embedded: Option<EmbeddedPostgres>,
}

impl Application {
    /// Bind, resolve, migrate (unless disabled). Nothing is served until `run_until_stopped`.
    ///
    /// The port is bound before anything else starts, and an embedded cluster started here is
    /// stopped again if a later step fails: a failed start leaves nothing running.
    pub async fn build(settings: Settings, role: Role) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let Resolved {
            settings,
            database_url,
            embedded,
        } = resolve(settings).await?;
        match Self::assemble(settings, database_url, role, listener).await {
            Ok(mut app) => {
                app.embedded = embedded;
                Ok(app)
            }
            Err(e) => {
                if let Some(pg) = embedded {
                    pg.stop().await;
                }
                Err(e)
            }
        }
    }

    async fn assemble(
        settings: Settings,
        database_url: Secret,
        role: Role,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        if settings.database.migrate_on_start && role != Role::WorkerOnly {
            migrate_with(
                database_url.expose(),
                settings.database.tls_ca_file.as_deref(),
            )
            .await?;
        }
        let pool = store::create_pool(database_url.expose(), &settings.database)?;
        let key = settings
            .encryption_key
            .as_ref()
            .map(|k| decode_encryption_key(k.expose()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("encryption key: {e}"))?
            .context("no encryption key")?;
        let cipher = CredentialCipher::new(&key);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("mailscope/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let verifier = match (&settings.auth.jwks_url, &settings.auth.hs256_secret) {
            (Some(url), _) => Verifier::jwks(settings.auth.clone(), url.clone(), http.clone()),
            (None, Some(secret)) => Verifier::hs256(settings.auth.clone(), secret.expose()),
            (None, None) => anyhow::bail!("no token verification configured"),
        };
        verifier.warm_up().await;
        let verifier = web::Data::new(verifier);
        let metrics = web::Data::new(Metrics::new()?);
        let m365 = crate::m365::M365Client::new(settings.m365.clone(), &metrics.registry)?;
        let state = web::Data::new(AppState {
            pool: pool.clone(),
            cipher,
            settings: Arc::new(settings.clone()),
            m365,
            key_locks: Default::default(),
            liveness: Default::default(),
        });

        let worker = match role {
            Role::ApiOnly => None,
            Role::All | Role::WorkerOnly => Some(build_worker(
                pool.clone(),
                state.get_ref().clone(),
                &settings,
                &metrics.registry,
                database_url.expose(),
            )?),
        };

        let port = listener.local_addr()?.port();
        let body_limit = settings.http.body_limit_bytes;
        let app_state = state.get_ref().clone();
        let server = http_server(listener, &settings, move || {
            App::new()
                .wrap(from_fn(api::middleware::request_context))
                .app_data(state.clone())
                .app_data(verifier.clone())
                .app_data(metrics.clone())
                .configure(|cfg| api::configure(cfg, body_limit, role != Role::WorkerOnly))
        })?;
        tracing::info!(port, "listening");
        Ok(Application {
            port,
            server,
            pool,
            state: app_state,
            worker,
            shutdown_grace: Duration::from_secs(settings.shutdown_grace_seconds),
            embedded: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// On SIGINT (Ctrl-C) or SIGTERM: stop accepting, drain the requests in flight (up to the
    /// shutdown grace), then let `run_until_stopped` stop the worker and the embedded cluster.
    pub fn stop_gracefully_on_signals(&self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let handle = self.server.handle();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "stopping: draining requests in flight");
            handle.stop(true).await;
        });
        Ok(())
    }

    /// Serve until stopped (by a signal, see `stop_gracefully_on_signals`, or the handle), then
    /// stop the worker and the embedded cluster.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let maintenance = self
            .worker
            .as_ref()
            .map(|_| tokio::spawn(maintenance(self.state.clone(), stop_rx.clone())));
        let worker = self.worker.map(|w| tokio::spawn(w.run(stop_rx)));
        // actix stops on SIGINT/SIGTERM after draining requests; then the worker gets its grace.
        let result = self.server.await;
        let _ = stop_tx.send(true);
        if let Some(m) = maintenance {
            m.abort();
        }
        if let Some(w) = worker
            && tokio::time::timeout(self.shutdown_grace + Duration::from_secs(5), w)
                .await
                .is_err()
        {
            tracing::warn!("the worker did not stop in time");
        }
        self.pool.close();
        if let Some(pg) = self.embedded {
            pg.stop().await;
        }
        result.map_err(Into::into)
    }

    /// The worker, to register job handlers before running (tests and later job kinds).
    pub fn worker_mut(&mut self) -> Option<&mut Worker> {
        self.worker.as_mut()
    }

    /// A handle to stop the server from elsewhere (tests).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }
}
