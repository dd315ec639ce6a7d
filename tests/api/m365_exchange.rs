//! Exchange InvokeCommand client: request shape, paging, output cleaning and error kinds, against
//! a mock Exchange admin endpoint over real HTTP.
use crate::m365_support::*;
use mailscope::m365::exchange::{
    AccessRight, InvokeOptions, NewApplicationAccessPolicy, Params, Replication,
};
use mailscope::m365::{ErrorKind, M365Settings};
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ANCHOR: &str =
    "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@6f0c7a3e-1111-4c3b-9e2d-0a1b2c3d4e5f";

fn cmdlet_error(status: u16, code: &str, detail: &str) -> (u16, ResponseTemplate) {
    json(
        status,
        json!({"error": {"code": code, "message": "Error executing cmdlet",
            "details": [{"code": "Client", "target": "", "message": detail}],
            "innererror": {"message": "Error executing cmdlet", "type": "Microsoft.Exchange.Admin.OData.Core.ODataServiceException"}}}),
    )
}

const NOT_FOUND_DETAIL: &str = "Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|The operation couldn't be performed because object 'nope' couldn't be found on 'EURPR01A001.PROD.OUTLOOK.COM'.";

#[tokio::test]
async fn invoke_sends_the_documented_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .and(wiremock::matchers::body_string_contains(
            "scope=https%3A%2F%2Foutlook.office365.com%2F.default",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(3599)))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .and(header("x-anchormailbox", ANCHOR))
        .and(header("prefer", "odata.maxpagesize=1000"))
        .and(header("content-type", "application/json; charset=utf-8"))
        .and(body_json(json!({"CmdletInput": {"CmdletName": "Get-Mailbox", "Parameters": {"ResultSize": "1"}}})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "@odata.context": "https://outlook.office.com/adminapi/beta/x/$metadata#Collection(Exchange.GenericHashTable)",
            "value": [{"Name": "alice", "PrimarySmtpAddress": "alice@contoso.test", "RecipientTypeDetails": "UserMailbox",
                       "ExchangeGuid@data.type": "System.Guid", "ExchangeGuid@odata.type": "#Guid", "ExchangeGuid": "e1"}]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let m = tenant(&server)
        .exchange()
        .list_mailboxes(Some(1))
        .await
        .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        m[0].primary_smtp_address.as_deref(),
        Some("alice@contoso.test")
    );
    assert_eq!(m[0].exchange_guid.as_deref(), Some("e1"));
}

#[tokio::test]
async fn parameterless_cmdlets_omit_parameters() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .and(body_json(
            json!({"CmdletInput": {"CmdletName": "Get-OrganizationConfig"}}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"value": [{"Name": "contoso"}]})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let cfg = tenant(&server)
        .exchange()
        .get_organization_config()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cfg["Name"], "contoso");
}

