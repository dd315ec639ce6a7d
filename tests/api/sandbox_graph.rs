//! The Graph subset: applications, service principals, grants, directory roles, users, mailbox
//! endpoints with Exchange's access rules, and `$batch`.
#![allow(clippy::unwrap_used)]
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

const MAIL_READ_ID: &str = "810c84a8-4a9e-49e6-bf7d-12d183f40d01";
const MANAGE_AS_APP_ID: &str = "dc50a0fb-09a3-484d-be87-e023b12c6440";

#[tokio::test]
async fn applications_crud_and_secrets() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let rra = json!([{"resourceAppId": "00000003-0000-0000-c000-000000000000", "resourceAccess": [{"id": MAIL_READ_ID, "type": "Role"}]}]);
    let r = sb
        .graph(
            &g,
            "POST",
            "applications",
            Some(json!({"displayName": "Acme reader", "requiredResourceAccess": rra})),
        )
        .await;
    assert_eq!(r.status, 201);
    let app = r.json();
    let (id, app_id) = (
        app["id"].as_str().unwrap().to_string(),
        app["appId"].as_str().unwrap().to_string(),
    );
    assert_ne!(id, app_id);
    assert_eq!(app["passwordCredentials"], json!([]));
    assert_eq!(app["requiredResourceAccess"], rra);
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications/{id}"), None)
            .await
            .json()["appId"],
        app_id.as_str()
    );
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications(appId='{app_id}')"), None)
            .await
            .json()["id"],
        id.as_str()
    );
    let f = sb
        .graph(
            &g,
            "GET",
            &format!("applications?$filter=appId eq '{app_id}'"),
            None,
        )
        .await
        .json();
    assert_eq!(f["value"].as_array().unwrap().len(), 1);
    assert_eq!(
        sb.graph(
            &g,
            "PATCH",
            &format!("applications/{id}"),
            Some(json!({"displayName": "Acme mail reader"}))
        )
        .await
        .status,
        204
    );
    assert_eq!(
        sb.graph(&g, "GET", &format!("applications/{id}"), None)
            .await
            .json()["displayName"],
        "Acme mail reader"
    );

    // addPassword returns the secret once; the secret authenticates once a service principal exists.
    let r = sb
        .graph(
            &g,
            "POST",
            &format!("applications/{id}/addPassword"),
            Some(json!({"passwordCredential": {"displayName": "rotation 1"}})),
        )
        .await;
    assert_eq!(r.status, 200);
    let pw = r.json();
    let secret = pw["secretText"].as_str().unwrap().to_string();
    assert!((16..=64).contains(&secret.len()));
    assert_eq!(pw["hint"].as_str().unwrap(), &secret[..3]);
    let key_id = pw["keyId"].as_str().unwrap().to_string();
    let listed = sb
        .graph(&g, "GET", &format!("applications/{id}"), None)
        .await
        .json();
    assert!(listed["passwordCredentials"][0]["secretText"].is_null());
    let r = sb
        .token_request(
            &sb.tenant,
            &[
                ("client_id", &app_id),
                ("client_secret", &secret),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(
        r.json()["error_codes"],
        json!([7000229]),
        "no service principal yet"
    );
    assert_eq!(
        sb.graph(
            &g,
            "POST",
            "servicePrincipals",
            Some(json!({"appId": app_id}))
        )
        .await
        .status,
        201
    );
    sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert_eq!(
        sb.graph(
            &g,
            "POST",
            &format!("applications/{id}/removePassword"),
            Some(json!({"keyId": key_id}))
        )
        .await
        .status,
        204
    );
    let r = sb
        .token_request(
            &sb.tenant,
            &[
                ("client_id", &app_id),
                ("client_secret", &secret),
                ("scope", GRAPH_SCOPE),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(r.json()["error_codes"], json!([7000215]));
    assert_eq!(
        sb.graph(&g, "DELETE", &format!("applications/{id}"), None)
            .await
            .status,
        204
    );
    let r = sb
        .graph(&g, "GET", &format!("applications/{id}"), None)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "Request_ResourceNotFound");
    assert!(r.json()["error"]["innerError"]["request-id"].is_string());
    // Apps without Application.* permissions are refused.
    let crm = sb.crm_token().await;
    let r = sb.graph(&crm, "GET", "applications", None).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "Authorization_RequestDenied");
}

#[tokio::test]
async fn service_principals_and_app_role_grants() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let graph_sp = sb
        .graph(
            &g,
            "GET",
            "servicePrincipals(appId='00000003-0000-0000-c000-000000000000')?$select=id,appRoles",
            None,
        )
        .await
        .json();
    let role = |sp: &Value, v: &str| {
        sp["appRoles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["value"] == v)
            .cloned()
            .unwrap()
    };
    assert_eq!(role(&graph_sp, "Mail.Read")["id"], MAIL_READ_ID);
    assert_eq!(
        role(&graph_sp, "Mail.Read")["allowedMemberTypes"],
        json!(["Application"])
    );
    let exo_sp = sb
        .graph(
            &g,
            "GET",
            "servicePrincipals(appId='00000002-0000-0ff1-ce00-000000000000')",
            None,
        )
        .await
        .json();
    assert_eq!(
        role(&exo_sp, "Exchange.ManageAsApp")["id"],
        MANAGE_AS_APP_ID
    );
    assert_eq!(
        role(&exo_sp, "full_access_as_app")["id"],
        "dc890d15-9560-4a4c-9b7f-a736ec74ec40"
    );
    assert!(role(&exo_sp, "Exchange.ManageAsAppV2")["id"].is_string());

    let (app_id, secret, sp_id) = sb.new_app(json!({"displayName": "to be granted"})).await;
    assert_eq!(
        sb.graph(
            &g,
            "POST",
            "servicePrincipals",
            Some(json!({"appId": app_id}))
        )
        .await
        .status,
        409
    );
    let f = sb
        .graph(
            &g,
            "GET",
            &format!("servicePrincipals?$filter=appId eq '{app_id}'"),
            None,
        )
        .await
        .json();
    assert_eq!(f["value"][0]["id"], sp_id.as_str());
    let resource = graph_sp["id"].as_str().unwrap();
    let body = json!({"principalId": sp_id, "resourceId": resource, "appRoleId": MAIL_READ_ID});
    let r = sb
        .graph(
            &g,
            "POST",
            &format!("servicePrincipals/{resource}/appRoleAssignedTo"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 201);
    let a = r.json();
    for k in [
        "id",
        "appRoleId",
        "createdDateTime",
        "principalDisplayName",
        "principalId",
        "principalType",
        "resourceDisplayName",
        "resourceId",
    ] {
        assert!(!a[k].is_null(), "{k}");
    }
    assert_eq!(a["principalType"], "ServicePrincipal");
    assert_eq!(
        sb.graph(
            &g,
            "POST",
            &format!("servicePrincipals/{resource}/appRoleAssignedTo"),
            Some(body)
        )
        .await
        .status,
        400,
        "duplicate"
    );
    let bad = json!({"principalId": sp_id, "resourceId": resource, "appRoleId": "00000000-0000-0000-0000-000000000001"});
    assert_eq!(
        sb.graph(
            &g,
            "POST",
            &format!("servicePrincipals/{resource}/appRoleAssignedTo"),
            Some(bad)
        )
        .await
        .status,
        400
    );
    let mine = sb
        .graph(
            &g,
            "GET",
            &format!("servicePrincipals/{sp_id}/appRoleAssignments"),
            None,
        )
        .await
        .json();
    assert_eq!(mine["value"].as_array().unwrap().len(), 1);
    // The role shows up in the next token.
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    let alice = sb
        .graph(&t, "GET", &format!("users/{}/messages", upn("alice")), None)
        .await;
    assert_eq!(alice.status, 200);
    let assignment = a["id"].as_str().unwrap();
    assert_eq!(
        sb.graph(
            &g,
            "DELETE",
            &format!("servicePrincipals/{resource}/appRoleAssignedTo/{assignment}"),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        sb.graph(
            &g,
            "DELETE",
            &format!("servicePrincipals/{resource}/appRoleAssignedTo/{assignment}"),
            None
        )
        .await
        .status,
        404
    );
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert_eq!(
        sb.graph(&t, "GET", &format!("users/{}/messages", upn("alice")), None)
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn directory_role_assignment_unlocks_exchange() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let (app_id, secret, sp_id) = sb
        .new_app(
            json!({"displayName": "needs role", "exchangePermissions": ["Exchange.ManageAsApp"]}),
        )
        .await;
    let x = sb.token_for(&app_id, &secret, EXCHANGE_SCOPE).await;
    assert_eq!(sb.invoke(&x, "Get-Mailbox", Value::Null).await.status, 403);
    let r = sb
        .graph(&g, "POST", "roleManagement/directory/roleAssignments", Some(json!({"@odata.type": "#microsoft.graph.unifiedRoleAssignment",
            "principalId": sp_id, "roleDefinitionId": "29232cdf-9323-42fd-ade2-1d097af3e4de", "directoryScopeId": "/"})))
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(sb.invoke(&x, "Get-Mailbox", Value::Null).await.status, 200);
    let listed = sb
        .graph(
            &g,
            "GET",
            &format!("roleManagement/directory/roleAssignments?$filter=principalId eq '{sp_id}'"),
            None,
        )
        .await
        .json();
    assert_eq!(listed["value"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn users_groups_and_organization() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let users = sb.graph(&g, "GET", "users?$top=3", None).await.json();
    assert_eq!(users["value"].as_array().unwrap().len(), 3);
    assert!(
        users["@odata.nextLink"]
            .as_str()
            .unwrap()
            .starts_with(&sb.h.base_url)
    );
    let next =
        sb.c.get(users["@odata.nextLink"].as_str().unwrap())
            .bearer_auth(&g)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
    assert_eq!(next["value"].as_array().unwrap().len(), 3);
    assert_ne!(next["value"][0]["id"], users["value"][0]["id"]);
    let alice = sb
        .graph(&g, "GET", &format!("users/{}", upn("alice")), None)
        .await
        .json();
    assert_eq!(alice["mail"], upn("alice"));
    assert_eq!(
        sb.graph(
            &g,
            "GET",
            "users/nobody@contoso-sandbox.onmicrosoft.com",
            None
        )
        .await
        .status,
        404
    );
    let groups = sb
        .graph(
            &g,
            "GET",
            "groups?$filter=displayName eq 'Sales Team'",
            None,
        )
        .await
        .json();
    let sales = &groups["value"][0];
    assert_eq!(
        (
            sales["mailEnabled"].clone(),
            sales["securityEnabled"].clone(),
            sales["groupTypes"].clone()
        ),
        (json!(true), json!(true), json!([]))
    );
    let members = sb
        .graph(
            &g,
            "GET",
            &format!("groups/{}/members", sales["id"].as_str().unwrap()),
            None,
        )
        .await
        .json();
    assert_eq!(members["value"][0]["userPrincipalName"], upn("alice"));
    let r = sb
        .graph(
            &g,
            "POST",
            &format!("groups/{}/members/$ref", sales["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        r.status, 400,
        "mail-enabled security groups are read-only in Graph"
    );
    let org = sb.graph(&g, "GET", "organization", None).await.json();
    assert_eq!(org["value"][0]["id"], sb.tenant.as_str());
}

#[tokio::test]
async fn mailbox_endpoints_need_the_right_permission() {
    let sb = Sb::fast().await;
    let crm = sb.crm_token().await;
    let alice = upn("alice");
    let r = sb
        .graph(&crm, "GET", &format!("users/{alice}/messages"), None)
        .await;
    assert_eq!(r.status, 200);
    let msgs = r.json();
    assert!(msgs["value"][0]["body"]["content"].is_string());
    assert!(
        r.header("x-ms-ags-diagnostic")
            .unwrap()
            .contains("RoleInstance")
    );
    let id = msgs["value"][0]["id"].as_str().unwrap();
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{alice}/messages/{id}"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{alice}/mailFolders"), None)
            .await
            .status,
        200
    );
    let inbox = sb
        .graph(
            &crm,
            "GET",
            &format!("users/{alice}/mailFolders/inbox/messages?$top=1"),
            None,
        )
        .await
        .json();
    assert_eq!(inbox["value"].as_array().unwrap().len(), 1);
    assert!(inbox["@odata.nextLink"].is_string());
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{alice}/calendar/events"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{alice}/calendars"), None)
            .await
            .status,
        200
    );
    for (m, path, body) in [
        ("GET", "contacts", None),
        ("GET", "mailboxSettings", None),
        ("POST", "messages", Some(json!({"subject": "draft"}))),
        ("POST", "events", Some(json!({"subject": "meeting"}))),
    ] {
        let r = sb
            .graph(&crm, m, &format!("users/{alice}/{path}"), body)
            .await;
        assert_eq!(r.status, 403, "{m} {path}");
        let e = r.json();
        assert_eq!(e["error"]["code"], "ErrorAccessDenied");
        assert_eq!(
            e["error"]["message"],
            "Access is denied. Check credentials and try again."
        );
    }
    let r = sb
        .graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("frank")),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("MailboxNotEnabledForRESTAPI"))
    );
    let r = sb
        .graph(
            &crm,
            "GET",
            "users/ghost@contoso-sandbox.onmicrosoft.com/messages",
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("ErrorInvalidUser"))
    );
    // A shared mailbox is reachable like any other.
    assert_eq!(
        sb.graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("support")),
            None
        )
        .await
        .status,
        200
    );

    // A full-access app can write and read settings.
    let (id, secret, _) = sb
        .new_app(json!({"displayName": "full", "graphPermissions": ["Mail.ReadWrite", "MailboxSettings.ReadWrite", "Contacts.ReadWrite", "Calendars.ReadWrite"]}))
        .await;
    let full = sb.token_for(&id, &secret, GRAPH_SCOPE).await;
    let d = sb
        .graph(
            &full,
            "POST",
            &format!("users/{alice}/messages"),
            Some(json!({"subject": "draft"})),
        )
        .await;
    assert_eq!(d.status, 201);
    assert_eq!(d.json()["isDraft"], true);
    let did = d.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        sb.graph(
            &full,
            "PATCH",
            &format!("users/{alice}/messages/{did}"),
            Some(json!({"subject": "edited"}))
        )
        .await
        .json()["subject"],
        "edited"
    );
    assert_eq!(
        sb.graph(
            &full,
            "DELETE",
            &format!("users/{alice}/messages/{did}"),
            None
        )
        .await
        .status,
        204
    );
    let s = sb
        .graph(
            &full,
            "PATCH",
            &format!("users/{alice}/mailboxSettings"),
            Some(json!({"timeZone": "Europe/Paris"})),
        )
        .await;
    assert_eq!(s.json()["timeZone"], "Europe/Paris");
    assert_eq!(
        sb.graph(
            &full,
            "POST",
            &format!("users/{alice}/contacts"),
            Some(json!({"displayName": "New"}))
        )
        .await
        .status,
        201
    );
    assert_eq!(
        sb.graph(
            &full,
            "POST",
            &format!("users/{alice}/events"),
            Some(json!({"subject": "Sync"}))
        )
        .await
        .status,
        201
    );
}

