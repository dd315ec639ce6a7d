//! The sandbox control API under `/_sandbox/…`: create tenants, mailboxes, groups and app
//! credentials; read and change settings; watch propagation; read the recorded call log and
//! per-endpoint counters; move the clock; reset to the fixture.
//!
//! Changes made here are immediately visible (no replication lag); changes to group membership
//! propagate to Graph like any other change.
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::*;
use super::settings::{Behaviour, Pacing, parse_duration};
use super::state::{
    AppSpec, ManagementCredentials, Shared, World, create_app_with_grants, new_secret,
};
use super::tokens::pem_to_der;
use super::{base_url, state::TenantPropagation};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/info", web::get().to(info))
        .route("/settings", web::get().to(get_settings))
        .route("/settings", web::patch().to(patch_settings))
        .route("/tenants", web::get().to(list_tenants))
        .route("/tenants", web::post().to(create_tenant))
        .route("/tenants/{t}", web::get().to(get_tenant))
        .route("/tenants/{t}/settings", web::get().to(get_tenant_settings))
        .route(
            "/tenants/{t}/settings",
            web::patch().to(patch_tenant_settings),
        )
        .route("/tenants/{t}/mailboxes", web::post().to(create_recipient))
        .route("/tenants/{t}/recipients", web::post().to(create_recipient))
        .route(
            "/tenants/{t}/recipients/{r}",
            web::patch().to(patch_recipient),
        )
        .route("/tenants/{t}/groups", web::post().to(create_group))
        .route(
            "/tenants/{t}/administrative-units",
            web::post().to(create_administrative_unit),
        )
        .route(
            "/tenants/{t}/groups/{g}/members",
            web::post().to(add_member),
        )
        .route(
            "/tenants/{t}/groups/{g}/members/{m}",
            web::delete().to(remove_member),
        )
        .route(
            "/tenants/{t}/credentials",
            web::post().to(create_credentials),
        )
        .route("/tenants/{t}/sent-mail", web::get().to(sent_mail))
        .route("/tenants/{t}/propagation", web::get().to(propagation))
        .route("/tenants/{t}/propagation/settle", web::post().to(settle))
        .route("/calls", web::get().to(calls))
        .route("/calls", web::delete().to(clear_calls))
        .route("/counters", web::get().to(counters))
        .route("/counters", web::delete().to(clear_calls))
        .route("/clock", web::get().to(clock))
        .route("/clock/advance", web::post().to(advance_clock))
        .route("/reset", web::post().to(reset));
}

fn bad(status: u16, msg: impl Into<String>) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({"error": msg.into()}))
}

/// Parse a JSON body (an empty body is `{}`); the error is the 400 response to send.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Box<HttpResponse>> {
    let text: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(text).map_err(|e| Box::new(bad(400, format!("invalid JSON body: {e}"))))
}

async fn info(req: HttpRequest, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    HttpResponse::Ok().json(json!({
        "baseUrl": base_url(&req),
        "defaultTenantId": w.default_tenant_id,
        "managementApps": w.management.iter().map(|m| json!({"tenantId": m.tenant_id, "clientId": m.client_id})).collect::<Vec<_>>(),
        "seed": sh.seed,
        "pacing": w.pacing,
    }))
}

async fn get_settings(sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    HttpResponse::Ok().json(json!({"pacing": w.pacing, "defaultBehaviour": w.default_behaviour}))
}

