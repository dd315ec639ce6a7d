//! `mailscope sandbox`: a simulated Microsoft 365 tenant over HTTP.
//!
//! One base URL serves Microsoft's login endpoint (`/{tenant}/oauth2/v2.0/token`, OpenID
//! configuration, JWKS), a Graph v1.0 subset (`/v1.0/…`, `/v1.0/$batch`), Exchange's admin
//! `InvokeCommand` (`/adminapi/beta/{tenant}/InvokeCommand`) and a control API (`/_sandbox/…`).
//! Wire details follow `docs/microsoft-365.md`; every behaviour that document marks as
//! unverified is a setting ([`settings::Behaviour`]) with the documented default.
//!
//! What makes it more than a mock: access rules are evaluated by the sandbox's own reading of
//! Microsoft's pages ([`rules`], never mailscope's `domain` rules, so that a rule mailscope
//! misreads shows up as a disagreement), Exchange's Test cmdlets see changes at once while Graph front ends
//! adopt them after configurable delays (so answers flap while a change propagates), new
//! Exchange objects stay invisible for a replication delay, and throttling and faults are
//! deterministic under a seed.
pub mod control;
pub mod exchange;
pub mod graph;
pub mod login;
pub mod model;
pub mod propagation;
pub mod rules;
pub mod settings;
pub mod state;
pub mod tls;
pub mod tokens;
pub mod wire;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use secrecy::SecretString;
use serde_json::Value;

use settings::{Api, Behaviour, Budget, DelayRange, Pacing};
use state::{CallRecord, Clock, Fault, ManagementCredentials, Shared, World};
use wire::Reply;

/// Command-line flags of `mailscope sandbox`.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(
        long,
        default_value = "127.0.0.1:8090",
        env = "MAILSCOPE_SANDBOX_LISTEN"
    )]
    pub listen: String,
    /// Fixture file (JSON) with tenants, recipients and apps; the embedded default when absent.
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// Delay before each Graph front end adopts an access policy or group membership change:
    /// a duration (`2s`) or a range (`30s..5m`). Microsoft: it "can take longer than 1 hour",
    /// even once Test-ApplicationAccessPolicy shows the change; users report hours.
    #[arg(long, default_value = "1m..2h")]
    pub propagation_delay: DelayRange,
    /// Delay before Graph front ends adopt an RBAC for Applications change (permission cache;
    /// Microsoft: 30 minutes to 2 hours).
    #[arg(long, default_value = "30m..2h")]
    pub rbac_propagation_delay: DelayRange,
    /// RBAC permission cache per app: an app idle for longer than this picks up RBAC changes
    /// (once its front end has them) at its next Graph call (Microsoft: 30 minutes; `0s`: no
    /// per-app cache).
    #[arg(long, default_value = "30m", value_parser = settings::parse_duration)]
    pub rbac_app_cache_idle: Duration,
    /// RBAC permission cache per app: maximum age of an app's cached grants, even while the app
    /// keeps calling (Microsoft: up to 2 hours; `0s`: no per-app cache).
    #[arg(long, default_value = "2h", value_parser = settings::parse_duration)]
    pub rbac_app_cache_lifetime: Duration,
    /// How long objects created by Exchange `New-*` cmdlets answer 404 to other calls.
    #[arg(long, default_value = "5s..60s")]
    pub replication_delay: DelayRange,
    /// Entra's eventual consistency: how long a new application reads as 404 (and blocks its
    /// service principal), a new client secret is refused and a new app role assignment is
    /// missing from tokens.
    #[arg(long, default_value = "1s..5s")]
    pub entra_consistency_delay: DelayRange,
    /// Number of simulated Graph front ends (each with its own cache).
    #[arg(long, default_value_t = 4)]
    pub front_ends: usize,
    /// Seed for ids, delays, front-end choice and faults (random when absent; printed at start).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Lifetime of issued access tokens.
    #[arg(long, default_value = "3599s", value_parser = settings::parse_duration)]
    pub token_lifetime: Duration,
    /// Graph budget per tenant, `N/window` (e.g. `10000/10m`), or `off`.
    #[arg(long, default_value = "10000/10m")]
    pub throttle_graph: String,
    /// InvokeCommand budget per tenant, `N/window`, or `off`.
    #[arg(long, default_value = "30000/1h")]
    pub throttle_exchange: String,
    /// Token endpoint budget per tenant, `N/window`, or `off`.
    #[arg(long, default_value = "off")]
    pub throttle_login: String,
    /// Concurrent InvokeCommand requests allowed per tenant (0: unlimited).
    #[arg(long, default_value_t = 10)]
    pub exchange_concurrency: usize,
    /// Latency added to each simulated API request (duration or range).
    #[arg(long, default_value = "0s")]
    pub latency: DelayRange,
    /// Fraction of requests answered with a 5xx (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub fault_5xx_rate: f64,
    /// Fraction of requests whose connection is dropped (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub fault_drop_rate: f64,
    /// APIs that latency and faults apply to.
    #[arg(long, value_delimiter = ',', default_value = "login,graph,exchange")]
    pub fault_apis: Vec<Api>,
    /// Default tenant behaviour switch, `key=value` (repeatable; keys as in
    /// `GET /_sandbox/settings`, e.g. `aapNestedGroups=direct_only`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Serve https with a certificate from a local CA (made once in `--tls-dir`, printed as
    /// `SANDBOX_CA_FILE`), so Microsoft's own clients work given that one CA file.
    #[arg(long)]
    pub tls: bool,
    /// Where `--tls` keeps its CA (`ca.pem`, `ca.key`).
    #[arg(long, default_value = ".mailscope/sandbox-tls")]
    pub tls_dir: PathBuf,
}

