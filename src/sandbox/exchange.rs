//! Exchange Online's admin `InvokeCommand` endpoint (docs/microsoft-365.md §1.3, §2–§4): the
//! `CmdletInput` body, parameter binding and validation, Exchange's error shape, `X-AnchorMailbox`,
//! `@odata.nextLink` paging, replication-lag 404s, the admin-role requirement and the cmdlets
//! mailscope uses.
//!
//! Cmdlets act on the live directory; Test cmdlets evaluate it at once, while Graph sees changes
//! only as its front ends adopt them (see [`super::propagation`]).
use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

use super::login::{bearer_claims, url_decode_form};
use super::model::*;
use super::rules::{
    EVERY_APP, Filter, Right, authorization_rows, may_scope_policy, policy_verdict, role_grants,
};
use super::settings::{AnchorCheck, Api, EmptyOutput, ForbiddenBody, ScopeObjectId};
use super::state::{Shared, World, assignments_of, snapshot};
use super::tokens::{AccessClaims, TokenProblem};
use super::wire::{Body, Reply, exchange_error};
use super::{CallNote, Incoming, Interrupt, base_url, guarded};

/// The system mailbox app-only callers anchor on.
const APP_ANCHOR_MAILBOX: &str = "SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}";

/// What a cmdlet does with its bound parameters.
type Handler = fn(&mut Cx<'_>, &Bound) -> R;

/// A cmdlet the sandbox implements: its name, whether it changes anything, the parameters it
/// binds, and what it does with them.
struct Cmdlet {
    name: &'static str,
    writes: bool,
    params: &'static [P],
    run: Handler,
}

/// A cmdlet that only reads.
const fn reads(name: &'static str, params: &'static [P], run: Handler) -> Cmdlet {
    Cmdlet {
        name,
        writes: false,
        params,
        run,
    }
}

/// A cmdlet that changes the tenant (published to Graph's front ends after it runs).
const fn writes(name: &'static str, params: &'static [P], run: Handler) -> Cmdlet {
    let mut c = reads(name, params, run);
    c.writes = true;
    c
}

/// Every cmdlet the sandbox implements: name, parameters (bound before the handler runs), handler.
#[rustfmt::skip]
const CMDLETS: &[Cmdlet] = &[
    reads("Get-OrganizationConfig", &[], get_organization_config),
    writes("New-DistributionGroup", NEW_DISTRIBUTION_GROUP, new_distribution_group),
    reads("Get-DistributionGroup", GET_DISTRIBUTION_GROUP, get_distribution_group),
    writes("Set-DistributionGroup", SET_DISTRIBUTION_GROUP, set_distribution_group),
    writes("Remove-DistributionGroup", REMOVE_DISTRIBUTION_GROUP, remove_distribution_group),
    writes("Add-DistributionGroupMember", ADD_GROUP_MEMBER, add_distribution_group_member),
    writes("Remove-DistributionGroupMember", GROUP_MEMBER, remove_distribution_group_member),
    reads("Get-DistributionGroupMember", GET_DISTRIBUTION_GROUP_MEMBER, get_distribution_group_member),
    writes("Update-DistributionGroupMember", UPDATE_DISTRIBUTION_GROUP_MEMBER, update_distribution_group_member),
    reads("Get-Mailbox", GET_RECIPIENTS, |cx, b| get_recipients(cx, "Get-Mailbox", b)),
    reads("Get-Recipient", GET_RECIPIENTS, |cx, b| get_recipients(cx, "Get-Recipient", b)),
    reads("Get-CASMailbox", GET_RECIPIENTS, |cx, b| get_recipients(cx, "Get-CASMailbox", b)),
    writes("New-ApplicationAccessPolicy", NEW_APPLICATION_ACCESS_POLICY, new_policy),
    reads("Get-ApplicationAccessPolicy", GET_APPLICATION_ACCESS_POLICY, get_application_access_policy),
    writes("Set-ApplicationAccessPolicy", SET_APPLICATION_ACCESS_POLICY, set_application_access_policy),
    writes("Remove-ApplicationAccessPolicy", REMOVE_APPLICATION_ACCESS_POLICY, remove_application_access_policy),
    reads("Test-ApplicationAccessPolicy", TEST_APPLICATION_ACCESS_POLICY, test_application_access_policy),
    writes("New-ServicePrincipal", NEW_SERVICE_PRINCIPAL, new_service_principal),
    reads("Get-ServicePrincipal", GET_SERVICE_PRINCIPAL, get_service_principal),
    writes("Remove-ServicePrincipal", IDENTITY, remove_service_principal),
    writes("New-ManagementScope", NEW_MANAGEMENT_SCOPE, new_management_scope),
    reads("Get-ManagementScope", GET_MANAGEMENT_SCOPE, get_management_scope),
    writes("Set-ManagementScope", SET_MANAGEMENT_SCOPE, set_management_scope),
    writes("Remove-ManagementScope", IDENTITY, remove_management_scope),
    writes("New-ManagementRoleAssignment", NEW_MANAGEMENT_ROLE_ASSIGNMENT, new_role_assignment),
    reads("Get-ManagementRoleAssignment", GET_MANAGEMENT_ROLE_ASSIGNMENT, get_management_role_assignment),
    writes("Remove-ManagementRoleAssignment", IDENTITY, remove_management_role_assignment),
    reads("Test-ServicePrincipalAuthorization", TEST_SERVICE_PRINCIPAL_AUTHORIZATION, test_service_principal_authorization),
];

fn canonical_cmdlet(name: &str) -> Option<&'static Cmdlet> {
    CMDLETS
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(name.trim()))
}

/// Cmdlets a directory role lets an app run. Exchange/Global Administrator run everything;
/// Exchange Recipient Administrator also manages distribution groups; the other supported roles
/// (docs/microsoft-365.md §1.2) are treated as read-only. The exact role-to-cmdlet mapping is an approximation.
fn role_permits(roles: &[String], cmdlet: &str, writes: bool) -> bool {
    let has = |name: &str| {
        directory_role_id(name).is_some_and(|id| roles.iter().any(|r| r.eq_ignore_ascii_case(id)))
    };
    if has("Global Administrator") || has("Exchange Administrator") {
        return true;
    }
    if !writes {
        return DIRECTORY_ROLES.iter().any(|(n, _)| has(n));
    }
    has("Exchange Recipient Administrator") && cmdlet.contains("DistributionGroup")
}

/// An error a cmdlet raises.
#[derive(Debug, Clone)]
pub struct ExoError {
    status: u16,
    code: &'static str,
    error_id: &'static str,
    exception: &'static str,
    text: String,
}

impl ExoError {
    fn reply(&self) -> Reply {
        exchange_error(
            self.status,
            self.code,
            self.error_id,
            self.exception,
            &self.text,
        )
    }

    fn not_found(identity: &str, t: &Tenant) -> Self {
        ExoError {
            status: 404,
            code: "NotFound",
            error_id: "Ex6F9304",
            exception: "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException",
            text: format!(
                "The operation couldn't be performed because object '{identity}' couldn't be found on '{}'.",
                domain_controller(t)
            ),
        }
    }

    fn ambiguous(identity: &str) -> Self {
        ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex9C0E2D",
            exception: "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException",
            text: format!(
                "The operation couldn't be performed because '{identity}' matches multiple entries."
            ),
        }
    }

    fn binding(text: String) -> Self {
        ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex2B4E11",
            exception: "System.Management.Automation.ParameterBindingException",
            text,
        }
    }

    fn invalid(text: String) -> Self {
        ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex7A1F3B",
            exception: "Microsoft.Exchange.Configuration.Tasks.TaskArgumentException",
            text,
        }
    }

    /// A name, address or key collision. Exchange raises these as `ADObjectAlreadyExistsException`
    /// (PowerShell shows `[New-DistributionGroup], ADObjectAlreadyExistsException` for "The name
    /// … is being used"); clients tell "already there" from a bad parameter by the type alone.
    fn exists(text: String) -> Self {
        ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex4D1C7E",
            exception: "Microsoft.Exchange.Data.Directory.ADObjectAlreadyExistsException",
            text,
        }
    }

    fn task(text: String) -> Self {
        ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex0D5A88",
            exception: "Microsoft.Exchange.Configuration.Tasks.TaskException",
            text,
        }
    }
}

fn domain_controller(t: &Tenant) -> String {
    let _ = t;
    "NAMPR03A001DC02.NAMPR03A001.PROD.OUTLOOK.COM".into()
}

// ---------------------------------------------------------------------------------------------
// Parameter binding
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Strings,
    Switch,
    Bool,
    /// An integer or `Unlimited`.
    ResultSize,
    Enum(&'static [&'static str]),
}

#[derive(Debug, Clone, Copy)]
struct P(&'static str, Kind, bool);

const COMMON: &[&str] = &[
    "Confirm",
    "ErrorAction",
    "WarningAction",
    "Verbose",
    "Debug",
    "InformationAction",
];

/// Bound parameters, by canonical name.
#[derive(Debug, Default)]
struct Bound(BTreeMap<&'static str, Value>);

impl Bound {
    fn str(&self, n: &str) -> Option<String> {
        match self.0.get(n)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(x) => Some(x.to_string()),
            _ => None,
        }
    }
    fn strings(&self, n: &str) -> Vec<String> {
        match self.0.get(n) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => vec![],
        }
    }
    fn flag(&self, n: &str) -> bool {
        matches!(self.0.get(n), Some(Value::Bool(true)))
    }
    fn boolean(&self, n: &str) -> Option<bool> {
        self.0.get(n).and_then(Value::as_bool)
    }
    fn has(&self, n: &str) -> bool {
        self.0.contains_key(n)
    }
    /// `None` means Unlimited; the default is 1000 as in Exchange.
    fn result_size(&self) -> Option<usize> {
        match self.0.get("ResultSize") {
            None => Some(1000),
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            _ => None,
        }
    }
}

