//! `/v1/tenants/{tenant_id}/scope-groups`: the mail-enabled security groups that define which
//! mailboxes an app may reach (reference §2.4, §4).
//!
//! A scope group is keyed by its alias. `PUT` makes the tenant match the request: it looks the
//! group up in Exchange first (so a retry after a crash between Exchange's create and mailscope's
//! write adopts the group instead of failing or duplicating), creates it with its whole member
//! list in one `New-DistributionGroup -Type Security`, or sets the whole list in one
//! `Update-DistributionGroupMember`. Writers of one alias are serialised by a transaction-scoped
//! advisory lock taken before the look-up, so concurrent identical requests create one group.
//!
//! Members are checked with `Get-Recipient` before Exchange is changed: unknown addresses and
//! recipients that make no sense in a scope (groups, contacts) are refused with 422 naming them.
use std::collections::BTreeSet;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::audit::record as audit;
use super::problem::{ApiError, FieldError, Problem, ProblemKind};
use super::tenants::tenant_handle;
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::address::is_address;
use crate::m365::M365Error;
use crate::m365::exchange::{
    DistributionGroup, ExchangeClient, NewSecurityGroup, Recipient, Replication,
    SetDistributionGroup,
};
use crate::provisioning::scope_groups::{
    POLICY_LOCK, current_members, group_object_id, ids_of, lock_group, maybe_exists,
    primary_address,
};
use crate::store::{self, scope_groups::ScopeGroupRecord};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/tenants/{tenant_id}/scope-groups",
        web::get().to(list_scope_groups),
    )
    .service(
        web::resource("/tenants/{tenant_id}/scope-groups/{alias}")
            .route(web::put().to(put_scope_group))
            .route(web::get().to(get_scope_group))
            .route(web::delete().to(delete_scope_group)),
    )
    .route(
        "/tenants/{tenant_id}/scope-groups/{alias}/members",
        web::post().to(add_members),
    )
    .route(
        "/tenants/{tenant_id}/scope-groups/{alias}/members/{address}",
        web::delete().to(remove_member),
    );
}

/// Most members one request may name (Exchange's `-Members` limit).
const MAX_MEMBERS: usize = 10_000;
/// Parallel `Get-Recipient` look-ups per request; the connector's per-tenant limiter still applies.
const LOOKUP_CONCURRENCY: usize = 4;

/// How `members` in a `PUT` relate to the group's current members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Membership {
    /// The group holds exactly the listed members; others are removed.
    #[default]
    Exact,
    /// The listed members are added; nobody is removed.
    Additive,
}

impl Membership {
    fn as_str(self) -> &'static str {
        match self {
            Membership::Exact => "exact",
            Membership::Additive => "additive",
        }
    }
    fn parse(s: &str) -> Membership {
        if s == "additive" {
            Membership::Additive
        } else {
            Membership::Exact
        }
    }
}

/// The desired state of a scope group.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "display_name": "CRM connector scope",
    "members": ["alice@contoso-sandbox.onmicrosoft.com", "support@contoso-sandbox.onmicrosoft.com"],
    "membership": "exact"
}))]
pub struct ScopeGroupInput {
    /// Defaults to the alias.
    pub display_name: Option<String>,
    /// Mailbox or mail-user addresses (UPN or any SMTP address of the recipient). Shared, room
    /// and equipment mailboxes are fine here.
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub membership: Membership,
}