/// Everything needed to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub listen: String,
    pub fixture: Option<PathBuf>,
    pub seed: u64,
    pub pacing: Pacing,
    /// Default behaviour of tenants (fixture tenants may override parts).
    pub behaviour: Behaviour,
    pub workers: usize,
    /// Serve https with the CA kept in this directory (`None`: plain http).
    pub tls_dir: Option<PathBuf>,
}

impl Default for SandboxSettings {
    /// Microsoft-like pacing on `127.0.0.1:0` with seed 42 and one worker. Tests usually shorten
    /// the delays: see [`SandboxSettings::fast`].
    fn default() -> Self {
        SandboxSettings {
            listen: "127.0.0.1:0".into(),
            fixture: None,
            seed: 42,
            pacing: Pacing::default(),
            behaviour: Behaviour::default(),
            workers: 1,
            tls_dir: None,
        }
    }
}

impl SandboxSettings {
    /// No propagation or replication delay and no throttling: everything takes effect at once.
    pub fn fast() -> Self {
        let mut s = SandboxSettings::default();
        s.pacing.propagation_delay = DelayRange::ZERO;
        s.pacing.rbac_propagation_delay = DelayRange::ZERO;
        s.pacing.rbac_app_cache_idle = Duration::ZERO;
        s.pacing.rbac_app_cache_lifetime = Duration::ZERO;
        s.pacing.replication_delay = DelayRange::ZERO;
        s.pacing.entra_consistency_delay = DelayRange::ZERO;
        s.pacing.graph_budget = None;
        s.pacing.exchange_budget = None;
        s
    }

    pub fn from_args(a: &SandboxArgs) -> anyhow::Result<Self> {
        let budget = |s: &str| -> anyhow::Result<Option<Budget>> {
            if s.eq_ignore_ascii_case("off") || s.is_empty() {
                Ok(None)
            } else {
                Ok(Some(s.parse().map_err(anyhow::Error::msg)?))
            }
        };
        let rate = |name: &str, r: f64| -> anyhow::Result<f64> {
            if (0.0..=1.0).contains(&r) {
                Ok(r)
            } else {
                anyhow::bail!("--{name} must be between 0 and 1")
            }
        };
        let pacing = Pacing {
            propagation_delay: a.propagation_delay,
            rbac_propagation_delay: a.rbac_propagation_delay,
            rbac_app_cache_idle: a.rbac_app_cache_idle,
            rbac_app_cache_lifetime: a.rbac_app_cache_lifetime,
            replication_delay: a.replication_delay,
            entra_consistency_delay: a.entra_consistency_delay,
            front_ends: a.front_ends.max(1),
            token_lifetime: a.token_lifetime,
            graph_budget: budget(&a.throttle_graph)?,
            exchange_budget: budget(&a.throttle_exchange)?,
            login_budget: budget(&a.throttle_login)?,
            exchange_concurrency: a.exchange_concurrency,
            latency: a.latency,
            fault_5xx_rate: rate("fault-5xx-rate", a.fault_5xx_rate)?,
            fault_drop_rate: rate("fault-drop-rate", a.fault_drop_rate)?,
            fault_apis: a.fault_apis.clone(),
        };
        let overrides = a
            .set
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| anyhow::anyhow!("--set expects KEY=VALUE, got `{kv}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let behaviour = settings::apply_overrides(&Behaviour::default(), &overrides)
            .map_err(anyhow::Error::msg)?;
        Ok(SandboxSettings {
            listen: a.listen.clone(),
            fixture: a.fixture.clone(),
            seed: a.seed.unwrap_or_else(rand::random),
            pacing,
            behaviour,
            workers: a.workers.max(1),
            tls_dir: a.tls.then(|| a.tls_dir.clone()),
        })
    }
}

impl TryFrom<&SandboxArgs> for SandboxSettings {
    type Error = anyhow::Error;
    fn try_from(a: &SandboxArgs) -> anyhow::Result<Self> {
        SandboxSettings::from_args(a)
    }
}

/// A running sandbox.
pub struct SandboxHandle {
    /// `http://127.0.0.1:<port>` (`https://` with TLS): the login, Graph and Exchange base URL.
    pub base_url: String,
    /// With TLS, the CA file clients must trust.
    pub ca_file: Option<PathBuf>,
    shared: Arc<Shared>,
    server: actix_web::dev::ServerHandle,
}

impl SandboxHandle {
    pub fn default_tenant_id(&self) -> String {
        self.shared.lock().default_tenant_id.clone()
    }