fn bind(specs: &[P], params: &Map<String, Value>) -> Result<Bound, ExoError> {
    let mut out = Bound::default();
    for (key, value) in params {
        if key.contains('@') {
            continue; // type annotations such as `Members@odata.type`
        }
        if COMMON.iter().any(|c| c.eq_ignore_ascii_case(key)) {
            continue;
        }
        let Some(spec) = specs.iter().find(|p| p.0.eq_ignore_ascii_case(key)) else {
            return Err(ExoError::binding(format!(
                "A parameter cannot be found that matches parameter name '{key}'."
            )));
        };
        let name = spec.0;
        if value.is_null() {
            if spec.2 {
                return Err(ExoError::binding(format!(
                    "Cannot bind argument to parameter '{name}' because it is null."
                )));
            }
            continue;
        }
        let bound = match spec.1 {
            Kind::Str => match value {
                Value::String(_) | Value::Number(_) => value.clone(),
                Value::Array(_) => {
                    return Err(ExoError::binding(format!(
                        "Cannot convert 'System.Object[]' to the type 'System.String' required by parameter '{name}'. Specified method is not supported."
                    )));
                }
                _ => {
                    return Err(ExoError::binding(format!(
                        "Cannot bind parameter '{name}'. The value has an unsupported type."
                    )));
                }
            },
            Kind::Strings => match value {
                Value::String(s) => Value::Array(vec![Value::String(s.clone())]),
                Value::Array(a) if a.iter().all(|v| v.is_string()) => value.clone(),
                _ => {
                    return Err(ExoError::binding(format!(
                        "Cannot bind parameter '{name}'. Expected a string or an array of strings."
                    )));
                }
            },
            Kind::Switch | Kind::Bool => match value {
                Value::Bool(_) => value.clone(),
                Value::String(s)
                    if ["true", "$true"].contains(&s.to_ascii_lowercase().as_str()) =>
                {
                    Value::Bool(true)
                }
                Value::String(s)
                    if ["false", "$false"].contains(&s.to_ascii_lowercase().as_str()) =>
                {
                    Value::Bool(false)
                }
                _ => {
                    return Err(ExoError::binding(format!(
                        "Cannot process argument transformation on parameter '{name}'. Cannot convert value \"{value}\" to type \"System.Boolean\"."
                    )));
                }
            },
            Kind::ResultSize => match value {
                Value::String(s) if s.eq_ignore_ascii_case("unlimited") => Value::Null,
                Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => value.clone(),
                Value::String(s) if s.parse::<u64>().is_ok_and(|n| n > 0) => {
                    json!(s.parse::<u64>().unwrap_or(1000))
                }
                _ => {
                    return Err(ExoError::binding(format!(
                        "Cannot bind parameter 'ResultSize'. Cannot convert value \"{value}\" to type \"Microsoft.Exchange.Data.Unlimited`1[System.UInt32]\"."
                    )));
                }
            },
            Kind::Enum(allowed) => {
                let s = value.as_str().unwrap_or_default();
                match allowed.iter().find(|a| a.eq_ignore_ascii_case(s)) {
                    Some(a) => Value::String(a.to_string()),
                    None => {
                        return Err(ExoError::binding(format!(
                            "Cannot bind parameter '{name}'. Cannot convert value \"{s}\" to type. Error: \"Unable to match the identifier name {s} to a valid enumerator name. Specify one of the following enumerator names and try again: {}\"",
                            allowed.join(", ")
                        )));
                    }
                }
            }
        };
        out.0.insert(name, bound);
    }
    let missing: Vec<&str> = specs
        .iter()
        .filter(|p| p.2 && !out.0.contains_key(p.0))
        .map(|p| p.0)
        .collect();
    if !missing.is_empty() {
        return Err(ExoError::binding(format!(
            "Cannot process command because of one or more missing mandatory parameters: {}.",
            missing.join(" ")
        )));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

/// `POST /adminapi/beta/{tenant}/InvokeCommand`.
pub async fn entry(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let tenant_segment = path.into_inner();
    let base = base_url(&req);
    let claims = bearer_claims(&req, &shared, EXCHANGE_RESOURCE);
    let parsed: Result<Value, String> = serde_json::from_slice(&body).map_err(|e| e.to_string());
    let cmdlet_name = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.pointer("/CmdletInput/CmdletName"))
        .and_then(Value::as_str)
        .map(String::from);
    let parameters = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.pointer("/CmdletInput/Parameters"))
        .cloned();
    let tenant_id = shared.lock().tenant(&tenant_segment).map(|t| t.id.clone());
    let query = url_decode_form(req.query_string());
    let anchor = req
        .headers()
        .get("x-anchormailbox")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let prefer = req
        .headers()
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let note = CallNote {
        endpoint: format!(
            "exchange:{}",
            cmdlet_name
                .as_deref()
                .and_then(canonical_cmdlet)
                .map(|c| c.name)
                .unwrap_or("unknown")
        ),
        cmdlet: cmdlet_name.clone(),
        parameters: parameters.clone(),
        app_id: claims.as_ref().ok().map(|c| c.appid.clone()),
        ..Default::default()
    };
    let inc = Incoming {
        api: Api::Exchange,
        tenant: tenant_id.clone(),
        method: "POST".into(),
        path: format!(
            "{}{}",
            req.path(),
            if req.query_string().is_empty() {
                String::new()
            } else {
                format!("?{}", req.query_string())
            }
        ),
        note: note.clone(),
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    guarded(
        &shared,
        inc,
        |w, i| interrupted(w, tenant_id.as_deref(), i, &request_id),
        |w, sh| {
            let reply = invoke(
                w,
                sh,
                Invocation {
                    tenant_segment: &tenant_segment,
                    claims,
                    body: parsed,
                    query,
                    anchor,
                    prefer,
                    base,
                    request_id: request_id.clone(),
                },
            );
            (reply, note)
        },
    )
    .await
}

fn interrupted(w: &World, tenant: Option<&str>, i: Interrupt, request_id: &str) -> Reply {
    let behaviour = tenant
        .and_then(|t| w.tenant(t))
        .map(|t| t.behaviour.clone())
        .unwrap_or_default();
    match i {
        Interrupt::Throttled(retry) => {
            let mut r = exchange_error(
                429,
                "TooManyRequests",
                "Ex3E9A71",
                "Microsoft.Exchange.Admin.OData.Core.ThrottlingException",
                "The request was throttled. Please wait and try again.",
            )
            .header("request-id", request_id);
            if behaviour.exchange_retry_after {
                r = r.header("Retry-After", super::wire::retry_after_whole_secs(retry));
            }
            r
        }
        Interrupt::TooManyConcurrent => exchange_error(
            429,
            "TooManyRequests",
            "Ex3E9A72",
            "Microsoft.Exchange.Admin.OData.Core.ThrottlingException",
            "You have reached the maximum number of concurrent requests per tenant. Please wait and try again.",
        )
        .header("request-id", request_id),
        Interrupt::ServerError => Reply::json(
            503,
            json!({"error": {"code": "ServiceUnavailable", "message": "The service is temporarily unavailable. Please try again later."}}),
        )
        .header("request-id", request_id),
    }
}

struct Invocation<'a> {
    tenant_segment: &'a str,
    claims: Result<AccessClaims, TokenProblem>,
    body: Result<Value, String>,
    query: Vec<(String, String)>,
    anchor: Option<String>,
    prefer: Option<String>,
    base: String,
    request_id: String,
}

fn unauthorized(reason: &str) -> Reply {
    Reply::empty(401)
        .header(
            "WWW-Authenticate",
            format!("Bearer client_id=\"{EXCHANGE_APP_ID}\", trusted_issuers=\"00000001-0000-0000-c000-000000000000@*\", token_types=\"app_asserted_user_v1 service_asserted_app_v1\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", error=\"invalid_token\""),
        )
        .header("x-ms-diagnostics", format!("2000001;reason=\"{reason}\";error_category=\"invalid_token\""))
}

fn forbidden(behaviour: ForbiddenBody) -> Reply {
    match behaviour {
        // Observed: NUL bytes labelled as gzip, which no JSON parser accepts.
        ForbiddenBody::NulGzip => Reply {
            status: 403,
            headers: vec![("Content-Encoding".into(), "gzip".into())],
            body: Body::Raw(vec![0u8; 16], "application/json; charset=utf-8".into()),
        },
        ForbiddenBody::InvalidOperationJson => Reply::json(
            403,
            json!({"error": {"code": "Forbidden", "message": "Invalid Operation"}}),
        ),
    }
}