#[tokio::test]
async fn next_link_paging_over_three_pages_posts_the_same_body() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let base = server.uri();
    let script = Script::new(move |req, _| {
        let page: usize = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "$skiptoken")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(1);
        let items: Vec<_> = (0..3).map(|i| json!({"Name": format!("m{page}-{i}"), "Guid@odata.type": "#Guid", "Guid": "g"})).collect();
        let mut body = json!({"value": items});
        if page < 3 {
            // Microsoft answers with outlook.office.com; the first link is on our host.
            let host = if page == 1 {
                base.clone()
            } else {
                "https://outlook.office.com".to_string()
            };
            body["@odata.nextLink"] = json!(format!(
                "{host}/adminapi/beta/{TENANT}/InvokeCommand?$skiptoken={}",
                page + 1
            ));
        }
        json(200, body)
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let out = tenant(&server)
        .exchange()
        .invoke(
            "Get-Mailbox",
            Params::new().str("ResultSize", "Unlimited").into_map(),
            &InvokeOptions::read(),
        )
        .await
        .unwrap();
    let names: Vec<_> = out
        .items
        .iter()
        .map(|m| m["Name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 9);
    assert_eq!(names[0], "m1-0");
    assert_eq!(names[8], "m3-2");
    assert!(out.items.iter().all(|m| !m.keys().any(|k| k.contains('@'))));
    let hits = script.hits();
    assert_eq!(hits.len(), 3, "all pages went to the configured host");
    assert!(
        hits.windows(2).all(|w| w[0].body == w[1].body),
        "same body on every page"
    );
}

#[tokio::test]
async fn domain_tenant_is_addressed_by_the_token_tid() {
    let server = MockServer::start().await;
    mount_token(&server, "contoso.onmicrosoft.com", None).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .and(header("x-anchormailbox", ANCHOR))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"value": []})))
        .expect(1)
        .mount(&server)
        .await;
    let (c, _) = client(fast_settings());
    let t = c.tenant(context(
        &server,
        "contoso.onmicrosoft.com",
        secret_credential(),
    ));
    assert!(
        t.exchange()
            .list_mailboxes(Some(1))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn anchor_and_tenant_form_are_configurable() {
    let server = MockServer::start().await;
    mount_token(&server, "contoso.onmicrosoft.com", None).await;
    Mock::given(method("POST"))
        .and(path("/adminapi/beta/contoso.onmicrosoft.com/InvokeCommand"))
        .and(header(
            "x-anchormailbox",
            "UPN:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@contoso.onmicrosoft.com",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"value": null})))
        .expect(1)
        .mount(&server)
        .await;
    let settings = M365Settings {
        exchange_anchor_mailbox: "UPN:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@{tenant}"
            .into(),
        exchange_tenant_form: mailscope::m365::ExchangeTenantForm::AsConfigured,
        ..fast_settings()
    };
    let (c, _) = client(settings);
    let t = c.tenant(context(
        &server,
        "contoso.onmicrosoft.com",
        secret_credential(),
    ));
    assert!(
        t.exchange()
            .list_mailboxes(Some(1))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn not_found_details_are_parsed_and_lookups_return_none() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| cmdlet_error(404, "NotFound", NOT_FOUND_DETAIL));
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let x = tenant(&server).exchange();
    assert_eq!(
        x.get_distribution_group("nope", Replication::Ignore)
            .await
            .unwrap(),
        None
    );
    let err = x
        .invoke(
            "Get-DistributionGroup",
            Params::new().str("Identity", "nope").into_map(),
            &InvokeOptions::read(),
        )
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::NotFound);
    assert_eq!(err.remote_code(), Some("Ex6F9304"));
    assert_eq!(
        err.exception_type(),
        Some("Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException")
    );
    assert!(
        err.remote_message()
            .unwrap()
            .starts_with("The operation couldn't be performed")
    );
    assert_eq!(
        script.hits().len(),
        2,
        "404s are not retried without a replication window"
    );
}

#[tokio::test]
async fn replication_404s_are_retried_only_when_asked() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        if n < 3 {
            cmdlet_error(404, "NotFound", NOT_FOUND_DETAIL)
        } else {
            json(
                200,
                json!({"value": [{"Name": "Scope-Finance", "DistinguishedName": "CN=Scope-Finance,OU=x", "RecipientTypeDetails": "MailUniversalSecurityGroup"}]}),
            )
        }
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let g = tenant(&server)
        .exchange()
        .get_distribution_group("Scope-Finance", Replication::AwaitNew)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        g.distinguished_name.as_deref(),
        Some("CN=Scope-Finance,OU=x")
    );
    assert_eq!(script.hits().len(), 4);
}