#[tokio::test]
async fn read_basic_omits_bodies() {
    let sb = Sb::fast().await;
    let (id, secret, _) = sb
        .new_app(json!({"displayName": "basic", "graphPermissions": ["Mail.ReadBasic.All"]}))
        .await;
    let t = sb.token_for(&id, &secret, GRAPH_SCOPE).await;
    let v = sb
        .graph(&t, "GET", &format!("users/{}/messages", upn("bob")), None)
        .await
        .json();
    assert!(v["value"][0]["subject"].is_string());
    assert!(v["value"][0].get("body").is_none() && v["value"][0].get("bodyPreview").is_none());
}

#[tokio::test]
async fn send_mail_is_recorded_and_delivered() {
    let sb = Sb::fast().await;
    let crm = sb.crm_token().await;
    let msg = json!({"message": {"subject": "Invoice 42", "body": {"contentType": "Text", "content": "Hi"},
        "toRecipients": [{"emailAddress": {"address": upn("bob")}}]}});
    let r = sb
        .graph(
            &crm,
            "POST",
            &format!("users/{}/sendMail", upn("alice")),
            Some(msg),
        )
        .await;
    assert_eq!(r.status, 202);
    assert!(r.bytes.is_empty());
    let sent = sb
        .control("GET", &format!("tenants/{}/sent-mail", sb.tenant), None)
        .await
        .json();
    assert_eq!(sent["value"][0]["from"], upn("alice"));
    assert_eq!(sent["value"][0]["message"]["subject"], "Invoice 42");
    let inbox = sb
        .graph(
            &crm,
            "GET",
            &format!("users/{}/mailFolders/inbox/messages?$top=50", upn("bob")),
            None,
        )
        .await
        .json();
    assert!(
        inbox["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["subject"] == "Invoice 42")
    );
    let r = sb
        .graph(
            &crm,
            "POST",
            &format!("users/{}/sendMail", upn("alice")),
            Some(json!({"message": {"subject": "x"}})),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("ErrorInvalidRecipients"))
    );
}