fn invoke(w: &mut World, sh: &Shared, inv: Invocation<'_>) -> Reply {
    let now = sh.clock.now();
    let wall = sh.clock.wall();
    let rid = inv.request_id.clone();
    let with_ids = |r: Reply| {
        r.header("request-id", rid.clone()).header(
            "X-CalculatedBETarget",
            "NAMPR03MB7521.namprd03.prod.outlook.com",
        )
    };
    let claims = match inv.claims {
        Ok(c) => c,
        Err(TokenProblem::Missing) => return with_ids(unauthorized("The token is missing")),
        Err(TokenProblem::Expired) => return with_ids(unauthorized("The token has expired")),
        Err(TokenProblem::WrongAudience) => {
            return with_ids(unauthorized("The audience claim value is invalid"));
        }
        Err(TokenProblem::Invalid) => {
            return with_ids(unauthorized(
                "The token is malformed or its signature is invalid",
            ));
        }
    };
    let Some(tenant) = w.tenant(inv.tenant_segment) else {
        return with_ids(unauthorized("The tenant in the request URL is unknown"));
    };
    let tid = tenant.id.clone();
    if !tenant.id.eq_ignore_ascii_case(&claims.tid) {
        return with_ids(unauthorized("The token was issued for another tenant"));
    }
    let domain_form = !tenant.id.eq_ignore_ascii_case(inv.tenant_segment);
    if domain_form && !tenant.behaviour.exchange_accepts_domain_tenant {
        return with_ids(unauthorized("The tenant must be addressed by its GUID"));
    }
    if !claims.roles.iter().any(|r| r == "Exchange.ManageAsApp") {
        return with_ids(unauthorized("The token has no Exchange.ManageAsApp role"));
    }
    if tenant.behaviour.exchange_rejects_secret_tokens && claims.appidacr == "1" {
        return with_ids(unauthorized(
            "Tokens obtained with a client secret are not accepted",
        ));
    }
    if let Some(r) = check_anchor(tenant, inv.anchor.as_deref()) {
        return with_ids(r);
    }
    let input = match &inv.body {
        Ok(v) => v.get("CmdletInput").cloned(),
        Err(_) => None,
    };
    let Some(input) = input.filter(Value::is_object) else {
        return with_ids(Reply::json(
            400,
            json!({"error": {"code": "BadRequest", "message": "The request body must contain a CmdletInput object."}}),
        ));
    };
    let name = input
        .get("CmdletName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let params = match input.get("Parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return with_ids(ExoError::binding("Parameters must be a JSON object.".into()).reply());
        }
    };
    let behaviour = tenant.behaviour.clone();
    let roles = tenant.directory_roles_of(&claims.oid);
    // Unknown cmdlets and cmdlets outside the caller's roles look the same: a 403.
    let Some(cmdlet) = canonical_cmdlet(&name) else {
        return with_ids(forbidden(behaviour.exchange_forbidden_body));
    };
    let writes = cmdlet.writes;
    if !role_permits(&roles, cmdlet.name, writes) {
        return with_ids(forbidden(behaviour.exchange_forbidden_body));
    }
    let lag = w.replication_lag();
    let result = {
        let World { tenants, rng, .. } = &mut *w;
        let Some(t) = tenants.iter_mut().find(|t| t.id == tid) else {
            return with_ids(unauthorized("The tenant disappeared"));
        };
        let mut cx = Cx {
            t,
            now,
            wall,
            visible_at: now + lag,
            rng: &mut rng.ids,
        };
        run_cmdlet(&mut cx, cmdlet, &params)
    };
    let output = match result {
        Ok(o) => o,
        Err(e) => return with_ids(e.reply()),
    };
    if writes {
        w.publish(&tid, now);
    }
    // Paging and $select.
    let select: Vec<String> = inv
        .query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("$select"))
        .map(|(_, v)| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let skip: usize = inv
        .query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("$skiptoken"))
        .and_then(|(_, v)| decode_skiptoken(v))
        .unwrap_or(0);
    let page_size = inv
        .prefer
        .as_deref()
        .and_then(|p| {
            p.split([',', ';'])
                .find_map(|x| x.trim().strip_prefix("odata.maxpagesize="))
                .and_then(|n| n.trim().parse::<usize>().ok())
        })
        .unwrap_or(1000)
        .clamp(1, 1000);
    let segment = inv.tenant_segment.to_string();
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(format!("https://outlook.office.com/adminapi/beta/{segment}/$metadata#Collection(Exchange.GenericHashTable)")),
    );
    body.insert(
        "adminapi.warnings@odata.type".into(),
        json!("#Collection(String)"),
    );
    body.insert("@adminapi.warnings".into(), json!(output.warnings));
    match output.items {
        None => match behaviour.exchange_empty_output {
            EmptyOutput::EmptyArray => {
                body.insert("value".into(), json!([]));
            }
            EmptyOutput::Null => {
                body.insert("value".into(), Value::Null);
            }
            EmptyOutput::Missing => {}
        },
        Some(items) => {
            let total = items.len();
            let page: Vec<Value> = items
                .into_iter()
                .skip(skip)
                .take(page_size)
                .map(|o| project(o, &select))
                .collect();
            let next = skip + page.len();
            body.insert("value".into(), Value::Array(page));
            if next < total {
                let mut link = format!(
                    "{}/adminapi/beta/{segment}/InvokeCommand?%24skiptoken={}",
                    inv.base,
                    encode_skiptoken(next)
                );
                if !select.is_empty() {
                    link.push_str(&format!("&%24select={}", select.join(",")));
                }
                body.insert("@odata.nextLink".into(), json!(link));
            }
        }
    }
    let mut reply = Reply::json(200, Value::Object(body)).header(
        "Content-Type",
        "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8",
    );
    if let (Some(b), Some((start, used))) = (
        w.pacing.exchange_budget,
        w.windows.get(&(tid.clone(), Api::Exchange)),
    ) {
        let reset = wall
            + chrono::Duration::from_std((*start + b.window).saturating_sub(now))
                .unwrap_or_default();
        reply = reply
            .header("Rate-Limit-Limit", b.limit.to_string())
            .header(
                "Rate-Limit-Remaining",
                b.limit.saturating_sub(*used).to_string(),
            )
            .header(
                "Rate-Limit-Reset",
                reset.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
    }
    with_ids(reply)
}

fn encode_skiptoken(offset: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("offset={offset}"))
}

fn decode_skiptoken(s: &str) -> Option<usize> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim())
        .ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("offset=")?
        .parse()
        .ok()
}

/// Keep only `$select`ed properties (with their annotations).
fn project(o: Value, select: &[String]) -> Value {
    if select.is_empty() {
        return o;
    }
    match o {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| {
                    let base = k.split('@').next().unwrap_or(k);
                    select.iter().any(|s| s.eq_ignore_ascii_case(base))
                })
                .collect(),
        ),
        other => other,
    }
}

