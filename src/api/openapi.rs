//! The OpenAPI 3.1 document (generated from the code), Swagger UI with vendored assets, and the
//! problem-type catalogue that the problems' `type` URIs point at.
use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use super::problem::{ApiError, CATALOGUE, FieldError, Problem};
use super::{
    access_grants, access_policies, applications, audit, health, propagation_checks,
    rbac_migrations, rbac_restrictions, scope_groups, tenants,
};
use crate::domain::cloud::{Cloud, EndpointOverrides};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailscope",
        description = "Give a third-party app access to some Exchange Online mailboxes and no others, \
and prove that the restriction is in force.\n\nErrors are RFC 9457 `application/problem+json` documents; \
branch on `type` (or its short form `code`). Every response carries `X-Request-Id`. \
Any operation can also answer 431 `request_headers_too_large` (over 96 header fields or 128 KiB of head), \
400 `malformed_request` (not parseable HTTP/1.1) or 408 `request_timeout` (the head came too slowly), \
before the request reaches the operation.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    servers((url = "/", description = "This mailscope instance (the document is served at `/openapi.json`)")),
    paths(
        health::healthz, health::readyz, health::metrics,
        problem_types, problem_type,
        tenants::put_tenant, tenants::get_tenant, tenants::list_tenants, tenants::delete_tenant,
        tenants::connection_test,
        applications::put_application, applications::get_application,
        applications::list_applications, applications::delete_application,
        applications::add_secret, applications::list_secrets, applications::delete_secret,
        audit::list_audit_events,
        scope_groups::put_scope_group, scope_groups::get_scope_group,
        scope_groups::list_scope_groups, scope_groups::delete_scope_group,
        scope_groups::add_members, scope_groups::remove_member,
        access_policies::create_policy, access_policies::list_access_policies,
        access_policies::get_access_policy, access_policies::patch_access_policy,
        access_policies::put_access_policy, access_policies::delete_access_policy,
        access_policies::access_test, access_policies::sync,
        propagation_checks::create_check, propagation_checks::list_checks,
        propagation_checks::get_check, propagation_checks::cancel_check,
        rbac_restrictions::create_restriction, rbac_restrictions::list_restrictions,
        rbac_restrictions::get_restriction, rbac_restrictions::put_restriction,
        rbac_restrictions::delete_restriction, rbac_restrictions::enforce_restriction,
        rbac_restrictions::findings,
        rbac_migrations::create_migration, rbac_migrations::list_migrations,
        rbac_migrations::get_migration, rbac_migrations::pause_migration,
        rbac_migrations::resume_migration, rbac_migrations::rollback_migration,
        access_grants::put_access_grant, access_grants::get_access_grant,
        access_grants::delete_access_grant, access_grants::list_access_grants,
        access_grants::get_credentials, access_grants::add_secret, access_grants::delete_secret,
        access_grants::add_certificate, access_grants::delete_certificate,
    ),
    components(schemas(
        Problem, FieldError, ProblemType, Cloud, EndpointOverrides,
        tenants::TenantInput, tenants::CredentialsInput, tenants::Tenant, tenants::TenantList,
        tenants::CredentialSummary, audit::AuditEvent, audit::AuditEventList, audit::Actor,
        health::Health, crate::m365::ConnectionTestReport, crate::m365::ConnectionTestStep,
        crate::m365::StepStatus,
        applications::ApplicationInput, applications::ApplicationView,
        applications::ApplicationSummary, applications::ApplicationList,
        applications::PermissionView, applications::ConsentState, applications::SecretView,
        applications::SecretStatus, applications::SecretInput, applications::NewSecret,
        applications::SecretList,
        scope_groups::ScopeGroupInput, scope_groups::Membership, scope_groups::MembersInput,
        scope_groups::ScopeGroup, scope_groups::ScopeGroupList, scope_groups::MembersAdded,
        crate::domain::access::AccessRight, access_policies::AccessPolicyInput,
        access_policies::AccessPolicyPatch, access_policies::AccessPolicy,
        access_policies::AccessPolicyList, access_policies::AccessTestInput,
        access_policies::AccessTestResult, access_policies::ExchangeVerdict,
        access_policies::LocalVerdict, access_policies::EffectiveAccess,
        access_policies::PermissionVerdict, access_policies::RbacAuthorizationRow, access_policies::SyncReport, access_policies::DriftSet,
        access_policies::DriftItem, access_policies::FieldDrift,
        propagation_checks::CheckInput, propagation_checks::ExpectationInput,
        propagation_checks::PropagationCheck, propagation_checks::ExpectationView,
        propagation_checks::PropagationCheckList, crate::domain::propagation::Access,
        crate::domain::propagation::Bracket,
        rbac_restrictions::ScopeGroupVia, rbac_restrictions::RbacScopeInput,
        rbac_restrictions::RbacRestrictionInput, rbac_restrictions::EnforceInput,
        rbac_restrictions::RbacAssignment, rbac_restrictions::RbacFinding,
        rbac_restrictions::RbacScope, rbac_restrictions::EnforcementReport,
        rbac_restrictions::RbacRestriction, rbac_restrictions::RbacRestrictionSummary,
        rbac_restrictions::RbacRestrictionList, rbac_restrictions::RbacScanFinding,
        rbac_restrictions::RbacFindings,
        rbac_migrations::RbacMigrationInput, rbac_migrations::MigrationState,
        rbac_migrations::MigrationStepName, rbac_migrations::MigrationStepState,
        rbac_migrations::NotCarriedKind, rbac_migrations::NotCarriedView,
        rbac_migrations::PlannedAssignment, rbac_migrations::PlannedPolicyView,
        rbac_migrations::RbacMigrationPlan, rbac_migrations::MigrationStep,
        rbac_migrations::PausedReason, rbac_migrations::RbacMigration,
        rbac_migrations::RbacMigrationDryRun, rbac_migrations::RbacMigrationList,
        access_grants::AccessGrantInput, access_grants::AccessGrant, access_grants::AccessGrantList,
        access_grants::GrantStep, access_grants::StepErrorView, crate::domain::grant::Mechanism,
        access_grants::CertificateView, access_grants::GrantCredentials,
        access_grants::CertificateInput,
    )),
    modifiers(&BearerAuth, &CrossCutting),
    tags(
        (name = "tenants", description = "Microsoft 365 tenants mailscope manages"),
        (name = "applications", description = "The third party's app registration: permissions, admin consent, secrets"),
        (name = "scope groups", description = "Mail-enabled security groups that define which mailboxes an app may reach"),
        (name = "rbac restrictions", description = "RBAC for Applications, Microsoft's recommended mechanism: pointer, scope and role assignments, the union trap with Entra grants closed"),
        (name = "rbac migrations", description = "Move an app from application access policies to RBAC for Applications: a dry-run plan, then a resumable job that never widens the app's access, with pause, resume and rollback"),
        (name = "access policies", description = "Application access policies: create, replace safely, test and sync"),
        (name = "propagation checks", description = "Proof that an app's restriction is in force: Exchange's verdict, then Graph as the app until every front end agrees"),
        (name = "access grants", description = "Vendor onboarding and offboarding as one declarative, resumable resource: the app, its permissions and its mailboxes, proven in force"),
        (name = "operations", description = "Health, readiness, metrics and error catalogue"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT from your identity provider (or `mailscope token` locally) with \
                         MailScope.Read / MailScope.Write / MailScope.Admin in `roles` or `scp`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// What every `/v1` operation can answer by its shape alone, declared in one place so that no
/// route can forget it: the extractors' 400s (`invalid_path_parameter` for a UUID path segment,
/// `invalid_query`, `malformed_json`), the body's 413/415/422, the bearer token's 401/403, the
/// `Idempotency-Key` header that the middleware honours on every POST and PATCH (with its
/// 400/409/422), and the database's 503; outside `/v1`, that no token is needed (`security: []`).
/// A route's own description of a status is kept, and the shared causes of a 400, 409, 413, 415
/// or 422 are appended to it.
struct CrossCutting;

impl CrossCutting {
    /// Whether the operation takes a key lease (`provisioning::key_lease`) while it calls
    /// Microsoft, and so may answer `object_busy` when another process holds it too long.
    fn leased(path: &str, method: &str) -> bool {
        let tail = path.trim_start_matches("/v1/tenants/{tenant_id}");
        let writes = matches!(method, "put" | "post" | "patch" | "delete");
        writes
            && (tail.starts_with("/applications/")
                || tail.starts_with("/access-policies")
                || (tail.starts_with("/rbac-restrictions") && !tail.ends_with("/enforce"))
                || (tail == "/scope-groups/{alias}" && method == "delete")
                || tail == "/sync"
                || tail.ends_with("/certificates")
                || tail.ends_with("/certificates/{key_id}")
                || (tail.starts_with("/access-grants/") && tail.contains("/secrets")))
    }

    /// (status, problem code, cause) for one operation.
    fn causes(
        path: &str,
        method: &str,
        op: &Operation,
    ) -> Vec<(&'static str, &'static str, &'static str)> {
        let params = op.parameters.as_deref().unwrap_or_default();
        let uuid_in_path = params.iter().any(|p| {
            p.parameter_in == ParameterIn::Path
                && matches!(&p.schema, Some(RefOr::T(Schema::Object(o)))
                    if o.format == Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        });
        let query = params.iter().any(|p| p.parameter_in == ParameterIn::Query);
        let body = op.request_body.as_ref();
        let json_body = body.is_some_and(|b| b.content.contains_key("application/json"));
        let keyed = matches!(method, "post" | "patch");
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());

        let mut causes = Vec::new();
        if uuid_in_path {
            causes.push((
                "400",
                "invalid_path_parameter",
                "a path segment is not a UUID",
            ));
        }
        if query {
            causes.push((
                "400",
                "invalid_query",
                "a query parameter is unknown or malformed",
            ));
        }
        if json_body {
            causes.push(("400", "malformed_json", "the body is not valid JSON"));
        }
        if keyed {
            causes.push((
                "400",
                "invalid_idempotency_key",
                "the Idempotency-Key header is malformed",
            ));
        }
        if secured {
            causes.push(("401", "unauthenticated", "missing or invalid bearer token"));
            causes.push((
                "403",
                "forbidden",
                "the token lacks the role or tenant this needs",
            ));
        }
        if keyed {
            causes.push((
                "409",
                "idempotency_key_in_use",
                "the first request with this Idempotency-Key is still running (see Retry-After)",
            ));
        }
        if Self::leased(path, method) {
            causes.push((
                "409",
                "object_busy",
                "another mailscope process has been changing the same object for over a minute (see Retry-After)",
            ));
        }
        if body.is_some() {
            causes.push((
                "413",
                "payload_too_large",
                "the body exceeds `http.body_limit_bytes`",
            ));
            causes.push((
                "415",
                "unsupported_media_type",
                "no body, or a Content-Type this operation does not take",
            ));
        }
        if json_body {
            causes.push((
                "422",
                "validation_failed",
                "the JSON does not match the schema (unknown field, wrong type, missing field)",
            ));
        }
        if keyed {
            causes.push((
                "422",
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request",
            ));
        }
        causes.push((
            "503",
            "database_unavailable",
            "the database is unreachable (see Retry-After)",
        ));
        causes
    }

    fn idempotency_key() -> Parameter {
        ParameterBuilder::new()
            .name("Idempotency-Key")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "Makes a retry safe: a repeated request with the same key replays the first answer \
                 (marked `Idempotent-Replayed: true`) instead of running again. Best a quoted UUID.",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(255)),
            ))
            .build()
    }
}