#[tokio::test]
async fn application_access_policy_blocks_graph_exactly_as_microsoft() {
    let sb = Sb::fast().await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(&x, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess"})).await;
    let crm = sb.crm_token().await;
    assert_eq!(
        sb.graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("alice")),
            None
        )
        .await
        .status,
        200
    );
    let r = sb
        .graph(&crm, "GET", &format!("users/{}/messages", upn("bob")), None)
        .await;
    assert_eq!(r.status, 403);
    let e = r.json();
    assert_eq!(e["error"]["code"], "ErrorAccessDenied");
    assert_eq!(e["error"]["message"], "Access to OData is disabled.");
    assert!(
        e["error"]["innerError"]["request-id"].is_string()
            && e["error"]["innerError"]["date"].is_string()
    );
    // Permissions outside coverage stay tenant-wide.
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{}", upn("bob")), None)
            .await
            .status,
        200
    );
    // sendMail as bob is blocked too.
    let m = json!({"message": {"subject": "s", "toRecipients": [{"emailAddress": {"address": upn("alice")}}]}});
    assert_eq!(
        sb.graph(
            &crm,
            "POST",
            &format!("users/{}/sendMail", upn("bob")),
            Some(m)
        )
        .await
        .status,
        403
    );
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"accessDeniedMessage": "raop"})),
    )
    .await;
    let e = sb
        .graph(&crm, "GET", &format!("users/{}/messages", upn("bob")), None)
        .await
        .json();
    assert!(e["error"]["message"].as_str().unwrap().contains("[RAOP]"));
}