/// `X-AnchorMailbox` check (docs/microsoft-365.md §1.3). Returns an error reply when the anchor is refused.
fn check_anchor(t: &Tenant, anchor: Option<&str>) -> Option<Reply> {
    let mode = t.behaviour.anchor_mailbox;
    if mode == AnchorCheck::Off {
        return None;
    }
    let bad = |msg: String| {
        Some(Reply::json(
            400,
            json!({"error": {"code": "ErrorIncorrectRoutingHint", "message": msg}}),
        ))
    };
    let Some(a) = anchor.map(str::trim).filter(|a| !a.is_empty()) else {
        return match mode {
            AnchorCheck::Strict => bad("The X-AnchorMailbox header is missing.".into()),
            _ => None,
        };
    };
    let (kind, value) = match a.split_once(':') {
        Some((k, v)) => (k.to_ascii_uppercase(), v),
        None => {
            return bad(format!(
                "The x-anchor mailbox '{a}' is not in a recognized format."
            ));
        }
    };
    let system = |v: &str| -> bool {
        v.split_once('@').is_some_and(|(mbx, org)| {
            mbx.eq_ignore_ascii_case(APP_ANCHOR_MAILBOX) && (t.answers_to(org))
        })
    };
    let ok = match kind.as_str() {
        "APP" => system(value),
        "UPN" => {
            system(value)
                || t.recipients.iter().any(|r| {
                    r.user_principal_name
                        .as_deref()
                        .is_some_and(|u| u.eq_ignore_ascii_case(value))
                })
        }
        "SMTP" => t
            .recipients
            .iter()
            .any(|r| r.kind.has_mailbox() && r.primary_smtp_address.eq_ignore_ascii_case(value)),
        "MBX" => value.split_once('@').is_some_and(|(g, org)| {
            t.answers_to(org)
                && t.recipients.iter().any(|r| {
                    r.exchange_object_id.eq_ignore_ascii_case(g) || r.id.eq_ignore_ascii_case(g)
                })
        }),
        _ => false,
    };
    if ok {
        None
    } else {
        bad(format!(
            "The x-anchor mailbox '{a}' does not match the target of the request."
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Cmdlets
// ---------------------------------------------------------------------------------------------

struct Cx<'a> {
    t: &'a mut Tenant,
    now: Duration,
    wall: DateTime<Utc>,
    /// When objects created by this call become visible to other calls.
    visible_at: Duration,
    rng: &'a mut StdRng,
}

struct Output {
    /// `None` for cmdlets without output.
    items: Option<Vec<Value>>,
    warnings: Vec<String>,
}

impl Output {
    fn none() -> Self {
        Output {
            items: None,
            warnings: vec![],
        }
    }
    fn items(items: Vec<Value>) -> Self {
        Output {
            items: Some(items),
            warnings: vec![],
        }
    }
}

type R = Result<Output, ExoError>;

/// Bind the parameters by the cmdlet's specs, then run its handler.
fn run_cmdlet(cx: &mut Cx<'_>, cmdlet: &Cmdlet, params: &Map<String, Value>) -> R {
    let b = bind(cmdlet.params, params)?;
    (cmdlet.run)(cx, &b)
}

/// The distribution group `-Identity` names.
fn identity_group<'t>(cx: &'t Cx<'_>, b: &Bound) -> Result<&'t Recipient, ExoError> {
    let id = b.str("Identity").unwrap_or_default();
    resolve(cx.t, &id, cx.now, false, |r| r.kind.is_distribution_group())
}

/// Any (replicated) recipient by identity.
fn any_recipient<'t>(cx: &'t Cx<'_>, identity: &str) -> Result<&'t Recipient, ExoError> {
    resolve(cx.t, identity, cx.now, false, |r| r.kind.is_recipient())
}

fn get_organization_config(cx: &mut Cx<'_>, _: &Bound) -> R {
    let t = &cx.t;
    Ok(Output::items(vec![annotate(json!({
        "Name": t.initial_domain.split('.').next().unwrap_or_default(),
        "DisplayName": t.display_name, "Identity": t.initial_domain,
        "Guid": t.id, "ExternalDirectoryOrganizationId": t.id,
        "EwsEnabled": null, "IsDehydrated": false
    }))]))
}

const GET_DISTRIBUTION_GROUP: &[P] = &[
    P("Identity", Kind::Str, false),
    P("ResultSize", Kind::ResultSize, false),
];

fn get_distribution_group(cx: &mut Cx<'_>, b: &Bound) -> R {
    let list = match b.str("Identity") {
        Some(_) => vec![identity_group(cx, b)?.clone()],
        None => visible(cx.t, cx.now, |r| r.kind.is_distribution_group()),
    };
    Ok(limit(
        list.iter().map(|r| group_object(cx.t, r)).collect(),
        b.result_size(),
    ))
}

const REMOVE_DISTRIBUTION_GROUP: &[P] = &[
    P("Identity", Kind::Str, true),
    P("BypassSecurityGroupManagerCheck", Kind::Switch, false),
];

fn remove_distribution_group(cx: &mut Cx<'_>, b: &Bound) -> R {
    let g = identity_group(cx, b)?.id.clone();
    manager_check(cx.t, b)?;
    cx.t.recipients.retain(|r| r.id != g);
    for r in cx.t.recipients.iter_mut() {
        r.members.retain(|m| *m != g);
    }
    Ok(Output::none())
}

/// `Add-` and `Remove-DistributionGroupMember`.
const GROUP_MEMBER: &[P] = &[
    P("Identity", Kind::Str, true),
    P("Member", Kind::Str, true),
    P("BypassSecurityGroupManagerCheck", Kind::Switch, false),
];

/// `Add-DistributionGroupMember`: `-Member` is optional in Microsoft's syntax
/// (https://learn.microsoft.com/powershell/module/exchange/add-distributiongroupmember); without
/// it the cmdlet checks the group and changes nothing.
const ADD_GROUP_MEMBER: &[P] = &[
    P("Identity", Kind::Str, true),
    P("Member", Kind::Str, false),
    P("BypassSecurityGroupManagerCheck", Kind::Switch, false),
];

/// The group (`-Identity`) and the recipient (`-Member`) of a membership change, after the
/// manager check; `adding` also checks that the recipient can be a member.
fn group_and_member(
    cx: &Cx<'_>,
    b: &Bound,
    adding: bool,
) -> Result<(Recipient, Recipient), ExoError> {
    let gid = identity_group(cx, b)?.id.clone();
    let member = any_recipient(cx, &b.str("Member").unwrap_or_default())?.clone();
    if adding {
        check_member_type(&member)?;
    }
    manager_check(cx.t, b)?;
    let g =
        cx.t.recipient(&gid)
            .cloned()
            .ok_or_else(|| ExoError::not_found(&gid, cx.t))?;
    Ok((g, member))
}

fn add_distribution_group_member(cx: &mut Cx<'_>, b: &Bound) -> R {
    if !b.has("Member") {
        identity_group(cx, b)?;
        manager_check(cx.t, b)?;
        return Ok(Output::none());
    }
    let (g, member) = group_and_member(cx, b, true)?;
    if g.members.contains(&member.id) {
        return Err(ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex5B2C9A",
            exception: "Microsoft.Exchange.Management.Tasks.MemberAlreadyExistsException",
            text: format!(
                "The recipient \"{}\" is already a member of the group \"{}\".",
                member.name, g.name
            ),
        });
    }
    if let Some(g) = cx.t.recipient_mut(&g.id) {
        g.members.push(member.id.clone());
    }
    Ok(Output::none())
}

fn remove_distribution_group_member(cx: &mut Cx<'_>, b: &Bound) -> R {
    let (g, member) = group_and_member(cx, b, false)?;
    if !g.members.contains(&member.id) {
        return Err(ExoError {
            status: 400,
            code: "BadRequest",
            error_id: "Ex8D1E4F",
            exception: "Microsoft.Exchange.Management.Tasks.MemberNotFoundException",
            text: format!(
                "The recipient \"{}\" isn't a member of the group \"{}\".",
                member.name, g.name
            ),
        });
    }
    if let Some(g) = cx.t.recipient_mut(&g.id) {
        g.members.retain(|m| *m != member.id);
    }
    Ok(Output::none())
}

const GET_DISTRIBUTION_GROUP_MEMBER: &[P] = &[
    P("Identity", Kind::Str, true),
    P("ResultSize", Kind::ResultSize, false),
];

fn get_distribution_group_member(cx: &mut Cx<'_>, b: &Bound) -> R {
    let g = identity_group(cx, b)?;
    let members: Vec<Value> = g
        .members
        .iter()
        .filter_map(|m| cx.t.recipient(m))
        .map(|r| recipient_object(cx.t, r))
        .collect();
    Ok(limit(members, b.result_size()))
}

const UPDATE_DISTRIBUTION_GROUP_MEMBER: &[P] = &[
    P("Identity", Kind::Str, true),
    P("Members", Kind::Strings, true),
    P("BypassSecurityGroupManagerCheck", Kind::Switch, false),
];

fn update_distribution_group_member(cx: &mut Cx<'_>, b: &Bound) -> R {
    let gid = identity_group(cx, b)?.id.clone();
    let mut ids = vec![];
    for m in b.strings("Members") {
        let r = any_recipient(cx, &m)?;
        check_member_type(r)?;
        if !ids.contains(&r.id) {
            ids.push(r.id.clone());
        }
    }
    if ids.len() > 10_000 {
        return Err(ExoError::invalid(
            "The number of members exceeds the limit of 10000.".into(),
        ));
    }
    manager_check(cx.t, b)?;
    if let Some(g) = cx.t.recipient_mut(&gid) {
        g.members = ids;
    }
    Ok(Output::none())
}

const GET_APPLICATION_ACCESS_POLICY: &[P] = &[P("Identity", Kind::Str, false)];

fn get_application_access_policy(cx: &mut Cx<'_>, b: &Bound) -> R {
    if cx.t.policies.is_empty()
        && !cx.t.policies_ever_used
        && cx.t.behaviour.policy_get_fails_when_never_used
    {
        return Err(ExoError::not_found(
            &format!(
                "OU={},OU=Microsoft Exchange Hosted Organizations,DC=NAMPR03A001,DC=PROD,DC=OUTLOOK,DC=COM\\*",
                cx.t.initial_domain
            ),
            cx.t,
        ));
    }
    let all: Vec<&Policy> =
        cx.t.policies
            .iter()
            .filter(|p| p.visible_at <= cx.now)
            .collect();
    let wanted = b.str("Identity");
    // An unknown Identity returns every policy (docs/microsoft-365.md §2.1), so callers must check matches.
    let matching: Vec<&Policy> = match &wanted {
        Some(id) => {
            let m: Vec<&Policy> = all
                .iter()
                .copied()
                .filter(|p| policy_identity(cx.t, p).eq_ignore_ascii_case(id))
                .collect();
            if m.is_empty() { all } else { m }
        }
        None => all,
    };
    Ok(Output::items(
        matching.iter().map(|p| policy_object(cx.t, p)).collect(),
    ))
}

const SET_APPLICATION_ACCESS_POLICY: &[P] = &[
    P("Identity", Kind::Str, true),
    P("Description", Kind::Str, true),
    P("WhatIf", Kind::Switch, false),
    P("Confirm", Kind::Switch, false),
];

fn set_application_access_policy(cx: &mut Cx<'_>, b: &Bound) -> R {
    let id = b.str("Identity").unwrap_or_default();
    let idx = find_policy(cx.t, &id, cx.now)?;
    let desc = b.str("Description").unwrap_or_default();
    let mut trial: Vec<Policy> = cx.t.policies.clone();
    trial[idx].description = desc.clone();
    check_storage(cx.t, &trial)?;
    if !b.flag("WhatIf") {
        cx.t.policies[idx].description = desc;
    }
    Ok(Output::none())
}

/// A mandatory `-Identity` and nothing else (the `Remove-*` cmdlets).
const IDENTITY: &[P] = &[P("Identity", Kind::Str, true)];

const REMOVE_APPLICATION_ACCESS_POLICY: &[P] = &[
    P("Identity", Kind::Str, true),
    P("WhatIf", Kind::Switch, false),
    P("Confirm", Kind::Switch, false),
];

fn remove_application_access_policy(cx: &mut Cx<'_>, b: &Bound) -> R {
    let id = b.str("Identity").unwrap_or_default();
    let idx = find_policy(cx.t, &id, cx.now)?;
    if !b.flag("WhatIf") {
        cx.t.policies.remove(idx);
    }
    Ok(Output::none())
}

const TEST_APPLICATION_ACCESS_POLICY: &[P] =
    &[P("Identity", Kind::Str, true), P("AppId", Kind::Str, true)];

fn test_application_access_policy(cx: &mut Cx<'_>, b: &Bound) -> R {
    let app_id = b.str("AppId").unwrap_or_default();
    // Test cmdlets read the live directory: replication lag and caches do not apply.
    // A group is a valid -Identity too (Microsoft's example 1 tests the group "Engineering
    // Staff"): the verdict is the group's own, Granted when a policy is scoped to the group.
    let mbx = resolve(
        cx.t,
        &b.str("Identity").unwrap_or_default(),
        cx.now,
        true,
        |r| {
            r.kind.has_mailbox()
                || r.kind == RecipientKind::MailUser
                || (r.kind.is_group() && r.kind.is_recipient())
        },
    )?
    .clone();
    let d = policy_verdict(
        &app_id,
        &mbx.id,
        &cx.t.access_policies(),
        &cx.t.group_members(),
        cx.t.behaviour.aap_nested_groups,
    );
    Ok(Output::items(vec![annotate(json!({
        "AppId": app_id, "Mailbox": mbx.name, "MailboxId": mbx.id, "MailboxSid": mbx.sid,
        "AccessCheckResult": d.check_result()
    }))]))
}

const NEW_SERVICE_PRINCIPAL: &[P] = &[
    P("AppId", Kind::Str, true),
    P("ObjectId", Kind::Str, false),
    P("ServiceId", Kind::Str, false),
    P("DisplayName", Kind::Str, false),
    P("Organization", Kind::Str, false),
];

fn new_service_principal(cx: &mut Cx<'_>, b: &Bound) -> R {
    let app_id = b.str("AppId").unwrap_or_default();
    let object_id = b.str("ObjectId").or_else(|| b.str("ServiceId")).ok_or_else(|| {
        ExoError::binding("Cannot process command because of one or more missing mandatory parameters: ObjectId.".into())
    })?;
    for (label, v) in [("AppId", &app_id), ("ObjectId", &object_id)] {
        if uuid::Uuid::parse_str(v).is_err() {
            return Err(ExoError::invalid(format!(
                "The value '{v}' of parameter {label} is not a valid GUID."
            )));
        }
    }
    if cx.t.exo_service_principals.iter().any(|s| {
        s.app_id.eq_ignore_ascii_case(&app_id) || s.object_id.eq_ignore_ascii_case(&object_id)
    }) {
        return Err(ExoError::exists(format!(
            "A service principal with AppId '{app_id}' or ObjectId '{object_id}' already exists."
        )));
    }
    // Exchange does not check the pointer against Entra: a wrong ObjectId (e.g. the app
    // registration's) is accepted and simply never matches a token's `oid`.
    let display = b.str("DisplayName").unwrap_or_else(|| app_id.clone());
    let sp = ExoServicePrincipal {
        app_id,
        object_id: object_id.to_lowercase(),
        display_name: display,
        identity: object_id.to_lowercase(),
        created: cx.wall,
        visible_at: cx.visible_at,
    };
    let out = exo_sp_object(cx.t, &sp);
    cx.t.exo_service_principals.push(sp);
    Ok(Output::items(vec![out]))
}

const GET_SERVICE_PRINCIPAL: &[P] = &[
    P("Identity", Kind::Str, false),
    P("Organization", Kind::Str, false),
];

fn get_service_principal(cx: &mut Cx<'_>, b: &Bound) -> R {
    let list: Vec<Value> = match b.str("Identity") {
        Some(id) => vec![exo_sp_object(cx.t, find_exo_sp(cx.t, &id, cx.now, false)?)],
        None => {
            cx.t.exo_service_principals
                .iter()
                .filter(|s| s.visible_at <= cx.now)
                .map(|s| exo_sp_object(cx.t, s))
                .collect()
        }
    };
    Ok(Output::items(list))
}

fn remove_service_principal(cx: &mut Cx<'_>, b: &Bound) -> R {
    let oid = find_exo_sp(cx.t, &b.str("Identity").unwrap_or_default(), cx.now, false)?
        .object_id
        .clone();
    cx.t.exo_service_principals.retain(|s| s.object_id != oid);
    cx.t.role_assignments.retain(|a| a.app_object_id != oid);
    Ok(Output::none())
}

const NEW_MANAGEMENT_SCOPE: &[P] = &[
    P("Name", Kind::Str, true),
    P("RecipientRestrictionFilter", Kind::Str, true),
    P("RecipientRoot", Kind::Str, false),
    P("Exclusive", Kind::Switch, false),
    P("Force", Kind::Switch, false),
];

fn new_management_scope(cx: &mut Cx<'_>, b: &Bound) -> R {
    let name = b.str("Name").unwrap_or_default();
    if name.trim().is_empty() || name.chars().count() > 64 {
        return Err(ExoError::invalid(format!(
            "The length of the property Name is invalid: '{name}'. It must be between 1 and 64 characters."
        )));
    }
    if cx
        .t
        .management_scopes
        .iter()
        .any(|s| s.name.eq_ignore_ascii_case(&name))
    {
        return Err(ExoError::exists(format!(
            "The management scope \"{name}\" already exists. Specify a unique name."
        )));
    }
    let filter = b.str("RecipientRestrictionFilter").unwrap_or_default();
    Filter::parse(&filter).map_err(|e| {
        ExoError::invalid(format!(
            "The recipient filter \"{filter}\" isn't valid: {e}."
        ))
    })?;
    let scope = ManagementScopeRecord {
        name,
        guid: guid(cx.rng),
        filter,
        exclusive: b.flag("Exclusive"),
        created: cx.wall,
        visible_at: cx.visible_at,
    };
    let out = scope_object(&scope);
    cx.t.management_scopes.push(scope);
    Ok(Output::items(vec![out]))
}

/// A replicated management scope by name or GUID.
fn find_scope<'t>(
    t: &'t Tenant,
    identity: &str,
    now: Duration,
) -> Result<&'t ManagementScopeRecord, ExoError> {
    t.management_scopes
        .iter()
        .find(|s| {
            s.visible_at <= now
                && (s.name.eq_ignore_ascii_case(identity) || s.guid.eq_ignore_ascii_case(identity))
        })
        .ok_or_else(|| ExoError::not_found(identity, t))
}

