//! The command line: one binary, one role per subcommand.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{self, Application, Role};
use crate::config::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "mailscope",
    version,
    about = "Scope an Entra app's mailbox access to chosen Exchange Online mailboxes, and prove it."
)]
pub struct Cli {
    /// Optional TOML configuration file (layered between defaults and MAILSCOPE_* variables).
    #[arg(long, global = true, env = "MAILSCOPE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API and the background worker.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Mint a development token (HS256 setups only).
    Token(TokenArgs),
    /// Validate the configuration, print it with secrets redacted, and exit.
    CheckConfig,
    /// Run the sandbox: a simulated Microsoft 365 tenant (login, Graph, Exchange admin API).
    Sandbox(Box<crate::sandbox::SandboxArgs>),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve the API only; run workers as a separate deployment.
    #[arg(long, conflicts_with = "worker_only")]
    pub no_worker: bool,
    /// Run the worker only (health, readiness and metrics are still served).
    #[arg(long)]
    pub worker_only: bool,
    /// Do not apply migrations at start (run `mailscope migrate` separately).
    #[arg(long)]
    pub no_migrate: bool,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Role to grant (repeatable). Default: MailScope.Admin.
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// Tenant id the token may see (repeatable), or `*` for all. Default: `*`.
    #[arg(long = "tenant", value_name = "TENANT_ID")]
    pub tenants: Vec<String>,
    /// Subject (`sub`) of the token.
    #[arg(long, default_value = "local-developer")]
    pub subject: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(i64).range(60..=86400 * 30))]
    pub ttl: i64,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Sandbox(args) = cli.command {
        // The sandbox stands apart from the service's configuration; it only shares logging.
        let s = Settings::load(cli.config.as_deref()).unwrap_or_default();
        crate::telemetry::init_logging(s.log_format, &s.log_filter);
        return block_on(crate::sandbox::run(*args));
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailscope: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_logging(settings.log_format, &settings.log_filter);
    block_on(run(cli.command, settings))
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailscope: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailscope: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let role = match (args.no_worker, args.worker_only) {
                (true, _) => Role::ApiOnly,
                (_, true) => Role::WorkerOnly,
                _ => Role::All,
            };
            if args.no_migrate {
                settings.database.migrate_on_start = false;
            }
            let app = Application::build(settings, role).await?;
            app.stop_gracefully_on_signals()?;
            app.run_until_stopped().await
        }
        Command::Migrate => {
            let resolved = app::resolve(settings).await?;
            let result = app::migrate_with(
                resolved.database_url.expose(),
                resolved.settings.database.tls_ca_file.as_deref(),
            )
            .await;
            if let Some(pg) = resolved.embedded {
                pg.stop().await;
            }
            let applied = result?;
            println!(
                "schema at version {} ({} migration(s) applied now)",
                crate::store::migrate::latest_version(),
                applied.len()
            );
            Ok(())
        }
        Command::Openapi => {
            print!("{}", crate::api::openapi::document_json());
            Ok(())
        }
        Command::Token(args) => {
            if settings.auth.jwks_url.is_some() {
                anyhow::bail!(
                    "tokens come from your identity provider: this configuration verifies tokens \
                     with auth.jwks_url, and `mailscope token` only mints local HS256 tokens"
                );
            }
            let secret = match &settings.auth.hs256_secret {
                Some(s) => s.clone(),
                None => {
                    let dir = &settings.database.data_dir;
                    // A token signed with a secret made up here would be refused by the server:
                    // only share the secret of a data directory `serve` already uses.
                    if !dir.is_dir() {
                        anyhow::bail!(
                            "no mailscope data directory at {}: the server keeps its token signing \
                             secret there. Run `mailscope token` in the directory where `mailscope \
                             serve` runs (after it has started), or point at the server's data with \
                             MAILSCOPE_DATABASE__DATA_DIR, or set MAILSCOPE_AUTH__HS256_SECRET to the \
                             server's secret",
                            std::path::absolute(dir)
                                .unwrap_or_else(|_| dir.clone())
                                .display()
                        );
                    }
                    crate::store::local_secrets::read_or_create(
                        dir,
                        crate::store::local_secrets::HS256_SECRET_FILE,
                        48,
                    )?
                }
            };
            let roles = if args.roles.is_empty() {
                vec![settings.auth.role_admin.clone()]
            } else {
                args.roles
            };
            let tenants = if args.tenants.is_empty() {
                vec!["*".to_string()]
            } else {
                args.tenants
            };
            let token = crate::auth::mint_hs256(
                &settings.auth,
                secret.expose(),
                &args.subject,
                &roles,
                &tenants,
                args.ttl,
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Sandbox(_) => unreachable!("handled before configuration is loaded"),
        Command::CheckConfig => {
            let mut effective = serde_json::to_value(&settings)?;
            describe_generated(&settings, &mut effective);
            println!("{}", toml_like(&effective));
            eprintln!("configuration is valid");
            Ok(())
        }
    }
}

/// Say what an unset value means instead of `null`: the embedded database, a secret generated in
/// the data directory, or a feature that is off.
fn describe_generated(settings: &Settings, v: &mut serde_json::Value) {
    use crate::store::local_secrets::{ENCRYPTION_KEY_FILE, HS256_SECRET_FILE};
    let dir = std::path::absolute(&settings.database.data_dir)
        .unwrap_or_else(|_| settings.database.data_dir.clone());
    let generated = |file: &str| format!("generated in {}", dir.join(file).display());
    let mut set = |pointer: &str, text: String| {
        if let Some(slot) = v.pointer_mut(pointer)
            && slot.is_null()
        {
            *slot = serde_json::Value::String(text);
        }
    };
    set(
        "/database/url",
        format!(
            "embedded (a private cluster in {})",
            dir.join("pg").display()
        ),
    );
    set("/encryption_key", generated(ENCRYPTION_KEY_FILE));
    if settings.auth.jwks_url.is_none() {
        set("/auth/hs256_secret", generated(HS256_SECRET_FILE));
        set("/auth/jwks_url", "not used (HS256 tokens)".into());
    } else {
        set("/auth/hs256_secret", "not used (JWKS)".into());
    }
    set("/database/tls_ca_file", "the system's roots".into());
    set("/http/workers", "one per core".into());
    // Only the embedded setup generates it: receivers must be given it, so otherwise it is the
    // operator's to choose.
    let webhook_secret = if settings.database.url.is_none() {
        generated(crate::webhooks::SIGNING_SECRET_FILE)
    } else {
        "not set: callbacks are refused until it is".into()
    };
    set("/webhooks/signing_secret", webhook_secret);
}

/// Render the effective configuration as readable `key = value` lines (secrets are redacted by
/// their serializer).
fn toml_like(v: &serde_json::Value) -> String {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push(format!("{prefix} = {other}")),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.join("\n")
}
