//! The Microsoft 365 connector against `mailscope sandbox` over real HTTP: every operation of the
//! connector end to end (tokens, Exchange cmdlets, Graph calls, `$batch`, paging), as mailscope
//! uses them. Resilience (throttling storms, faults, timeouts) and credential failures are in
//! `m365_sandbox_faults.rs`. What the sandbox cannot produce is covered with wiremock in the
//! other `m365_*` modules.
use crate::sandbox_helpers::{CRM_APP_ID, CRM_SECRET, Sb, upn};
use mailscope::domain::cloud::{Cloud, CloudEndpoints, EndpointOverrides};
use mailscope::domain::credential::ManagementCredential;
use mailscope::m365::exchange::{
    AccessRight, NewAppRoleAssignment, NewApplicationAccessPolicy, NewSecurityGroup,
    PolicyIdentity, Replication, RoleAssignmentQuery, SetDistributionGroup,
};
use mailscope::m365::graph::{
    AppRoleSource, BatchRequest, MailboxProbe, NewApplication, ProbeOutcome, User,
};
use mailscope::m365::{
    AssertionAlgorithm, ErrorKind, M365Client, M365Settings, TenantContext, TenantHandle,
    TokenResource,
};
use mailscope::sandbox::SandboxSettings;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
pub const EXCHANGE_APP_ID: &str = "00000002-0000-0ff1-ce00-000000000000";
const CERT_PEM: &str = include_str!("fixtures/m365_test_cert.pem");
const KEY_PEM: &str = include_str!("fixtures/m365_test_key.pem");

/// Connector settings for tests: short backoffs and timeouts, realistic limits.
pub fn test_settings() -> M365Settings {
    M365Settings {
        backoff_base_ms: 10,
        backoff_max_ms: 200,
        replication_poll_max_ms: 100,
        max_retry_after_ms: 5_000,
        graph_timeout_ms: 5_000,
        exchange_timeout_ms: 5_000,
        login_timeout_ms: 5_000,
        ..M365Settings::default()
    }
}

/// A sandbox and a connector pointed at it (login, Graph and Exchange all on the sandbox URL).
pub struct Env {
    pub sb: Sb,
    pub m365: M365Client,
    pub registry: prometheus::Registry,
}

impl Env {
    pub async fn start(sandbox: SandboxSettings, settings: M365Settings) -> Env {
        let sb = Sb::start(sandbox).await;
        let registry = prometheus::Registry::new();
        let m365 = M365Client::new(settings, &registry).expect("connector builds");
        Env { sb, m365, registry }
    }

    pub async fn fast() -> Env {
        Env::start(SandboxSettings::fast(), test_settings()).await
    }

    pub fn endpoints(&self) -> CloudEndpoints {
        let u = Some(self.sb.h.base_url.clone());
        CloudEndpoints::resolve(
            Cloud::Custom,
            &EndpointOverrides {
                login: u.clone(),
                graph: u.clone(),
                exchange: u,
            },
        )
        .expect("endpoints")
    }

    /// The connector acting as the tenant's management app.
    pub fn tenant(&self) -> TenantHandle {
        self.as_app(
            &self.sb.h.management_client_id(),
            self.sb.h.management_client_secret().expose_secret(),
        )
    }

    /// The connector acting as any app with a client secret.
    pub fn as_app(&self, client_id: &str, secret: &str) -> TenantHandle {
        self.with_credential(ManagementCredential::ClientSecret {
            client_id: client_id.into(),
            client_secret: SecretString::from(secret.to_string()),
        })
    }

    pub fn with_credential(&self, credential: ManagementCredential) -> TenantHandle {
        self.m365.tenant(TenantContext {
            tenant_id: self.sb.tenant.clone(),
            endpoints: self.endpoints(),
            credential,
        })
    }

    /// Recorded calls of the default tenant (`api` = login, graph or exchange).
    pub async fn calls(&self, api: &str) -> Vec<Value> {
        self.sb
            .calls(&format!("api={api}&tenant={}", self.sb.tenant))
            .await
    }

    pub async fn cmdlet_calls(&self, cmdlet: &str) -> Vec<Value> {
        self.sb
            .calls(&format!("api=exchange&cmdlet={cmdlet}"))
            .await
    }

