//! A Microsoft Graph v1.0 subset with Graph's JSON and error shapes (docs/microsoft-365.md §5):
//! applications, service principals and their app role assignments, directory role assignments,
//! users, groups, the organization, the mailbox endpoints an app uses, and JSON `$batch`.
//!
//! Mailbox calls are authorized the way Exchange does it for Graph: the token's app roles, the
//! application access policies and RBAC for Applications, as cached by the front end that serves
//! the request (see [`super::propagation`]).
use std::collections::BTreeSet;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;
use serde_json::{Map, Value, json};

use super::login::{bearer_claims, percent_decode, url_decode_form};
use super::model::*;
use super::rules::Outcome;
use super::settings::{AccessDeniedMessage, Api};
use super::state::{CallRecord, Shared, World, grant_id};
use super::tokens::{AccessClaims, TokenProblem, pem_to_der, thumbprint_hex};
use super::wire::{Reply, graph_error, graph_throttled, with_details};
use super::{CallNote, Incoming, Interrupt, base_url, guarded};

const GRAPH_CONTEXT: &str = "https://graph.microsoft.com/v1.0/$metadata";

/// Per-request context.
struct Gx {
    claims: Result<AccessClaims, TokenProblem>,
    tenant_id: Option<String>,
    base: String,
    /// The service's own id for this request (`request-id`).
    request_id: String,
    /// The caller's `client-request-id`, echoed; the request id when none was sent.
    client_request_id: String,
    wall: DateTime<Utc>,
    now: std::time::Duration,
}