const GET_MANAGEMENT_SCOPE: &[P] = &[
    P("Identity", Kind::Str, false),
    P("Exclusive", Kind::Bool, false),
];

fn get_management_scope(cx: &mut Cx<'_>, b: &Bound) -> R {
    let list: Vec<Value> = match b.str("Identity") {
        Some(id) => vec![scope_object(find_scope(cx.t, &id, cx.now)?)],
        None => {
            cx.t.management_scopes
                .iter()
                .filter(|s| s.visible_at <= cx.now)
                .filter(|s| b.boolean("Exclusive").is_none_or(|e| e == s.exclusive))
                .map(scope_object)
                .collect()
        }
    };
    Ok(Output::items(list))
}

const SET_MANAGEMENT_SCOPE: &[P] = &[
    P("Identity", Kind::Str, true),
    P("RecipientRestrictionFilter", Kind::Str, false),
    P("Name", Kind::Str, false),
    P("Force", Kind::Switch, false),
];

/// `Set-ManagementScope`: a new filter (validated like `New-ManagementScope`'s) or a new name,
/// which role assignments scoped by the old name follow.
fn set_management_scope(cx: &mut Cx<'_>, b: &Bound) -> R {
    let id = b.str("Identity").unwrap_or_default();
    let now = cx.now;
    let i =
        cx.t.management_scopes
            .iter()
            .position(|s| {
                s.visible_at <= now
                    && (s.name.eq_ignore_ascii_case(&id) || s.guid.eq_ignore_ascii_case(&id))
            })
            .ok_or_else(|| ExoError::not_found(&id, cx.t))?;
    if let Some(filter) = b.str("RecipientRestrictionFilter") {
        Filter::parse(&filter).map_err(|e| {
            ExoError::invalid(format!(
                "The recipient filter \"{filter}\" isn't valid: {e}."
            ))
        })?;
        cx.t.management_scopes[i].filter = filter;
    }
    if let Some(name) = b.str("Name") {
        if name.trim().is_empty() || name.chars().count() > 64 {
            return Err(ExoError::invalid(format!(
                "The length of the property Name is invalid: '{name}'. It must be between 1 and 64 characters."
            )));
        }
        let old = cx.t.management_scopes[i].name.clone();
        for a in cx.t.role_assignments.iter_mut() {
            if let ScopeRef::Custom(n) = &mut a.scope
                && n.eq_ignore_ascii_case(&old)
            {
                *n = name.clone();
            }
        }
        cx.t.management_scopes[i].name = name;
    }
    Ok(Output::none())
}

fn remove_management_scope(cx: &mut Cx<'_>, b: &Bound) -> R {
    let id = b.str("Identity").unwrap_or_default();
    let name = find_scope(cx.t, &id, cx.now)?.name.clone();
    if cx
        .t
        .role_assignments
        .iter()
        .any(|a| matches!(&a.scope, ScopeRef::Custom(n) if n.eq_ignore_ascii_case(&name)))
    {
        return Err(ExoError::task(format!(
            "Management scope \"{name}\" can't be removed because it's used by one or more role assignments."
        )));
    }
    cx.t.management_scopes.retain(|s| s.name != name);
    Ok(Output::none())
}

/// A replicated role assignment by name or GUID.
fn find_assignment<'t>(
    t: &'t Tenant,
    identity: &str,
    now: Duration,
) -> Result<&'t RoleAssignmentRecord, ExoError> {
    t.role_assignments
        .iter()
        .find(|a| {
            a.visible_at <= now
                && (a.name.eq_ignore_ascii_case(identity) || a.guid.eq_ignore_ascii_case(identity))
        })
        .ok_or_else(|| ExoError::not_found(identity, t))
}

const GET_MANAGEMENT_ROLE_ASSIGNMENT: &[P] = &[
    P("Identity", Kind::Str, false),
    P("Role", Kind::Str, false),
    P("RoleAssignee", Kind::Str, false),
    P("RoleAssigneeType", Kind::Str, false),
    P("Enabled", Kind::Bool, false),
];

fn get_management_role_assignment(cx: &mut Cx<'_>, b: &Bound) -> R {
    if let Some(id) = b.str("Identity") {
        let a = find_assignment(cx.t, &id, cx.now)?;
        return Ok(Output::items(vec![assignment_object(cx.t, a)]));
    }
    let assignee = match b.str("RoleAssignee") {
        Some(x) => Some(find_exo_sp(cx.t, &x, cx.now, false)?.object_id.clone()),
        None => None,
    };
    let list =
        cx.t.role_assignments
            .iter()
            .filter(|a| a.visible_at <= cx.now)
            .filter(|a| {
                b.str("Role")
                    .is_none_or(|r| r.eq_ignore_ascii_case(&a.role))
            })
            .filter(|a| assignee.as_deref().is_none_or(|o| o == a.app_object_id))
            .filter(|_| {
                b.str("RoleAssigneeType")
                    .is_none_or(|t| t.eq_ignore_ascii_case("ServicePrincipal"))
            })
            .filter(|a| b.boolean("Enabled").is_none_or(|e| e == a.enabled))
            .map(|a| assignment_object(cx.t, a))
            .collect();
    Ok(Output::items(list))
}

fn remove_management_role_assignment(cx: &mut Cx<'_>, b: &Bound) -> R {
    let id = b.str("Identity").unwrap_or_default();
    let name = find_assignment(cx.t, &id, cx.now)?.name.clone();
    cx.t.role_assignments.retain(|a| a.name != name);
    Ok(Output::none())
}

const TEST_SERVICE_PRINCIPAL_AUTHORIZATION: &[P] = &[
    P("Identity", Kind::Str, true),
    P("Resource", Kind::Str, false),
];

fn test_service_principal_authorization(cx: &mut Cx<'_>, b: &Bound) -> R {
    // Bypasses the permission cache and ignores Entra grants (docs/microsoft-365.md §3.1): live state only.
    let sp = find_exo_sp(cx.t, &b.str("Identity").unwrap_or_default(), cx.now, true)?.clone();
    let assignments = assignments_of(cx.t, &sp.object_id);
    let snap = snapshot(cx.t);
    let resource = match b.str("Resource") {
        Some(r) => {
            let m = resolve(cx.t, &r, cx.now, true, |x| x.kind.is_recipient())?
                .id
                .clone();
            super::state::facts_with_groups(&snap, &m, &cx.t.behaviour)
        }
        None => None,
    };
    let rows = authorization_rows(&assignments, resource.as_ref());
    Ok(Output::items(
        rows.iter()
            .map(|r| {
                json!({"RoleName": r.role, "GrantedPermissions": r.permissions.join(", "),
                    "AllowedResourceScope": r.scope_label, "ScopeType": r.scope_type,
                    "InScope": match r.in_scope { Some(b) => json!(b), None => json!("Not Run") }})
            })
            .collect(),
    ))
}

fn limit(items: Vec<Value>, size: Option<usize>) -> Output {
    match size {
        Some(n) if items.len() > n => Output {
            items: Some(items.into_iter().take(n).collect()),
            warnings: vec!["There are more results available than are currently displayed. To view them, increase the value for the ResultSize parameter.".into()],
        },
        _ => Output::items(items),
    }
}

fn visible(t: &Tenant, now: Duration, filter: impl Fn(&Recipient) -> bool) -> Vec<Recipient> {
    t.recipients
        .iter()
        .filter(|r| r.visible_at <= now && filter(r))
        .cloned()
        .collect()
}