fn merge<T: serde::Serialize + for<'de> Deserialize<'de>>(
    base: &T,
    patch: &Value,
) -> Result<T, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let (Some(o), Some(p)) = (v.as_object_mut(), patch.as_object()) else {
        return Err("expected a JSON object".into());
    };
    for (k, val) in p {
        if !o.contains_key(k) {
            return Err(format!("unknown setting `{k}`"));
        }
        o.insert(k.clone(), val.clone());
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// `PATCH /_sandbox/settings` with `{"pacing": {...}, "defaultBehaviour": {...}}` (or pacing keys
/// at the top level).
async fn patch_settings(body: web::Bytes, sh: web::Data<Shared>) -> HttpResponse {
    let patch: Value = match parse(&body) {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let mut w = sh.lock();
    let pacing_patch = patch.get("pacing").cloned().unwrap_or_else(|| {
        let mut p = patch.clone();
        if let Some(o) = p.as_object_mut() {
            o.remove("defaultBehaviour");
        }
        p
    });
    let pacing: Pacing = match merge(&w.pacing, &pacing_patch) {
        Ok(p) => p,
        Err(e) => return bad(400, e),
    };
    if !(0.0..=1.0).contains(&pacing.fault_5xx_rate)
        || !(0.0..=1.0).contains(&pacing.fault_drop_rate)
    {
        return bad(400, "fault rates must be between 0 and 1");
    }
    let behaviour: Behaviour = match patch.get("defaultBehaviour") {
        Some(b) => match merge(&w.default_behaviour, b) {
            Ok(b) => b,
            Err(e) => return bad(400, e),
        },
        None => w.default_behaviour.clone(),
    };
    let front_ends_changed = pacing.front_ends != w.pacing.front_ends;
    w.pacing = pacing;
    w.default_behaviour = behaviour;
    if front_ends_changed {
        let now = sh.clock.now();
        let ids: Vec<String> = w.tenants.iter().map(|t| t.id.clone()).collect();
        for id in ids {
            w.init_propagation(&id, now);
        }
    }
    HttpResponse::Ok().json(json!({"pacing": w.pacing, "defaultBehaviour": w.default_behaviour}))
}

fn tenant_summary(t: &Tenant) -> Value {
    json!({"id": t.id, "domain": t.initial_domain, "displayName": t.display_name,
        "managementClientId": t.management_app_id,
        "recipients": t.recipients.len(), "applications": t.applications.len(),
        "policies": t.policies.len(), "managementScopes": t.management_scopes.len(),
        "roleAssignments": t.role_assignments.len()})
}

async fn list_tenants(sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    HttpResponse::Ok()
        .json(json!({"value": w.tenants.iter().map(tenant_summary).collect::<Vec<_>>()}))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct NewTenant {
    id: Option<String>,
    domain: Option<String>,
    display_name: Option<String>,
    with_management_app: Option<bool>,
    behaviour: Option<Value>,
}

async fn create_tenant(body: web::Bytes, sh: web::Data<Shared>) -> HttpResponse {
    let n: NewTenant = match parse(&body) {
        Ok(n) => n,
        Err(e) => return *e,
    };
    let mut w = sh.lock();
    let wall = sh.clock.wall();
    let id = n.id.unwrap_or_else(|| guid(&mut w.rng.ids));
    if uuid::Uuid::parse_str(&id).is_err() {
        return bad(400, "tenant id must be a GUID");
    }
    let label: String = id.chars().take(8).collect();
    let domain = n
        .domain
        .unwrap_or_else(|| format!("sandbox-{label}.onmicrosoft.com"));
    if w.tenants
        .iter()
        .any(|t| t.answers_to(&id) || t.answers_to(&domain))
    {
        return bad(409, "a tenant with this id or domain already exists");
    }
    let behaviour = match &n.behaviour {
        Some(b) => match merge(&w.default_behaviour, b) {
            Ok(b) => b,
            Err(e) => return bad(400, e),
        },
        None => w.default_behaviour.clone(),
    };
    let World { rng, .. } = &mut *w;
    let mut t = Tenant::new(
        id.clone(),
        domain,
        n.display_name
            .unwrap_or_else(|| format!("Sandbox tenant {label}")),
        &mut rng.ids,
    );
    t.behaviour = behaviour;
    super::state::add_resource_principals(&mut t, wall, &mut rng.ids);
    let mut creds = None;
    if n.with_management_app.unwrap_or(true) {
        let secret = new_secret();
        match create_app_with_grants(&mut t, management_spec(secret.clone()), wall, &mut rng.ids) {
            Ok(c) => {
                t.management_app_id = Some(c.app_id.clone());
                creds = Some(ManagementCredentials {
                    tenant_id: id.clone(),
                    client_id: c.app_id,
                    client_secret: secret,
                });
            }
            Err(e) => return bad(500, e.to_string()),
        }
    }
    let summary = tenant_summary(&t);
    w.tenants.push(t);
    w.init_propagation(&id, sh.clock.now());
    if let Some(c) = &creds {
        w.management.push(c.clone());
    }
    HttpResponse::Created().json(json!({"tenant": summary,
        "management": creds.map(|c| json!({"clientId": c.client_id, "clientSecret": c.client_secret}))}))
}

fn management_spec(secret: String) -> AppSpec {
    AppSpec {
        display_name: "mailscope management".into(),
        app_id: None,
        secret: Some(secret),
        secret_end: None,
        graph_permissions: [
            "Application.ReadWrite.All",
            "AppRoleAssignment.ReadWrite.All",
            "Directory.Read.All",
            "User.Read.All",
            "Group.Read.All",
            "Organization.Read.All",
            "RoleManagement.ReadWrite.Directory",
        ]
        .map(String::from)
        .to_vec(),
        exchange_permissions: vec!["Exchange.ManageAsApp".into()],
        directory_roles: vec!["Exchange Administrator".into()],
        certificate_der: None,
    }
}

async fn get_tenant(path: web::Path<String>, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    let Some(t) = w.tenant(&path) else {
        return bad(404, "unknown tenant");
    };
    let now = sh.clock.now();
    HttpResponse::Ok().json(json!({
        "id": t.id, "domain": t.initial_domain, "displayName": t.display_name,
        "managementClientId": t.management_app_id,
        "behaviour": t.behaviour,
        "recipients": t.recipients.iter().map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["distinguishedName"] = json!(r.distinguished_name(t));
            v["recipientTypeDetails"] = json!(r.kind.recipient_type_details());
            v["replicating"] = json!(r.visible_at > now);
            v
        }).collect::<Vec<_>>(),
        "applications": t.applications,
        "servicePrincipals": t.service_principals.iter().map(|s| json!({"id": s.id, "appId": s.app_id, "displayName": s.display_name})).collect::<Vec<_>>(),
        "appRoleAssignments": t.app_role_grants,
        "directoryRoleAssignments": t.directory_role_assignments,
        "policies": t.policies,
        "exchangeServicePrincipals": t.exo_service_principals,
        "managementScopes": t.management_scopes,
        "roleAssignments": t.role_assignments,
        "administrativeUnits": t.administrative_units,
    }))
}

async fn get_tenant_settings(path: web::Path<String>, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    match w.tenant(&path) {
        Some(t) => HttpResponse::Ok().json(&t.behaviour),
        None => bad(404, "unknown tenant"),
    }
}

async fn patch_tenant_settings(
    path: web::Path<String>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let patch: Value = match parse(&body) {
        Ok(v) => v,
        Err(e) => return *e,
    };
    let mut w = sh.lock();
    let Some(t) = w.tenant_mut(&path) else {
        return bad(404, "unknown tenant");
    };
    match merge(&t.behaviour, &patch) {
        Ok(b) => {
            t.behaviour = b;
            HttpResponse::Ok().json(&t.behaviour)
        }
        Err(e) => bad(400, e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewRecipientBody {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    members: Vec<String>,
    #[serde(default)]
    directory_roles: Vec<String>,
    #[serde(default)]
    ews_enabled: Option<bool>,
}

fn recipient_view(t: &Tenant, r: &Recipient) -> Value {
    json!({"id": r.id, "exchangeObjectId": r.exchange_object_id, "name": r.name, "alias": r.alias,
        "displayName": r.display_name, "primarySmtpAddress": r.primary_smtp_address,
        "userPrincipalName": r.user_principal_name, "kind": r.kind,
        "recipientTypeDetails": r.kind.recipient_type_details(),
        "distinguishedName": r.distinguished_name(t), "sid": r.sid, "members": r.members})
}

fn add_recipient(
    w: &mut World,
    sh: &Shared,
    tenant: &str,
    n: NewRecipientBody,
    default_kind: RecipientKind,
    groups_only: bool,
) -> HttpResponse {
    let kind = match n.kind.as_deref() {
        None => default_kind,
        Some(k) => match RecipientKind::parse(k) {
            Some(k) => k,
            None => return bad(400, format!("unknown kind `{k}`")),
        },
    };
    if groups_only != kind.is_group() {
        return bad(
            400,
            if groups_only {
                "use /mailboxes for non-group recipients"
            } else {
                "use /groups for groups"
            },
        );
    }
    let wall = sh.clock.wall();
    let now = sh.clock.now();
    let World { tenants, rng, .. } = &mut *w;
    let Some(t) = tenants.iter_mut().find(|t| t.answers_to(tenant)) else {
        return bad(404, "unknown tenant");
    };
    if t.recipients
        .iter()
        .any(|r| r.name.eq_ignore_ascii_case(&n.name))
        || t.name_taken(&alias_from(&n.name))
    {
        return bad(409, "a recipient with this name already exists");
    }
    let mut member_ids = vec![];
    for m in &n.members {
        match t
            .recipients
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(m) || r.name.eq_ignore_ascii_case(m))
        {
            Some(r) => member_ids.push(r.id.clone()),
            None => return bad(400, format!("member `{m}` not found")),
        }
    }
    let mut roles = vec![];
    for role in &n.directory_roles {
        match directory_role_id(role) {
            Some(id) => roles.push(id.to_string()),
            None => return bad(400, format!("unknown directory role `{role}`")),
        }
    }
    let mut r = build_recipient(
        t,
        NewRecipient {
            kind,
            name: n.name,
            display_name: n.display_name,
            alias: n.alias,
            primary_smtp_address: None,
            id: None,
            properties: n.properties,
            members: member_ids,
        },
        wall,
        Duration::ZERO,
        &mut rng.ids,
    );
    r.directory_roles = roles;
    r.ews_enabled = n.ews_enabled;
    if r.kind.has_mailbox() {
        let data = seed_mailbox(&r, &t.initial_domain, wall, &mut rng.ids);
        t.mailboxes.insert(r.id.clone(), data);
    }
    let view = recipient_view(t, &r);
    let tid = t.id.clone();
    t.recipients.push(r);
    w.publish(&tid, now);
    HttpResponse::Created().json(view)
}

async fn create_recipient(
    path: web::Path<String>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let n: NewRecipientBody = match parse(&body) {
        Ok(n) => n,
        Err(e) => return *e,
    };
    let mut w = sh.lock();
    add_recipient(&mut w, &sh, &path, n, RecipientKind::UserMailbox, false)
}

async fn create_group(
    path: web::Path<String>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let n: NewRecipientBody = match parse(&body) {
        Ok(n) => n,
        Err(e) => return *e,
    };
    let mut w = sh.lock();
    add_recipient(
        &mut w,
        &sh,
        &path,
        n,
        RecipientKind::MailUniversalSecurityGroup,
        true,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PatchRecipient {
    #[serde(default)]
    ews_enabled: Option<Option<bool>>,
    #[serde(default)]
    properties: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    display_name: Option<String>,
}

async fn patch_recipient(
    path: web::Path<(String, String)>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let (tenant, rid) = path.into_inner();
    let p: PatchRecipient = match parse(&body) {
        Ok(p) => p,
        Err(e) => return *e,
    };
    let now = sh.clock.now();
    let mut w = sh.lock();
    let Some(t) = w.tenant_mut(&tenant) else {
        return bad(404, "unknown tenant");
    };
    let tid = t.id.clone();
    let Some(r) = t
        .recipients
        .iter_mut()
        .find(|r| r.id.eq_ignore_ascii_case(&rid) || r.name.eq_ignore_ascii_case(&rid))
    else {
        return bad(404, "unknown recipient");
    };
    if let Some(e) = p.ews_enabled {
        r.ews_enabled = e;
    }
    if let Some(props) = p.properties {
        r.properties.extend(props);
    }
    if let Some(d) = p.display_name {
        r.display_name = d;
    }
    let r = r.clone();
    let view = w
        .tenant(&tid)
        .map(|t| recipient_view(t, &r))
        .unwrap_or_default();
    w.publish(&tid, now);
    HttpResponse::Ok().json(view)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewAdministrativeUnit {
    display_name: String,
    /// Recipients by id or name.
    #[serde(default)]
    members: Vec<String>,
}

/// An Entra administrative unit with recipients as members (for `-RecipientAdministrativeUnitScope`).
async fn create_administrative_unit(
    path: web::Path<String>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let n: NewAdministrativeUnit = match parse(&body) {
        Ok(n) => n,
        Err(e) => return *e,
    };
    let now = sh.clock.now();
    let mut w = sh.lock();
    let id = guid(&mut w.rng.ids);
    let Some(t) = w.tenant_mut(&path) else {
        return bad(404, "unknown tenant");
    };
    let mut members = Vec::new();
    for m in &n.members {
        match t
            .recipients
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(m) || r.name.eq_ignore_ascii_case(m))
        {
            Some(r) => members.push(r.id.clone()),
            None => return bad(404, format!("unknown recipient `{m}`")),
        }
    }
    let unit = AdministrativeUnit {
        id,
        display_name: n.display_name,
        members,
    };
    t.administrative_units.push(unit.clone());
    let tid = t.id.clone();
    w.publish(&tid, now);
    HttpResponse::Created().json(unit)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MemberBody {
    member: String,
}

async fn add_member(
    path: web::Path<(String, String)>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let (tenant, group) = path.into_inner();
    let m: MemberBody = match parse(&body) {
        Ok(m) => m,
        Err(e) => return *e,
    };
    change_membership(&sh, &tenant, &group, &m.member, true)
}

async fn remove_member(
    path: web::Path<(String, String, String)>,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let (tenant, group, member) = path.into_inner();
    change_membership(&sh, &tenant, &group, &member, false)
}

fn change_membership(
    sh: &Shared,
    tenant: &str,
    group: &str,
    member: &str,
    add: bool,
) -> HttpResponse {
    let now = sh.clock.now();
    let mut w = sh.lock();
    let Some(t) = w.tenant_mut(tenant) else {
        return bad(404, "unknown tenant");
    };
    let tid = t.id.clone();
    let find = |t: &Tenant, x: &str| {
        t.recipients
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(x) || r.name.eq_ignore_ascii_case(x))
            .map(|r| r.id.clone())
    };
    let (Some(gid), Some(mid)) = (find(t, group), find(t, member)) else {
        return bad(404, "unknown group or member");
    };
    let Some(g) = t.recipient_mut(&gid).filter(|g| g.kind.is_group()) else {
        return bad(400, "not a group");
    };
    if add {
        if !g.members.contains(&mid) {
            g.members.push(mid);
        }
    } else {
        g.members.retain(|x| *x != mid);
    }
    let members = g.members.clone();
    w.publish(&tid, now);
    HttpResponse::Ok().json(json!({"members": members}))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct CredentialsBody {
    display_name: Option<String>,
    app_id: Option<String>,
    graph_permissions: Vec<String>,
    exchange_permissions: Vec<String>,
    directory_roles: Vec<String>,
    /// Register the secret as already expired (to see AADSTS7000222).
    secret_expired: bool,
    /// Register no secret at all.
    no_secret: bool,
    /// PEM of an X.509 certificate to register as a key credential.
    certificate_pem: Option<String>,
}

/// `POST /_sandbox/tenants/{t}/credentials`: register an app with a secret (returned once),
/// admin-consented permissions and directory roles.
async fn create_credentials(
    path: web::Path<String>,
    body: web::Bytes,
    sh: web::Data<Shared>,
) -> HttpResponse {
    let b: CredentialsBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return *e,
    };
    let cert = match &b.certificate_pem {
        Some(pem) => {
            match pem_to_der(pem).filter(|d| super::tokens::certificate_public_key(d).is_some()) {
                Some(d) => Some(d),
                None => return bad(400, "certificatePem is not an RSA X.509 certificate in PEM"),
            }
        }
        None => None,
    };
    let wall = sh.clock.wall();
    let secret = (!b.no_secret).then(new_secret);
    let mut w = sh.lock();
    let World { tenants, rng, .. } = &mut *w;
    let Some(t) = tenants.iter_mut().find(|t| t.answers_to(&path)) else {
        return bad(404, "unknown tenant");
    };
    let spec = AppSpec {
        display_name: b.display_name.unwrap_or_else(|| "sandbox app".into()),
        app_id: b.app_id,
        secret: secret.clone(),
        secret_end: b.secret_expired.then(|| wall - chrono::Duration::days(1)),
        graph_permissions: b.graph_permissions,
        exchange_permissions: b.exchange_permissions,
        directory_roles: b.directory_roles,
        certificate_der: cert.clone(),
    };
    match create_app_with_grants(t, spec, wall, &mut rng.ids) {
        Ok(c) => HttpResponse::Created().json(json!({
            "tenantId": t.id, "clientId": c.app_id, "clientSecret": secret,
            "applicationObjectId": c.object_id, "servicePrincipalId": c.service_principal_id,
            "certificateThumbprint": cert.as_ref().map(|d| super::tokens::thumbprint_hex(d)),
        })),
        Err(e) => bad(400, e.to_string()),
    }
}

async fn sent_mail(path: web::Path<String>, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    match w.tenant(&path) {
        Some(t) => HttpResponse::Ok().json(json!({"value": t.sent_mail})),
        None => bad(404, "unknown tenant"),
    }
}

async fn propagation(path: web::Path<String>, sh: web::Data<Shared>) -> HttpResponse {
    let now = sh.clock.now();
    let w = sh.lock();
    let Some(t) = w.tenant(&path) else {
        return bad(404, "unknown tenant");
    };
    let Some(TenantPropagation {
        aap,
        rbac,
        rbac_apps,
    }) = w.propagation.get(&t.id)
    else {
        return bad(404, "no propagation state");
    };
    HttpResponse::Ok().json(json!({
        "settled": aap.settled(now) && rbac.settled(now),
        "applicationAccessPolicies": aap.status(now),
        "rbac": rbac.status(now),
        // Apps holding a per-app RBAC permission cache entry (cleared by settle).
        "rbacAppCaches": rbac_apps.len(),
    }))
}

async fn settle(path: web::Path<String>, sh: web::Data<Shared>) -> HttpResponse {
    let now = sh.clock.now();
    let mut w = sh.lock();
    let Some(id) = w.tenant(&path).map(|t| t.id.clone()) else {
        return bad(404, "unknown tenant");
    };
    if let Some(p) = w.propagation.get_mut(&id) {
        p.aap.settle(now);
        p.rbac.settle(now);
        p.rbac_apps.clear();
    }
    HttpResponse::Ok().json(json!({"settled": true}))
}

#[derive(Deserialize)]
struct CallsQuery {
    api: Option<String>,
    tenant: Option<String>,
    cmdlet: Option<String>,
    endpoint: Option<String>,
    since: Option<u64>,
}

/// `GET /_sandbox/calls`: the recorded calls in order (filters: api, tenant, cmdlet, endpoint,
/// since=<seq>).
async fn calls(q: web::Query<CallsQuery>, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    let tenant = q
        .tenant
        .as_deref()
        .and_then(|t| w.tenant(t).map(|x| x.id.clone()).or(Some(t.to_string())));
    let list: Vec<_> = w
        .calls
        .iter()
        .filter(|c| q.api.as_deref().is_none_or(|a| c.api.as_str() == a))
        .filter(|c| {
            tenant
                .as_deref()
                .is_none_or(|t| c.tenant.as_deref() == Some(t))
        })
        .filter(|c| {
            q.cmdlet.as_deref().is_none_or(|x| {
                c.cmdlet
                    .as_deref()
                    .is_some_and(|y| y.eq_ignore_ascii_case(x))
            })
        })
        .filter(|c| q.endpoint.as_deref().is_none_or(|e| c.endpoint == e))
        .filter(|c| q.since.is_none_or(|s| c.seq > s))
        .collect();
    HttpResponse::Ok().json(json!({"value": list}))
}

async fn clear_calls(sh: web::Data<Shared>) -> HttpResponse {
    let mut w = sh.lock();
    w.calls.clear();
    w.counters.clear();
    HttpResponse::NoContent().finish()
}

#[derive(Deserialize)]
struct CountersQuery {
    tenant: Option<String>,
}

/// `GET /_sandbox/counters`: calls per endpoint, per tenant (`?tenant=` for one tenant).
async fn counters(q: web::Query<CountersQuery>, sh: web::Data<Shared>) -> HttpResponse {
    let w = sh.lock();
    match &q.tenant {
        Some(t) => {
            let id = w
                .tenant(t)
                .map(|x| x.id.clone())
                .unwrap_or_else(|| t.clone());
            HttpResponse::Ok().json(w.counters.get(&id).cloned().unwrap_or_default())
        }
        None => HttpResponse::Ok().json(&w.counters),
    }
}

async fn clock(sh: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"now": sh.clock.wall().to_rfc3339(), "elapsedSeconds": sh.clock.now().as_secs_f64()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceBody {
    by: Option<String>,
    seconds: Option<f64>,
}

/// `POST /_sandbox/clock/advance` with `{"by": "10m"}` or `{"seconds": 600}`.
async fn advance_clock(body: web::Bytes, sh: web::Data<Shared>) -> HttpResponse {
    let b: AdvanceBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return *e,
    };
    let by = match (b.by, b.seconds) {
        (Some(s), _) => match parse_duration(&s) {
            Ok(d) => d,
            Err(e) => return bad(400, e),
        },
        (None, Some(s)) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
        _ => return bad(400, "give `by` (e.g. \"10m\") or `seconds`"),
    };
    sh.clock.advance(by);
    HttpResponse::Ok().json(json!({"now": sh.clock.wall().to_rfc3339(), "elapsedSeconds": sh.clock.now().as_secs_f64()}))
}

async fn reset(sh: web::Data<Shared>) -> HttpResponse {
    match sh.reset() {
        Ok(()) => HttpResponse::Ok().json(json!({"reset": true})),
        Err(e) => bad(500, e.to_string()),
    }
}
