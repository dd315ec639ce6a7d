//! The connection test behind `POST /v1/tenants/{id}/connection-test`: acquire both tokens, make
//! one harmless Graph call and one harmless Exchange call, and report each step in admin words.
//!
//! The Graph call reads the management app's own service principal (it proves the token works
//! and the app exists in the tenant); the Exchange call is `Get-Mailbox -ResultSize 1`, the
//! cheapest cmdlet that needs both Exchange.ManageAsApp and an Exchange admin role. A step whose
//! token failed is reported as skipped, not as a second failure.
use super::error::M365Error;
use super::token::TokenResource;
use super::{ErrorKind, TenantHandle};
use serde::Serialize;
use std::time::Instant;
use utoipa::ToSchema;

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Passed,
    Failed,
    /// Not attempted because a step it depends on failed.
    Skipped,
}

/// The steps of the connection test, in order (the values of a step's `step`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    GraphToken,
    GraphCall,
    ExchangeToken,
    ExchangeCall,
}

/// The ways mailscope's management app can prove its identity (`credential_kind`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ClientSecret,
    Certificate,
}

/// One step of the connection test.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionTestStep {
    /// `graph_token`, `exchange_token`, `graph_call` or `exchange_call`.
    #[schema(value_type = StepName, example = "exchange_call")]
    pub step: String,
    pub status: StepStatus,
    /// What the step did, or found.
    #[schema(example = "Get-Mailbox -ResultSize 1 answered")]
    pub summary: String,
    pub duration_ms: u64,
    /// Stable machine code of the failure (same codes as the problem `type` suffixes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "missing_manage_as_app_role")]
    pub code: Option<String>,
    /// Why it failed, in an admin's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(
        example = "The app lacks the Exchange.ManageAsApp role, so Exchange Online refuses its admin commands."
    )]
    pub cause: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Microsoft's own error code (e.g. `AADSTS7000215`), for support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microsoft_code: Option<String>,
    /// Microsoft's message, for support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub microsoft_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConnectionTestReport {
    /// True when every step passed.
    pub ok: bool,
    pub tenant_id: String,
    /// `client_secret` or `certificate`.
    #[schema(value_type = CredentialKind)]
    pub credential_kind: String,
    pub steps: Vec<ConnectionTestStep>,
}

impl ConnectionTestStep {
    fn passed(step: &str, summary: String, started: Instant) -> Self {
        Self::base(step, StepStatus::Passed, summary, started)
    }

    fn skipped(step: &str, because: &str) -> Self {
        let mut s = Self::base(
            step,
            StepStatus::Skipped,
            format!("not attempted: {because}"),
            Instant::now(),
        );
        s.duration_ms = 0;
        s
    }

    fn failed(step: &str, e: &M365Error, started: Instant) -> Self {
        let mut s = Self::base(step, StepStatus::Failed, e.cause(), started);
        s.code = Some(e.code().to_string());
        s.cause = Some(e.cause());
        s.fix = Some(e.fix());
        s.microsoft_code = e.remote_code().map(str::to_string);
        s.microsoft_message = e.remote_message().map(str::to_string);
        s.http_status = e.status();
        s.request_id = e.request_id().map(str::to_string);
        s
    }

    fn base(step: &str, status: StepStatus, summary: String, started: Instant) -> Self {
        ConnectionTestStep {
            step: step.to_string(),
            status,
            summary,
            duration_ms: started.elapsed().as_millis() as u64,
            code: None,
            cause: None,
            fix: None,
            microsoft_code: None,
            microsoft_message: None,
            http_status: None,
            request_id: None,
        }
    }
}

async fn graph_steps(t: &TenantHandle) -> Vec<ConnectionTestStep> {
    let started = Instant::now();
    if let Err(e) = t.token(TokenResource::Graph).await {
        return vec![
            ConnectionTestStep::failed("graph_token", &e, started),
            ConnectionTestStep::skipped("graph_call", "no Graph token"),
        ];
    }
    let token_step = ConnectionTestStep::passed(
        "graph_token",
        "Microsoft Graph token acquired".into(),
        started,
    );
    let started = Instant::now();
    let client_id = t.context().credential.client_id().to_string();
    let call = match t.graph().service_principal_by_app_id(&client_id).await {
        Ok(Some(sp)) => ConnectionTestStep::passed(
            "graph_call",
            format!(
                "Graph answered: service principal {} ({}) found",
                sp.id,
                sp.display_name.as_deref().unwrap_or("no display name")
            ),
            started,
        ),
        Ok(None) => ConnectionTestStep::failed(
            "graph_call",
            &M365Error::new(
                ErrorKind::AppNotFoundInTenant,
                super::Service::Graph,
                "service_principals.get_by_app_id",
            )
            .with_status(404)
            .with_message(format!("no service principal with appId {client_id}")),
            started,
        ),
        Err(e) => ConnectionTestStep::failed("graph_call", &e, started),
    };
    vec![token_step, call]
}

async fn exchange_steps(t: &TenantHandle) -> Vec<ConnectionTestStep> {
    let started = Instant::now();
    if let Err(e) = t.token(TokenResource::Exchange).await {
        return vec![
            ConnectionTestStep::failed("exchange_token", &e, started),
            ConnectionTestStep::skipped("exchange_call", "no Exchange token"),
        ];
    }
    let token_step = ConnectionTestStep::passed(
        "exchange_token",
        "Exchange Online token acquired".into(),
        started,
    );
    let started = Instant::now();
    let call = match t.exchange().list_mailboxes(Some(1)).await {
        Ok(m) => ConnectionTestStep::passed(
            "exchange_call",
            format!(
                "Exchange answered Get-Mailbox -ResultSize 1 ({} mailbox returned)",
                m.len()
            ),
            started,
        ),
        Err(e) => ConnectionTestStep::failed("exchange_call", &e, started),
    };
    vec![token_step, call]
}

pub(crate) async fn run(t: &TenantHandle) -> ConnectionTestReport {
    let (graph, exchange) = tokio::join!(graph_steps(t), exchange_steps(t));
    let steps: Vec<ConnectionTestStep> = graph.into_iter().chain(exchange).collect();
    ConnectionTestReport {
        ok: steps.iter().all(|s| s.status == StepStatus::Passed),
        tenant_id: t.context().tenant_id.clone(),
        credential_kind: t.context().credential.kind().to_string(),
        steps,
    }
}