#[tokio::test]
async fn invalid_parameter_and_ambiguous_parameter_set() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        if n == 0 {
            cmdlet_error(
                400,
                "BadRequest",
                "Ex9A1B2C|System.Management.Automation.ParameterBindingException|A parameter cannot be found that matches parameter name 'Bogus'.",
            )
        } else {
            cmdlet_error(
                400,
                "BadRequest",
                "ExD00D|System.Management.Automation.AmbiguousParameterSetException|Parameter set cannot be resolved using the specified named parameters.",
            )
        }
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let x = tenant(&server).exchange();
    for _ in 0..2 {
        let err = x
            .invoke(
                "Get-Mailbox",
                Params::new().str("Bogus", "1").into_map(),
                &InvokeOptions::read(),
            )
            .await
            .unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::InvalidParameter);
        assert_eq!(err.code(), "invalid_parameter");
    }
    assert_eq!(script.hits().len(), 2, "400s are not retried");
}

#[tokio::test]
async fn gzip_labelled_nul_403_means_missing_exchange_admin_role() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("content-encoding", "gzip")
                .insert_header("content-type", "application/json")
                .set_body_bytes(vec![0u8; 64]),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = tenant(&server)
        .exchange()
        .list_mailboxes(Some(1))
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::MissingExchangeAdminRole);
    assert_eq!(err.status(), Some(403));
    assert!(err.cause().contains("Exchange Administrator"));
    assert!(err.fix().contains("Exchange Administrator role"));
}

#[tokio::test]
async fn exchange_401_means_missing_manage_as_app_after_one_fresh_token() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, Some(2)).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(ResponseTemplate::new(401))
        .expect(2)
        .mount(&server)
        .await;
    let err = tenant(&server)
        .exchange()
        .list_mailboxes(Some(1))
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::MissingManageAsAppRole);
    assert!(err.fix().contains("Exchange.ManageAsApp"));
}

#[tokio::test]
async fn policy_limit_is_recognised() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| {
        cmdlet_error(
            400,
            "BadRequest",
            "Ex1234|Microsoft.Exchange.Management.Tasks.TaskException|The total size of App Access Policies exceeded the limit.",
        )
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let err = tenant(&server)
        .exchange()
        .new_application_access_policy(&NewApplicationAccessPolicy {
            app_ids: vec!["app-1".into()],
            policy_scope_group_id: "Scope-Finance".into(),
            access_right: AccessRight::RestrictAccess,
            description: None,
        })
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::PolicyLimitReached);
    let body: serde_json::Value = serde_json::from_slice(&script.hits()[0].body).unwrap();
    assert_eq!(
        body,
        json!({"CmdletInput": {"CmdletName": "New-ApplicationAccessPolicy", "Parameters": {
            "AppId": ["app-1"], "PolicyScopeGroupId": "Scope-Finance", "AccessRight": "RestrictAccess", "Description": " "}}})
    );
}

#[tokio::test]
async fn concurrency_limit_body_is_throttling_and_retried() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, n| {
        if n == 0 {
            json(
                500,
                json!({"error": {"code": "InternalServerError", "message": "You have reached the maximum number of concurrent requests per tenant. Please wait and try again"}}),
            )
        } else {
            json(200, json!({"value": []}))
        }
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    // Add-DistributionGroupMember is a write, yet a refused request is safe to resend.
    let added = tenant(&server)
        .exchange()
        .add_distribution_group_member("g", "alice", Replication::Ignore)
        .await
        .unwrap();
    assert!(added);
    assert_eq!(script.hits().len(), 2);
}

fn policy(app: &str, guid: &str) -> serde_json::Value {
    json!({"Identity": format!("{TENANT}\\{app}:S-1-5-21-1-2-3-4;{guid}"), "AppId": app,
           "ScopeIdentityRaw": format!("S-1-5-21-1-2-3-4;{guid}"), "AccessRight": "RestrictAccess", "Description": " "})
}