    /// The default tenant's initial domain, e.g. `contoso-sandbox.onmicrosoft.com`.
    pub fn default_tenant_domain(&self) -> String {
        let w = self.shared.lock();
        w.tenants
            .iter()
            .find(|t| t.id.eq_ignore_ascii_case(&w.default_tenant_id))
            .map(|t| t.initial_domain.clone())
            .unwrap_or_default()
    }

    /// Client id of the default tenant's management app.
    pub fn management_client_id(&self) -> String {
        self.management_credentials(None)
            .map(|c| c.client_id)
            .unwrap_or_default()
    }

    /// Secret of the default tenant's management app.
    pub fn management_client_secret(&self) -> SecretString {
        SecretString::from(
            self.management_credentials(None)
                .map(|c| c.client_secret)
                .unwrap_or_default(),
        )
    }

    /// Management credentials of a tenant (the default tenant when `None`).
    pub fn management_credentials(&self, tenant_id: Option<&str>) -> Option<ManagementCredentials> {
        let w = self.shared.lock();
        let tid = tenant_id
            .map(str::to_string)
            .unwrap_or_else(|| w.default_tenant_id.clone());
        w.management
            .iter()
            .find(|m| m.tenant_id.eq_ignore_ascii_case(&tid))
            .cloned()
    }

    /// Move the sandbox clock forward (propagation, replication, token expiry, throttling windows).
    pub fn advance_clock(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// Stop serving (gracefully).
    pub async fn stop(self) {
        self.server.stop(true).await;
    }
}

fn build_shared(settings: &SandboxSettings) -> anyhow::Result<Arc<Shared>> {
    let text = match &settings.fixture {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("cannot read fixture {}: {e}", p.display()))?,
        None => model::DEFAULT_FIXTURE.to_string(),
    };
    let fixture: model::Fixture =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid fixture: {e}"))?;
    let clock = Clock::new();
    let mut secrets = Default::default();
    let world = World::build(
        &fixture,
        settings.pacing.clone(),
        settings.behaviour.clone(),
        settings.seed,
        clock.wall(),
        clock.now(),
        &mut secrets,
    )?;
    Ok(Arc::new(Shared {
        clock,
        keys: tokens::process_keys()?,
        world: Mutex::new(world),
        fixture,
        seed: settings.seed,
        secrets: Mutex::new(secrets),
    }))
}

/// Register every route on an actix `App`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(4 * 1024 * 1024))
        .service(web::scope("/_sandbox").configure(control::routes))
        .route("/v1.0/{tail:.*}", web::route().to(graph::entry))
        .route(
            "/adminapi/beta/{tenant}/InvokeCommand",
            web::post().to(exchange::entry),
        )
        .route(
            "/common/discovery/instance",
            web::get().to(login::instance_discovery),
        )
        .route("/{tenant}/oauth2/v2.0/token", web::post().to(login::token))
        .route(
            "/{tenant}/oauth2/v2.0/token",
            web::get().to(login::token_get),
        )
        .route("/{tenant}/oauth2/token", web::post().to(login::token))
        .route("/{tenant}/oauth2/token", web::get().to(login::token_get))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            web::get().to(login::openid_configuration),
        )
        .route(
            "/{tenant}/.well-known/openid-configuration",
            web::get().to(login::openid_configuration),
        )
        .route("/{tenant}/discovery/v2.0/keys", web::get().to(login::keys))
        .route("/{tenant}/discovery/keys", web::get().to(login::keys))
        .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({"error": {"code": "NotFound",
        "message": format!("The sandbox does not serve {} {}", req.method(), req.path())}}))
}

