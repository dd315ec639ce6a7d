//! The OpenAPI 3.1 document (generated from the code), Swagger UI with vendored assets, and the
//! problem-type catalogue that the problems' `type` URIs point at.
use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use super::problem::{ApiError, CATALOGUE, FieldError, Problem};
use super::{
    access_grants, access_policies, applications, audit, health, propagation_checks, scope_groups,
    tenants,
};
use crate::domain::cloud::{Cloud, EndpointOverrides};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailscope",
        description = "Give a third-party app access to some Exchange Online mailboxes and no others, \
and prove that the restriction is in force.\n\nErrors are RFC 9457 `application/problem+json` documents; \
branch on `type` (or its short form `code`). Every response carries `X-Request-Id`.",
        license(name = "Apache-2.0")
    ),
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
        access_policies::LocalVerdict, access_policies::SyncReport, access_policies::DriftSet,
        access_policies::DriftItem, access_policies::FieldDrift,
        propagation_checks::CheckInput, propagation_checks::ExpectationInput,
        propagation_checks::PropagationCheck, propagation_checks::ExpectationView,
        propagation_checks::PropagationCheckList, crate::domain::propagation::Access,
        access_grants::AccessGrantInput, access_grants::AccessGrant, access_grants::AccessGrantList,
        access_grants::GrantStep, access_grants::StepErrorView, crate::domain::grant::Mechanism,
        access_grants::CertificateView, access_grants::GrantCredentials,
        access_grants::CertificateInput,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "tenants", description = "Microsoft 365 tenants mailscope manages"),
        (name = "applications", description = "The third party's app registration: permissions, admin consent, secrets"),
        (name = "scope groups", description = "Mail-enabled security groups that define which mailboxes an app may reach"),
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