/// Any method on `/v1.0/{tail}`.
pub async fn entry(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let tail = req.match_info().get("tail").unwrap_or_default().to_string();
    let method = req.method().as_str().to_string();
    let claims = bearer_claims(&req, &shared, GRAPH_RESOURCE);
    let tenant_id = claims
        .as_ref()
        .ok()
        .and_then(|c| shared.lock().tenant(&c.tid).map(|t| t.id.clone()));
    let query = url_decode_form(req.query_string());
    let parsed_body: Option<Result<Value, String>> =
        (!body.is_empty()).then(|| serde_json::from_slice(&body).map_err(|e| e.to_string()));
    // Graph's `request-id` is its own; `client-request-id` echoes the caller's when it sent one
    // (docs/microsoft-365.md §8.6).
    let request_id = uuid::Uuid::new_v4().to_string();
    let client_request_id = req
        .headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(String::from)
        .unwrap_or_else(|| request_id.clone());
    let base = base_url(&req);
    let is_batch = tail == "$batch" && method == "POST";
    let identity_endpoint = is_identity(&tail);
    let inc = Incoming {
        api: Api::Graph,
        tenant: tenant_id.clone(),
        method: method.clone(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        note: CallNote {
            endpoint: format!("graph:{method} /{}", template(&tail)),
            app_id: claims.as_ref().ok().map(|c| c.appid.clone()),
            body: parsed_body.as_ref().and_then(|b| b.as_ref().ok()).cloned(),
            ..Default::default()
        },
    };
    let rid = request_id.clone();
    let crid = client_request_id.clone();
    let tid = tenant_id.clone();
    guarded(
        &shared,
        inc,
        move |w, i| {
            let now = chrono::Utc::now();
            match i {
                Interrupt::Throttled(retry) => {
                    let behaviour = tid
                        .as_deref()
                        .and_then(|t| w.tenant(t))
                        .map(|t| t.behaviour.clone())
                        .unwrap_or_default();
                    with_retry_after(
                        graph_throttled(&rid, &crid, now),
                        retry,
                        &behaviour,
                        identity_endpoint,
                        w.next_seq,
                    )
                }
                _ => graph_error(
                    503,
                    "serviceNotAvailable",
                    "The service is temporarily unavailable. Please try again later.",
                    &rid,
                    &crid,
                    now,
                )
                .header("Retry-After", "2"),
            }
            .header("request-id", rid.as_str())
            .header("client-request-id", crid.as_str())
        },
        move |w, sh| {
            let gx = Gx {
                claims,
                tenant_id,
                base,
                request_id: request_id.clone(),
                client_request_id: client_request_id.clone(),
                wall: sh.clock.wall(),
                now: sh.clock.now(),
            };
            let front_end = w.pick_front_end();
            let mut note = CallNote {
                endpoint: format!("graph:{method} /{}", template(&tail)),
                app_id: gx.claims.as_ref().ok().map(|c| c.appid.clone()),
                front_end: Some(front_end),
                body: parsed_body.as_ref().and_then(|b| b.as_ref().ok()).cloned(),
                ..Default::default()
            };
            let reply = match parsed_body {
                Some(Err(e)) => graph_error(
                    400,
                    "BadRequest",
                    &format!("Invalid request body: {e}"),
                    &gx.request_id,
                    &gx.client_request_id,
                    gx.wall,
                ),
                _ if is_batch => {
                    note.front_end = None;
                    batch(w, &gx, parsed_body.and_then(Result::ok))
                }
                body => dispatch(
                    w,
                    &gx,
                    front_end,
                    &method,
                    &tail,
                    &query,
                    body.and_then(Result::ok).as_ref(),
                ),
            };
            (
                decorate(reply, &gx.request_id, &gx.client_request_id, front_end),
                note,
            )
        },
    )
    .await
}

fn decorate(r: Reply, request_id: &str, client_request_id: &str, front_end: usize) -> Reply {
    r.header("request-id", request_id)
        .header("client-request-id", client_request_id)
        .header(
            "x-ms-ags-diagnostic",
            format!("{{\"ServerInfo\":{{\"DataCenter\":\"Sandbox\",\"Slice\":\"E\",\"Ring\":\"1\",\"ScaleUnit\":\"000\",\"RoleInstance\":\"SANDBOX-FE{front_end}\"}}}}"),
        )
}

/// `Retry-After` on a Graph 429: whole or fractional seconds (docs/microsoft-365.md §8.6: both
/// are sent). With fractional values allowed, throttled answers alternate between the two forms
/// (by the sandbox's call sequence number, so runs repeat), so a client meets both.
fn with_retry_after(
    r: Reply,
    retry: std::time::Duration,
    b: &super::settings::Behaviour,
    identity: bool,
    seq: u64,
) -> Reply {
    if identity && b.graph_identity_omits_retry_after {
        return r;
    }
    let fractional = b.graph_fractional_retry_after && seq.is_multiple_of(2);
    let value = if fractional {
        format!("{:.3}", retry.as_secs_f64().max(0.001))
    } else {
        retry.as_secs_f64().ceil().max(1.0).to_string()
    };
    r.header("Retry-After", value)
}

fn is_identity(tail: &str) -> bool {
    [
        "applications",
        "servicePrincipals",
        "roleManagement",
        "organization",
    ]
    .iter()
    .any(|p| tail.starts_with(p))
}

/// Normalise a path for counters: ids become `{id}`, keys `(appId='{appId}')`.
pub fn template(tail: &str) -> String {
    let path = tail.split('?').next().unwrap_or_default().trim_matches('/');
    let mut out = vec![];
    let mut prev = "";
    for seg in path.split('/') {
        let t = if let Some((name, _)) = seg.split_once("(appId=") {
            format!("{name}(appId='{{appId}}')")
        } else if [
            "applications",
            "servicePrincipals",
            "users",
            "groups",
            "messages",
            "mailFolders",
            "events",
            "contacts",
            "calendars",
            "appRoleAssignedTo",
            "appRoleAssignments",
            "roleAssignments",
            "members",
        ]
        .contains(&prev)
        {
            "{id}".to_string()
        } else {
            seg.to_string()
        };
        prev = seg;
        out.push(t);
    }
    out.join("/")
}

fn err(gx: &Gx, status: u16, code: &str, message: &str) -> Reply {
    graph_error(
        status,
        code,
        message,
        &gx.request_id,
        &gx.client_request_id,
        gx.wall,
    )
}

/// A Graph 401, with the `WWW-Authenticate` challenge Graph sends (docs/microsoft-365.md §8.6).
fn unauthorized(gx: &Gx, message: &str) -> Reply {
    err(gx, 401, "InvalidAuthenticationToken", message).header(
        "WWW-Authenticate",
        format!(
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"{GRAPH_APP_ID}\""
        ),
    )
}

fn insufficient(gx: &Gx) -> Reply {
    err(
        gx,
        403,
        "Authorization_RequestDenied",
        "Insufficient privileges to complete the operation.",
    )
}

fn not_found(gx: &Gx, id: &str) -> Reply {
    err(
        gx,
        404,
        "Request_ResourceNotFound",
        &format!(
            "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
        ),
    )
}

fn bad_request(gx: &Gx, message: &str) -> Reply {
    err(gx, 400, "Request_BadRequest", message)
}

fn holds(c: &AccessClaims, any_of: &[&str]) -> bool {
    c.roles
        .iter()
        .any(|r| any_of.iter().any(|a| a.eq_ignore_ascii_case(r)))
}

const APP_READ: &[&str] = &[
    "Application.Read.All",
    "Application.ReadWrite.All",
    "Application.ReadWrite.OwnedBy",
    "Directory.Read.All",
];
const APP_WRITE: &[&str] = &["Application.ReadWrite.All", "Application.ReadWrite.OwnedBy"];
const GRANT_READ: &[&str] = &[
    "AppRoleAssignment.ReadWrite.All",
    "Application.Read.All",
    "Application.ReadWrite.All",
    "Directory.Read.All",
];
const GRANT_WRITE: &[&str] = &["AppRoleAssignment.ReadWrite.All"];
/// Granting or revoking app roles needs AppRoleAssignment.ReadWrite.All **and** one of these
/// (docs/microsoft-365.md §5.3, §8.6).
const GRANT_WRITE_ALSO: &[&str] = &[
    "Application.Read.All",
    "Application.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];
const USER_READ: &[&str] = &["User.Read.All", "User.ReadWrite.All", "Directory.Read.All"];
const GROUP_READ: &[&str] = &[
    "Group.Read.All",
    "GroupMember.Read.All",
    "Directory.Read.All",
];
const ORG_READ: &[&str] = &["Organization.Read.All", "Directory.Read.All"];
const ROLE_READ: &[&str] = &[
    "RoleManagement.Read.Directory",
    "RoleManagement.ReadWrite.Directory",
    "Directory.Read.All",
];
const ROLE_WRITE: &[&str] = &["RoleManagement.ReadWrite.Directory"];

/// Handle one Graph request (also used for each `$batch` member).
fn dispatch(
    w: &mut World,
    gx: &Gx,
    fe: usize,
    method: &str,
    tail: &str,
    query: &[(String, String)],
    body: Option<&Value>,
) -> Reply {
    let claims = match &gx.claims {
        Ok(c) => c.clone(),
        Err(TokenProblem::Missing) => return unauthorized(gx, "Access token is empty."),
        Err(TokenProblem::Expired) => {
            return unauthorized(gx, "Lifetime validation failed, the token is expired.");
        }
        Err(TokenProblem::WrongAudience) => {
            return unauthorized(gx, "Access token validation failure. Invalid audience.");
        }
        Err(TokenProblem::Invalid) => return unauthorized(gx, "Access token validation failure."),
    };
    let Some(tid) = gx.tenant_id.clone() else {
        return unauthorized(gx, "Access token validation failure. Invalid issuer.");
    };
    let path = tail
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_matches('/')
        .to_string();
    let segs: Vec<String> = path.split('/').map(percent_decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = method.to_ascii_uppercase();
    let (first, key) = split_key(segs.first().copied().unwrap_or_default());
    match (first, key, &segs[1..], m.as_str()) {
        ("organization", None, [], "GET") => {
            if !holds(&claims, ORG_READ) {
                return insufficient(gx);
            }
            let Some(t) = w.tenant(&tid) else {
                return insufficient(gx);
            };
            Reply::json(
                200,
                json!({"@odata.context": format!("{GRAPH_CONTEXT}#organization"), "value": [{
                "id": t.id, "displayName": t.display_name, "tenantType": "AAD", "deletedDateTime": null,
                "verifiedDomains": [{"name": t.initial_domain, "isDefault": true, "isInitial": true, "type": "Managed",
                    "capabilities": "Email, OfficeCommunicationsOnline"}]}]}),
            )
        }
        ("applications", key, rest, _) => {
            applications(w, gx, &claims, &tid, key, rest, &m, query, body)
        }
        ("servicePrincipals", key, rest, _) => {
            service_principals(w, gx, &claims, &tid, key, rest, &m, query, body)
        }
        ("users", None, [], "GET") => {
            if !holds(&claims, USER_READ) {
                return insufficient(gx);
            }
            let Some(t) = w.tenant(&tid) else {
                return insufficient(gx);
            };
            let users: Vec<Value> = t
                .recipients
                .iter()
                .filter(|r| r.kind.is_user())
                .map(user_json)
                .collect();
            list(
                gx,
                "users",
                users,
                query,
                100,
                999,
                &["id", "userPrincipalName", "mail", "displayName"],
            )
        }
        ("users", None, [u, rest @ ..], _) => {
            users(w, gx, fe, &claims, &tid, u, rest, &m, query, body)
        }
        ("groups", None, rest, "GET") => {
            if !holds(&claims, GROUP_READ) {
                return insufficient(gx);
            }
            let Some(t) = w.tenant(&tid) else {
                return insufficient(gx);
            };
            match rest {
                [] => list(
                    gx,
                    "groups",
                    t.recipients
                        .iter()
                        .filter(|r| r.kind.is_group())
                        .map(group_json)
                        .collect(),
                    query,
                    100,
                    999,
                    &["id", "displayName", "mail", "mailNickname"],
                ),
                [g] => match t
                    .recipients
                    .iter()
                    .find(|r| r.kind.is_group() && r.id.eq_ignore_ascii_case(g))
                {
                    Some(g) => Reply::json(200, with_context(group_json(g), "groups/$entity")),
                    None => not_found(gx, g),
                },
                [g, "members"] => match t
                    .recipients
                    .iter()
                    .find(|r| r.kind.is_group() && r.id.eq_ignore_ascii_case(g))
                {
                    Some(g) => {
                        let members = g
                            .members
                            .iter()
                            .filter_map(|m| t.recipient(m))
                            .map(|r| {
                                let mut v = if r.kind.is_group() {
                                    group_json(r)
                                } else {
                                    user_json(r)
                                };
                                v["@odata.type"] = json!(if r.kind.is_group() {
                                    "#microsoft.graph.group"
                                } else {
                                    "#microsoft.graph.user"
                                });
                                v
                            })
                            .collect();
                        list(gx, "directoryObjects", members, query, 100, 999, &[])
                    }
                    None => not_found(gx, g),
                },
                _ => err(gx, 400, "BadRequest", "Resource not found for the segment."),
            }
        }
        ("groups", None, [_, "members", ..], "POST" | "DELETE") => {
            // Mail-enabled security groups and distribution groups are read-only in Graph (docs/microsoft-365.md §4.2).
            err(
                gx,
                400,
                "Request_BadRequest",
                "Cannot Update a mail-enabled security groups and or distribution list.",
            )
        }
        ("directory", None, ["administrativeUnits", au], "GET") => {
            if !holds(&claims, GROUP_READ) {
                return insufficient(gx);
            }
            let Some(t) = w.tenant(&tid) else {
                return insufficient(gx);
            };
            match t
                .administrative_units
                .iter()
                .find(|u| u.id.eq_ignore_ascii_case(au))
            {
                Some(u) => Reply::json(
                    200,
                    with_context(
                        json!({"id": u.id, "displayName": u.display_name}),
                        "directory/administrativeUnits/$entity",
                    ),
                ),
                None => not_found(gx, au),
            }
        }
        ("roleManagement", None, ["directory", "roleAssignments", rest @ ..], _) => {
            role_assignments(w, gx, &claims, &tid, rest, &m, query, body)
        }
        _ => err(
            gx,
            400,
            "BadRequest",
            &format!(
                "Resource not found for the segment '{}'.",
                segs.first().copied().unwrap_or_default()
            ),
        ),
    }
}

/// `applications(appId='x')` → ("applications", Some("x")).
fn split_key(seg: &str) -> (&str, Option<String>) {
    if let Some((name, rest)) = seg.split_once('(') {
        let inner = rest.trim_end_matches(')');
        let v = inner.split_once('=').map(|(_, v)| v).unwrap_or(inner);
        return (name, Some(v.trim_matches('\'').to_string()));
    }
    (seg, None)
}

fn with_context(mut v: Value, ctx: &str) -> Value {
    if let Value::Object(m) = &mut v {
        let mut out = Map::new();
        out.insert(
            "@odata.context".into(),
            json!(format!("{GRAPH_CONTEXT}#{ctx}")),
        );
        out.extend(std::mem::take(m));
        return Value::Object(out);
    }
    v
}

/// A `$filter` the sandbox understands.
#[derive(Debug, PartialEq)]
enum Filter {
    /// `prop eq 'value'`
    Eq(String, String),
    /// `prop/any(x:x eq 'value')`: a string collection holds the value (e.g. `tags`).
    Any(String, String),
}

/// `$filter=prop eq 'value'` or `prop/any(x:x eq 'value')` (the forms the sandbox supports).
fn parse_filter(q: &[(String, String)]) -> Result<Option<Filter>, ()> {
    let Some((_, f)) = q.iter().find(|(k, _)| k == "$filter") else {
        return Ok(None);
    };
    if let Some((prop, lambda)) = f.split_once("/any(") {
        let inner = lambda.trim().strip_suffix(')').ok_or(())?;
        let (var, cond) = inner.split_once(':').ok_or(())?;
        let var = var.trim();
        let cond = cond.trim();
        let rest = cond.strip_prefix(var).ok_or(())?;
        let q = vec![("$filter".to_string(), format!("{var}{rest}"))];
        return match parse_filter(&q)? {
            Some(Filter::Eq(v, val)) if v == var && !var.is_empty() => {
                Ok(Some(Filter::Any(prop.trim().to_string(), val)))
            }
            _ => Err(()),
        };
    }
    let parts: Vec<&str> = f.splitn(3, ' ').collect();
    match parts.as_slice() {
        [prop, op, val]
            if op.eq_ignore_ascii_case("eq")
                && val.starts_with('\'')
                && val.ends_with('\'')
                && val.len() >= 2 =>
        {
            Ok(Some(Filter::Eq(
                prop.to_string(),
                val[1..val.len() - 1].replace("''", "'"),
            )))
        }
        _ => Err(()),
    }
}

fn select(v: Value, q: &[(String, String)]) -> Value {
    let Some((_, s)) = q.iter().find(|(k, _)| k == "$select") else {
        return v;
    };
    let wanted: Vec<&str> = s.split(',').map(str::trim).collect();
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| {
                    k.starts_with('@')
                        || k == "id"
                        || wanted.iter().any(|w| w.eq_ignore_ascii_case(k))
                })
                .collect(),
        ),
        o => o,
    }
}