    pub async fn patch_tenant(&self, body: Value) {
        let r = self
            .sb
            .control(
                "PATCH",
                &format!("tenants/{}/settings", self.sb.tenant),
                Some(body),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    }

    pub async fn add_mailbox(&self, name: &str) {
        let r = self
            .sb
            .control(
                "POST",
                &format!("tenants/{}/mailboxes", self.sb.tenant),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.bytes));
    }
}

fn statuses(calls: &[Value]) -> Vec<u64> {
    calls
        .iter()
        .map(|c| c["status"].as_u64().unwrap())
        .collect()
}

fn names(v: &[mailscope::m365::exchange::Recipient]) -> Vec<String> {
    let mut n: Vec<String> = v
        .iter()
        .map(|r| r.name.clone().unwrap_or_default().to_ascii_lowercase())
        .collect();
    n.sort();
    n
}

// ---------------------------------------------------------------- tokens

#[tokio::test]
async fn secret_tokens_are_cached_and_concurrent_callers_share_one_request() {
    let env = Env::fast().await;
    let t = env.tenant();
    let tokens =
        futures_util::future::join_all((0..8).map(|_| t.token(TokenResource::Graph))).await;
    assert!(tokens.iter().all(|x| x.is_ok()));
    let x = t.token(TokenResource::Exchange).await.unwrap();
    assert_eq!(x.tenant_guid(), Some(env.sb.tenant.as_str()));
    assert!(x.expires_in() > std::time::Duration::from_secs(3000));
    // Eight Graph callers and one Exchange caller: two token requests, then the cache.
    t.graph().get_user(&upn("alice")).await.unwrap();
    let logins = env.calls("login").await;
    assert_eq!(statuses(&logins), vec![200, 200], "{logins:?}");
}

#[tokio::test]
async fn certificate_credentials_sign_in_with_both_assertion_styles() {
    for alg in [AssertionAlgorithm::PS256, AssertionAlgorithm::RS256] {
        let env = Env::start(
            SandboxSettings::fast(),
            M365Settings {
                client_assertion_algorithm: alg,
                ..test_settings()
            },
        )
        .await;
        let (client_id, _, _) = env
            .sb
            .new_app(json!({"displayName": "cert app", "noSecret": true,
                "certificatePem": CERT_PEM, "graphPermissions": ["User.Read.All"]}))
            .await;
        let t = env.with_credential(ManagementCredential::Certificate {
            client_id: client_id.clone(),
            certificate_pem: CERT_PEM.into(),
            private_key_pem: SecretString::from(KEY_PEM),
        });
        let u = t.graph().get_user(&upn("bob")).await.unwrap().unwrap();
        assert_eq!(
            u.user_principal_name.as_deref(),
            Some(upn("bob").as_str()),
            "{alg:?}"
        );
        let login = &env.calls("login").await[0];
        assert_eq!(login["status"], 200, "{alg:?}: {login}");
        assert_eq!(login["appId"], client_id.as_str());
    }
}

// ---------------------------------------------------------------- Exchange