/// Members to add: `{"members": [...]}`, or send `text/csv` with a `UserPrincipalName` column.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"members": ["bob@contoso-sandbox.onmicrosoft.com"]}))]
pub struct MembersInput {
    pub members: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ScopeGroup {
    #[schema(example = "crm-scope")]
    pub alias: String,
    pub display_name: String,
    #[schema(example = "crm-scope@contoso-sandbox.onmicrosoft.com")]
    pub primary_smtp_address: String,
    /// The group's Entra object id (the scope object id of its policies).
    pub object_id: String,
    pub membership: Membership,
    /// Primary SMTP addresses, lower case, sorted. Read live from Exchange by
    /// `GET /scope-groups/{alias}`; as last recorded by mailscope in lists.
    pub members: Vec<String>,
    /// `created` (mailscope made it; DELETE removes it from the tenant), `adopted` or `imported`
    /// (it existed before; DELETE only forgets it).
    #[schema(example = "created")]
    pub origin: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ScopeGroupList {
    pub items: Vec<ScopeGroup>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

/// The outcome of adding members.
#[derive(Serialize, ToSchema)]
pub struct MembersAdded {
    /// Newly added (primary SMTP addresses).
    pub added: Vec<String>,
    /// Already members before this request.
    pub already_members: Vec<String>,
    pub scope_group: ScopeGroup,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ScopeGroupListQuery {
    /// Page size, 1–500 (default 50).
    pub limit: Option<i64>,
    /// Cursor: the `next_after` of the previous page.
    pub after: Option<String>,
}

pub(crate) fn view(r: ScopeGroupRecord, members: Option<Vec<String>>) -> ScopeGroup {
    ScopeGroup {
        alias: r.alias,
        display_name: r.display_name,
        primary_smtp_address: r.primary_smtp_address,
        object_id: r.object_id,
        membership: Membership::parse(&r.membership),
        members: members.unwrap_or(r.members),
        origin: r.origin,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// Why a recipient should not be a scope-group member, if it should not.
fn member_refusal(r: &Recipient) -> Option<String> {
    match r.recipient_type_details.as_deref().unwrap_or("unknown") {
        "UserMailbox" | "SharedMailbox" | "RoomMailbox" | "EquipmentMailbox" | "MailUser" => None,
        "MailContact" => {
            Some("a mail contact has no mailbox in this tenant for an app to reach".into())
        }
        t if t.contains("Group") => Some(format!(
            "a group ({t}) cannot be added: whether policies count members of nested groups is unverified (reference §2.5), so mailscope adds mailboxes directly"
        )),
        t => Some(format!(
            "a recipient of type {t} cannot be a scope-group member"
        )),
    }
}

/// Look up each (label, address) with `Get-Recipient`; 422 naming every unknown or unsuitable
/// one. Returns the recipients in input order.
async fn resolve_members(
    exo: &ExchangeClient,
    wanted: Vec<(String, String)>,
) -> Result<Vec<Recipient>, ApiError> {
    let looked_up: Vec<(String, String, Result<Option<Recipient>, M365Error>)> =
        futures_util::stream::iter(wanted)
            .map(|(label, address)| async move {
                let r = exo.get_recipient(&address, Replication::Ignore).await;
                (label, address, r)
            })
            .buffered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
    let mut errs = Vec::new();
    let mut found = Vec::new();
    for (label, address, r) in looked_up {
        match r? {
            None => errs.push(FieldError {
                field: label,
                message: format!("no recipient with the address {address} exists in the tenant"),
            }),
            Some(rec) => match member_refusal(&rec) {
                Some(why) => errs.push(FieldError {
                    field: label,
                    message: format!("{address}: {why}"),
                }),
                None if primary_address(&rec).is_none() => errs.push(FieldError {
                    field: label,
                    message: format!("{address} has no primary SMTP address"),
                }),
                None => found.push(rec),
            },
        }
    }
    if errs.is_empty() {
        Ok(found)
    } else {
        Err(ApiError::validation(errs))
    }
}

/// Normalise and check addresses: lower case, deduplicated, each an address.
fn check_addresses(
    items: &[(String, String)],
    errs: &mut Vec<FieldError>,
) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if items.len() > MAX_MEMBERS {
        errs.push(FieldError {
            field: "members".into(),
            message: format!("at most {MAX_MEMBERS} members"),
        });
        return out;
    }
    for (label, raw) in items {
        let a = raw.trim().to_ascii_lowercase();
        if !is_address(&a) {
            errs.push(FieldError {
                field: label.clone(),
                message: format!("`{raw}` is not an email address"),
            });
        } else if seen.insert(a.clone()) {
            out.push((label.clone(), a));
        }
    }
    out
}

fn check_alias(alias: &str) -> Result<String, ApiError> {
    let a = alias.trim().to_ascii_lowercase();
    let ok = !a.is_empty()
        && a.len() <= 64
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !a.starts_with('.')
        && !a.ends_with('.');
    if ok {
        Ok(a)
    } else {
        Err(ApiError::new(
            ProblemKind::InvalidPathParameter,
            "alias must be 1 to 64 characters: letters, digits, '-', '_' or '.' (not at either end)",
        ))
    }
}

fn group_fields(g: &DistributionGroup, alias: &str) -> Result<(String, String), ApiError> {
    let oid = group_object_id(g).ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "Exchange returned group {alias} without an object id"
        ))
    })?;
    let smtp = g
        .primary_smtp_address
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase();
    Ok((oid, smtp))
}

/// A group found in the tenant under this alias must be a mail-enabled security group.
fn require_security_group(g: &DistributionGroup, alias: &str) -> Result<(), ApiError> {
    match g.recipient_type_details.as_deref() {
        Some("MailUniversalSecurityGroup") => Ok(()),
        other => Err(ApiError {
            errors: vec![FieldError {
                field: "alias".into(),
                message: format!(
                    "a {} with this alias already exists in the tenant and cannot be a policy scope; choose another alias",
                    other.unwrap_or("group")
                ),
            }],
            ..ApiError::new(
                ProblemKind::InvalidPolicyScope,
                format!(
                    "the tenant already has a group `{alias}` of type {}, which cannot scope an application access policy (only mail-enabled security groups can)",
                    other.unwrap_or("unknown")
                ),
            )
        }),
    }
}

// ---------- handlers ----------

/// Ensure a scope group exists with the given members.
///
/// Idempotent by alias. Looks the group up in Exchange before creating it, so a group created by
/// an interrupted earlier attempt (or by someone else) is adopted, never duplicated. A new group
/// is created with its whole member list in one call; an existing one gets its whole list set in
/// one `Update-DistributionGroupMember` only when it differs.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/scope-groups/{alias}", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("alias" = String, Path, description = "The group's Exchange alias (also its name)")),
    request_body = ScopeGroupInput,
    responses(
        (status = 201, description = "created in the tenant, or adopted from it", body = ScopeGroup),
        (status = 200, description = "updated, or already as requested", body = ScopeGroup),
        (status = 400, description = "malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid content, unknown member address, or the alias belongs to a group that cannot be a policy scope", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed (the code names the cause)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "database unavailable or Microsoft throttling (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn put_scope_group(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Json<ScopeGroupInput>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, alias) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let alias = check_alias(&alias)?;
    let input = body.into_inner();
    let mut errs = Vec::new();
    let display_name = input
        .display_name
        .as_deref()
        .map(str::trim)
        .unwrap_or(&alias)
        .to_string();
    if display_name.is_empty() || display_name.chars().count() > 256 {
        errs.push(FieldError {
            field: "display_name".into(),
            message: "must be 1 to 256 characters".into(),
        });
    }
    let labelled: Vec<(String, String)> = input
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("members[{i}]"), m.clone()))
        .collect();
    let wanted = check_addresses(&labelled, &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();

    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_group(&tx, tenant_id, &alias).await?;
    let existing = store::scope_groups::get(&tx, tenant_id, &alias).await?;

    // Look up before creating: the record's object id when mailscope knows the group, else the
    // alias (a group left by a crashed attempt, or made outside mailscope, is adopted).
    let lookup = existing
        .as_ref()
        .map_or(alias.as_str(), |e| e.object_id.as_str());
    let found = exo
        .get_distribution_group(lookup, Replication::Ignore)
        .await?;
    if let Some(g) = &found {
        require_security_group(g, &alias)?;
    }
    let current = match &found {
        Some(g) => current_members(&exo, &group_fields(g, &alias)?.0).await?,
        None => BTreeSet::new(),
    };
    // Only addresses not already listed as members need checking.
    let to_check: Vec<(String, String)> = wanted
        .iter()
        .filter(|(_, a)| !current.contains(a))
        .cloned()
        .collect();
    let resolved = resolve_members(&exo, to_check).await?;
    let mut requested: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, a)| current.contains(a))
        .map(|(_, a)| a.clone())
        .collect();
    requested.extend(resolved.iter().filter_map(primary_address));
    let desired: BTreeSet<String> = match input.membership {
        Membership::Exact => requested,
        Membership::Additive => current.union(&requested).cloned().collect(),
    };
    let desired_list: Vec<String> = desired.iter().cloned().collect();

    let mut exchange_changes: Vec<&str> = Vec::new();
    let (group, origin) = match found {
        Some(g) => (
            g,
            existing.as_ref().map_or("adopted", |e| e.origin.as_str()),
        ),
        None => {
            let new = NewSecurityGroup {
                name: alias.clone(),
                display_name: Some(display_name.clone()),
                alias: Some(alias.clone()),
                members: desired_list.clone(),
                ..Default::default()
            };
            match exo.new_security_group(&new).await {
                Ok(g) => {
                    exchange_changes.push("created");
                    (g, "created")
                }
                // The name may have been taken a moment ago by an attempt whose response was
                // lost: adopt it if it is now visible.
                Err(e) if maybe_exists(&e) => {
                    match exo
                        .get_distribution_group(&alias, Replication::Ignore)
                        .await?
                    {
                        Some(g) => {
                            require_security_group(&g, &alias)?;
                            (g, "adopted")
                        }
                        None => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let (object_id, smtp) = group_fields(&group, &alias)?;
    if !exchange_changes.contains(&"created") {
        if group.display_name.as_deref() != Some(display_name.as_str()) {
            let set = SetDistributionGroup {
                display_name: Some(display_name.clone()),
                ..Default::default()
            };
            exo.set_distribution_group(&object_id, &set).await?;
            exchange_changes.push("display_name");
        }
        // Re-read when adopting after a failed create: `current` was empty then.
        let now_current = if origin == "adopted" && existing.is_none() && current.is_empty() {
            current_members(&exo, &object_id).await?
        } else {
            current.clone()
        };
        if now_current != desired {
            exo.update_distribution_group_members(&object_id, &desired_list)
                .await?;
            exchange_changes.push("members");
        }
    }
    let added: Vec<&String> = desired.difference(&current).collect();
    let removed: Vec<&String> = current.difference(&desired).collect();

    let record = ScopeGroupRecord {
        tenant_id,
        alias: alias.clone(),
        display_name,
        primary_smtp_address: smtp,
        object_id,
        membership: input.membership.as_str().into(),
        members: desired_list,
        origin: origin.into(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let unchanged_record = existing.as_ref().is_some_and(|e| {
        ScopeGroupRecord {
            created_at: e.created_at,
            updated_at: e.updated_at,
            ..record.clone()
        } == *e
    });
    if unchanged_record && exchange_changes.is_empty() {
        tx.commit().await.map_err(store::StoreError::from)?;
        let e = existing.unwrap_or(record);
        return Ok(HttpResponse::Ok().json(view(e, None)));
    }
    let stored = store::scope_groups::upsert(&tx, &record).await?;
    let action = match (&existing, origin) {
        (None, "created") => "scope_group.created",
        (None, _) => "scope_group.adopted",
        _ => "scope_group.updated",
    };
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        action,
        &format!("scope_group/{alias}"),
        serde_json::json!({
            "exchange_changes": exchange_changes, "members_added": added,
            "members_removed": removed, "membership": input.membership.as_str(),
            "object_id": stored.object_id,
        }),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    let location = req.path().to_string();
    let v = view(stored, None);
    Ok(if existing.is_none() {
        HttpResponse::Created()
            .insert_header((header::LOCATION, location))
            .json(v)
    } else {
        HttpResponse::Ok().json(v)
    })
}

/// One scope group, with its members read live from Exchange.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/scope-groups/{alias}", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("alias" = String, Path, description = "The group's alias")),
    responses(
        (status = 200, description = "the group with its current members", body = ScopeGroup),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown group, gone from the tenant, or tenant not visible", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_scope_group(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let (tenant_id, alias) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let alias = check_alias(&alias)?;
    let db = state.db().await?;
    let rec = store::scope_groups::get(&db, tenant_id, &alias)
        .await?
        .ok_or_else(|| group_not_found(&alias))?;
    drop(db);
    let exo = handle.exchange();
    if exo
        .get_distribution_group(&rec.object_id, Replication::Ignore)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "scope group {alias} was removed from the tenant outside mailscope; PUT it to recreate it, or POST /sync to reconcile"
        )));
    }
    let members: Vec<String> = current_members(&exo, &rec.object_id)
        .await?
        .into_iter()
        .collect();
    Ok(HttpResponse::Ok().json(view(rec, Some(members))))
}

fn group_not_found(alias: &str) -> ApiError {
    ApiError::not_found(format!(
        "mailscope has no scope group `{alias}` in this tenant"
    ))
}

/// The tenant's scope groups, by alias (members as last recorded by mailscope).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/scope-groups", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"), ScopeGroupListQuery),
    responses(
        (status = 200, description = "a page of scope groups", body = ScopeGroupList),
        (status = 400, description = "invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "tenant not visible", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list_scope_groups(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<Uuid>,
    q: web::Query<ScopeGroupListQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Read)?;
    let tenant_id = path.into_inner();
    caller.require_tenant(tenant_id)?;
    let limit = page_limit(q.limit)?;
    let db = state.db().await?;
    super::require_registered(&db, tenant_id).await?;
    let rows = store::scope_groups::list(&db, tenant_id, q.after.as_deref(), limit + 1).await?;
    let (rows, more) = super::split_page(rows, limit);
    let items: Vec<ScopeGroup> = rows.into_iter().map(|r| view(r, None)).collect();
    let next_after = if more {
        items.last().map(|g| g.alias.clone())
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(ScopeGroupList { items, next_after }))
}

/// Delete a scope group: removed from the tenant if mailscope created it, only forgotten if it
/// was adopted or imported. Refused (409) while any access policy (mailscope's or the tenant's)
/// uses it as its scope.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/scope-groups/{alias}", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("alias" = String, Path, description = "The group's alias")),
    responses(
        (status = 204, description = "deleted (or forgotten)"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown group or tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a policy uses the group (`scope_group_in_use`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_scope_group(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, alias) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let alias = check_alias(&alias)?;
    let exo = handle.exchange();
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    // Policy lock first (the one lock order): no policy can start using the group meanwhile.
    store::lock_key(&tx, POLICY_LOCK, &tenant_id.to_string()).await?;
    lock_group(&tx, tenant_id, &alias).await?;
    let rec = store::scope_groups::get(&tx, tenant_id, &alias)
        .await?
        .ok_or_else(|| group_not_found(&alias))?;
    let in_use = store::access_policies::count_by_scope(&tx, tenant_id, &rec.object_id).await?;
    if in_use > 0 {
        return Err(ApiError::new(
            ProblemKind::ScopeGroupInUse,
            format!(
                "scope group {alias} is the scope of {in_use} access polic{} in mailscope; delete or replace {} first",
                if in_use == 1 { "y" } else { "ies" },
                if in_use == 1 { "it" } else { "them" }
            ),
        ));
    }
    let group = exo
        .get_distribution_group(&rec.object_id, Replication::Ignore)
        .await?;
    if let Some(g) = &group {
        let ids = ids_of(g.external_directory_object_id.as_deref(), g.guid.as_deref());
        let outside: Vec<String> = exo
            .list_application_access_policies()
            .await?
            .into_iter()
            .filter(|p| {
                p.scope_group_guid()
                    .is_some_and(|s| ids.contains(&s.to_ascii_lowercase()))
            })
            .filter_map(|p| p.identity)
            .collect();
        if !outside.is_empty() {
            return Err(ApiError::new(
                ProblemKind::ScopeGroupInUse,
                format!(
                    "scope group {alias} is the scope of access policies in the tenant that mailscope does not manage ({}); POST /sync to import them, then delete or replace them",
                    outside.join(", ")
                ),
            ));
        }
    }
    let removed_from_tenant = if rec.origin == "created" && group.is_some() {
        exo.remove_distribution_group(&rec.object_id).await?
    } else {
        false
    };
    store::scope_groups::delete(&tx, tenant_id, &alias).await?;
    audit(
        &tx,
        &caller,
        &req,
        tenant_id,
        "scope_group.deleted",
        &format!("scope_group/{alias}"),
        serde_json::json!({"object_id": rec.object_id, "origin": rec.origin,
                           "removed_from_tenant": removed_from_tenant}),
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::NoContent().finish())
}

/// Parse a CSV export with a `UserPrincipalName` column (as admins keep it): a header row,
/// comma-separated, fields optionally in double quotes (`""` escapes a quote), an optional BOM.
pub(crate) fn parse_upn_csv(text: &str) -> Result<Vec<(String, String)>, ApiError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = csv_rows(text).map_err(|m| {
        ApiError::validation(vec![FieldError {
            field: "body".into(),
            message: m,
        }])
    })?;
    let mut rows = rows
        .into_iter()
        .filter(|(_, r)| r.iter().any(|f| !f.trim().is_empty()));
    let Some((_, header)) = rows.next() else {
        return Err(ApiError::validation(vec![FieldError {
            field: "body".into(),
            message: "the CSV is empty; it needs a header row with a UserPrincipalName column"
                .into(),
        }]));
    };
    let Some(col) = header
        .iter()
        .position(|h| h.trim().eq_ignore_ascii_case("UserPrincipalName"))
    else {
        return Err(ApiError::validation(vec![FieldError {
            field: "body".into(),
            message: format!(
                "the CSV header has no UserPrincipalName column (found: {})",
                header.join(", ")
            ),
        }]));
    };
    Ok(rows
        .filter_map(|(line, r)| {
            let v = r.get(col).map(|s| s.trim().to_string()).unwrap_or_default();
            (!v.is_empty()).then(|| (format!("csv line {line}"), v))
        })
        .collect())
}

/// Rows of (1-based starting line, fields).
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut line = 1usize;
    let mut row_line = 1usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => in_quotes = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push((row_line, std::mem::take(&mut row)));
                line += 1;
                row_line = line;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(format!(
            "unterminated quoted field starting on line {row_line}"
        ));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((row_line, row));
    }
    Ok(rows)
}

/// Add members: JSON `{"members": [...]}` or `text/csv` with a `UserPrincipalName` column. Every
/// address is checked first; then the whole new list is set in one Exchange call.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/scope-groups/{alias}/members", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("alias" = String, Path, description = "The group's alias")),
    request_body(content(
        (MembersInput = "application/json"),
        (String = "text/csv", example = "UserPrincipalName,DisplayName\nbob@contoso-sandbox.onmicrosoft.com,Bob Baker\n"),
    )),
    responses(
        (status = 200, description = "members added (or already present)", body = MembersAdded),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown group or tenant", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "neither JSON nor CSV", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown or unsuitable addresses, each named", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn add_members(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String)>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, alias) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let alias = check_alias(&alias)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let labelled: Vec<(String, String)> = match content_type.as_str() {
        "application/json" => {
            let input: MembersInput = serde_json::from_slice(&body).map_err(|e| {
                if e.is_data() {
                    ApiError::validation(vec![FieldError {
                        field: "body".into(),
                        message: e.to_string(),
                    }])
                } else {
                    ApiError::new(
                        ProblemKind::MalformedJson,
                        format!("the body is not valid JSON: {e}"),
                    )
                }
            })?;
            input
                .members
                .into_iter()
                .enumerate()
                .map(|(i, m)| (format!("members[{i}]"), m))
                .collect()
        }
        "text/csv" => {
            let text = std::str::from_utf8(&body).map_err(|_| {
                ApiError::validation(vec![FieldError {
                    field: "body".into(),
                    message: "the CSV must be UTF-8".into(),
                }])
            })?;
            parse_upn_csv(text)?
        }
        _ => {
            return Err(ApiError::new(
                ProblemKind::UnsupportedMediaType,
                "send `application/json` ({\"members\": [...]}) or `text/csv` with a UserPrincipalName column",
            ));
        }
    };
    let mut errs = Vec::new();
    if labelled.is_empty() {
        errs.push(FieldError {
            field: "members".into(),
            message: "name at least one member".into(),
        });
    }
    let wanted = check_addresses(&labelled, &mut errs);
    if !errs.is_empty() {
        return Err(ApiError::validation(errs));
    }
    let exo = handle.exchange();
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_group(&tx, tenant_id, &alias).await?;
    let rec = store::scope_groups::get(&tx, tenant_id, &alias)
        .await?
        .ok_or_else(|| group_not_found(&alias))?;
    let current = current_members(&exo, &rec.object_id).await?;
    let to_check: Vec<(String, String)> = wanted
        .iter()
        .filter(|(_, a)| !current.contains(a))
        .cloned()
        .collect();
    let resolved = resolve_members(&exo, to_check).await?;
    let requested: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, a)| current.contains(a))
        .map(|(_, a)| a.clone())
        .chain(resolved.iter().filter_map(primary_address))
        .collect();
    let added: Vec<String> = requested.difference(&current).cloned().collect();
    let already: Vec<String> = requested.intersection(&current).cloned().collect();
    let all: BTreeSet<String> = current.union(&requested).cloned().collect();
    let all_list: Vec<String> = all.iter().cloned().collect();
    let stored = if added.is_empty() && rec.members == all_list {
        rec
    } else {
        if !added.is_empty() {
            exo.update_distribution_group_members(&rec.object_id, &all_list)
                .await?;
        }
        let stored = store::scope_groups::upsert(
            &tx,
            &ScopeGroupRecord {
                members: all_list,
                ..rec
            },
        )
        .await?;
        audit(
            &tx,
            &caller,
            &req,
            tenant_id,
            "scope_group.members_added",
            &format!("scope_group/{alias}"),
            serde_json::json!({"added": added, "source": content_type}),
        )
        .await?;
        stored
    };
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::Ok().json(MembersAdded {
        added,
        already_members: already,
        scope_group: view(stored, None),
    }))
}