/// Start a sandbox in-process (for tests: listen on `127.0.0.1:0`).
pub async fn spawn(settings: SandboxSettings) -> anyhow::Result<SandboxHandle> {
    let (handle, server) = start(settings, false)?;
    tokio::spawn(server);
    Ok(handle)
}

fn start(
    settings: SandboxSettings,
    signals: bool,
) -> anyhow::Result<(SandboxHandle, actix_web::dev::Server)> {
    let shared = build_shared(&settings)?;
    let listener = std::net::TcpListener::bind(&settings.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr()?;
    let data = web::Data::from(shared.clone());
    let server = HttpServer::new(move || App::new().app_data(data.clone()).configure(routes))
        .workers(settings.workers.max(1))
        .shutdown_timeout(5);
    let (mut server, scheme, ca_file) = match &settings.tls_dir {
        Some(dir) => {
            let t = tls::prepare(dir)?;
            let s = server.listen_rustls_0_23(listener, t.config)?;
            (s, "https", Some(t.ca_file))
        }
        None => (server.listen(listener)?, "http", None),
    };
    if !signals {
        server = server.disable_signals();
    }
    let server = server.run();
    let handle = SandboxHandle {
        base_url: format!("{scheme}://{addr}"),
        ca_file,
        shared,
        server: server.handle(),
    };
    Ok((handle, server))
}

/// Run `mailscope sandbox` until SIGINT/SIGTERM, printing how to use it.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let settings = SandboxSettings::from_args(&args)?;
    let seed = settings.seed;
    let pacing = settings.pacing.clone();
    let (handle, server) = start(settings, true)?;
    print_banner(&handle, seed, &pacing);
    server.await?;
    Ok(())
}