/// Resolve a recipient identity among objects passing `filter`. Objects still replicating are
/// invisible unless `include_pending`.
fn resolve<'t>(
    t: &'t Tenant,
    identity: &str,
    now: Duration,
    include_pending: bool,
    filter: impl Fn(&Recipient) -> bool,
) -> Result<&'t Recipient, ExoError> {
    let hits: Vec<&Recipient> = t
        .recipients
        .iter()
        .filter(|r| {
            (include_pending || r.visible_at <= now) && filter(r) && r.matches_identity(t, identity)
        })
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(ExoError::not_found(identity, t)),
        many => {
            // An exact GUID match wins over name collisions.
            many.iter()
                .find(|r| {
                    r.id.eq_ignore_ascii_case(identity)
                        || r.exchange_object_id.eq_ignore_ascii_case(identity)
                })
                .copied()
                .ok_or_else(|| ExoError::ambiguous(identity))
        }
    }
}

fn check_member_type(r: &Recipient) -> Result<(), ExoError> {
    use RecipientKind::*;
    if matches!(
        r.kind,
        UserMailbox
            | SharedMailbox
            | RoomMailbox
            | EquipmentMailbox
            | MailUser
            | MailContact
            | MailUniversalDistributionGroup
            | MailUniversalSecurityGroup
    ) {
        Ok(())
    } else {
        Err(ExoError::invalid(format!(
            "The recipient \"{}\" of type {} can't be a member of a distribution group.",
            r.name,
            r.kind.recipient_type_details()
        )))
    }
}

fn manager_check(t: &Tenant, b: &Bound) -> Result<(), ExoError> {
    if t.behaviour.require_bypass_security_group_manager_check
        && !b.flag("BypassSecurityGroupManagerCheck")
    {
        return Err(ExoError::task(
            "You don't have sufficient permissions. This operation can only be performed by a manager of the group.".into(),
        ));
    }
    Ok(())
}

const NEW_DISTRIBUTION_GROUP: &[P] = &[
    P("Name", Kind::Str, true),
    P("Alias", Kind::Str, false),
    P("DisplayName", Kind::Str, false),
    P("ManagedBy", Kind::Strings, false),
    P(
        "MemberDepartRestriction",
        Kind::Enum(&["Open", "Closed"]),
        false,
    ),
    P(
        "MemberJoinRestriction",
        Kind::Enum(&["Open", "Closed", "ApprovalRequired"]),
        false,
    ),
    P("Members", Kind::Strings, false),
    P("PrimarySmtpAddress", Kind::Str, false),
    P("Type", Kind::Enum(&["Distribution", "Security"]), false),
    P("CopyOwnerToMember", Kind::Switch, false),
    P("Notes", Kind::Str, false),
    P("RequireSenderAuthenticationEnabled", Kind::Bool, false),
    P("HiddenGroupMembershipEnabled", Kind::Switch, false),
    P("IgnoreNamingPolicy", Kind::Switch, false),
    P("Description", Kind::Strings, false),
];

fn new_distribution_group(cx: &mut Cx<'_>, b: &Bound) -> R {
    let name = b.str("Name").unwrap_or_default();
    let len_check = |prop: &str, v: &str, max: usize| -> Result<(), ExoError> {
        if v.trim().is_empty() || v.chars().count() > max {
            Err(ExoError::invalid(format!(
                "The length of the property is too long. The maximum length is {max} and the length of the value provided is {}. Property: {prop}",
                v.chars().count()
            )))
        } else {
            Ok(())
        }
    };
    len_check("Name", &name, 64)?;
    let alias = b.str("Alias").unwrap_or_else(|| alias_from(&name));
    len_check("Alias", &alias, 64)?;
    let display = b.str("DisplayName").unwrap_or_else(|| name.clone());
    len_check("DisplayName", &display, 256)?;
    let security = b.str("Type").as_deref() == Some("Security");
    if security {
        for p in ["MemberJoinRestriction", "MemberDepartRestriction"] {
            if b.str(p).as_deref() == Some("Open") {
                return Err(ExoError::invalid(format!(
                    "Security groups must have {p} set to Closed. The value Open isn't supported for security groups."
                )));
            }
        }
    }
    if cx
        .t
        .recipients
        .iter()
        .any(|r| r.name.eq_ignore_ascii_case(&name))
    {
        return Err(ExoError::exists(format!(
            "The name \"{name}\" is being used. Please choose another name."
        )));
    }
    let smtp = b
        .str("PrimarySmtpAddress")
        .unwrap_or_else(|| format!("{}@{}", alias.to_lowercase(), cx.t.initial_domain));
    if cx.t.name_taken(&alias)
        || cx.t.recipients.iter().any(|r| {
            r.email_addresses
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&format!("smtp:{smtp}")))
        })
    {
        return Err(ExoError::exists(format!(
            "The proxy address \"SMTP:{smtp}\" is already being used by the proxy addresses or LegacyExchangeDN. Please choose another proxy address."
        )));
    }
    let members = b.strings("Members");
    if members.len() > 10_000 {
        return Err(ExoError::invalid(
            "The number of members exceeds the limit of 10000.".into(),
        ));
    }
    let mut member_ids = vec![];
    for m in &members {
        let r = any_recipient(cx, m)?;
        check_member_type(r)?;
        if !member_ids.contains(&r.id) {
            member_ids.push(r.id.clone());
        }
    }
    let mut managers = vec![];
    for m in b.strings("ManagedBy") {
        let r = resolve(cx.t, &m, cx.now, false, |r| {
            r.kind.has_mailbox()
                || matches!(
                    r.kind,
                    RecipientKind::MailUser | RecipientKind::MailUniversalSecurityGroup
                )
        })?;
        managers.push(r.id.clone());
    }
    if b.flag("CopyOwnerToMember") {
        for m in &managers {
            if !member_ids.contains(m) {
                member_ids.push(m.clone());
            }
        }
    }
    let kind = if security {
        RecipientKind::MailUniversalSecurityGroup
    } else {
        RecipientKind::MailUniversalDistributionGroup
    };
    let mut g = build_recipient(
        cx.t,
        NewRecipient {
            kind,
            name,
            display_name: Some(display),
            alias: Some(alias),
            primary_smtp_address: Some(smtp),
            id: None,
            properties: Default::default(),
            members: member_ids,
        },
        cx.wall,
        cx.visible_at,
        cx.rng,
    );
    g.managed_by = managers;
    g.notes = b.str("Notes").unwrap_or_default();
    g.member_join_restriction = b
        .str("MemberJoinRestriction")
        .unwrap_or_else(|| "Closed".into());
    g.member_depart_restriction = b
        .str("MemberDepartRestriction")
        .unwrap_or_else(|| "Closed".into());
    g.require_sender_authentication_enabled = b
        .boolean("RequireSenderAuthenticationEnabled")
        .unwrap_or(true);
    let out = group_object(cx.t, &g);
    cx.t.recipients.push(g);
    Ok(Output::items(vec![out]))
}

const SET_DISTRIBUTION_GROUP: &[P] = &[
    P("Identity", Kind::Str, true),
    P("DisplayName", Kind::Str, false),
    P("ManagedBy", Kind::Strings, false),
    P("Notes", Kind::Str, false),
    P(
        "MemberJoinRestriction",
        Kind::Enum(&["Open", "Closed", "ApprovalRequired"]),
        false,
    ),
    P(
        "MemberDepartRestriction",
        Kind::Enum(&["Open", "Closed"]),
        false,
    ),
    P("RequireSenderAuthenticationEnabled", Kind::Bool, false),
    P("BypassSecurityGroupManagerCheck", Kind::Switch, false),
    P("CustomAttribute1", Kind::Str, false),
    P("CustomAttribute2", Kind::Str, false),
    P("CustomAttribute3", Kind::Str, false),
];

fn set_distribution_group(cx: &mut Cx<'_>, b: &Bound) -> R {
    let gid = identity_group(cx, b)?.id.clone();
    manager_check(cx.t, b)?;
    let security =
        cx.t.recipient(&gid)
            .is_some_and(|g| g.kind == RecipientKind::MailUniversalSecurityGroup);
    for p in ["MemberJoinRestriction", "MemberDepartRestriction"] {
        if security && b.str(p).as_deref() == Some("Open") {
            return Err(ExoError::invalid(format!(
                "Security groups must have {p} set to Closed. The value Open isn't supported for security groups."
            )));
        }
    }
    let mut managers = None;
    if b.has("ManagedBy") {
        let mut ids = vec![];
        for m in b.strings("ManagedBy") {
            ids.push(any_recipient(cx, &m)?.id.clone());
        }
        managers = Some(ids);
    }
    let Some(g) = cx.t.recipient_mut(&gid) else {
        return Ok(Output::none());
    };
    if let Some(d) = b.str("DisplayName") {
        g.display_name = d;
    }
    if let Some(m) = managers {
        g.managed_by = m;
    }
    if let Some(n) = b.str("Notes") {
        g.notes = n;
    }
    if let Some(v) = b.str("MemberJoinRestriction") {
        g.member_join_restriction = v;
    }
    if let Some(v) = b.str("MemberDepartRestriction") {
        g.member_depart_restriction = v;
    }
    if let Some(v) = b.boolean("RequireSenderAuthenticationEnabled") {
        g.require_sender_authentication_enabled = v;
    }
    for a in ["CustomAttribute1", "CustomAttribute2", "CustomAttribute3"] {
        if let Some(v) = b.str(a) {
            g.properties.insert(a.into(), v);
        }
    }
    Ok(Output::none())
}

const GET_RECIPIENTS: &[P] = &[
    P("Identity", Kind::Str, false),
    P("ResultSize", Kind::ResultSize, false),
    P("RecipientTypeDetails", Kind::Strings, false),
    P("Filter", Kind::Str, false),
];

fn get_recipients(cx: &mut Cx<'_>, cmdlet: &str, b: &Bound) -> R {
    let in_scope = |r: &Recipient| match cmdlet {
        "Get-Recipient" => r.kind.is_recipient(),
        _ => r.kind.has_mailbox(),
    };
    let mut list = match b.str("Identity") {
        Some(id) => vec![resolve(cx.t, &id, cx.now, false, in_scope)?.clone()],
        None => visible(cx.t, cx.now, in_scope),
    };
    let types = b.strings("RecipientTypeDetails");
    if !types.is_empty() {
        list.retain(|r| {
            types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(r.kind.recipient_type_details()))
        });
    }
    if let Some(f) = b.str("Filter") {
        let filter = Filter::parse(&f).map_err(|e| ExoError::invalid(format!("Cannot bind parameter 'Filter' to the target. Exception setting \"Filter\": \"{e}\"")))?;
        let snap = snapshot(cx.t);
        list.retain(|r| {
            super::state::facts_with_groups(&snap, &r.id, &cx.t.behaviour)
                .is_some_and(|f| filter.matches(&f))
        });
    }
    let items = list
        .iter()
        .map(|r| match cmdlet {
            "Get-Mailbox" => mailbox_object(cx.t, r),
            "Get-CASMailbox" => cas_object(cx.t, r),
            _ => recipient_object(cx.t, r),
        })
        .collect();
    Ok(limit(items, b.result_size()))
}