/// Remove one member. Idempotent: 204 whether or not it was a member.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/scope-groups/{alias}/members/{address}", tag = "scope groups",
    params(("tenant_id" = Uuid, Path, description = "The Microsoft Entra tenant id"),
           ("alias" = String, Path, description = "The group's alias"),
           ("address" = String, Path, description = "The member's address")),
    responses(
        (status = 204, description = "not a member (any more)"),
        (status = 401, description = "missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "needs MailScope.Write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown group or tenant", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Microsoft 365 refused or failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn remove_member(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(Uuid, String, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require(Role::Write)?;
    let (tenant_id, alias, address) = path.into_inner();
    let (_, handle) = tenant_handle(&state, &caller, tenant_id).await?;
    let alias = check_alias(&alias)?;
    let address = address.trim().to_ascii_lowercase();
    if !is_address(&address) {
        return Err(ApiError::new(
            ProblemKind::InvalidPathParameter,
            "the member must be an email address",
        ));
    }
    let exo = handle.exchange();
    let mut db = state.db().await?;
    let tx = db.transaction().await.map_err(store::StoreError::from)?;
    lock_group(&tx, tenant_id, &alias).await?;
    let rec = store::scope_groups::get(&tx, tenant_id, &alias)
        .await?
        .ok_or_else(|| group_not_found(&alias))?;
    // Resolve to the primary address so a secondary address or UPN removes the right member.
    let primary = match exo.get_recipient(&address, Replication::Ignore).await? {
        Some(r) => primary_address(&r).unwrap_or(address.clone()),
        None => {
            tx.commit().await.map_err(store::StoreError::from)?;
            return Ok(HttpResponse::NoContent().finish());
        }
    };
    let removed = exo
        .remove_distribution_group_member(&rec.object_id, &primary)
        .await?;
    if removed || rec.members.contains(&primary) {
        let members: Vec<String> = rec
            .members
            .iter()
            .filter(|m| **m != primary)
            .cloned()
            .collect();
        store::scope_groups::upsert(&tx, &ScopeGroupRecord { members, ..rec }).await?;
        audit(
            &tx,
            &caller,
            &req,
            tenant_id,
            "scope_group.member_removed",
            &format!("scope_group/{alias}"),
            serde_json::json!({"member": primary, "was_member_in_tenant": removed}),
        )
        .await?;
    }
    tx.commit().await.map_err(store::StoreError::from)?;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioning::scope_groups::scope_refusal;

    #[test]
    fn csv_with_quotes_bom_and_crlf() {
        let text = "\u{feff}DisplayName,UserPrincipalName\r\n\"Baker, Bob\",bob@x.com\r\n\r\nAlice,\"alice@x.com\"\n";
        let rows = parse_upn_csv(text).unwrap();
        assert_eq!(
            rows,
            vec![
                ("csv line 2".to_string(), "bob@x.com".to_string()),
                ("csv line 4".to_string(), "alice@x.com".to_string())
            ]
        );
    }

    #[test]
    fn csv_without_the_column_is_refused() {
        let e = parse_upn_csv("Mail\nbob@x.com\n").unwrap_err();
        assert!(e.detail.contains("UserPrincipalName"), "{}", e.detail);
        assert!(parse_upn_csv("A\n\"open\n").is_err());
    }

    #[test]
    fn scope_reasons_follow_the_reference() {
        let r = |t: &str| Recipient {
            recipient_type_details: Some(t.into()),
            ..Default::default()
        };
        assert!(scope_refusal(&r("MailUniversalSecurityGroup")).is_none());
        assert!(scope_refusal(&r("UserMailbox")).is_none());
        assert!(
            scope_refusal(&r("SharedMailbox"))
                .unwrap()
                .contains("scope group")
        );
        assert!(
            scope_refusal(&r("GroupMailbox"))
                .unwrap()
                .contains("Microsoft 365 group")
        );
        assert!(
            scope_refusal(&r("MailUniversalDistributionGroup"))
                .unwrap()
                .contains("distribution group")
        );
        assert!(member_refusal(&r("RoomMailbox")).is_none());
        assert!(member_refusal(&r("MailContact")).is_some());
    }

    #[test]
    fn aliases() {
        assert_eq!(check_alias("CRM-Scope").unwrap(), "crm-scope");
        assert!(check_alias("a b").is_err());
        assert!(check_alias(&"x".repeat(65)).is_err());
    }
}