fn print_banner(h: &SandboxHandle, seed: u64, p: &Pacing) {
    let url = &h.base_url;
    let tenant = h.default_tenant_id();
    let client_id = h.management_client_id();
    let creds = h.management_credentials(None);
    // The sandbox's management secret is a throwaway credential of a simulated tenant; printing
    // it is the point (the user registers it with mailscope).
    let secret = creds.map(|c| c.client_secret).unwrap_or_default();
    let domain = h.default_tenant_domain();
    println!("mailscope sandbox: a simulated Microsoft 365 tenant");
    println!();
    println!("  URL (login, Graph and Exchange):  {url}");
    println!("  default tenant id:                {tenant}");
    println!("  management app client id:        {client_id}");
    println!("  management app client secret:    {secret}");
    println!("  seed:                             {seed}");
    if let Some(ca) = &h.ca_file {
        println!("  TLS: trust this CA file:          {}", ca.display());
    }
    println!(
        "  propagation: AAP {}  RBAC {} (app cache {} idle, {} max)  replication {}  Entra consistency {}  front ends {}",
        p.propagation_delay,
        p.rbac_propagation_delay,
        settings::format_duration(p.rbac_app_cache_idle),
        settings::format_duration(p.rbac_app_cache_lifetime),
        p.replication_delay,
        p.entra_consistency_delay,
        p.front_ends
    );
    println!();
    println!("Register it with mailscope (a token from `mailscope token`, the API on :8080):");
    println!();
    println!("  curl -s -X PUT http://127.0.0.1:8080/v1/tenants/{tenant} \\");
    println!(
        "    -H \"Authorization: Bearer $(mailscope token)\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "    -d '{{\"display_name\": \"Contoso (sandbox)\", \"cloud\": \"custom\", \"default_domain\": \"{domain}\",\n        \"endpoints\": {{\"login\": \"{url}\", \"graph\": \"{url}\", \"exchange\": \"{url}\"}},\n        \"credentials\": {{\"client_id\": \"{client_id}\", \"client_secret\": \"{secret}\"}}}}'"
    );
    println!();
    println!(
        "Control API: {url}/_sandbox/ (tenants, mailboxes, credentials, settings, calls, counters, reset)"
    );
    println!();
    println!("SANDBOX_URL={url}");
    println!("SANDBOX_TENANT_ID={tenant}");
    println!("SANDBOX_CLIENT_ID={client_id}");
    println!("SANDBOX_CLIENT_SECRET={secret}");
    if let Some(ca) = &h.ca_file {
        // Trust this file in each client (requests/MSAL: REQUESTS_CA_BUNDLE; azure-identity
        // and the Graph SDK: a connection_verify / SSL context), not system-wide.
        println!("SANDBOX_CA_FILE={}", ca.display());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// The scheme and host the client used, so links point back at the sandbox.
pub(crate) fn base_url(req: &HttpRequest) -> String {
    let ci = req.connection_info();
    format!("{}://{}", ci.scheme(), ci.host())
}

/// Why a request was cut short before reaching its handler.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Interrupt {
    ServerError,
    Throttled(Duration),
    TooManyConcurrent,
}

/// What the pipeline records about a request besides its status.
#[derive(Debug, Default, Clone)]
pub(crate) struct CallNote {
    pub endpoint: String,
    pub cmdlet: Option<String>,
    pub parameters: Option<Value>,
    pub body: Option<Value>,
    pub front_end: Option<usize>,
    pub app_id: Option<String>,
}

/// A request to one of the simulated APIs.
pub(crate) struct Incoming {
    pub api: Api,
    /// Resolved tenant id (for budgets, counters and concurrency), when known.
    pub tenant: Option<String>,
    pub method: String,
    pub path: String,
    pub note: CallNote,
}

/// Run a request through latency, faults, throttling and concurrency limits, then `handle`
/// under the world lock, and record it.
pub(crate) async fn guarded(
    shared: &Shared,
    inc: Incoming,
    interrupted: impl Fn(&World, Interrupt) -> Reply,
    handle: impl FnOnce(&mut World, &Shared) -> (Reply, CallNote),
) -> HttpResponse {
    let now = shared.clock.now();
    let (fault, latency, early, took_slot) = {
        let mut w = shared.lock();
        let (fault, latency) = w.draw_fault(inc.api);
        let mut early = None;
        let mut took_slot = false;
        if let Some(t) = &inc.tenant {
            match w.take_budget(t, inc.api, now) {
                Err(retry) => early = Some(Interrupt::Throttled(retry)),
                Ok(_) if inc.api == Api::Exchange => {
                    let limit = w.pacing.exchange_concurrency;
                    let n = w.in_flight.entry(t.clone()).or_insert(0);
                    if limit > 0 && *n >= limit {
                        early = Some(Interrupt::TooManyConcurrent);
                    } else {
                        *n += 1;
                        took_slot = true;
                    }
                }
                Ok(_) => {}
            }
        }
        (fault, latency, early, took_slot)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut w = shared.lock();
    if took_slot
        && let Some(t) = &inc.tenant
        && let Some(n) = w.in_flight.get_mut(t)
    {
        *n = n.saturating_sub(1);
    }
    let at = shared
        .clock
        .wall()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let record = |w: &mut World, reply: &Reply, note: CallNote, fault: Option<&str>| {
        let retry_after = reply
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
            .map(|(_, v)| v.clone());
        w.record(CallRecord {
            seq: 0,
            at: at.clone(),
            api: inc.api,
            tenant: inc.tenant.clone(),
            method: inc.method.clone(),
            path: inc.path.clone(),
            endpoint: note.endpoint,
            cmdlet: note.cmdlet,
            parameters: note.parameters,
            body: note.body,
            status: reply.status,
            app_id: note.app_id,
            front_end: note.front_end,
            batch_request_id: None,
            fault: fault.map(str::to_string),
            retry_after,
        });
    };
    let interrupt = match (fault, early) {
        (Fault::Drop, _) => {
            let dropped = Reply {
                status: 200,
                headers: vec![],
                body: wire::Body::Drop,
            };
            // Status 0: no answer reached the client.
            record(
                &mut w,
                &Reply {
                    status: 0,
                    headers: vec![],
                    body: wire::Body::Empty,
                },
                inc.note.clone(),
                Some("dropped"),
            );
            return dropped.into_response();
        }
        (Fault::ServerError, _) => Some((Interrupt::ServerError, "server_error")),
        (Fault::None, Some(i @ Interrupt::Throttled(_))) => Some((i, "throttled")),
        (Fault::None, Some(i @ Interrupt::TooManyConcurrent)) => Some((i, "concurrency_limit")),
        (Fault::None, Some(i @ Interrupt::ServerError)) => Some((i, "server_error")),
        (Fault::None, None) => None,
    };
    if let Some((i, label)) = interrupt {
        let reply = interrupted(&w, i);
        record(&mut w, &reply, inc.note.clone(), Some(label));
        return reply.into_response();
    }
    let (reply, note) = handle(&mut w, shared);
    record(&mut w, &reply, note, None);
    drop(w);
    reply.into_response()
}