impl Modify for CrossCutting {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                // Operational endpoints are public: say so rather than leave it unsaid.
                for op in [item.get.as_mut(), item.post.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    op.security.get_or_insert_with(Vec::new);
                }
                continue;
            }
            let ops = [
                ("get", item.get.as_mut()),
                ("put", item.put.as_mut()),
                ("post", item.post.as_mut()),
                ("delete", item.delete.as_mut()),
                ("patch", item.patch.as_mut()),
            ];
            for (method, op) in ops {
                let Some(op) = op else { continue };
                let causes = Self::causes(path, method, op);
                if matches!(method, "post" | "patch") {
                    let params = op.parameters.get_or_insert_with(Vec::new);
                    if !params.iter().any(|p| p.name == "Idempotency-Key") {
                        params.push(Self::idempotency_key());
                    }
                }
                for (status, code, cause) in causes {
                    let entry = op
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .content(
                                        super::problem::PROBLEM_CONTENT_TYPE,
                                        ContentBuilder::new()
                                            .schema(Some(Ref::from_schema_name("Problem")))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                    let RefOr::T(response) = entry else { continue };
                    // A route's own 401/403/503 already says it all; other statuses gain causes.
                    let said =
                        matches!(status, "401" | "403" | "503") && !response.description.is_empty();
                    if said || response.description.contains(&format!("`{code}`")) {
                        continue;
                    }
                    let cause = format!("{cause} (`{code}`)");
                    response.description = if response.description.is_empty() {
                        cause
                    } else {
                        format!("{}; {cause}", response.description)
                    };
                }
            }
        }
    }
}