fn policy_cost(t: &Tenant, p: &Policy) -> usize {
    t.behaviour.policy_overhead_bytes + p.description.len()
}

fn check_storage(t: &Tenant, policies: &[Policy]) -> Result<(), ExoError> {
    let total: usize = policies.iter().map(|p| policy_cost(t, p)).sum();
    if total > t.behaviour.policy_storage_limit_bytes {
        return Err(ExoError::task(
            "The total size of App Access Policies exceeded the limit.".into(),
        ));
    }
    Ok(())
}

const NEW_APPLICATION_ACCESS_POLICY: &[P] = &[
    P(
        "AccessRight",
        Kind::Enum(&["RestrictAccess", "DenyAccess"]),
        true,
    ),
    P("AppId", Kind::Strings, true),
    P("PolicyScopeGroupId", Kind::Str, true),
    P("Description", Kind::Str, false),
    // -WhatIf validates and reports, and changes nothing (docs/microsoft-365.md §2.1).
    P("WhatIf", Kind::Switch, false),
    P("Confirm", Kind::Switch, false),
];

fn new_policy(cx: &mut Cx<'_>, b: &Bound) -> R {
    let right = b
        .str("AccessRight")
        .and_then(|s| Right::parse(&s))
        .unwrap_or(Right::RestrictAccess);
    let app_ids = b.strings("AppId");
    for a in &app_ids {
        if a != EVERY_APP && uuid::Uuid::parse_str(a).is_err() {
            return Err(ExoError::invalid(format!(
                "The AppId '{a}' is not valid. Specify a GUID or '*'."
            )));
        }
    }
    let scope_text = b.str("PolicyScopeGroupId").unwrap_or_default();
    let scope = any_recipient(cx, &scope_text)?.clone();
    if !may_scope_policy(scope.kind.recipient_type_details()) {
        return Err(ExoError::invalid(format!(
            "The PolicyScopeGroupId '{scope_text}' is of type {}. Only a mailbox (UserMailbox), a mail user or a mail-enabled security group can be the scope of an application access policy.",
            scope.kind.recipient_type_details()
        )));
    }
    let scope_oid = scope_guid(cx.t, &scope);
    let mut trial = cx.t.policies.clone();
    let mut created = vec![];
    for app in &app_ids {
        let app = app.to_lowercase();
        if trial
            .iter()
            .any(|p| p.app_id.eq_ignore_ascii_case(&app) && p.scope_id == scope.id)
        {
            return Err(ExoError::exists(format!(
                "An application access policy for app '{app}' and scope '{}' already exists.",
                scope.name
            )));
        }
        let description = b.str("Description").unwrap_or_else(|| {
            format!("AppId: {app}; ScopeIdentitySid: {}; ScopeIdentityOid: {scope_oid}; AccessRight: {}; ShardType: All", scope.sid, right.as_str())
        });
        let p = Policy {
            app_id: app,
            scope_id: scope.id.clone(),
            access_right: right,
            description,
            created: cx.wall,
            visible_at: cx.visible_at,
        };
        trial.push(p.clone());
        created.push(p);
    }
    check_storage(cx.t, &trial)?;
    if b.flag("WhatIf") {
        return Ok(Output::none());
    }
    cx.t.policies = trial;
    cx.t.policies_ever_used = true;
    Ok(Output::items(
        created.iter().map(|p| policy_object(cx.t, p)).collect(),
    ))
}

fn scope_guid(t: &Tenant, r: &Recipient) -> String {
    match t.behaviour.scope_object_id {
        ScopeObjectId::ExternalDirectoryObjectId => r.id.clone(),
        ScopeObjectId::ExchangeObjectId => r.exchange_object_id.clone(),
    }
}

/// `<tenantId>\<AppId>:<ScopeSid>;<ScopeObjectGuid>` (docs/microsoft-365.md §2.2).
fn policy_identity(t: &Tenant, p: &Policy) -> String {
    format!("{}\\{}:{}", t.id, p.app_id, scope_identity_raw(t, p))
}

fn scope_identity_raw(t: &Tenant, p: &Policy) -> String {
    match t.recipient(&p.scope_id) {
        Some(r) => format!("{};{}", r.sid, scope_guid(t, r)),
        None => format!("S-1-0-0;{}", p.scope_id),
    }
}

fn find_policy(t: &Tenant, identity: &str, now: Duration) -> Result<usize, ExoError> {
    t.policies
        .iter()
        .position(|p| {
            p.visible_at <= now && policy_identity(t, p).eq_ignore_ascii_case(identity.trim())
        })
        .ok_or_else(|| ExoError::not_found(identity, t))
}

fn find_exo_sp<'t>(
    t: &'t Tenant,
    identity: &str,
    now: Duration,
    include_pending: bool,
) -> Result<&'t ExoServicePrincipal, ExoError> {
    t.exo_service_principals
        .iter()
        .filter(|s| include_pending || s.visible_at <= now)
        .find(|s| {
            [&s.object_id, &s.app_id, &s.identity, &s.display_name]
                .iter()
                .any(|v| v.eq_ignore_ascii_case(identity.trim()))
                || exo_sp_dn(t, s).eq_ignore_ascii_case(identity.trim())
        })
        .ok_or_else(|| ExoError::not_found(identity, t))
}

fn exo_sp_dn(t: &Tenant, s: &ExoServicePrincipal) -> String {
    format!(
        "CN={},OU={},OU=Microsoft Exchange Hosted Organizations,DC=NAMPR03A001,DC=PROD,DC=OUTLOOK,DC=COM",
        s.object_id, t.initial_domain
    )
}

const NEW_MANAGEMENT_ROLE_ASSIGNMENT: &[P] = &[
    P("Name", Kind::Str, false),
    P("Role", Kind::Str, true),
    P("App", Kind::Str, true),
    P("CustomResourceScope", Kind::Str, false),
    P("RecipientAdministrativeUnitScope", Kind::Str, false),
    P("RecipientGroupScope", Kind::Str, false),
    P("Delegating", Kind::Switch, false),
    P("Force", Kind::Switch, false),
];

fn new_role_assignment(cx: &mut Cx<'_>, b: &Bound) -> R {
    let role_text = b.str("Role").unwrap_or_default();
    let (role_name, _) = role_grants(&role_text).ok_or_else(|| {
        ExoError::invalid(format!("The role \"{role_text}\" can't be assigned to an application. Only application roles (\"Application …\") can be assigned with the App parameter."))
    })?;
    let sp = find_exo_sp(cx.t, &b.str("App").unwrap_or_default(), cx.now, false)?.clone();
    let scopes = [
        "CustomResourceScope",
        "RecipientAdministrativeUnitScope",
        "RecipientGroupScope",
    ]
    .iter()
    .filter(|s| b.has(s))
    .count();
    if scopes > 1 {
        return Err(ExoError::binding(
            "Parameter set cannot be resolved using the specified named parameters.".into(),
        ));
    }
    let scope = if let Some(s) = b.str("CustomResourceScope") {
        ScopeRef::Custom(find_scope(cx.t, &s, cx.now)?.name.clone())
    } else if let Some(g) = b.str("RecipientGroupScope") {
        let r = resolve(cx.t, &g, cx.now, false, |r| {
            r.kind.is_group() && r.kind.is_recipient()
        })?;
        ScopeRef::Group(r.id.clone())
    } else if let Some(au) = b.str("RecipientAdministrativeUnitScope") {
        let unit = cx
            .t
            .administrative_units
            .iter()
            .find(|u| u.id.eq_ignore_ascii_case(&au) || u.display_name.eq_ignore_ascii_case(&au))
            .ok_or_else(|| ExoError::not_found(&au, cx.t))?;
        ScopeRef::AdministrativeUnit(unit.id.clone())
    } else {
        ScopeRef::Organization
    };
    let name = b.str("Name").unwrap_or_else(|| {
        let n = format!("{}-{}", role_name, sp.display_name);
        n.chars().take(64).collect()
    });
    if name.chars().count() > 64 {
        return Err(ExoError::invalid(format!(
            "The length of the property is too long. The maximum length is 64 and the length of the value provided is {}. Property: Name",
            name.chars().count()
        )));
    }
    if cx
        .t
        .role_assignments
        .iter()
        .any(|a| a.name.eq_ignore_ascii_case(&name))
    {
        return Err(ExoError::exists(format!(
            "The role assignment \"{name}\" already exists. Specify a unique name."
        )));
    }
    let a = RoleAssignmentRecord {
        name,
        guid: guid(cx.rng),
        role: role_name.to_string(),
        app_object_id: sp.object_id.clone(),
        scope,
        enabled: true,
        created: cx.wall,
        visible_at: cx.visible_at,
    };
    let out = assignment_object(cx.t, &a);
    cx.t.role_assignments.push(a);
    Ok(Output::items(vec![out]))
}

// ---------------------------------------------------------------------------------------------
// Output objects
// ---------------------------------------------------------------------------------------------

const GUID_KEYS: &[&str] = &["Guid", "ExchangeObjectId", "ExternalDirectoryObjectId"];

/// Add OData type annotations as the REST endpoint does (clients must strip keys with `@`).
fn annotate(v: Value) -> Value {
    let Value::Object(m) = v else { return v };
    let mut out = Map::new();
    for (k, val) in m {
        if GUID_KEYS.contains(&k.as_str()) && val.is_string() {
            out.insert(format!("{k}@data.type"), json!("System.Guid"));
            out.insert(format!("{k}@odata.type"), json!("#Guid"));
        } else if val.is_array() {
            out.insert(format!("{k}@odata.type"), json!("#Collection(String)"));
        } else if k.starts_with("WhenCreated") && val.is_string() {
            out.insert(format!("{k}@odata.type"), json!("#DateTimeOffset"));
        }
        out.insert(k, val);
    }
    Value::Object(out)
}