#[tokio::test]
async fn distribution_group_and_membership_cmdlets() {
    let env = Env::fast().await;
    let x = env.tenant().exchange();
    let g = x
        .new_security_group(&NewSecurityGroup {
            name: "crm-scope".into(),
            display_name: Some("CRM scope".into()),
            members: vec!["alice".into()],
            notes: Some("managed by mailscope".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(g.name.as_deref(), Some("crm-scope"));
    assert_eq!(
        g.recipient_type_details.as_deref(),
        Some("MailUniversalSecurityGroup")
    );
    assert!(g.external_directory_object_id.is_some() && g.distinguished_name.is_some());

    let got = x
        .get_distribution_group("crm-scope", Replication::AwaitNew)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.guid, g.guid);
    assert_eq!(
        x.get_distribution_group("no-such-group", Replication::Ignore)
            .await
            .unwrap(),
        None
    );

    x.set_distribution_group(
        "crm-scope",
        &SetDistributionGroup {
            display_name: Some("CRM mailboxes".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = x
        .get_distribution_group("crm-scope", Replication::Ignore)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.display_name.as_deref(), Some("CRM mailboxes"));

    // Add/remove report whether they changed anything; a repeat is harmless.
    assert!(
        x.add_distribution_group_member("crm-scope", "bob", Replication::Ignore)
            .await
            .unwrap()
    );
    assert!(
        !x.add_distribution_group_member("crm-scope", "bob", Replication::Ignore)
            .await
            .unwrap()
    );
    let m = x
        .get_distribution_group_members("crm-scope", Replication::Ignore)
        .await
        .unwrap();
    assert_eq!(names(&m), vec!["alice", "bob"]);
    assert!(
        x.remove_distribution_group_member("crm-scope", "alice")
            .await
            .unwrap()
    );
    assert!(
        !x.remove_distribution_group_member("crm-scope", "alice")
            .await
            .unwrap()
    );
    // Update replaces the whole list; an empty list empties the group.
    x.update_distribution_group_members("crm-scope", &["carol".into(), "dave".into()])
        .await
        .unwrap();
    let m = x
        .get_distribution_group_members("crm-scope", Replication::Ignore)
        .await
        .unwrap();
    assert_eq!(names(&m), vec!["carol", "dave"]);
    x.update_distribution_group_members("crm-scope", &[])
        .await
        .unwrap();
    assert!(
        x.get_distribution_group_members("crm-scope", Replication::Ignore)
            .await
            .unwrap()
            .is_empty()
    );

    // Creating it again is refused as AlreadyExists (callers look it up first).
    let again = x
        .new_security_group(&NewSecurityGroup {
            name: "crm-scope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(*again.kind(), ErrorKind::AlreadyExists, "{again}");

    assert!(x.remove_distribution_group("crm-scope").await.unwrap());
    assert!(!x.remove_distribution_group("crm-scope").await.unwrap());
    assert_eq!(
        x.get_distribution_group("crm-scope", Replication::Ignore)
            .await
            .unwrap(),
        None
    );
    // The sandbox saw the shape the reference describes: BypassSecurityGroupManagerCheck as a
    // switch on membership changes.
    let add = &env.cmdlet_calls("Add-DistributionGroupMember").await[0];
    assert_eq!(add["parameters"]["BypassSecurityGroupManagerCheck"], true);
}

#[tokio::test]
async fn recipient_cmdlets() {
    let env = Env::fast().await;
    let x = env.tenant().exchange();
    let mbx = x.get_mailbox("alice").await.unwrap().unwrap();
    assert_eq!(mbx.recipient_type_details.as_deref(), Some("UserMailbox"));
    assert_eq!(
        mbx.external_directory_object_id.as_deref(),
        Some(env.sb.recipient_id("alice").await.as_str())
    );
    assert_eq!(x.get_mailbox("nobody-here").await.unwrap(), None);
    let all = x.list_mailboxes(None).await.unwrap();
    assert!(all.iter().any(|m| m.name.as_deref() == Some("bob")));
    assert!(
        all.iter()
            .any(|m| m.recipient_type_details.as_deref() == Some("SharedMailbox"))
    );
    assert_eq!(x.list_mailboxes(Some(2)).await.unwrap().len(), 2);

    let r = x
        .get_recipient("Sales Team", Replication::Ignore)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.is_valid_security_principal, Some(true));
    assert_eq!(
        x.get_recipient("nobody-here", Replication::Ignore)
            .await
            .unwrap(),
        None
    );
    let cas = x.get_cas_mailbox("alice").await.unwrap().unwrap();
    assert_eq!(cas.name.as_deref(), Some("alice"));
    assert!(x.get_organization_config().await.unwrap().is_some());
}

#[tokio::test]
async fn application_access_policy_cmdlets() {
    let env = Env::fast().await;
    let t = env.tenant();
    let x = t.exchange();
    assert!(
        x.list_application_access_policies()
            .await
            .unwrap()
            .is_empty()
    );
    let group = x
        .new_security_group(&NewSecurityGroup {
            name: "crm-allowed".into(),
            members: vec!["alice".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let created = x
        .new_application_access_policy(&NewApplicationAccessPolicy {
            app_ids: vec![CRM_APP_ID.into()],
            policy_scope_group_id: "crm-allowed".into(),
            access_right: AccessRight::RestrictAccess,
            description: None,
        })
        .await
        .unwrap();
    assert_eq!(created.len(), 1);
    let p = &created[0];
    // The key mailscope matches policies on comes from ScopeIdentityRaw, and the Identity parses.
    let group_guid = group
        .external_directory_object_id
        .clone()
        .unwrap()
        .to_ascii_lowercase();
    assert_eq!(
        p.key(),
        Some((
            CRM_APP_ID.to_string(),
            group_guid.clone(),
            "RestrictAccess".to_string()
        ))
    );
    let identity = p.identity.clone().unwrap();
    let parsed = PolicyIdentity::parse(&identity).unwrap();
    assert_eq!(parsed.tenant_id, env.sb.tenant);
    assert_eq!(parsed.app_id, CRM_APP_ID);
    assert_eq!(parsed.scope_object_guid.to_ascii_lowercase(), group_guid);
    // The description defaulted to " " (the shortest, docs/microsoft-365.md §2.6).
    let new_call = &env.cmdlet_calls("New-ApplicationAccessPolicy").await[0];
    assert_eq!(new_call["parameters"]["Description"], " ");
    assert_eq!(new_call["parameters"]["AppId"], json!([CRM_APP_ID]));

    // A second policy, so "unknown Identity returns every policy" is visible.
    x.new_security_group(&NewSecurityGroup {
        name: "other-app-scope".into(),
        members: vec!["carol".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let other_app = env.sb.new_app(json!({"displayName": "other"})).await.0;
    x.new_application_access_policy(&NewApplicationAccessPolicy {
        app_ids: vec![other_app.clone()],
        policy_scope_group_id: "other-app-scope".into(),
        access_right: AccessRight::DenyAccess,
        description: Some("deny".into()),
    })
    .await
    .unwrap();
    assert_eq!(x.list_application_access_policies().await.unwrap().len(), 2);
    let one = x
        .get_application_access_policy(&identity)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.app_id.as_deref(), Some(CRM_APP_ID));
    let unknown = format!(r"{}\{}:S-1-5-21-1;{}", env.sb.tenant, CRM_APP_ID, uuid());
    let raw = x
        .invoke(
            "Get-ApplicationAccessPolicy",
            serde_json::Map::from_iter([("Identity".to_string(), json!(unknown))]),
            &mailscope::m365::exchange::InvokeOptions::read(),
        )
        .await
        .unwrap();
    assert_eq!(
        raw.items.len(),
        2,
        "the sandbox answers an unknown Identity with every policy"
    );
    assert_eq!(
        x.get_application_access_policy(&unknown).await.unwrap(),
        None,
        "...which the wrapper filters out"
    );
    let for_crm = x
        .application_access_policies_for_app(&CRM_APP_ID.to_ascii_uppercase())
        .await
        .unwrap();
    assert_eq!(for_crm.len(), 1);

    x.set_application_access_policy_description(&identity, "CRM: Sales only")
        .await
        .unwrap();
    let one = x
        .get_application_access_policy(&identity)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.description.as_deref(), Some("CRM: Sales only"));

    let alice = x
        .test_application_access_policy("alice", CRM_APP_ID)
        .await
        .unwrap();
    assert_eq!(alice.granted(), Some(true), "{alice:?}");
    let bob = x
        .test_application_access_policy(&upn("bob"), CRM_APP_ID)
        .await
        .unwrap();
    assert_eq!(bob.granted(), Some(false), "{bob:?}");

    assert!(x.remove_application_access_policy(&identity).await.unwrap());
    assert!(!x.remove_application_access_policy(&identity).await.unwrap());
    assert_eq!(
        x.test_application_access_policy("bob", CRM_APP_ID)
            .await
            .unwrap()
            .granted(),
        Some(true)
    );
    assert_eq!(x.list_application_access_policies().await.unwrap().len(), 1);
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn rbac_for_applications_cmdlets() {
    let env = Env::fast().await;
    let t = env.tenant();
    let x = t.exchange();
    let sp = t
        .graph()
        .service_principal_by_app_id(CRM_APP_ID)
        .await
        .unwrap()
        .unwrap();
    let exo_sp = x
        .new_service_principal(CRM_APP_ID, &sp.id, Some("CRM connector"))
        .await
        .unwrap();
    assert_eq!(exo_sp.app_id.as_deref(), Some(CRM_APP_ID));
    assert_eq!(exo_sp.object_id.as_deref(), Some(sp.id.as_str()));
    let got = x
        .get_service_principal(&sp.id, Replication::AwaitNew)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.identity, exo_sp.identity);
    assert!(
        x.list_service_principals()
            .await
            .unwrap()
            .iter()
            .any(|s| s.object_id.as_deref() == Some(sp.id.as_str()))
    );
    assert_eq!(
        x.get_service_principal(&uuid(), Replication::Ignore)
            .await
            .unwrap(),
        None
    );

    let sales = x
        .get_distribution_group("Sales Team", Replication::Ignore)
        .await
        .unwrap()
        .unwrap();
    let filter = format!(
        "MemberOfGroup -eq '{}'",
        sales.distinguished_name.clone().unwrap()
    );
    let scope = x.new_management_scope("crm-sales", &filter).await.unwrap();
    // The filter is read back (an empty one would widen the scope to the organization).
    assert_eq!(scope.filter(), Some(filter.as_str()));
    let got = x
        .get_management_scope("crm-sales", Replication::AwaitNew)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.filter(), Some(filter.as_str()));

    let a = x
        .new_app_role_assignment(&NewAppRoleAssignment {
            name: Some("crm-mail-read".into()),
            role: "Application Mail.Read".into(),
            app: sp.id.clone(),
            custom_resource_scope: Some("crm-sales".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(a.role.as_deref(), Some("Application Mail.Read"));
    let listed = x
        .get_management_role_assignments(&RoleAssignmentQuery {
            role_assignee: Some(sp.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].custom_resource_scope.as_deref(),
        Some("crm-sales")
    );

    let rows = x
        .test_service_principal_authorization(&sp.id, Some("alice"))
        .await
        .unwrap();
    let row = rows
        .iter()
        .find(|r| r.role_name.as_deref() == Some("Application Mail.Read"))
        .unwrap();
    assert_eq!(row.in_scope(), Some(true), "{rows:?}");
    let rows = x
        .test_service_principal_authorization(&sp.id, Some("bob"))
        .await
        .unwrap();
    assert_eq!(rows[0].in_scope(), Some(false), "{rows:?}");
    let rows = x
        .test_service_principal_authorization(&sp.id, None)
        .await
        .unwrap();
    assert_eq!(rows[0].in_scope(), None, "Not Run without -Resource");

    let name = a.identity.clone().or(a.name.clone()).unwrap();
    assert!(x.remove_management_role_assignment(&name).await.unwrap());
    assert!(!x.remove_management_role_assignment(&name).await.unwrap());
    assert!(
        x.get_management_role_assignments(&RoleAssignmentQuery {
            role_assignee: Some(sp.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty()
    );
    assert!(x.remove_management_scope("crm-sales").await.unwrap());
    assert!(!x.remove_management_scope("crm-sales").await.unwrap());
    assert!(x.remove_service_principal(&sp.id).await.unwrap());
    assert!(!x.remove_service_principal(&sp.id).await.unwrap());
}

// ---------------------------------------------------------------- Graph

#[tokio::test]
async fn applications_and_secrets() {
    let env = Env::fast().await;
    let g = env.tenant().graph();
    let app = g
        .create_application(&NewApplication {
            display_name: "mailscope test app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!app.id.is_empty() && !app.app_id.is_empty());
    assert_eq!(
        g.get_application(&app.id).await.unwrap().unwrap().app_id,
        app.app_id
    );
    assert_eq!(
        g.application_by_app_id(&app.app_id)
            .await
            .unwrap()
            .unwrap()
            .id,
        app.id
    );
    let found = g
        .find_applications(&format!("appId eq '{}'", app.app_id))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    g.update_application(&app.id, &json!({"displayName": "renamed"}))
        .await
        .unwrap();
    assert_eq!(
        g.get_application(&app.id)
            .await
            .unwrap()
            .unwrap()
            .display_name
            .as_deref(),
        Some("renamed")
    );

    let pw = g
        .add_password(&app.id, "rotation 1", Some("2099-01-01T00:00:00Z"))
        .await
        .unwrap();
    let secret = pw.secret_text.expose_secret().to_string();
    assert!(secret.len() >= 16);
    assert_eq!(pw.hint.as_deref(), Some(&secret[..3]));
    // The new secret works at the token endpoint (a service principal makes it usable here).
    g.create_service_principal(&app.app_id).await.unwrap();
    env.as_app(&app.app_id, &secret)
        .token(TokenResource::Graph)
        .await
        .unwrap();
    let listed = g.get_application(&app.id).await.unwrap().unwrap();
    assert!(
        listed
            .password_credentials
            .iter()
            .any(|c| c.key_id.as_deref() == Some(pw.key_id.as_str()))
    );
    g.remove_password(&app.id, &pw.key_id).await.unwrap();
    // The connector caches tokens per client id; a changed credential is forgotten explicitly.
    env.m365.forget_tenant(&env.sb.tenant);
    let err = env
        .as_app(&app.app_id, &secret)
        .token(TokenResource::Graph)
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidClientSecret, "{err}");

    assert!(g.delete_application(&app.id).await.unwrap());
    assert!(!g.delete_application(&app.id).await.unwrap());
    assert_eq!(g.get_application(&app.id).await.unwrap(), None);
    assert_eq!(g.application_by_app_id(&app.app_id).await.unwrap(), None);
    // addPassword was sent once: a POST that creates a secret is never repeated blindly.
    let adds: Vec<Value> = env
        .calls("graph")
        .await
        .into_iter()
        .filter(|c| c["endpoint"] == "graph:POST /applications/{id}/addPassword")
        .collect();
    assert_eq!(adds.len(), 1);
}

#[tokio::test]
async fn service_principals_app_role_grants_and_directory_roles_onboard_a_working_app() {
    let env = Env::fast().await;
    let g = env.tenant().graph();
    let app = g
        .create_application(&NewApplication {
            display_name: "second management app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sp = g.create_service_principal(&app.app_id).await.unwrap();
    assert_eq!(sp.app_id, app.app_id);
    assert_eq!(
        g.get_service_principal(&sp.id)
            .await
            .unwrap()
            .unwrap()
            .app_id,
        app.app_id
    );
    assert_eq!(
        g.service_principal_by_app_id(&app.app_id)
            .await
            .unwrap()
            .unwrap()
            .id,
        sp.id
    );
    assert_eq!(g.get_service_principal(&uuid()).await.unwrap(), None);

    // App role ids come from the tenant's resource service principals (cached).
    let graph_sp = g.resource_service_principal(GRAPH_APP_ID).await.unwrap();
    let exo_sp = g.resource_service_principal(EXCHANGE_APP_ID).await.unwrap();
    let user_read = g
        .resolve_app_role(GRAPH_APP_ID, "User.Read.All")
        .await
        .unwrap();
    assert_eq!(user_read.source, AppRoleSource::Tenant);
    let manage = g
        .resolve_app_role(EXCHANGE_APP_ID, "Exchange.ManageAsApp")
        .await
        .unwrap();
    assert_eq!(manage.id, "dc50a0fb-09a3-484d-be87-e023b12c6440");
    assert_eq!(manage.source, AppRoleSource::Tenant);
    let mail_read = g.resolve_app_role(GRAPH_APP_ID, "Mail.Read").await.unwrap();
    assert_eq!(mail_read.id, "810c84a8-4a9e-49e6-bf7d-12d183f40d01");
    let sp_lookups = env
        .calls("graph")
        .await
        .into_iter()
        .filter(|c| {
            c["path"]
                .as_str()
                .unwrap()
                .contains(&format!("servicePrincipals(appId='{GRAPH_APP_ID}')"))
        })
        .count();
    assert_eq!(sp_lookups, 1, "the resource service principal is cached");

    // An app that may not read service principals falls back to the documented id (the cache
    // is per tenant, so it is emptied first).
    env.m365.forget_tenant(&env.sb.tenant);
    let crm = env.as_app(CRM_APP_ID, CRM_SECRET).graph();
    let fallback = crm
        .resolve_app_role(GRAPH_APP_ID, "Mail.Read")
        .await
        .unwrap();
    assert_eq!(fallback.source, AppRoleSource::WellKnown);
    assert_eq!(fallback.id, mail_read.id);

    let a1 = g
        .grant_app_role(&graph_sp.id, &sp.id, &user_read.id)
        .await
        .unwrap();
    let a2 = g
        .grant_app_role(&exo_sp.id, &sp.id, &manage.id)
        .await
        .unwrap();
    assert_eq!(a1.principal_id, sp.id);
    assert!(
        g.app_role_assigned_to(&graph_sp.id)
            .await
            .unwrap()
            .iter()
            .any(|a| a.id == a1.id)
    );
    let mine = g.app_role_assignments(&sp.id).await.unwrap();
    assert_eq!(mine.len(), 2);

    let exchange_admin = "29232cdf-9323-42fd-ade2-1d097af3e4de";
    let d = g
        .assign_directory_role(&sp.id, exchange_admin)
        .await
        .unwrap();
    assert_eq!(d.role_definition_id, exchange_admin);
    let roles = g.directory_role_assignments(&sp.id).await.unwrap();
    assert_eq!(roles.len(), 1);

    // The onboarded app now works end to end as a management app.
    let pw = g.add_password(&app.id, "s", None).await.unwrap();
    let second = env.as_app(&app.app_id, pw.secret_text.expose_secret());
    assert!(
        second
            .graph()
            .get_user(&upn("carol"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        second
            .exchange()
            .get_mailbox("carol")
            .await
            .unwrap()
            .is_some()
    );

    assert!(g.revoke_app_role(&graph_sp.id, &a1.id).await.unwrap());
    assert!(!g.revoke_app_role(&graph_sp.id, &a1.id).await.unwrap());
    let mine = g.app_role_assignments(&sp.id).await.unwrap();
    assert_eq!(
        mine.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        vec![a2.id.as_str()]
    );
}

#[tokio::test]
async fn users_and_mailbox_probes_granted_then_denied_by_code() {
    let env = Env::fast().await;
    let t = env.tenant();
    let u = t.graph().get_user(&upn("alice")).await.unwrap().unwrap();
    assert_eq!(u.id, env.sb.recipient_id("alice").await);
    assert_eq!(t.graph().get_user(&upn("nobody")).await.unwrap(), None);

    let crm = env.as_app(CRM_APP_ID, CRM_SECRET).graph();
    for probe in [
        MailboxProbe::Messages,
        MailboxProbe::Calendars,
        MailboxProbe::Events,
    ] {
        assert_eq!(
            crm.probe_mailbox(&upn("bob"), probe).await.unwrap(),
            ProbeOutcome::Allowed,
            "{probe:?}"
        );
    }
    // Graph answers a missing permission with the same ErrorAccessDenied code, so a probe is
    // only meaningful for permissions the app holds (CRM has no Contacts.Read).
    assert!(matches!(
        crm.probe_mailbox(&upn("bob"), MailboxProbe::Contacts)
            .await
            .unwrap(),
        ProbeOutcome::Denied { .. }
    ));

    let x = t.exchange();
    x.new_application_access_policy(&NewApplicationAccessPolicy {
        app_ids: vec![CRM_APP_ID.into()],
        policy_scope_group_id: "Sales Team".into(),
        access_right: AccessRight::RestrictAccess,
        description: None,
    })
    .await
    .unwrap();
    env.sb
        .control(
            "POST",
            &format!("tenants/{}/propagation/settle", env.sb.tenant),
            None,
        )
        .await;
    assert_eq!(
        crm.probe_mailbox(&upn("alice"), MailboxProbe::Messages)
            .await
            .unwrap(),
        ProbeOutcome::Allowed
    );
    // Recognised by ErrorAccessDenied, whatever the message says.
    for message in ["documented", "raop"] {
        env.patch_tenant(json!({ "accessDeniedMessage": message }))
            .await;
        let out = crm
            .probe_mailbox(&upn("bob"), MailboxProbe::Messages)
            .await
            .unwrap();
        assert!(
            matches!(out, ProbeOutcome::Denied { message: Some(_) }),
            "{message}: {out:?}"
        );
    }
}

#[tokio::test]
async fn batch_of_more_than_twenty_is_split_and_answered_in_order() {
    let env = Env::fast().await;
    let g = env.tenant().graph();
    let people = ["alice", "bob", "carol", "dave", "erin"];
    let reqs: Vec<BatchRequest> = (0..45)
        .map(|i| {
            let who = if i == 44 {
                "ghost".to_string()
            } else {
                people[i % people.len()].to_string()
            };
            BatchRequest::get(format!("r{i}"), format!("/users/{}", upn(&who)))
        })
        .collect();
    let out = g.batch(reqs).await.unwrap();
    assert_eq!(out.len(), 45);
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r.id, format!("r{i}"), "request order is kept");
        if i == 44 {
            assert_eq!(r.status, 404);
            assert_eq!(*r.error("users.get").unwrap().kind(), ErrorKind::NotFound);
        } else {
            assert_eq!(r.status, 200, "{r:?}");
            let u: User = serde_json::from_value(r.body.clone().unwrap()).unwrap();
            assert_eq!(
                u.user_principal_name.as_deref(),
                Some(upn(people[i % 5]).as_str())
            );
        }
    }
    let outer: Vec<Value> = env
        .calls("graph")
        .await
        .into_iter()
        .filter(|c| c["path"] == "/v1.0/$batch")
        .collect();
    assert_eq!(outer.len(), 3, "20 + 20 + 5");

    // A write in a batch is sent as given.
    let app = g
        .create_application(&NewApplication {
            display_name: "batched".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = g
        .batch(vec![BatchRequest::with_json(
            "p",
            "PATCH",
            format!("/applications/{}", app.id),
            json!({"displayName": "batched and renamed"}),
        )])
        .await
        .unwrap();
    assert!(out[0].is_success(), "{out:?}");
    assert_eq!(
        g.get_application(&app.id)
            .await
            .unwrap()
            .unwrap()
            .display_name
            .as_deref(),
        Some("batched and renamed")
    );
}

// ---------------------------------------------------------------- paging

#[tokio::test]
async fn exchange_and_graph_paging_over_several_pages() {
    let env = Env::start(
        SandboxSettings::fast(),
        M365Settings {
            exchange_page_size: 4,
            ..test_settings()
        },
    )
    .await;
    for i in 0..11 {
        env.add_mailbox(&format!("pager{i:02}")).await;
    }
    let x = env.tenant().exchange();
    let all = x.list_mailboxes(None).await.unwrap();
    let pagers = all
        .iter()
        .filter(|m| m.name.as_deref().is_some_and(|n| n.starts_with("pager")))
        .count();
    assert_eq!(pagers, 11);
    let mut seen = std::collections::HashSet::new();
    assert!(
        all.iter().all(|m| seen.insert(m.guid.clone())),
        "no item twice"
    );
    let pages = env.cmdlet_calls("Get-Mailbox").await;
    assert_eq!(pages.len(), all.len().div_ceil(4), "{} items", all.len());
    assert!(pages.len() >= 4);
    assert!(
        pages[1]["path"].as_str().unwrap().contains("skiptoken"),
        "{}",
        pages[1]
    );

    // A group with 11 members, read back in pages of 4.
    let members: Vec<String> = (0..11).map(|i| format!("pager{i:02}")).collect();
    x.new_security_group(&NewSecurityGroup {
        name: "big-group".into(),
        members: members.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = x
        .get_distribution_group_members("big-group", Replication::AwaitNew)
        .await
        .unwrap();
    assert_eq!(names(&got), members);
    assert_eq!(
        env.cmdlet_calls("Get-DistributionGroupMember").await.len(),
        3
    );

    // Graph: $top=3 over every user, following @odata.nextLink.
    let g = env.tenant().graph();
    let users: Vec<User> = g.list("users.list", "/users?$top=3").await.unwrap();
    assert!(users.len() >= 17, "{}", users.len());
    let pages = env
        .calls("graph")
        .await
        .into_iter()
        .filter(|c| c["path"].as_str().unwrap().starts_with("/v1.0/users"))
        .count();
    assert_eq!(pages, users.len().div_ceil(3));
}

// ---------------------------------------------------------------- Entra's answers, round two

/// A throttled token request is throttling with Entra's wait, not a transient failure: a wait
/// longer than the connector sleeps through is handed back (docs/microsoft-365.md §8.5).
#[tokio::test]
async fn a_throttled_token_request_is_throttling_with_the_wait() {
    let mut s = SandboxSettings::fast();
    s.pacing.login_budget = Some(mailscope::sandbox::settings::Budget {
        limit: 1,
        window: std::time::Duration::from_secs(60),
    });
    let env = Env::start(s, test_settings()).await;
    let t = env.tenant();
    t.token(TokenResource::Graph).await.unwrap();
    let err = t.token(TokenResource::Exchange).await.unwrap_err();
    assert_eq!(err.status(), Some(429), "{err}");
    match err.kind() {
        ErrorKind::Throttled {
            retry_after: Some(d),
        } => assert!(
            *d > std::time::Duration::from_secs(5) && *d <= std::time::Duration::from_secs(60),
            "{d:?}"
        ),
        other => panic!("expected throttling with a wait, got {other:?}"),
    }
    // Not retried blindly: one refused request, its wait handed back to the caller.
    assert_eq!(statuses(&env.calls("login").await), vec![200, 429]);
}