/// The generated document, as committed in `openapi/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Pretty JSON with a trailing newline (the committed file's exact form).
pub fn document_json() -> String {
    let mut s = document().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", document()))
        .route(
            "/docs",
            web::get().to(|| async {
                HttpResponse::PermanentRedirect()
                    .insert_header(("Location", "/docs/"))
                    .finish()
            }),
        )
        .route("/problems", web::get().to(problem_types))
        .route("/problems/{code}", web::get().to(problem_type));
}

#[derive(Serialize, ToSchema)]
pub struct ProblemType {
    #[schema(example = "validation_failed")]
    pub code: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub description: &'static str,
}

fn catalogue() -> Vec<ProblemType> {
    CATALOGUE
        .iter()
        .map(|(k, title, description)| ProblemType {
            code: k.code(),
            title,
            status: k.status().as_u16(),
            description,
        })
        .collect()
}

/// Every problem type this API returns.
#[utoipa::path(get, path = "/problems", tag = "operations",
    responses((status = 200, description = "the catalogue", body = [ProblemType])))]
pub async fn problem_types() -> HttpResponse {
    HttpResponse::Ok().json(catalogue())
}

/// One problem type (the target of a problem's `type` URI).
#[utoipa::path(get, path = "/problems/{code}", tag = "operations",
    params(("code" = String, Path, description = "problem code")),
    responses(
        (status = 200, description = "the problem type", body = ProblemType),
        (status = 404, description = "no such problem type", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn problem_type(code: web::Path<String>) -> Result<HttpResponse, ApiError> {
    catalogue()
        .into_iter()
        .find(|p| p.code == code.as_str())
        .map(|p| HttpResponse::Ok().json(p))
        .ok_or_else(|| ApiError::not_found(format!("no problem type `{code}`")))
}