fn when(d: DateTime<Utc>) -> String {
    d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn base_object(t: &Tenant, r: &Recipient) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("Name".into(), json!(r.name));
    m.insert("DisplayName".into(), json!(r.display_name));
    m.insert("Alias".into(), json!(r.alias));
    m.insert("PrimarySmtpAddress".into(), json!(r.primary_smtp_address));
    m.insert("EmailAddresses".into(), json!(r.email_addresses));
    m.insert("Identity".into(), json!(r.name));
    m.insert("Id".into(), json!(r.name));
    m.insert("DistinguishedName".into(), json!(r.distinguished_name(t)));
    m.insert("Guid".into(), json!(r.exchange_object_id));
    m.insert("ExchangeObjectId".into(), json!(r.exchange_object_id));
    m.insert("ExternalDirectoryObjectId".into(), json!(r.id));
    m.insert("RecipientType".into(), json!(r.kind.recipient_type()));
    m.insert(
        "RecipientTypeDetails".into(),
        json!(r.kind.recipient_type_details()),
    );
    m.insert("OrganizationalUnit".into(), json!(t.initial_domain));
    m.insert("WhenCreated".into(), json!(when(r.created)));
    m.insert("WhenCreatedUTC".into(), json!(when(r.created)));
    m
}

fn custom_attributes(m: &mut Map<String, Value>, r: &Recipient) {
    for i in 1..=15 {
        let k = format!("CustomAttribute{i}");
        m.insert(
            k.clone(),
            json!(r.properties.get(&k).cloned().unwrap_or_default()),
        );
    }
}

fn recipient_object(t: &Tenant, r: &Recipient) -> Value {
    let mut m = base_object(t, r);
    m.insert(
        "IsValidSecurityPrincipal".into(),
        json!(r.kind.is_valid_security_principal()),
    );
    for k in ["Department", "Company", "City"] {
        m.insert(
            k.into(),
            json!(r.properties.get(k).cloned().unwrap_or_default()),
        );
    }
    custom_attributes(&mut m, r);
    annotate(Value::Object(m))
}

fn mailbox_object(t: &Tenant, r: &Recipient) -> Value {
    let mut m = base_object(t, r);
    m.insert("UserPrincipalName".into(), json!(r.user_principal_name));
    m.insert(
        "IsShared".into(),
        json!(r.kind == RecipientKind::SharedMailbox),
    );
    m.insert(
        "IsResource".into(),
        json!(matches!(
            r.kind,
            RecipientKind::RoomMailbox | RecipientKind::EquipmentMailbox
        )),
    );
    m.insert(
        "ResourceType".into(),
        match r.kind {
            RecipientKind::RoomMailbox => json!("Room"),
            RecipientKind::EquipmentMailbox => json!("Equipment"),
            _ => Value::Null,
        },
    );
    m.insert("IsMailboxEnabled".into(), json!(true));
    m.insert("Database".into(), json!("NAMPR03DG123-db042"));
    m.insert("WhenMailboxCreated".into(), json!(when(r.created)));
    custom_attributes(&mut m, r);
    annotate(Value::Object(m))
}

fn cas_object(t: &Tenant, r: &Recipient) -> Value {
    let mut m = Map::new();
    let b = base_object(t, r);
    for k in [
        "Name",
        "DisplayName",
        "Identity",
        "PrimarySmtpAddress",
        "Guid",
        "ExternalDirectoryObjectId",
        "DistinguishedName",
    ] {
        if let Some(v) = b.get(k) {
            m.insert(k.into(), v.clone());
        }
    }
    m.insert("EwsEnabled".into(), json!(r.ews_enabled));
    m.insert("EwsAllowList".into(), Value::Null);
    m.insert("EwsBlockList".into(), Value::Null);
    m.insert("EwsApplicationAccessPolicy".into(), Value::Null);
    for k in [
        "OWAEnabled",
        "ActiveSyncEnabled",
        "MAPIEnabled",
        "ImapEnabled",
        "PopEnabled",
    ] {
        m.insert(k.into(), json!(true));
    }
    annotate(Value::Object(m))
}

fn group_object(t: &Tenant, r: &Recipient) -> Value {
    let mut m = base_object(t, r);
    let names = |ids: &[String]| -> Vec<String> {
        ids.iter()
            .filter_map(|i| t.recipient(i))
            .map(|x| x.name.clone())
            .collect()
    };
    m.insert(
        "GroupType".into(),
        json!(if r.kind == RecipientKind::MailUniversalSecurityGroup {
            "Universal, SecurityEnabled"
        } else {
            "Universal"
        }),
    );
    m.insert("ManagedBy".into(), json!(names(&r.managed_by)));
    m.insert(
        "MemberJoinRestriction".into(),
        json!(r.member_join_restriction),
    );
    m.insert(
        "MemberDepartRestriction".into(),
        json!(r.member_depart_restriction),
    );
    m.insert(
        "RequireSenderAuthenticationEnabled".into(),
        json!(r.require_sender_authentication_enabled),
    );
    m.insert("Notes".into(), json!(r.notes));
    m.insert("IsDirSynced".into(), json!(false));
    m.insert("HiddenFromAddressListsEnabled".into(), json!(false));
    custom_attributes(&mut m, r);
    annotate(Value::Object(m))
}

fn policy_object(t: &Tenant, p: &Policy) -> Value {
    let scope = t.recipient(&p.scope_id);
    annotate(json!({
        "ScopeName": scope.map(|s| s.display_name.clone()).unwrap_or_default(),
        "ScopeIdentity": scope.map(|s| s.name.clone()).unwrap_or_default(),
        "Identity": policy_identity(t, p),
        "AppId": p.app_id,
        "ScopeIdentityRaw": scope_identity_raw(t, p),
        "Description": p.description,
        "AccessRight": p.access_right.as_str(),
        "ShardType": "All",
        "IsValid": true,
        "ObjectState": "Unchanged"
    }))
}

fn exo_sp_object(t: &Tenant, s: &ExoServicePrincipal) -> Value {
    annotate(json!({
        "DisplayName": s.display_name, "AppId": s.app_id, "ObjectId": s.object_id, "ServiceId": s.object_id,
        "Identity": s.identity, "Id": s.identity, "Name": s.object_id,
        "DistinguishedName": exo_sp_dn(t, s), "Organization": t.initial_domain,
        "WhenCreated": when(s.created)
    }))
}

fn scope_object(s: &ManagementScopeRecord) -> Value {
    annotate(json!({
        "Name": s.name, "Identity": s.name, "Guid": s.guid, "ScopeRestrictionType": "RecipientScope",
        "Exclusive": s.exclusive, "RecipientRoot": null, "RecipientFilter": s.filter,
        "ServerFilter": null, "DatabaseFilter": null, "IsValid": true, "WhenCreated": when(s.created)
    }))
}

fn assignment_object(t: &Tenant, a: &RoleAssignmentRecord) -> Value {
    let sp = t
        .exo_service_principals
        .iter()
        .find(|s| s.object_id == a.app_object_id);
    let mut unit = Value::Null;
    let (custom, group, write_scope) = match &a.scope {
        ScopeRef::Organization => (Value::Null, Value::Null, "Organization"),
        ScopeRef::Custom(n) => (json!(n), Value::Null, "CustomRecipientScope"),
        ScopeRef::Group(id) => (
            Value::Null,
            json!(t.recipient(id).map(|g| g.name.clone())),
            "Group",
        ),
        // How Exchange prints an administrative-unit scope is unverified: the unit's id here.
        ScopeRef::AdministrativeUnit(id) => {
            unit = json!(id);
            (Value::Null, Value::Null, "AdministrativeUnit")
        }
    };
    annotate(json!({
        "Name": a.name, "Identity": a.name, "Guid": a.guid, "Role": a.role,
        "RoleAssignee": sp.map(|s| s.identity.clone()).unwrap_or_else(|| a.app_object_id.clone()),
        "RoleAssigneeName": sp.map(|s| s.app_id.clone()).unwrap_or_default(),
        "RoleAssigneeType": "ServicePrincipal", "AssignmentMethod": "Direct",
        "CustomResourceScope": custom, "RecipientGroupScope": group,
        "RecipientAdministrativeUnitScope": unit, "RecipientWriteScope": write_scope,
        "RecipientReadScope": "Organization", "ConfigWriteScope": "None",
        "Enabled": a.enabled, "RoleAssignmentDelegationType": "Regular", "WhenCreated": when(a.created)
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn binding_validates_names_types_and_mandatory() {
        let specs = [
            P("Identity", Kind::Str, true),
            P("AppId", Kind::Str, false),
            P("Members", Kind::Strings, false),
        ];
        let ok = bind(
            &specs,
            json!({"identity": "x", "Members": "a", "Confirm": false})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ok.str("Identity").as_deref(), Some("x"));
        assert_eq!(ok.strings("Members"), vec!["a".to_string()]);
        let e = bind(
            &specs,
            json!({"Identity": "x", "Colour": "red"})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.text.contains("'Colour'"));
        let e = bind(&specs, json!({"AppId": "a"}).as_object().unwrap()).unwrap_err();
        assert!(e.text.contains("missing mandatory parameters: Identity"));
        let e = bind(
            &specs,
            json!({"Identity": "x", "AppId": ["a", "b"]})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.text.contains("System.Object[]"));
    }

    #[test]
    fn skiptokens_round_trip() {
        assert_eq!(decode_skiptoken(&encode_skiptoken(1234)), Some(1234));
        assert_eq!(decode_skiptoken("garbage"), None);
    }

    #[test]
    fn projection_keeps_annotations_of_selected_keys() {
        let o = annotate(json!({"Guid": "g", "Name": "n", "EmailAddresses": ["a"]}));
        let p = project(o, &["guid".into()]);
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
    }

    #[test]
    fn roles_gate_cmdlets() {
        let exo = vec![
            directory_role_id("Exchange Administrator")
                .unwrap()
                .to_string(),
        ];
        let reader = vec![directory_role_id("Global Reader").unwrap().to_string()];
        let recip = vec![
            directory_role_id("Exchange Recipient Administrator")
                .unwrap()
                .to_string(),
        ];
        assert!(role_permits(&exo, "New-ApplicationAccessPolicy", true));
        assert!(role_permits(&reader, "Get-ApplicationAccessPolicy", false));
        assert!(!role_permits(&reader, "New-ApplicationAccessPolicy", true));
        assert!(role_permits(&recip, "Add-DistributionGroupMember", true));
        assert!(!role_permits(&recip, "New-ManagementScope", true));
        assert!(!role_permits(&[], "Get-Mailbox", false));
    }
}