#[tokio::test]
async fn rbac_scopes_graph_access_and_unions_with_entra() {
    let sb = Sb::fast().await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    // An app with no Entra mail grant, scoped through RBAC to Sales Team.
    let (app_id, secret, sp_id) = sb.new_app(json!({"displayName": "rbac only"})).await;
    sb.cmd(
        &x,
        "New-ServicePrincipal",
        json!({"AppId": app_id, "ObjectId": sp_id}),
    )
    .await;
    let dn = sb
        .cmd(
            &x,
            "Get-DistributionGroup",
            json!({"Identity": "Sales Team"}),
        )
        .await[0]["DistinguishedName"]
        .as_str()
        .unwrap()
        .to_string();
    sb.cmd(
        &x,
        "New-ManagementScope",
        json!({"Name": "sales", "RecipientRestrictionFilter": format!("MemberOfGroup -eq '{dn}'")}),
    )
    .await;
    sb.cmd(
        &x,
        "New-ManagementRoleAssignment",
        json!({"Role": "Application Mail.Read", "App": sp_id, "CustomResourceScope": "sales"}),
    )
    .await;
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert_eq!(
        sb.graph(&t, "GET", &format!("users/{}/messages", upn("alice")), None)
            .await
            .status,
        200
    );
    let r = sb
        .graph(&t, "GET", &format!("users/{}/messages", upn("bob")), None)
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["error"]["message"],
        "Access is denied. Check credentials and try again."
    );
    assert_eq!(
        sb.graph(
            &t,
            "GET",
            &format!("users/{}/calendars", upn("alice")),
            None
        )
        .await
        .status,
        403,
        "only Mail.Read was assigned"
    );

    // Union trap: the CRM app keeps its unscoped Entra Mail.Read, so an RBAC scope narrows nothing.
    let crm_sp = sb
        .graph(
            &sb.mgmt_token(GRAPH_SCOPE).await,
            "GET",
            &format!("servicePrincipals(appId='{CRM_APP_ID}')"),
            None,
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    sb.cmd(
        &x,
        "New-ServicePrincipal",
        json!({"AppId": CRM_APP_ID, "ObjectId": crm_sp}),
    )
    .await;
    sb.cmd(
        &x,
        "New-ManagementRoleAssignment",
        json!({"Role": "Application Mail.Read", "App": crm_sp, "CustomResourceScope": "sales"}),
    )
    .await;
    let crm = sb.crm_token().await;
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{}/messages", upn("bob")), None)
            .await
            .status,
        200
    );
    // An AAP restricting the CRM app denies bob through Entra, but RBAC still grants alice.
    sb.cmd(
        &x,
        "New-ApplicationAccessPolicy",
        json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "dave", "AccessRight": "RestrictAccess"}),
    )
    .await;
    assert_eq!(
        sb.graph(&crm, "GET", &format!("users/{}/messages", upn("bob")), None)
            .await
            .status,
        403
    );
    assert_eq!(
        sb.graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("alice")),
            None
        )
        .await
        .status,
        200
    );
    assert_eq!(
        sb.graph(
            &crm,
            "GET",
            &format!("users/{}/messages", upn("dave")),
            None
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn wrong_exchange_service_principal_object_id_grants_nothing() {
    let sb = Sb::fast().await;
    let x = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (app_id, secret, _) = sb.new_app(json!({"displayName": "confused"})).await;
    // The app registration's object id instead of the service principal's (docs/microsoft-365.md §6.5).
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    let app_obj = sb
        .graph(&g, "GET", &format!("applications(appId='{app_id}')"), None)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    sb.cmd(
        &x,
        "New-ServicePrincipal",
        json!({"AppId": app_id, "ObjectId": app_obj}),
    )
    .await;
    sb.cmd(
        &x,
        "New-ManagementRoleAssignment",
        json!({"Role": "Application Mail.Read", "App": app_obj}),
    )
    .await;
    let t = sb.token_for(&app_id, &secret, GRAPH_SCOPE).await;
    assert_eq!(
        sb.graph(&t, "GET", &format!("users/{}/messages", upn("alice")), None)
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn json_batch() {
    let sb = Sb::fast().await;
    let crm = sb.crm_token().await;
    let batch = |reqs: Value| {
        let sb = &sb;
        let crm = crm.clone();
        async move {
            sb.graph(&crm, "POST", "$batch", Some(json!({"requests": reqs})))
                .await
        }
    };
    let r = batch(json!([
        {"id": "1", "method": "GET", "url": format!("/users/{}/messages?$top=1", upn("alice"))},
        {"id": "2", "method": "GET", "url": format!("/users/{}/contacts", upn("alice"))},
        {"id": "3", "method": "GET", "url": format!("/users/{}/calendars", upn("alice")), "dependsOn": ["2"]},
        {"id": "4", "method": "POST", "url": format!("/users/{}/sendMail", upn("alice")),
         "body": {"message": {"subject": "b", "toRecipients": [{"emailAddress": {"address": upn("bob")}}]}},
         "headers": {"Content-Type": "application/json"}}
    ]))
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let status = |id: &str| {
        v["responses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()["status"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        (status("1"), status("2"), status("3"), status("4")),
        (200, 403, 424, 202)
    );
    let one = v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "1")
        .unwrap();
    assert_eq!(one["body"]["value"].as_array().unwrap().len(), 1);
    let many: Vec<Value> = (0..21)
        .map(|i| json!({"id": i.to_string(), "method": "GET", "url": "/organization"}))
        .collect();
    assert_eq!(batch(Value::Array(many)).await.status, 400);
    let dup = json!([{"id": "a", "method": "GET", "url": "/users"}, {"id": "a", "method": "GET", "url": "/users"}]);
    assert_eq!(batch(dup).await.status, 400);
    let no_ct = json!([{"id": "a", "method": "POST", "url": format!("/users/{}/sendMail", upn("alice")), "body": {}}]);
    assert_eq!(batch(no_ct).await.json()["responses"][0]["status"], 400);
    // Inner requests are recorded individually.
    let calls = sb.calls("api=graph").await;
    assert!(
        calls
            .iter()
            .any(|c| c["batchRequestId"] == "4"
                && c["endpoint"] == "graph:POST /users/{id}/sendMail")
    );
}

/// Graph details from docs/microsoft-365.md §8.6: the service's own `request-id` beside the
/// echoed `client-request-id`, `$batch` ids without case, the permission pair consent needs,
/// addPassword's default end, the 401 challenge.
#[tokio::test]
async fn request_ids_batch_ids_consent_permissions_password_end_and_challenge() {
    let sb = Sb::fast().await;
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    // request-id is Graph's own; client-request-id echoes the caller's.
    let mine = "7d0c1f5e-2a3b-4c5d-8e9f-0a1b2c3d4e5f";
    let r =
        sb.c.get(sb.url("/v1.0/applications/00000000-0000-0000-0000-000000000001"))
            .bearer_auth(&g)
            .header("client-request-id", mine)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let rid = r.headers()["request-id"].to_str().unwrap().to_string();
    assert_eq!(r.headers()["client-request-id"], mine);
    assert_ne!(rid, mine);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["innerError"]["request-id"], rid.as_str());
    assert_eq!(e["error"]["innerError"]["client-request-id"], mine);

    // $batch ids are compared without case: a duplicate fails the whole batch.
    let r = sb
        .graph(
            &g,
            "POST",
            "$batch",
            Some(json!({"requests": [
                {"id": "a", "method": "GET", "url": "/organization"},
                {"id": "A", "method": "GET", "url": "/organization"}]})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json());

    // Consent needs AppRoleAssignment.ReadWrite.All and Application.Read.All (or Directory.Read.All).
    let graph_sp = sb
        .graph(
            &g,
            "GET",
            "servicePrincipals(appId='00000003-0000-0000-c000-000000000000')",
            None,
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, target_sp) = sb.new_app(json!({"displayName": "consent target"})).await;
    let consent = |token: String| {
        let (sb, graph_sp, target_sp) = (&sb, &graph_sp, &target_sp);
        async move {
            sb.graph(
                &token,
                "POST",
                &format!("servicePrincipals/{graph_sp}/appRoleAssignedTo"),
                Some(json!({"principalId": target_sp, "resourceId": graph_sp, "appRoleId": MAIL_READ_ID})),
            )
            .await
        }
    };
    let (half, half_secret, _) = sb
        .new_app(json!({"displayName": "assignments only", "graphPermissions": ["AppRoleAssignment.ReadWrite.All"]}))
        .await;
    let r = consent(sb.token_for(&half, &half_secret, GRAPH_SCOPE).await).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "Authorization_RequestDenied");
    let (both, both_secret, _) = sb
        .new_app(json!({"displayName": "assignments and read", "graphPermissions": ["AppRoleAssignment.ReadWrite.All", "Application.Read.All"]}))
        .await;
    let r = consent(sb.token_for(&both, &both_secret, GRAPH_SCOPE).await).await;
    assert_eq!(r.status, 201, "{}", r.json());

    // addPassword without endDateTime: two calendar years after the start (across a leap day).
    let app = sb
        .graph(
            &g,
            "POST",
            "applications",
            Some(json!({"displayName": "dates"})),
        )
        .await
        .json();
    let r = sb
        .graph(
            &g,
            "POST",
            &format!("applications/{}/addPassword", app["id"].as_str().unwrap()),
            Some(json!({"passwordCredential": {"startDateTime": "2023-03-01T00:00:00Z"}})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["endDateTime"], "2025-03-01T00:00:00Z");

    // A 401 carries the Bearer challenge.
    let r = sb.graph("", "GET", "organization", None).await;
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(challenge.contains("authorization_uri="), "{challenge}");
}