#[tokio::test]
async fn get_policy_with_unknown_identity_returning_everything_is_filtered() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"value": [policy("app-1", "g-1"), policy("app-2", "g-2")]})),
        )
        .mount(&server)
        .await;
    let x = tenant(&server).exchange();
    let unknown = format!("{TENANT}\\app-9:S-1-5-21-9;g-9");
    assert_eq!(
        x.get_application_access_policy(&unknown).await.unwrap(),
        None
    );
    let known = format!("{TENANT}\\app-2:S-1-5-21-1-2-3-4;g-2");
    let p = x
        .get_application_access_policy(&known)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.app_id.as_deref(), Some("app-2"));
    assert_eq!(p.scope_group_guid().as_deref(), Some("g-2"));
    let mine = x
        .application_access_policies_for_app("APP-1")
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
}

#[tokio::test]
async fn tenant_without_any_policy_lists_none() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|_, _| {
        cmdlet_error(
            404,
            "NotFound",
            "Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|The operation couldn't be performed because object 'OU=contoso.onmicrosoft.com,OU=Microsoft Exchange Hosted Organizations,DC=x\\*' couldn't be found.",
        )
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script)
        .mount(&server)
        .await;
    assert!(
        tenant(&server)
            .exchange()
            .list_application_access_policies()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn removals_and_adds_accept_every_empty_shape_and_repeats() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        match body["CmdletInput"]["CmdletName"].as_str().unwrap() {
            "Remove-DistributionGroup" => (200, ResponseTemplate::new(200)),
            "Remove-ApplicationAccessPolicy" => json(200, json!({"value": null})),
            "Remove-ManagementScope" => json(200, json!({"@odata.context": "x"})),
            "Remove-ServicePrincipal" => cmdlet_error(404, "NotFound", NOT_FOUND_DETAIL),
            "Add-DistributionGroupMember" => cmdlet_error(
                400,
                "BadRequest",
                "ExB61C59|Microsoft.Exchange.Management.Tasks.MemberAlreadyExistsException|The recipient \"alice\" is already a member of the group \"g\".",
            ),
            _ => json(200, json!({"value": []})),
        }
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script)
        .mount(&server)
        .await;
    let x = tenant(&server).exchange();
    assert!(x.remove_distribution_group("g").await.unwrap());
    assert!(x.remove_application_access_policy("p").await.unwrap());
    assert!(x.remove_management_scope("s").await.unwrap());
    assert!(
        !x.remove_service_principal("sp").await.unwrap(),
        "already gone"
    );
    assert!(
        !x.add_distribution_group_member("g", "alice", Replication::Ignore)
            .await
            .unwrap(),
        "already a member"
    );
}

#[tokio::test]
async fn test_cmdlets_are_typed() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        match body["CmdletInput"]["CmdletName"].as_str().unwrap() {
            "Test-ApplicationAccessPolicy" => json(
                200,
                json!({"value": [{"AppId": "app-1", "Mailbox": "alice", "MailboxId": "m-1",
                "MailboxSid": "S-1-5-21-1", "AccessCheckResult": "Denied"}]}),
            ),
            _ => json(
                200,
                json!({"value": [
                {"RoleName": "Application Mail.Read", "GrantedPermissions": "Mail.Read", "AllowedResourceScope": "Finance",
                 "ScopeType": "CustomRecipientScope", "InScope": true}]}),
            ),
        }
    });
    Mock::given(method("POST"))
        .and(path(invoke_path()))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let x = tenant(&server).exchange();
    let check = x
        .test_application_access_policy("alice@contoso.test", "app-1")
        .await
        .unwrap();
    assert_eq!(check.granted(), Some(false));
    let rows = x
        .test_service_principal_authorization("app-1", Some("alice@contoso.test"))
        .await
        .unwrap();
    assert_eq!(rows[0].granted_permissions, vec!["Mail.Read"]);
    assert_eq!(rows[0].in_scope(), Some(true));
    let sent: serde_json::Value = serde_json::from_slice(&script.hits()[0].body).unwrap();
    assert_eq!(
        sent["CmdletInput"]["Parameters"],
        json!({"Identity": "alice@contoso.test", "AppId": "app-1"})
    );
}