/// A collection response with `$filter` (on `filterable` properties), `$select`, `$top` and
/// `@odata.nextLink` paging.
fn list(
    gx: &Gx,
    ctx: &str,
    items: Vec<Value>,
    q: &[(String, String)],
    default_top: usize,
    max_top: usize,
    filterable: &[&str],
) -> Reply {
    let mut items = items;
    match parse_filter(q) {
        Ok(Some(filter)) => {
            let (Filter::Eq(prop, val) | Filter::Any(prop, val)) = &filter;
            let (prop, val) = (prop.clone(), val.clone());
            if !filterable.iter().any(|f| f.eq_ignore_ascii_case(&prop)) {
                return err(
                    gx,
                    400,
                    "Request_UnsupportedQuery",
                    &format!(
                        "Unsupported or invalid query filter clause specified for property '{prop}' of resource '{ctx}'."
                    ),
                );
            }
            let any = matches!(filter, Filter::Any(..));
            items.retain(|i| {
                let v = i
                    .as_object()
                    .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(&prop)))
                    .map(|(_, v)| v);
                match (any, v) {
                    (false, Some(v)) => v.as_str().is_some_and(|s| s.eq_ignore_ascii_case(&val)),
                    // Collection values compare exactly, as Graph does for `tags`.
                    (true, Some(Value::Array(a))) => a.iter().any(|x| x.as_str() == Some(&val)),
                    _ => false,
                }
            });
        }
        Ok(None) => {}
        Err(()) => {
            return err(
                gx,
                400,
                "BadRequest",
                "Invalid filter clause: the sandbox supports `property eq 'value'` and `property/any(x:x eq 'value')`.",
            );
        }
    }
    let top = q
        .iter()
        .find(|(k, _)| k == "$top")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(default_top);
    if top == 0 || top > max_top {
        return err(
            gx,
            400,
            "Request_BadRequest",
            &format!(
                "Invalid page size specified: '{top}'. Must be between 1 and {max_top} inclusive."
            ),
        );
    }
    let skip = q
        .iter()
        .find(|(k, _)| k == "$skiptoken" || k == "$skip")
        .and_then(|(_, v)| {
            v.trim_start_matches("X%27")
                .trim_start_matches("X'")
                .trim_end_matches('\'')
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    let total = items.len();
    let page: Vec<Value> = items
        .into_iter()
        .skip(skip)
        .take(top)
        .map(|v| select(v, q))
        .collect();
    let mut body = json!({"@odata.context": format!("{GRAPH_CONTEXT}#{ctx}"), "value": page});
    if skip + top < total {
        let mut qs: Vec<String> = q
            .iter()
            .filter(|(k, _)| k != "$skiptoken" && k != "$skip" && k != "$top")
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect();
        qs.push(format!("%24top={top}"));
        qs.push(format!("%24skiptoken={}", skip + top));
        body["@odata.nextLink"] = json!(format!(
            "{}/v1.0/{}?{}",
            gx.base,
            ctx_path(ctx),
            qs.join("&")
        ));
    }
    Reply::json(200, body)
}

/// Collection contexts double as paths except for mailbox collections, which carry `users('x')`.
fn ctx_path(ctx: &str) -> String {
    if let Some(rest) = ctx.strip_prefix("users('")
        && let Some((u, tail)) = rest.split_once("')")
    {
        return format!("users/{u}{tail}");
    }
    ctx.to_string()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ts(d: DateTime<Utc>) -> String {
    d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn app_json(t: &Tenant, a: &Application) -> Value {
    let mut v = json!({
        "id": a.id, "deletedDateTime": null, "appId": a.app_id, "displayName": a.display_name,
        "createdDateTime": ts(a.created), "signInAudience": a.sign_in_audience,
        "publisherDomain": t.initial_domain, "identifierUris": [],
        "tags": a.extra.get("tags").filter(|v| v.is_array()).cloned().unwrap_or(json!([])),
        "requiredResourceAccess": a.required_resource_access,
        "passwordCredentials": a.password_credentials.iter().map(|p| json!({
            "customKeyIdentifier": null, "displayName": p.display_name, "endDateTime": ts(p.end),
            "hint": p.hint, "keyId": p.key_id, "secretText": null, "startDateTime": ts(p.start)})).collect::<Vec<_>>(),
        "keyCredentials": a.key_credentials.iter().map(|k| json!({
            "customKeyIdentifier": thumbprint_hex(&k.der), "displayName": k.display_name, "endDateTime": ts(k.end),
            "key": null, "keyId": k.key_id, "startDateTime": ts(k.start), "type": "AsymmetricX509Cert", "usage": "Verify"})).collect::<Vec<_>>(),
    });
    if let Value::Object(m) = &mut v {
        for (k, val) in &a.extra {
            m.entry(k.clone()).or_insert(val.clone());
        }
    }
    v
}

fn sp_json(s: &ServicePrincipal) -> Value {
    json!({
        "id": s.id, "deletedDateTime": null, "accountEnabled": true, "appId": s.app_id,
        "appDisplayName": s.display_name, "displayName": s.display_name,
        "appOwnerOrganizationId": s.app_owner_organization_id, "servicePrincipalType": "Application",
        "servicePrincipalNames": [s.app_id], "tags": [], "createdDateTime": ts(s.created),
        "appRoles": s.app_roles.iter().map(|r| json!({"allowedMemberTypes": ["Application"],
            "description": r.display_name, "displayName": r.display_name, "id": r.id,
            "isEnabled": true, "origin": "Application", "value": r.value})).collect::<Vec<_>>(),
    })
}

fn grant_json(t: &Tenant, g: &AppRoleGrant) -> Value {
    let principal = t.service_principal(&g.principal_id);
    let resource = t.service_principal(&g.resource_id);
    json!({"id": g.id, "deletedDateTime": null, "appRoleId": g.app_role_id, "createdDateTime": ts(g.created),
        "principalDisplayName": principal.map(|p| p.display_name.clone()), "principalId": g.principal_id,
        "principalType": "ServicePrincipal", "resourceDisplayName": resource.map(|r| r.display_name.clone()),
        "resourceId": g.resource_id})
}

fn user_json(r: &Recipient) -> Value {
    let (given, surname) = r
        .display_name
        .split_once(' ')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or((r.display_name.clone(), String::new()));
    json!({"id": r.id, "displayName": r.display_name, "givenName": given, "surname": surname,
        "userPrincipalName": r.user_principal_name,
        "mail": if r.primary_smtp_address.is_empty() { Value::Null } else { json!(r.primary_smtp_address) },
        "businessPhones": [], "jobTitle": null, "mobilePhone": null, "officeLocation": null, "preferredLanguage": null})
}

fn group_json(g: &Recipient) -> Value {
    let (types, mail_enabled, security_enabled): (Vec<&str>, bool, bool) = match g.kind {
        RecipientKind::MailUniversalSecurityGroup => (vec![], true, true),
        RecipientKind::MailUniversalDistributionGroup => (vec![], true, false),
        RecipientKind::GroupMailbox => (vec!["Unified"], true, false),
        _ => (vec![], false, true),
    };
    json!({"id": g.id, "displayName": g.display_name, "description": null, "groupTypes": types,
        "mail": if mail_enabled { json!(g.primary_smtp_address) } else { Value::Null },
        "mailEnabled": mail_enabled, "mailNickname": g.alias, "securityEnabled": security_enabled,
        "securityIdentifier": g.sid, "createdDateTime": ts(g.created)})
}

fn find_app<'t>(
    t: &'t Tenant,
    key: &Option<String>,
    rest: &[&str],
) -> Option<(&'t Application, usize)> {
    match key {
        Some(app_id) => t
            .applications
            .iter()
            .find(|a| a.app_id.eq_ignore_ascii_case(app_id))
            .map(|a| (a, 0)),
        None => rest
            .first()
            .and_then(|id| {
                t.applications
                    .iter()
                    .find(|a| a.id.eq_ignore_ascii_case(id))
            })
            .map(|a| (a, 1)),
    }
}

fn key_credentials_from(
    v: &Value,
    wall: DateTime<Utc>,
    rng: &mut impl rand::Rng,
) -> Result<Vec<KeyCredential>, String> {
    let Some(arr) = v.as_array() else {
        return Err("keyCredentials must be an array".into());
    };
    let mut out = vec![];
    for k in arr {
        let key = k
            .get("key")
            .and_then(Value::as_str)
            .ok_or("keyCredentials[].key is required")?;
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .ok()
            .or_else(|| pem_to_der(key))
            .filter(|d| super::tokens::certificate_public_key(d).is_some())
            .ok_or("Key credential is not a valid RSA X.509 certificate.")?;
        let parse = |f: &str| {
            k.get(f)
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc))
        };
        out.push(KeyCredential {
            key_id: k
                .get("keyId")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| guid(rng)),
            display_name: k
                .get("displayName")
                .and_then(Value::as_str)
                .map(String::from),
            der,
            start: parse("startDateTime").unwrap_or(wall),
            end: parse("endDateTime").unwrap_or(wall + chrono::Duration::days(365)),
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn applications(
    w: &mut World,
    gx: &Gx,
    c: &AccessClaims,
    tid: &str,
    key: Option<String>,
    rest: &[&str],
    m: &str,
    q: &[(String, String)],
    body: Option<&Value>,
) -> Reply {
    // Entra's eventual consistency for what this request may create (docs/microsoft-365.md §8.4).
    let lag = if m == "POST" {
        w.consistency_lag()
    } else {
        std::time::Duration::ZERO
    };
    let World { tenants, rng, .. } = w;
    let Some(t) = tenants.iter_mut().find(|t| t.id == tid) else {
        return insufficient(gx);
    };
    let owned_only = !holds(
        c,
        &[
            "Application.Read.All",
            "Application.ReadWrite.All",
            "Directory.Read.All",
        ],
    );
    if key.is_none() && rest.is_empty() {
        return match m {
            "GET" => {
                if !holds(c, APP_READ) {
                    return insufficient(gx);
                }
                let apps = t
                    .applications
                    .iter()
                    .filter(|a| a.visible_at <= gx.now)
                    .filter(|a| !owned_only || a.owner_sp.as_deref() == Some(c.oid.as_str()))
                    .map(|a| app_json(t, a))
                    .collect();
                list(
                    gx,
                    "applications",
                    apps,
                    q,
                    100,
                    999,
                    &["appId", "displayName", "id", "tags"],
                )
            }
            "POST" => {
                if !holds(c, APP_WRITE) {
                    return insufficient(gx);
                }
                let Some(b) = body.and_then(Value::as_object) else {
                    return bad_request(gx, "A request body is required.");
                };
                let Some(name) = b
                    .get("displayName")
                    .and_then(Value::as_str)
                    .filter(|s| !s.trim().is_empty())
                else {
                    return bad_request(
                        gx,
                        "Invalid value specified for property 'displayName' of resource 'Application'.",
                    );
                };
                let keys = match b.get("keyCredentials") {
                    Some(v) => match key_credentials_from(v, gx.wall, &mut rng.ids) {
                        Ok(k) => k,
                        Err(e) => return bad_request(gx, &e),
                    },
                    None => vec![],
                };
                let mut extra = Map::new();
                for (k, v) in b {
                    // Secrets cannot be set at creation (docs/microsoft-365.md §5.4): passwordCredentials are ignored.
                    if ![
                        "displayName",
                        "requiredResourceAccess",
                        "keyCredentials",
                        "passwordCredentials",
                        "id",
                        "appId",
                        "signInAudience",
                    ]
                    .contains(&k.as_str())
                    {
                        extra.insert(k.clone(), v.clone());
                    }
                }
                let a = Application {
                    id: guid(&mut rng.ids),
                    app_id: guid(&mut rng.ids),
                    display_name: name.to_string(),
                    sign_in_audience: b
                        .get("signInAudience")
                        .and_then(Value::as_str)
                        .unwrap_or("AzureADMyOrg")
                        .to_string(),
                    password_credentials: vec![],
                    key_credentials: keys,
                    required_resource_access: b
                        .get("requiredResourceAccess")
                        .cloned()
                        .unwrap_or(json!([])),
                    extra,
                    owner_sp: Some(c.oid.clone()),
                    created: gx.wall,
                    visible_at: gx.now + lag,
                };
                let out = with_context(app_json(t, &a), "applications/$entity");
                t.applications.push(a);
                Reply::json(201, out)
            }
            _ => err(gx, 405, "Request_BadRequest", "Method not allowed."),
        };
    }
    let Some((app, used)) = find_app(t, &key, rest)
        // A new application reads as 404 until it has replicated (docs/microsoft-365.md §8.4).
        .filter(|(a, _)| m != "GET" || a.visible_at <= gx.now)
    else {
        return not_found(
            gx,
            key.as_deref().or(rest.first().copied()).unwrap_or_default(),
        );
    };
    if owned_only && app.owner_sp.as_deref() != Some(c.oid.as_str()) {
        return if holds(c, APP_READ) {
            not_found(gx, &app.id)
        } else {
            insufficient(gx)
        };
    }
    let app_obj = app.id.clone();
    let action = &rest[used..];
    let idx = t
        .applications
        .iter()
        .position(|a| a.id == app_obj)
        .unwrap_or(0);
    match (action, m) {
        ([], "GET") => {
            if !holds(c, APP_READ) {
                return insufficient(gx);
            }
            Reply::json(
                200,
                select(
                    with_context(app_json(t, &t.applications[idx]), "applications/$entity"),
                    q,
                ),
            )
        }
        ([], "PATCH") => {
            if !holds(c, APP_WRITE) {
                return insufficient(gx);
            }
            let Some(b) = body.and_then(Value::as_object) else {
                return bad_request(gx, "A request body is required.");
            };
            if b.contains_key("passwordCredentials") {
                return bad_request(
                    gx,
                    "Updating passwordCredentials is not supported; use addPassword and removePassword.",
                );
            }
            let keys = match b.get("keyCredentials") {
                Some(v) => match key_credentials_from(v, gx.wall, &mut rng.ids) {
                    Ok(k) => Some(k),
                    Err(e) => return bad_request(gx, &e),
                },
                None => None,
            };
            let a = &mut t.applications[idx];
            for (k, v) in b {
                match k.as_str() {
                    "displayName" => {
                        if let Some(s) = v.as_str() {
                            a.display_name = s.to_string();
                        }
                    }
                    "requiredResourceAccess" => a.required_resource_access = v.clone(),
                    "keyCredentials" => {}
                    "signInAudience" => {
                        if let Some(s) = v.as_str() {
                            a.sign_in_audience = s.to_string();
                        }
                    }
                    _ => {
                        a.extra.insert(k.clone(), v.clone());
                    }
                }
            }
            if let Some(k) = keys {
                a.key_credentials = k;
            }
            Reply::empty(204)
        }
        ([], "DELETE") => {
            if !holds(c, APP_WRITE) {
                return insufficient(gx);
            }
            let app_id = t.applications[idx].app_id.clone();
            t.applications.remove(idx);
            // Deleting the registration deletes its service principal in the home tenant.
            if let Some(sp) = t.service_principal_by_app_id(&app_id).map(|s| s.id.clone()) {
                t.service_principals.retain(|s| s.id != sp);
                t.app_role_grants.retain(|g| g.principal_id != sp);
                t.directory_role_assignments
                    .retain(|d| d.principal_id != sp);
            }
            Reply::empty(204)
        }
        (["addPassword"], "POST") => {
            if !holds(c, APP_WRITE) {
                return insufficient(gx);
            }
            let pc = body
                .and_then(|b| b.get("passwordCredential"))
                .cloned()
                .unwrap_or(json!({}));
            let parse = |f: &str| {
                pc.get(f)
                    .and_then(Value::as_str)
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|d| d.with_timezone(&Utc))
            };
            let start = parse("startDateTime").unwrap_or(gx.wall);
            // Without an end: two calendar years after the start (docs/microsoft-365.md §8.6).
            let end = parse("endDateTime").unwrap_or_else(|| {
                start
                    .checked_add_months(chrono::Months::new(24))
                    .unwrap_or(start + chrono::Duration::days(730))
            });
            if end <= start {
                return bad_request(
                    gx,
                    "Invalid value specified for property 'endDateTime' of resource 'PasswordCredential'.",
                );
            }
            let secret = super::state::new_secret();
            let cred = PasswordCredential {
                key_id: guid(&mut rng.ids),
                display_name: pc
                    .get("displayName")
                    .and_then(Value::as_str)
                    .map(String::from),
                hint: secret.chars().take(3).collect(),
                secret_text: secret.clone(),
                start,
                end,
                usable_at: gx.now + lag,
            };
            let out = json!({"@odata.context": format!("{GRAPH_CONTEXT}#microsoft.graph.passwordCredential"),
                "customKeyIdentifier": null, "displayName": cred.display_name, "endDateTime": ts(end), "hint": cred.hint,
                "keyId": cred.key_id, "secretText": secret, "startDateTime": ts(start)});
            t.applications[idx].password_credentials.push(cred);
            Reply::json(200, out)
        }
        (["removePassword"], "POST") => {
            if !holds(c, APP_WRITE) {
                return insufficient(gx);
            }
            let Some(key_id) = body.and_then(|b| b.get("keyId")).and_then(Value::as_str) else {
                return bad_request(gx, "Invalid value specified for property 'keyId'.");
            };
            let a = &mut t.applications[idx];
            let before = a.password_credentials.len();
            a.password_credentials
                .retain(|p| !p.key_id.eq_ignore_ascii_case(key_id));
            if a.password_credentials.len() == before {
                return err(
                    gx,
                    404,
                    "Request_ResourceNotFound",
                    &format!("No password credential found with keyId '{key_id}'."),
                );
            }
            Reply::empty(204)
        }
        _ => err(
            gx,
            400,
            "BadRequest",
            "Unsupported segment or method on application.",
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn service_principals(
    w: &mut World,
    gx: &Gx,
    c: &AccessClaims,
    tid: &str,
    key: Option<String>,
    rest: &[&str],
    m: &str,
    q: &[(String, String)],
    body: Option<&Value>,
) -> Reply {
    let lag = if m == "POST" {
        w.consistency_lag()
    } else {
        std::time::Duration::ZERO
    };
    let World { tenants, rng, .. } = w;
    // Applications that have replicated: only those can back a new service principal.
    let home_apps: Vec<(String, String, String)> = tenants
        .iter()
        .flat_map(|t| {
            t.applications
                .iter()
                .filter(|a| a.visible_at <= gx.now)
                .map(move |a| (a.app_id.clone(), a.display_name.clone(), t.id.clone()))
        })
        .collect();
    let Some(t) = tenants.iter_mut().find(|t| t.id == tid) else {
        return insufficient(gx);
    };
    if key.is_none() && rest.is_empty() {
        return match m {
            "GET" => {
                if !holds(c, APP_READ) {
                    return insufficient(gx);
                }
                list(
                    gx,
                    "servicePrincipals",
                    t.service_principals.iter().map(sp_json).collect(),
                    q,
                    100,
                    999,
                    &["appId", "displayName", "id"],
                )
            }
            "POST" => {
                if !holds(c, APP_WRITE) {
                    return insufficient(gx);
                }
                let Some(app_id) = body.and_then(|b| b.get("appId")).and_then(Value::as_str) else {
                    return bad_request(
                        gx,
                        "Invalid value specified for property 'appId' of resource 'ServicePrincipal'.",
                    );
                };
                if t.service_principal_by_app_id(app_id).is_some() {
                    return err(
                        gx,
                        409,
                        "Request_MultipleObjectsWithSameKeyValue",
                        "Another object with the same value for property servicePrincipalNames already exists.",
                    );
                }
                let Some((app_id, name, home)) = home_apps
                    .iter()
                    .find(|(a, _, _)| a.eq_ignore_ascii_case(app_id))
                    .cloned()
                else {
                    // Also the answer right after the application was created, until it has
                    // replicated (docs/microsoft-365.md §8.4).
                    let text = format!(
                        "The appId '{app_id}' of the service principal does not reference a valid application object."
                    );
                    return with_details(
                        bad_request(gx, &text),
                        json!([{"code": "NoBackingApplicationObject", "message": text, "target": "appId"}]),
                    );
                };
                let sp = ServicePrincipal {
                    id: guid(&mut rng.ids),
                    app_id,
                    display_name: name,
                    app_roles: vec![],
                    app_owner_organization_id: Some(home),
                    created: gx.wall,
                };
                let out = with_context(sp_json(&sp), "servicePrincipals/$entity");
                t.service_principals.push(sp);
                Reply::json(201, out)
            }
            _ => err(gx, 405, "Request_BadRequest", "Method not allowed."),
        };
    }
    let (sp, used) = match &key {
        Some(app_id) => (t.service_principal_by_app_id(app_id).cloned(), 0),
        None => (
            rest.first().and_then(|id| t.service_principal(id)).cloned(),
            1,
        ),
    };
    let Some(sp) = sp else {
        return not_found(
            gx,
            key.as_deref().or(rest.first().copied()).unwrap_or_default(),
        );
    };
    let action = &rest[used..];
    match (action, m) {
        ([], "GET") => {
            if !holds(c, APP_READ) {
                return insufficient(gx);
            }
            Reply::json(
                200,
                select(with_context(sp_json(&sp), "servicePrincipals/$entity"), q),
            )
        }
        ([], "DELETE") => {
            if !holds(c, APP_WRITE) {
                return insufficient(gx);
            }
            t.service_principals.retain(|s| s.id != sp.id);
            t.app_role_grants
                .retain(|g| g.principal_id != sp.id && g.resource_id != sp.id);
            t.directory_role_assignments
                .retain(|d| d.principal_id != sp.id);
            // Exchange drops the role assignments of a deleted service principal, not its scopes (docs/microsoft-365.md §3.5).
            t.role_assignments
                .retain(|a| !a.app_object_id.eq_ignore_ascii_case(&sp.id));
            Reply::empty(204)
        }
        ([rel], "GET") if *rel == "appRoleAssignedTo" || *rel == "appRoleAssignments" => {
            if !holds(c, GRANT_READ) {
                return insufficient(gx);
            }
            let by_resource = *rel == "appRoleAssignedTo";
            let items = t
                .app_role_grants
                .iter()
                .filter(|g| {
                    if by_resource {
                        g.resource_id == sp.id
                    } else {
                        g.principal_id == sp.id
                    }
                })
                .map(|g| grant_json(t, g))
                .collect();
            list(
                gx,
                &format!("servicePrincipals('{}')/{rel}", sp.id),
                items,
                q,
                100,
                999,
                &["principalId", "resourceId", "appRoleId"],
            )
        }
        ([rel], "POST") if *rel == "appRoleAssignedTo" || *rel == "appRoleAssignments" => {
            if !holds(c, GRANT_WRITE) || !holds(c, GRANT_WRITE_ALSO) {
                return insufficient(gx);
            }
            let get = |k: &str| {
                body.and_then(|b| b.get(k))
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            let (Some(principal), Some(resource), Some(role)) =
                (get("principalId"), get("resourceId"), get("appRoleId"))
            else {
                return bad_request(gx, "principalId, resourceId and appRoleId are required.");
            };
            let by_resource = *rel == "appRoleAssignedTo";
            if by_resource && !resource.eq_ignore_ascii_case(&sp.id)
                || !by_resource && !principal.eq_ignore_ascii_case(&sp.id)
            {
                return bad_request(
                    gx,
                    "Invalid value specified for property 'resourceId' or 'principalId'.",
                );
            }
            let Some(resource_sp) = t.service_principal(&resource).cloned() else {
                return not_found(gx, &resource);
            };
            if t.service_principal(&principal).is_none() {
                return not_found(gx, &principal);
            }
            if !resource_sp
                .app_roles
                .iter()
                .any(|r| r.id.eq_ignore_ascii_case(&role))
            {
                return bad_request(
                    gx,
                    &format!(
                        "Permission being assigned was not found on application '{}'.",
                        resource_sp.app_id
                    ),
                );
            }
            if t.app_role_grants.iter().any(|g| {
                g.principal_id.eq_ignore_ascii_case(&principal)
                    && g.resource_id.eq_ignore_ascii_case(&resource)
                    && g.app_role_id.eq_ignore_ascii_case(&role)
            }) {
                return bad_request(gx, "Permission being assigned already exists on the object");
            }
            let g = AppRoleGrant {
                id: grant_id(&mut rng.ids),
                principal_id: principal.to_lowercase(),
                resource_id: resource_sp.id.clone(),
                app_role_id: role.to_lowercase(),
                created: gx.wall,
                in_token_at: gx.now + lag,
            };
            let out = with_context(
                grant_json(t, &g),
                &format!("servicePrincipals('{}')/{rel}/$entity", sp.id),
            );
            t.app_role_grants.push(g);
            Reply::json(201, out)
        }
        ([rel, id], "DELETE") if *rel == "appRoleAssignedTo" || *rel == "appRoleAssignments" => {
            if !holds(c, GRANT_WRITE) || !holds(c, GRANT_WRITE_ALSO) {
                return insufficient(gx);
            }
            let by_resource = *rel == "appRoleAssignedTo";
            let before = t.app_role_grants.len();
            t.app_role_grants.retain(|g| {
                !(g.id == *id
                    && if by_resource {
                        g.resource_id == sp.id
                    } else {
                        g.principal_id == sp.id
                    })
            });
            if t.app_role_grants.len() == before {
                return not_found(gx, id);
            }
            Reply::empty(204)
        }
        _ => err(
            gx,
            400,
            "BadRequest",
            "Unsupported segment or method on servicePrincipal.",
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn role_assignments(
    w: &mut World,
    gx: &Gx,
    c: &AccessClaims,
    tid: &str,
    rest: &[&str],
    m: &str,
    q: &[(String, String)],
    body: Option<&Value>,
) -> Reply {
    let World { tenants, rng, .. } = w;
    let Some(t) = tenants.iter_mut().find(|t| t.id == tid) else {
        return insufficient(gx);
    };
    let json_of = |a: &DirectoryRoleAssignment| json!({"id": a.id, "principalId": a.principal_id, "roleDefinitionId": a.role_definition_id, "directoryScopeId": a.directory_scope_id});
    match (rest, m) {
        ([], "GET") => {
            if !holds(c, ROLE_READ) {
                return insufficient(gx);
            }
            list(
                gx,
                "roleManagement/directory/roleAssignments",
                t.directory_role_assignments.iter().map(json_of).collect(),
                q,
                100,
                999,
                &["principalId", "roleDefinitionId"],
            )
        }
        ([], "POST") => {
            if !holds(c, ROLE_WRITE) {
                return insufficient(gx);
            }
            let get = |k: &str| {
                body.and_then(|b| b.get(k))
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            let (Some(principal), Some(role)) = (get("principalId"), get("roleDefinitionId"))
            else {
                return bad_request(gx, "principalId and roleDefinitionId are required.");
            };
            let scope = get("directoryScopeId").unwrap_or_else(|| "/".into());
            if t.service_principal(&principal).is_none() && t.recipient(&principal).is_none() {
                return not_found(gx, &principal);
            }
            if uuid::Uuid::parse_str(&role).is_err() {
                return bad_request(
                    gx,
                    "Invalid value specified for property 'roleDefinitionId'.",
                );
            }
            if t.directory_role_assignments.iter().any(|a| {
                a.principal_id.eq_ignore_ascii_case(&principal)
                    && a.role_definition_id.eq_ignore_ascii_case(&role)
                    && a.directory_scope_id == scope
            }) {
                return bad_request(
                    gx,
                    "A conflicting object with one or more of the specified property values is present in the directory.",
                );
            }
            let a = DirectoryRoleAssignment {
                id: grant_id(&mut rng.ids),
                principal_id: principal.to_lowercase(),
                role_definition_id: role.to_lowercase(),
                directory_scope_id: scope,
            };
            let out = with_context(
                json_of(&a),
                "roleManagement/directory/roleAssignments/$entity",
            );
            t.directory_role_assignments.push(a);
            Reply::json(201, out)
        }
        ([id], "GET") => {
            if !holds(c, ROLE_READ) {
                return insufficient(gx);
            }
            match t.directory_role_assignments.iter().find(|a| a.id == *id) {
                Some(a) => Reply::json(
                    200,
                    with_context(
                        json_of(a),
                        "roleManagement/directory/roleAssignments/$entity",
                    ),
                ),
                None => not_found(gx, id),
            }
        }
        ([id], "DELETE") => {
            if !holds(c, ROLE_WRITE) {
                return insufficient(gx);
            }
            let before = t.directory_role_assignments.len();
            t.directory_role_assignments.retain(|a| a.id != *id);
            if t.directory_role_assignments.len() == before {
                return not_found(gx, id);
            }
            Reply::empty(204)
        }
        _ => err(
            gx,
            400,
            "BadRequest",
            "Unsupported segment or method on roleAssignments.",
        ),
    }
}

const MAIL_READ: &[&str] = &[
    "Mail.ReadBasic",
    "Mail.ReadBasic.All",
    "Mail.Read",
    "Mail.ReadWrite",
];
const MAIL_WRITE: &[&str] = &["Mail.ReadWrite"];
const MAIL_SEND: &[&str] = &["Mail.Send"];
const CAL_READ: &[&str] = &["Calendars.Read", "Calendars.ReadWrite"];
const CAL_WRITE: &[&str] = &["Calendars.ReadWrite"];
const CONTACTS_READ: &[&str] = &["Contacts.Read", "Contacts.ReadWrite"];
const CONTACTS_WRITE: &[&str] = &["Contacts.ReadWrite"];
const SETTINGS_READ: &[&str] = &["MailboxSettings.Read", "MailboxSettings.ReadWrite"];
const SETTINGS_WRITE: &[&str] = &["MailboxSettings.ReadWrite"];

/// Which permissions let a mailbox operation through.
fn accepted(rest: &[&str], m: &str) -> Option<&'static [&'static str]> {
    let read = m == "GET";
    Some(match rest.first().copied()? {
        "messages" | "mailFolders" => {
            if read {
                MAIL_READ
            } else {
                MAIL_WRITE
            }
        }
        "sendMail" => MAIL_SEND,
        "calendar" | "calendars" | "events" => {
            if read {
                CAL_READ
            } else {
                CAL_WRITE
            }
        }
        "contacts" => {
            if read {
                CONTACTS_READ
            } else {
                CONTACTS_WRITE
            }
        }
        "mailboxSettings" => {
            if read {
                SETTINGS_READ
            } else {
                SETTINGS_WRITE
            }
        }
        _ => return None,
    })
}

#[allow(clippy::too_many_arguments)]
fn users(
    w: &mut World,
    gx: &Gx,
    fe: usize,
    c: &AccessClaims,
    tid: &str,
    u: &str,
    rest: &[&str],
    m: &str,
    q: &[(String, String)],
    body: Option<&Value>,
) -> Reply {
    let Some(t) = w.tenant(tid) else {
        return insufficient(gx);
    };
    if rest.is_empty() {
        if m != "GET" {
            return err(gx, 405, "Request_BadRequest", "Method not allowed.");
        }
        if !holds(c, USER_READ) {
            return insufficient(gx);
        }
        return match t.user_by_key(u) {
            Some(r) => Reply::json(200, select(with_context(user_json(r), "users/$entity"), q)),
            None => not_found(gx, u),
        };
    }
    let Some(perms) = accepted(rest, m) else {
        return err(
            gx,
            400,
            "BadRequest",
            &format!("Resource not found for the segment '{}'.", rest[0]),
        );
    };
    let Some(user) = t.user_by_key(u).cloned() else {
        return err(
            gx,
            404,
            "ErrorInvalidUser",
            &format!("The requested user '{u}' is invalid."),
        );
    };
    let tenant_id = t.id.clone();
    let (access, _) = w.graph_mailbox_access(
        &tenant_id, fe, gx.now, &c.appid, &c.oid, &c.roles, &user.id, perms,
    );
    let Some(t) = w.tenant(tid) else {
        return insufficient(gx);
    };
    let behaviour = t.behaviour.clone();
    let blocked_msg = match behaviour.access_denied_message {
        AccessDeniedMessage::Documented => "Access to OData is disabled.",
        AccessDeniedMessage::Raop => {
            "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings."
        }
    };
    let permission = match access {
        Outcome::NoPermission => {
            return err(
                gx,
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            );
        }
        Outcome::DeniedByPolicy => {
            return err(gx, 403, "ErrorAccessDenied", blocked_msg);
        }
        Outcome::Granted { permission, .. } => permission,
    };
    if behaviour.admin_mailboxes_blocked && !user.directory_roles.is_empty() {
        return err(
            gx,
            403,
            "ErrorAccessDenied",
            "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
        );
    }
    if behaviour.ews_disabled_blocks_graph
        && let Some(p) = w.propagation.get(tid)
        && p.aap.view(fe, gx.now).ews_disabled.contains(&user.id)
    {
        return err(gx, 403, "ErrorAccessDenied", blocked_msg);
    }
    if !user.kind.has_mailbox() {
        return err(
            gx,
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        );
    }
    let basic_only = permission.starts_with("Mail.ReadBasic");
    let World { tenants, rng, .. } = w;
    let Some(t) = tenants.iter_mut().find(|t| t.id == tid) else {
        return insufficient(gx);
    };
    mailbox(t, gx, &mut rng.ids, &user, u, rest, m, q, body, basic_only)
}

fn strip_basic(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        for k in ["body", "bodyPreview", "uniqueBody", "attachments"] {
            m.remove(k);
        }
    }
    v
}

fn folder_id(data: &MailboxData, key: &str) -> Option<String> {
    data.folders
        .iter()
        .find(|f| {
            f["id"].as_str() == Some(key)
                || f["wellKnownName"]
                    .as_str()
                    .is_some_and(|w| w.eq_ignore_ascii_case(key))
        })
        .and_then(|f| f["id"].as_str().map(String::from))
}

#[allow(clippy::too_many_arguments)]
fn mailbox(
    t: &mut Tenant,
    gx: &Gx,
    rng: &mut impl rand::Rng,
    user: &Recipient,
    u: &str,
    rest: &[&str],
    m: &str,
    q: &[(String, String)],
    body: Option<&Value>,
    basic_only: bool,
) -> Reply {
    let domain = t.initial_domain.clone();
    let all_addresses: Vec<(String, String)> = t
        .recipients
        .iter()
        .filter(|r| r.kind.has_mailbox())
        .map(|r| (r.primary_smtp_address.to_lowercase(), r.id.clone()))
        .collect();
    let data = t
        .mailboxes
        .entry(user.id.clone())
        .or_insert_with(|| seed_mailbox(user, &domain, gx.wall, rng));
    let ctx = |s: &str| format!("users('{u}')/{s}");
    let msg_view = |v: &Value| {
        if basic_only {
            strip_basic(v.clone())
        } else {
            v.clone()
        }
    };
    let item_id = |prefix: &str, rng: &mut dyn rand::RngCore| format!("{prefix}{}", guid_like(rng));
    match (rest, m) {
        (["messages"], "GET") => list(
            gx,
            &ctx("messages"),
            data.messages.iter().map(msg_view).collect(),
            q,
            10,
            1000,
            &["subject", "isRead", "parentFolderId"],
        ),
        (["messages"], "POST") => {
            let Some(mut msg) = body.cloned().filter(Value::is_object) else {
                return bad_request(gx, "A message is required.");
            };
            let drafts = folder_id(data, "drafts");
            let now = ts(gx.wall);
            msg["id"] = json!(item_id("AAMkAG", rng));
            msg["isDraft"] = json!(true);
            msg["parentFolderId"] = json!(drafts);
            msg["createdDateTime"] = json!(now);
            msg["lastModifiedDateTime"] = json!(now);
            data.messages.push(msg.clone());
            Reply::json(
                201,
                with_context(msg, &format!("{}/$entity", ctx("messages"))),
            )
        }
        (["messages", id], _) => {
            let Some(i) = data
                .messages
                .iter()
                .position(|x| x["id"].as_str() == Some(id))
            else {
                return err(
                    gx,
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                );
            };
            match m {
                "GET" => Reply::json(
                    200,
                    select(
                        with_context(
                            msg_view(&data.messages[i]),
                            &format!("{}/$entity", ctx("messages")),
                        ),
                        q,
                    ),
                ),
                "PATCH" => {
                    if let (Some(b), Some(target)) = (
                        body.and_then(Value::as_object),
                        data.messages[i].as_object_mut(),
                    ) {
                        for (k, v) in b {
                            if k != "id" {
                                target.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    Reply::json(
                        200,
                        with_context(
                            data.messages[i].clone(),
                            &format!("{}/$entity", ctx("messages")),
                        ),
                    )
                }
                "DELETE" => {
                    data.messages.remove(i);
                    Reply::empty(204)
                }
                _ => err(gx, 405, "Request_BadRequest", "Method not allowed."),
            }
        }
        (["mailFolders"], "GET") => list(
            gx,
            &ctx("mailFolders"),
            data.folders
                .iter()
                .map(|f| {
                    let mut f = f.clone();
                    if let Value::Object(o) = &mut f {
                        o.remove("wellKnownName");
                    }
                    f
                })
                .collect(),
            q,
            10,
            1000,
            &["displayName"],
        ),
        (["mailFolders", f], "GET") => match folder_id(data, f)
            .and_then(|id| data.folders.iter().find(|x| x["id"] == json!(id)).cloned())
        {
            Some(mut folder) => {
                if let Value::Object(o) = &mut folder {
                    o.remove("wellKnownName");
                }
                Reply::json(
                    200,
                    with_context(folder, &format!("{}/$entity", ctx("mailFolders"))),
                )
            }
            None => err(
                gx,
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            ),
        },
        (["mailFolders", f, "messages"], "GET") => match folder_id(data, f) {
            Some(id) => {
                let items = data
                    .messages
                    .iter()
                    .filter(|x| x["parentFolderId"] == json!(id))
                    .map(msg_view)
                    .collect();
                list(
                    gx,
                    &ctx(&format!("mailFolders('{f}')/messages")),
                    items,
                    q,
                    10,
                    1000,
                    &["subject", "isRead"],
                )
            }
            None => err(
                gx,
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            ),
        },
        (["calendars"], "GET") => list(
            gx,
            &ctx("calendars"),
            data.calendars.clone(),
            q,
            10,
            1000,
            &["name"],
        ),
        (["calendar"], "GET") => match data.calendars.first() {
            Some(c) => Reply::json(
                200,
                with_context(c.clone(), &format!("{}/calendar/$entity", ctx(""))),
            ),
            None => err(
                gx,
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            ),
        },
        (["events"] | ["calendar", "events"], "GET") => list(
            gx,
            &ctx("events"),
            data.events.clone(),
            q,
            10,
            1000,
            &["subject"],
        ),
        (["calendars", cid, "events"], "GET") => {
            let items = data
                .events
                .iter()
                .filter(|e| e["calendarId"].as_str() == Some(cid))
                .cloned()
                .collect();
            list(
                gx,
                &ctx(&format!("calendars('{cid}')/events")),
                items,
                q,
                10,
                1000,
                &["subject"],
            )
        }
        (["events"] | ["calendar", "events"], "POST") => {
            let Some(mut ev) = body.cloned().filter(Value::is_object) else {
                return bad_request(gx, "An event is required.");
            };
            ev["id"] = json!(item_id("AAMkEv", rng));
            ev["calendarId"] = data
                .calendars
                .first()
                .map(|c| c["id"].clone())
                .unwrap_or(Value::Null);
            ev["organizer"] = json!({"emailAddress": {"name": user.display_name, "address": user.primary_smtp_address}});
            data.events.push(ev.clone());
            Reply::json(201, with_context(ev, &format!("{}/$entity", ctx("events"))))
        }
        (["events", id] | ["calendar", "events", id], _) => {
            let Some(i) = data
                .events
                .iter()
                .position(|x| x["id"].as_str() == Some(id))
            else {
                return err(
                    gx,
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                );
            };
            match m {
                "GET" => Reply::json(
                    200,
                    with_context(
                        data.events[i].clone(),
                        &format!("{}/$entity", ctx("events")),
                    ),
                ),
                "DELETE" => {
                    data.events.remove(i);
                    Reply::empty(204)
                }
                _ => err(gx, 405, "Request_BadRequest", "Method not allowed."),
            }
        }
        (["contacts"], "GET") => list(
            gx,
            &ctx("contacts"),
            data.contacts.clone(),
            q,
            10,
            1000,
            &["displayName"],
        ),
        (["contacts"], "POST") => {
            let Some(mut ct) = body.cloned().filter(Value::is_object) else {
                return bad_request(gx, "A contact is required.");
            };
            ct["id"] = json!(item_id("AAMkCt", rng));
            data.contacts.push(ct.clone());
            Reply::json(
                201,
                with_context(ct, &format!("{}/$entity", ctx("contacts"))),
            )
        }
        (["contacts", id], _) => {
            let Some(i) = data
                .contacts
                .iter()
                .position(|x| x["id"].as_str() == Some(id))
            else {
                return err(
                    gx,
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                );
            };
            match m {
                "GET" => Reply::json(
                    200,
                    with_context(
                        data.contacts[i].clone(),
                        &format!("{}/$entity", ctx("contacts")),
                    ),
                ),
                "DELETE" => {
                    data.contacts.remove(i);
                    Reply::empty(204)
                }
                _ => err(gx, 405, "Request_BadRequest", "Method not allowed."),
            }
        }
        (["mailboxSettings"], "GET") => Reply::json(
            200,
            with_context(data.settings.clone(), &ctx("mailboxSettings")),
        ),
        (["mailboxSettings"], "PATCH") => {
            if let (Some(b), Some(s)) = (
                body.and_then(Value::as_object),
                data.settings.as_object_mut(),
            ) {
                for (k, v) in b {
                    s.insert(k.clone(), v.clone());
                }
            }
            Reply::json(
                200,
                with_context(data.settings.clone(), &ctx("mailboxSettings")),
            )
        }
        (["sendMail"], "POST") => {
            let Some(message) = body
                .and_then(|b| b.get("message"))
                .filter(|v| v.is_object())
                .cloned()
            else {
                return err(
                    gx,
                    400,
                    "ErrorInvalidRequest",
                    "The request body must contain a message.",
                );
            };
            let recipients: Vec<String> = ["toRecipients", "ccRecipients", "bccRecipients"]
                .iter()
                .flat_map(|k| {
                    message
                        .get(*k)
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|r| {
                    r.pointer("/emailAddress/address")
                        .and_then(Value::as_str)
                        .map(str::to_lowercase)
                })
                .collect();
            if recipients.is_empty() || recipients.iter().any(|a| !a.contains('@')) {
                return err(
                    gx,
                    400,
                    "ErrorInvalidRecipients",
                    "At least one recipient is not valid., A message can't be sent because it contains no recipients.",
                );
            }
            let save = body
                .and_then(|b| b.get("saveToSentItems"))
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let now = ts(gx.wall);
            let mut sent = message.clone();
            sent["id"] = json!(item_id("AAMkAG", rng));
            sent["sentDateTime"] = json!(now);
            sent["receivedDateTime"] = json!(now);
            sent["isDraft"] = json!(false);
            sent["from"] = json!({"emailAddress": {"name": user.display_name, "address": user.primary_smtp_address}});
            sent["sender"] = sent["from"].clone();
            if save && let Some(f) = folder_id(data, "sentitems") {
                let mut copy = sent.clone();
                copy["parentFolderId"] = json!(f);
                data.messages.push(copy);
            }
            let record = json!({"from": user.primary_smtp_address, "sentAt": now, "recipients": recipients, "message": sent.clone()});
            // Deliver to mailboxes of this tenant.
            for (addr, rid) in &all_addresses {
                if recipients.contains(addr) {
                    let mbx = t.mailboxes.entry(rid.clone()).or_default();
                    if let Some(inbox) = folder_id(mbx, "inbox") {
                        let mut copy = sent.clone();
                        copy["id"] = json!(item_id("AAMkAG", rng));
                        copy["parentFolderId"] = json!(inbox);
                        copy["isRead"] = json!(false);
                        mbx.messages.push(copy);
                    }
                }
            }
            t.sent_mail.push(record);
            Reply::empty(202)
        }
        _ => err(
            gx,
            400,
            "BadRequest",
            &format!("Unsupported segment or method '{m} {}'.", rest.join("/")),
        ),
    }
}

/// JSON `$batch` (https://learn.microsoft.com/graph/json-batching): at most 20 requests, each
/// throttled and authorized separately, `dependsOn` ordering with 424 for dependants of failures,
/// responses in shuffled order.
fn batch(w: &mut World, gx: &Gx, body: Option<Value>) -> Reply {
    let Some(requests) = body
        .as_ref()
        .and_then(|b| b.get("requests"))
        .and_then(Value::as_array)
        .cloned()
    else {
        return err(gx, 400, "BadRequest", "Invalid batch payload format.");
    };
    if requests.is_empty() {
        return err(gx, 400, "BadRequest", "Invalid batch payload format.");
    }
    if requests.len() > 20 {
        return err(
            gx,
            400,
            "BadRequest",
            "The number of requests in the batch exceeds the limit of 20.",
        );
    }
    // Request ids are compared without case: `A` and `a` are duplicates, and duplicates fail
    // the whole batch (docs/microsoft-365.md §8.6).
    let mut ids = BTreeSet::new();
    for r in &requests {
        let id = r.get("id").and_then(|v| {
            v.as_str()
                .map(String::from)
                .or_else(|| v.as_i64().map(|n| n.to_string()))
        });
        let Some(id) = id else {
            return err(gx, 400, "BadRequest", "Each batch request needs an id.");
        };
        if !ids.insert(id.to_lowercase()) {
            return err(
                gx,
                400,
                "BadRequest",
                "Batch request contains duplicate request ids.",
            );
        }
        if r.get("method").and_then(Value::as_str).is_none()
            || r.get("url").and_then(Value::as_str).is_none()
        {
            return err(
                gx,
                400,
                "BadRequest",
                "Each batch request needs a method and a url.",
            );
        }
    }
    let behaviour = gx
        .tenant_id
        .as_deref()
        .and_then(|t| w.tenant(t))
        .map(|t| t.behaviour.clone())
        .unwrap_or_default();
    let mut statuses: std::collections::BTreeMap<String, u16> = Default::default();
    let mut responses = vec![];
    for r in &requests {
        let id = r
            .get("id")
            .and_then(|v| {
                v.as_str()
                    .map(String::from)
                    .or_else(|| v.as_i64().map(|n| n.to_string()))
            })
            .unwrap_or_default();
        let method = r
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_uppercase();
        let url = r
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim_start_matches('/')
            .trim_start_matches("v1.0/")
            .to_string();
        let depends: Vec<String> = r
            .get("dependsOn")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let (path, qs) = url
            .split_once('?')
            .map(|(p, q)| (p.to_string(), q.to_string()))
            .unwrap_or((url.clone(), String::new()));
        let fe = w.pick_front_end();
        let reply = if depends
            .iter()
            .any(|d| statuses.get(&d.to_lowercase()).is_none_or(|s| *s >= 400))
        {
            err(gx, 424, "FailedDependency", "Failed dependency.")
        } else if r.get("body").is_some()
            && !r
                .get("headers")
                .and_then(Value::as_object)
                .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("content-type")))
        {
            err(
                gx,
                400,
                "BadRequest",
                "Content-Type header is required for requests with a body.",
            )
        } else if let Some(Err(retry)) = gx
            .tenant_id
            .as_ref()
            .map(|t| w.take_budget(t, Api::Graph, gx.now))
        {
            with_retry_after(
                graph_throttled(&gx.request_id, &gx.client_request_id, gx.wall),
                retry,
                &behaviour,
                is_identity(&path),
                w.next_seq,
            )
        } else {
            dispatch(
                w,
                gx,
                fe,
                &method,
                &path,
                &url_decode_form(&qs),
                r.get("body"),
            )
        };
        statuses.insert(id.to_lowercase(), reply.status);
        w.record(CallRecord {
            seq: 0,
            at: gx.wall.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            api: Api::Graph,
            tenant: gx.tenant_id.clone(),
            method: method.clone(),
            path: format!("/v1.0/{url}"),
            endpoint: format!("graph:{method} /{}", template(&path)),
            cmdlet: None,
            parameters: None,
            body: r.get("body").cloned(),
            status: reply.status,
            app_id: gx.claims.as_ref().ok().map(|c| c.appid.clone()),
            front_end: Some(fe),
            batch_request_id: Some(id.clone()),
            fault: None,
            retry_after: reply
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .map(|(_, v)| v.clone()),
        });
        let mut headers = Map::new();
        for (k, v) in &reply.headers {
            headers.insert(k.clone(), json!(v));
        }
        let mut entry = json!({"id": id, "status": reply.status, "headers": headers});
        if let Some(b) = reply.json_body() {
            entry["headers"]["Content-Type"] = json!("application/json; charset=utf-8");
            entry["body"] = b.clone();
        }
        responses.push(entry);
    }
    responses.shuffle(&mut w.rng.front_ends);
    Reply::json(200, json!({"responses": responses}))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_hide_ids() {
        assert_eq!(
            template("applications/abc/addPassword"),
            "applications/{id}/addPassword"
        );
        assert_eq!(
            template("applications(appId='x')"),
            "applications(appId='{appId}')"
        );
        assert_eq!(
            template("users/a@b.c/messages/123"),
            "users/{id}/messages/{id}"
        );
        assert_eq!(
            template("servicePrincipals/s/appRoleAssignedTo/g"),
            "servicePrincipals/{id}/appRoleAssignedTo/{id}"
        );
    }

    #[test]
    fn keys_and_filters() {
        assert_eq!(
            split_key("applications(appId='x')"),
            ("applications", Some("x".into()))
        );
        assert_eq!(
            parse_filter(&[("$filter".into(), "appId eq 'abc'".into())]),
            Ok(Some(Filter::Eq("appId".into(), "abc".into())))
        );
        assert!(parse_filter(&[("$filter".into(), "startswith(displayName,'a')".into())]).is_err());
        for f in [
            "tags/any(t:t eq 'mailscope:crm')",
            "tags/any(x: x eq 'mailscope:crm')",
        ] {
            assert_eq!(
                parse_filter(&[("$filter".into(), f.into())]),
                Ok(Some(Filter::Any("tags".into(), "mailscope:crm".into()))),
                "{f}"
            );
        }
        assert!(parse_filter(&[("$filter".into(), "tags/any(t:x eq 'a')".into())]).is_err());
        assert!(parse_filter(&[("$filter".into(), "tags/any(t:t eq 'a'".into())]).is_err());
    }
}
