//! `/v1/tenants/{tenant_id}/scope-groups`: the mail-enabled security groups that define which
//! mailboxes an app may reach (docs/microsoft-365.md §2.4, §4).
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
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::{ApiError, FieldError, Problem, ProblemKind};
use super::{AppState, page_limit};
use crate::auth::{Caller, Role};
use crate::domain::address::is_address;
use crate::provisioning::scope_groups::{self as use_case, GroupSpec, normalise_alias};
use crate::provisioning::{self, Change};
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

impl From<Membership> for store::scope_groups::Membership {
    fn from(m: Membership) -> Self {
        match m {
            Membership::Exact => Self::Exact,
            Membership::Additive => Self::Additive,
        }
    }
}

impl From<store::scope_groups::Membership> for Membership {
    fn from(m: store::scope_groups::Membership) -> Self {
        match m {
            store::scope_groups::Membership::Exact => Membership::Exact,
            store::scope_groups::Membership::Additive => Membership::Additive,
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
    #[schema(value_type = super::schema::ScopeGroupOrigin, example = "created")]
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

fn view(r: ScopeGroupRecord) -> ScopeGroup {
    ScopeGroup {
        alias: r.alias,
        display_name: r.display_name,
        primary_smtp_address: r.primary_smtp_address,
        object_id: r.object_id,
        membership: store::scope_groups::Membership::parse(&r.membership)
            .unwrap_or_default()
            .into(),
        members: r.members,
        origin: r.origin,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

/// `e`, unless the tenant is unknown: then its 404, which comes first (as when handlers loaded
/// the tenant before looking at the rest of the request).
async fn refused_after_tenant(state: &AppState, tenant_id: Uuid, e: ApiError) -> ApiError {
    match provisioning::tenants::load(state, tenant_id).await {
        Ok(_) => e,
        Err(t) => t.into(),
    }
}

/// The alias in mailscope's form (lower case), or 400.
async fn alias_of(state: &AppState, tenant_id: Uuid, raw: &str) -> Result<String, ApiError> {
    match normalise_alias(raw) {
        Some(a) => Ok(a),
        None => Err(refused_after_tenant(
            state,
            tenant_id,
            ApiError::new(
                ProblemKind::InvalidPathParameter,
                "alias must be 1 to 64 characters: letters, digits, '-', '_' or '.' (not at either end)",
            ),
        )
        .await),
    }
}

/// The members a `POST .../members` names, labelled by where (JSON index or CSV line), and the
/// media type they came in.
fn members_of(req: &HttpRequest, body: &[u8]) -> Result<(Vec<(String, String)>, String), ApiError> {
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
            let input: MembersInput = serde_json::from_slice(body).map_err(|e| {
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
            let text = std::str::from_utf8(body).map_err(|_| {
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
    Ok((labelled, content_type))
}

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
        (status = 409, description = "Exchange already has another recipient with this alias or address (`already_exists`)", body = Problem, content_type = "application/problem+json"),
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
    caller.require_tenant(tenant_id)?;
    let alias = alias_of(&state, tenant_id, &alias).await?;
    let input = body.into_inner();
    let spec = GroupSpec {
        display_name: input.display_name,
        members: input.members,
        membership: input.membership.into(),
    };
    let actor = super::actor(&caller, &req);
    let ensured = use_case::put(&state, &actor, tenant_id, &alias, spec).await?;
    let v = view(ensured.value);
    Ok(match ensured.change {
        Change::Created | Change::Adopted => HttpResponse::Created()
            .insert_header((header::LOCATION, req.path().to_string()))
            .json(v),
        Change::Updated | Change::Unchanged => HttpResponse::Ok().json(v),
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
    caller.require_tenant(tenant_id)?;
    let alias = alias_of(&state, tenant_id, &alias).await?;
    let group = use_case::get_live(&state, tenant_id, &alias).await?;
    Ok(HttpResponse::Ok().json(view(group)))
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
    let items: Vec<ScopeGroup> = rows.into_iter().map(view).collect();
    let next_after = super::next_cursor(&items, more, |g| g.alias.clone());
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
    caller.require_tenant(tenant_id)?;
    let alias = alias_of(&state, tenant_id, &alias).await?;
    let actor = super::actor(&caller, &req);
    use_case::delete(&state, &actor, tenant_id, &alias).await?;
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
    caller.require_tenant(tenant_id)?;
    let alias = alias_of(&state, tenant_id, &alias).await?;
    let (members, source) = match members_of(&req, &body) {
        Ok(m) => m,
        Err(e) => return Err(refused_after_tenant(&state, tenant_id, e).await),
    };
    let actor = super::actor(&caller, &req);
    let outcome =
        use_case::add_members(&state, &actor, tenant_id, &alias, members, &source).await?;
    Ok(HttpResponse::Ok().json(MembersAdded {
        added: outcome.added,
        already_members: outcome.already_members,
        scope_group: view(outcome.group),
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
    caller.require_tenant(tenant_id)?;
    let alias = alias_of(&state, tenant_id, &alias).await?;
    let address = address.trim().to_ascii_lowercase();
    if !is_address(&address) {
        let e = ApiError::new(
            ProblemKind::InvalidPathParameter,
            "the member must be an email address",
        );
        return Err(refused_after_tenant(&state, tenant_id, e).await);
    }
    let actor = super::actor(&caller, &req);
    use_case::remove_member(&state, &actor, tenant_id, &alias, &address).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
