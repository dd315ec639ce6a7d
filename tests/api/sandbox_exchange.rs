//! Exchange admin InvokeCommand: authorization, parameter validation, every cmdlet, paging,
//! replication lag, tenant forms and the anchor header.
#![allow(clippy::unwrap_used)]
use std::time::Duration;

use mailscope::sandbox::SandboxSettings;
use mailscope::sandbox::settings::DelayRange;
use serde_json::{Value, json};

use crate::sandbox_helpers::*;

fn details(r: &Reply) -> Vec<String> {
    let v = r.json();
    v["error"]["details"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .split('|')
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn caller_needs_manage_as_app_and_a_directory_role() {
    let sb = Sb::fast().await;
    // No Exchange.ManageAsApp: 401 with a Bearer challenge.
    let (id, secret, _) = sb
        .new_app(json!({"displayName": "nothing", "graphPermissions": ["User.Read.All"]}))
        .await;
    let t = sb.token_for(&id, &secret, EXCHANGE_SCOPE).await;
    let r = sb.invoke(&t, "Get-Mailbox", Value::Null).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer "));
    // The app role without a directory role: 403 whose body is not JSON.
    let (id, secret, _) = sb
        .new_app(
            json!({"displayName": "role only", "exchangePermissions": ["Exchange.ManageAsApp"]}),
        )
        .await;
    let t = sb.token_for(&id, &secret, EXCHANGE_SCOPE).await;
    let r = sb.invoke(&t, "Get-Mailbox", Value::Null).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert!(!r.bytes.is_empty() && r.bytes.iter().all(|b| *b == 0));
    assert!(serde_json::from_slice::<Value>(&r.bytes).is_err());
    // A read-only role runs Get-* but not New-*.
    let (id, secret, _) = sb
        .new_app(json!({"displayName": "reader", "exchangePermissions": ["Exchange.ManageAsApp"], "directoryRoles": ["Global Reader"]}))
        .await;
    let t = sb.token_for(&id, &secret, EXCHANGE_SCOPE).await;
    assert_eq!(
        sb.invoke(&t, "Get-ApplicationAccessPolicy", Value::Null)
            .await
            .status,
        200
    );
    let r = sb
        .invoke(
            &t,
            "New-ManagementScope",
            json!({"Name": "x", "RecipientRestrictionFilter": "Alias -eq 'a'"}),
        )
        .await;
    assert_eq!(r.status, 403);
    // A Graph token is not an Exchange token.
    let g = sb.mgmt_token(GRAPH_SCOPE).await;
    assert_eq!(sb.invoke(&g, "Get-Mailbox", Value::Null).await.status, 401);
}

#[tokio::test]
async fn unknown_cmdlets_are_403_and_the_body_variant_is_a_setting() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb.invoke(&t, "Get-Nonsense", Value::Null).await;
    assert_eq!(r.status, 403);
    let r = sb
        .control(
            "PATCH",
            &format!("tenants/{}/settings", sb.tenant),
            Some(json!({"exchangeForbiddenBody": "invalid-operation-json"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = sb.invoke(&t, "Get-Nonsense", Value::Null).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["message"], "Invalid Operation");
}

#[tokio::test]
async fn parameter_validation_uses_exchanges_error_shape() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb
        .invoke(&t, "Get-Mailbox", json!({"Colour": "blue"}))
        .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["code"], "BadRequest");
    assert_eq!(v["error"]["message"], "Error executing cmdlet");
    assert!(v["error"]["innererror"]["type"].is_string());
    let d = details(&r);
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(d[0].starts_with("Ex"));
    assert!(d[2].contains("'Colour'"));
    let r = sb
        .invoke(
            &t,
            "New-ApplicationAccessPolicy",
            json!({"AppId": CRM_APP_ID}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        details(&r)[2].contains("missing mandatory parameters: AccessRight PolicyScopeGroupId")
    );
    let r = sb
        .invoke(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "AllowAll"}))
        .await;
    assert!(details(&r)[2].contains("RestrictAccess, DenyAccess"));
    let r = sb
        .invoke(
            &t,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "alice", "AppId": [CRM_APP_ID, CRM_APP_ID]}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(details(&r)[2].contains("System.Object[]"));
    let r = sb
        .invoke(&t, "Get-Mailbox", json!({"Identity": "nobody"}))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "NotFound");
    assert_eq!(
        details(&r)[1],
        "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException"
    );
    assert_eq!(
        r.header("x-exceptiontype").as_deref(),
        Some("ManagementObjectNotFoundException")
    );
    // Parameterless cmdlets omit Parameters.
    let o = sb.cmd(&t, "Get-OrganizationConfig", Value::Null).await;
    assert_eq!(o[0]["Guid"], sb.tenant.as_str());
}

#[tokio::test]
async fn success_envelope_and_annotations() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb
        .invoke(&t, "Get-Mailbox", json!({"Identity": "alice"}))
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json;odata.metadata=minimal")
    );
    assert!(
        r.header("rate-limit-remaining").is_none(),
        "fast settings disable budgets"
    );
    let v = r.json();
    assert!(
        v["@odata.context"]
            .as_str()
            .unwrap()
            .starts_with("https://outlook.office.com/adminapi/beta/")
    );
    assert_eq!(v["@adminapi.warnings"], json!([]));
    let m = &v["value"][0];
    assert_eq!(m["RecipientTypeDetails"], "UserMailbox");
    assert_eq!(m["Guid@odata.type"], "#Guid");
    assert_eq!(m["Guid@data.type"], "System.Guid");
    assert_eq!(m["EmailAddresses@odata.type"], "#Collection(String)");
    assert_eq!(m["CustomAttribute1"], "012332");
    assert_ne!(m["ExternalDirectoryObjectId"], m["ExchangeObjectId"]);
    assert_eq!(m["UserPrincipalName"], upn("alice"));
}

#[tokio::test]
async fn recipients_mailboxes_and_cas_mailboxes() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let mbx = sb
        .cmd(&t, "Get-Mailbox", json!({"ResultSize": "Unlimited"}))
        .await;
    let kinds: Vec<&str> = mbx
        .iter()
        .map(|m| m["RecipientTypeDetails"].as_str().unwrap())
        .collect();
    for k in [
        "UserMailbox",
        "SharedMailbox",
        "RoomMailbox",
        "EquipmentMailbox",
    ] {
        assert!(kinds.contains(&k), "{k}");
    }
    assert!(!kinds.contains(&"MailUser"));
    let shared = sb
        .cmd(
            &t,
            "Get-Mailbox",
            json!({"RecipientTypeDetails": ["SharedMailbox"]}),
        )
        .await;
    assert_eq!(shared.len(), 1);
    let all = sb
        .cmd(&t, "Get-Recipient", json!({"ResultSize": 1000}))
        .await;
    let find = |name: &str| all.iter().find(|r| r["Name"] == name).unwrap().clone();
    assert_eq!(find("Sales Team")["IsValidSecurityPrincipal"], true);
    assert_eq!(find("All Staff")["IsValidSecurityPrincipal"], false);
    assert_eq!(find("Project X")["RecipientTypeDetails"], "GroupMailbox");
    assert_eq!(find("partner")["RecipientTypeDetails"], "MailUser");
    assert!(
        all.iter().all(|r| r["Name"] != "Entra Admins"),
        "Entra-only groups are not recipients"
    );
    let filtered = sb
        .cmd(
            &t,
            "Get-Recipient",
            json!({"Filter": "Department -eq 'Finance'"}),
        )
        .await;
    assert_eq!(filtered.len(), 2);
    let cas = sb
        .cmd(&t, "Get-CASMailbox", json!({"Identity": "bob"}))
        .await;
    assert!(cas[0]["EwsEnabled"].is_null());
    sb.control(
        "PATCH",
        &format!("tenants/{}/recipients/bob", sb.tenant),
        Some(json!({"ewsEnabled": false})),
    )
    .await;
    let cas = sb
        .cmd(&t, "Get-CASMailbox", json!({"Identity": "bob"}))
        .await;
    assert_eq!(cas[0]["EwsEnabled"], false);
}

#[tokio::test]
async fn distribution_group_lifecycle() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let g = sb
        .cmd(
            &t,
            "New-DistributionGroup",
            json!({"Name": "mailscope-crm", "Type": "Security", "Members": ["alice"]}),
        )
        .await;
    assert_eq!(g[0]["RecipientTypeDetails"], "MailUniversalSecurityGroup");
    assert_eq!(g[0]["GroupType"], "Universal, SecurityEnabled");
    assert_eq!(g[0]["MemberJoinRestriction"], "Closed");
    assert!(
        g[0]["DistinguishedName"]
            .as_str()
            .unwrap()
            .starts_with("CN=mailscope-crm,OU=contoso-sandbox.onmicrosoft.com")
    );
    let r = sb
        .invoke(
            &t,
            "New-DistributionGroup",
            json!({"Name": "mailscope-crm"}),
        )
        .await;
    assert_eq!(r.status, 400, "names are unique");
    let r = sb
        .invoke(
            &t,
            "New-DistributionGroup",
            json!({"Name": "open-sec", "Type": "Security", "MemberJoinRestriction": "Open"}),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = sb
        .invoke(&t, "New-DistributionGroup", json!({"Name": "x".repeat(65)}))
        .await;
    assert_eq!(r.status, 400);
    let dl = sb
        .cmd(&t, "New-DistributionGroup", json!({"Name": "newsletter"}))
        .await;
    assert_eq!(
        dl[0]["RecipientTypeDetails"],
        "MailUniversalDistributionGroup"
    );

    // Membership needs -BypassSecurityGroupManagerCheck for an app (not a manager).
    let r = sb
        .invoke(
            &t,
            "Add-DistributionGroupMember",
            json!({"Identity": "mailscope-crm", "Member": "bob"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(details(&r)[2].contains("manager of the group"));
    let add = |m: &str| json!({"Identity": "mailscope-crm", "Member": m, "BypassSecurityGroupManagerCheck": true});
    let r = sb
        .invoke(&t, "Add-DistributionGroupMember", add("bob"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["value"],
        json!([]),
        "no-output cmdlets return an empty value by default"
    );
    let r = sb
        .invoke(&t, "Add-DistributionGroupMember", add("bob"))
        .await;
    assert!(details(&r)[1].ends_with("MemberAlreadyExistsException"));
    assert_eq!(
        sb.invoke(&t, "Add-DistributionGroupMember", add("support"))
            .await
            .status,
        200,
        "shared mailboxes can be members"
    );
    let r = sb
        .invoke(&t, "Add-DistributionGroupMember", add("Project X"))
        .await;
    assert_eq!(r.status, 400, "Microsoft 365 groups cannot be members");
    let names = |v: Vec<Value>| {
        v.iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let members = sb
        .cmd(
            &t,
            "Get-DistributionGroupMember",
            json!({"Identity": "mailscope-crm"}),
        )
        .await;
    assert_eq!(names(members), vec!["alice", "bob", "support"]);
    let r = sb
        .invoke(&t, "Remove-DistributionGroupMember", json!({"Identity": "mailscope-crm", "Member": "alice", "BypassSecurityGroupManagerCheck": true}))
        .await;
    assert_eq!(r.status, 200);
    let r = sb
        .invoke(&t, "Remove-DistributionGroupMember", json!({"Identity": "mailscope-crm", "Member": "alice", "BypassSecurityGroupManagerCheck": true}))
        .await;
    assert!(details(&r)[1].ends_with("MemberNotFoundException"));
    let r = sb
        .invoke(&t, "Update-DistributionGroupMember", json!({"Identity": "mailscope-crm", "Members": ["carol", "dave"], "BypassSecurityGroupManagerCheck": true}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        names(
            sb.cmd(
                &t,
                "Get-DistributionGroupMember",
                json!({"Identity": "mailscope-crm"})
            )
            .await
        ),
        vec!["carol", "dave"]
    );
    let r = sb
        .invoke(&t, "Set-DistributionGroup", json!({"Identity": "mailscope-crm", "DisplayName": "CRM scope", "BypassSecurityGroupManagerCheck": true}))
        .await;
    assert_eq!(r.status, 200);
    let g = sb
        .cmd(
            &t,
            "Get-DistributionGroup",
            json!({"Identity": "mailscope-crm"}),
        )
        .await;
    assert_eq!(g[0]["DisplayName"], "CRM scope");
    let all = sb.cmd(&t, "Get-DistributionGroup", Value::Null).await;
    assert!(
        all.iter()
            .all(|g| g["RecipientTypeDetails"] != "GroupMailbox")
    );
    let r = sb
        .invoke(
            &t,
            "Remove-DistributionGroup",
            json!({"Identity": "mailscope-crm", "BypassSecurityGroupManagerCheck": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sb.invoke(
            &t,
            "Get-DistributionGroup",
            json!({"Identity": "mailscope-crm"})
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn application_access_policy_cmdlets() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let sales_id = sb.recipient_id("Sales Team").await;
    let p = sb
        .cmd(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "}))
        .await;
    assert_eq!(p.len(), 1);
    let identity = p[0]["Identity"].as_str().unwrap().to_string();
    let raw = p[0]["ScopeIdentityRaw"].as_str().unwrap().to_string();
    let (sid, oid) = raw.split_once(';').unwrap();
    assert!(sid.starts_with("S-1-5-21-"));
    assert_eq!(
        oid, sales_id,
        "the part after ';' is the group's Entra object id by default"
    );
    assert_eq!(identity, format!("{}\\{CRM_APP_ID}:{raw}", sb.tenant));
    assert_eq!(p[0]["ScopeName"], "Sales Team");
    assert_eq!(p[0]["AccessRight"], "RestrictAccess");
    assert_eq!(p[0]["ShardType"], "All");
    // Test cmdlet sees it at once.
    let test = |who: &str| json!({"Identity": who, "AppId": CRM_APP_ID});
    let r = sb
        .cmd(&t, "Test-ApplicationAccessPolicy", test("alice"))
        .await;
    assert_eq!(r[0]["AccessCheckResult"], "Granted");
    assert_eq!(r[0]["Mailbox"], "alice");
    assert!(
        r[0]["MailboxSid"]
            .as_str()
            .unwrap()
            .starts_with("S-1-5-21-")
    );
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", test("bob"))
            .await[0]["AccessCheckResult"],
        "Denied"
    );
    // The service principal object id instead of the client id matches no policy (docs/microsoft-365.md §6.2).
    let r = sb
        .cmd(
            &t,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "bob", "AppId": "11111111-2222-3333-4444-555555555555"}),
        )
        .await;
    assert_eq!(r[0]["AccessCheckResult"], "Granted");
    // Same app and scope again is refused; an omitted description is generated.
    assert_eq!(
        sb.invoke(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Sales Team", "AccessRight": "DenyAccess"})).await.status,
        400
    );
    let other = "0f0e0d0c-0b0a-4909-8807-060504030201";
    let two = sb
        .cmd(&t, "New-ApplicationAccessPolicy", json!({"AppId": [other, "*"], "PolicyScopeGroupId": "bob", "AccessRight": "DenyAccess"}))
        .await;
    assert_eq!(two.len(), 2, "one policy per AppId");
    assert!(
        two[0]["Description"]
            .as_str()
            .unwrap()
            .starts_with(&format!("AppId: {other}; ScopeIdentitySid: S-1-5-21-"))
    );
    // Get: by identity, and an unknown identity returns every policy.
    let all = sb.cmd(&t, "Get-ApplicationAccessPolicy", Value::Null).await;
    assert_eq!(all.len(), 3);
    assert_eq!(
        sb.cmd(
            &t,
            "Get-ApplicationAccessPolicy",
            json!({"Identity": identity})
        )
        .await
        .len(),
        1
    );
    assert_eq!(
        sb.cmd(
            &t,
            "Get-ApplicationAccessPolicy",
            json!({"Identity": "no such policy"})
        )
        .await
        .len(),
        3
    );
    assert_eq!(
        sb.cmd(&t, "Get-ApplicationAccessPolicy", json!({"Identity": null}))
            .await
            .len(),
        3
    );
    // Set changes the description only.
    assert_eq!(
        sb.invoke(
            &t,
            "Set-ApplicationAccessPolicy",
            json!({"Identity": identity, "Description": "crm"})
        )
        .await
        .status,
        200
    );
    let r = sb
        .invoke(
            &t,
            "Set-ApplicationAccessPolicy",
            json!({"Identity": identity, "AccessRight": "DenyAccess"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        sb.cmd(
            &t,
            "Get-ApplicationAccessPolicy",
            json!({"Identity": identity})
        )
        .await[0]["Description"],
        "crm"
    );
    // The '*' DenyAccess policy on bob applies to the CRM app too: rule 1.
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", test("bob"))
            .await[0]["AccessCheckResult"],
        "Denied"
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Remove-ApplicationAccessPolicy",
            json!({"Identity": identity})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Remove-ApplicationAccessPolicy",
            json!({"Identity": identity})
        )
        .await
        .status,
        404
    );
    // With the RestrictAccess policy gone, carol is reachable again (rule 4).
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", test("carol"))
            .await[0]["AccessCheckResult"],
        "Granted"
    );
}

#[tokio::test]
async fn policy_scope_type_rules() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let new = |scope: &str| json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": scope, "AccessRight": "RestrictAccess"});
    for refused in [
        "support",
        "room101",
        "projector",
        "All Staff",
        "Project X",
        "vendor",
    ] {
        let r = sb
            .invoke(&t, "New-ApplicationAccessPolicy", new(refused))
            .await;
        assert_eq!(
            r.status,
            400,
            "{refused}: {}",
            String::from_utf8_lossy(&r.bytes)
        );
    }
    let r = sb
        .invoke(&t, "New-ApplicationAccessPolicy", new("Entra Admins"))
        .await;
    assert_eq!(
        r.status, 404,
        "Entra-only security groups are not Exchange recipients"
    );
    for allowed in ["Support Mailboxes", "dave", "partner"] {
        assert_eq!(
            sb.invoke(&t, "New-ApplicationAccessPolicy", new(allowed))
                .await
                .status,
            200,
            "{allowed}"
        );
    }
}

#[tokio::test]
async fn policy_storage_limit() {
    let sb = Sb::fast().await;
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"policyStorageLimitBytes": 603})),
    )
    .await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let apps = [
        "10000000-0000-4000-8000-000000000001",
        "10000000-0000-4000-8000-000000000002",
        "10000000-0000-4000-8000-000000000003",
        "10000000-0000-4000-8000-000000000004",
    ];
    for a in &apps[..3] {
        let r = sb.invoke(&t, "New-ApplicationAccessPolicy", json!({"AppId": a, "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "})).await;
        assert_eq!(r.status, 200);
    }
    let r = sb.invoke(&t, "New-ApplicationAccessPolicy", json!({"AppId": apps[3], "PolicyScopeGroupId": "Sales Team", "AccessRight": "RestrictAccess", "Description": " "})).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        details(&r)[2],
        "The total size of App Access Policies exceeded the limit."
    );
}

#[tokio::test]
async fn rbac_for_applications_cmdlets() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (app_id, _, sp_id) = sb.new_app(json!({"displayName": "scoped reader"})).await;
    let sp = sb
        .cmd(
            &t,
            "New-ServicePrincipal",
            json!({"AppId": app_id, "ObjectId": sp_id, "DisplayName": "scoped reader"}),
        )
        .await;
    assert_eq!(sp[0]["ObjectId"], sp_id.as_str());
    assert_eq!(
        sb.invoke(
            &t,
            "New-ServicePrincipal",
            json!({"AppId": app_id, "ObjectId": sp_id})
        )
        .await
        .status,
        400
    );
    assert_eq!(
        sb.cmd(&t, "Get-ServicePrincipal", json!({"Identity": app_id}))
            .await
            .len(),
        1
    );
    let sales = sb
        .cmd(
            &t,
            "Get-DistributionGroup",
            json!({"Identity": "Sales Team"}),
        )
        .await;
    let dn = sales[0]["DistinguishedName"].as_str().unwrap().to_string();
    let r = sb
        .invoke(
            &t,
            "New-ManagementScope",
            json!({"Name": "bad", "RecipientRestrictionFilter": "MemberOfGroup 'x'"}),
        )
        .await;
    assert_eq!(r.status, 400);
    let scope = sb.cmd(&t, "New-ManagementScope", json!({"Name": "Sales scope", "RecipientRestrictionFilter": format!("MemberOfGroup -eq '{dn}'")})).await;
    assert_eq!(scope[0]["ScopeRestrictionType"], "RecipientScope");
    assert_eq!(
        scope[0]["RecipientFilter"],
        format!("MemberOfGroup -eq '{dn}'")
    );
    let r = sb
        .invoke(
            &t,
            "New-ManagementRoleAssignment",
            json!({"Role": "Mail Recipients", "App": sp_id}),
        )
        .await;
    assert_eq!(r.status, 400, "only application roles with -App");
    let a = sb
        .cmd(&t, "New-ManagementRoleAssignment", json!({"Role": "Application Mail.Read", "App": sp_id, "CustomResourceScope": "Sales scope"}))
        .await;
    assert_eq!(a[0]["RoleAssigneeType"], "ServicePrincipal");
    assert_eq!(a[0]["RoleAssigneeName"], app_id.as_str());
    assert_eq!(a[0]["CustomResourceScope"], "Sales scope");
    let name = a[0]["Name"].as_str().unwrap().to_string();
    let org = sb
        .cmd(
            &t,
            "New-ManagementRoleAssignment",
            json!({"Name": "cal-org", "Role": "Application Calendars.Read", "App": app_id}),
        )
        .await;
    assert_eq!(org[0]["RecipientWriteScope"], "Organization");
    let r = sb
        .invoke(
            &t,
            "New-ManagementRoleAssignment",
            json!({"Name": "n".repeat(65), "Role": "Application Mail.Send", "App": sp_id}),
        )
        .await;
    assert_eq!(r.status, 400);
    // Test-ServicePrincipalAuthorization: Not Run without a resource, InScope with one.
    let rows = sb
        .cmd(
            &t,
            "Test-ServicePrincipalAuthorization",
            json!({"Identity": app_id}),
        )
        .await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["InScope"] == "Not Run"));
    let row =
        |rows: &[Value], role: &str| rows.iter().find(|r| r["RoleName"] == role).unwrap().clone();
    let alice = sb
        .cmd(
            &t,
            "Test-ServicePrincipalAuthorization",
            json!({"Identity": app_id, "Resource": "alice"}),
        )
        .await;
    assert_eq!(row(&alice, "Application Mail.Read")["InScope"], true);
    assert_eq!(
        row(&alice, "Application Mail.Read")["ScopeType"],
        "CustomRecipientScope"
    );
    assert_eq!(
        row(&alice, "Application Mail.Read")["GrantedPermissions"],
        "Mail.Read"
    );
    assert_eq!(
        row(&alice, "Application Calendars.Read")["ScopeType"],
        "Organization"
    );
    let bob = sb
        .cmd(
            &t,
            "Test-ServicePrincipalAuthorization",
            json!({"Identity": sp_id, "Resource": "bob"}),
        )
        .await;
    assert_eq!(row(&bob, "Application Mail.Read")["InScope"], false);
    assert_eq!(row(&bob, "Application Calendars.Read")["InScope"], true);
    // Get, and the scope cannot go while an assignment uses it.
    let listed = sb
        .cmd(
            &t,
            "Get-ManagementRoleAssignment",
            json!({"RoleAssignee": app_id}),
        )
        .await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        sb.cmd(
            &t,
            "Get-ManagementRoleAssignment",
            json!({"Role": "Application Mail.Read"})
        )
        .await
        .len(),
        1
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Remove-ManagementScope",
            json!({"Identity": "Sales scope"})
        )
        .await
        .status,
        400
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Remove-ManagementRoleAssignment",
            json!({"Identity": name})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Remove-ManagementScope",
            json!({"Identity": "Sales scope"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        sb.invoke(
            &t,
            "Get-ManagementScope",
            json!({"Identity": "Sales scope"})
        )
        .await
        .status,
        404
    );
    assert_eq!(
        sb.invoke(&t, "Remove-ServicePrincipal", json!({"Identity": sp_id}))
            .await
            .status,
        200
    );
    // Removing the service principal removes its role assignments.
    assert_eq!(
        sb.invoke(
            &t,
            "Get-ManagementRoleAssignment",
            json!({"Identity": "cal-org"})
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn rbac_member_of_group_is_direct_only_by_default() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let (app_id, _, sp_id) = sb.new_app(json!({"displayName": "nested"})).await;
    sb.cmd(
        &t,
        "New-ServicePrincipal",
        json!({"AppId": app_id, "ObjectId": sp_id}),
    )
    .await;
    let dn = sb
        .cmd(
            &t,
            "Get-DistributionGroup",
            json!({"Identity": "Finance Team"}),
        )
        .await[0]["DistinguishedName"]
        .as_str()
        .unwrap()
        .to_string();
    sb.cmd(&t, "New-ManagementScope", json!({"Name": "Finance", "RecipientRestrictionFilter": format!("MemberOfGroup -eq '{dn}'")})).await;
    sb.cmd(
        &t,
        "New-ManagementRoleAssignment",
        json!({"Role": "Application Mail.Read", "App": sp_id, "CustomResourceScope": "Finance"}),
    )
    .await;
    let in_scope = |who: &'static str| {
        let sb = &sb;
        let t = t.clone();
        let app_id = app_id.clone();
        async move {
            sb.cmd(
                &t,
                "Test-ServicePrincipalAuthorization",
                json!({"Identity": app_id, "Resource": who}),
            )
            .await[0]["InScope"]
                .clone()
        }
    };
    assert_eq!(in_scope("bob").await, true);
    assert_eq!(in_scope("carol").await, false, "carol is in a nested group");
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"rbacNestedGroups": "transitive"})),
    )
    .await;
    assert_eq!(in_scope("carol").await, true);
}

#[tokio::test]
async fn aap_nested_groups_follow_the_tenant_setting() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "Finance Team", "AccessRight": "RestrictAccess"})).await;
    let carol = json!({"Identity": "carol", "AppId": CRM_APP_ID});
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", carol.clone())
            .await[0]["AccessCheckResult"],
        "Granted"
    );
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"aapNestedGroups": "direct_only"})),
    )
    .await;
    assert_eq!(
        sb.cmd(&t, "Test-ApplicationAccessPolicy", carol).await[0]["AccessCheckResult"],
        "Denied"
    );
}

#[tokio::test]
async fn next_link_paging_and_select() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let body = json!({"CmdletInput": {"CmdletName": "Get-Recipient", "Parameters": {"ResultSize": "Unlimited"}}});
    let mut url = sb.url(&format!(
        "/adminapi/beta/{}/InvokeCommand?$select=Name,Guid",
        sb.tenant
    ));
    let mut names = vec![];
    let mut pages = 0;
    loop {
        let r =
            sb.c.post(&url)
                .bearer_auth(&t)
                .header("Prefer", "odata.maxpagesize=4")
                .header(
                    "X-AnchorMailbox",
                    format!(
                        "APP:SystemMailbox{{bb558c35-97f1-4cb9-8ff7-d53741dc928c}}@{}",
                        sb.tenant
                    ),
                )
                .json(&body)
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        pages += 1;
        for item in v["value"].as_array().unwrap() {
            let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
            assert!(
                keys.iter()
                    .all(|k| k.starts_with("Name") || k.starts_with("Guid")),
                "{keys:?}"
            );
            names.push(item["Name"].as_str().unwrap().to_string());
        }
        match v["@odata.nextLink"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    let all = sb
        .cmd(&t, "Get-Recipient", json!({"ResultSize": "Unlimited"}))
        .await;
    assert_eq!(names.len(), all.len());
    assert!(pages >= 4, "{pages} pages");
    // ResultSize caps with a warning.
    let r = sb
        .invoke(&t, "Get-Recipient", json!({"ResultSize": 2}))
        .await
        .json();
    assert_eq!(r["value"].as_array().unwrap().len(), 2);
    assert!(
        r["@adminapi.warnings"][0]
            .as_str()
            .unwrap()
            .contains("ResultSize")
    );
}

#[tokio::test]
async fn new_objects_are_invisible_during_replication_but_test_cmdlets_see_them() {
    let mut s = SandboxSettings::fast();
    s.pacing.replication_delay = DelayRange::fixed(Duration::from_secs(30));
    let sb = Sb::start(s).await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    sb.cmd(
        &t,
        "New-DistributionGroup",
        json!({"Name": "fresh", "Type": "Security", "Members": ["dave"]}),
    )
    .await;
    let r = sb
        .invoke(&t, "Get-DistributionGroup", json!({"Identity": "fresh"}))
        .await;
    assert_eq!(r.status, 404);
    let r = sb.invoke(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "fresh", "AccessRight": "RestrictAccess"})).await;
    assert_eq!(
        r.status, 404,
        "a policy on a just-created group fails until it replicates"
    );
    sb.h.advance_clock(Duration::from_secs(31));
    assert_eq!(
        sb.invoke(&t, "Get-DistributionGroup", json!({"Identity": "fresh"}))
            .await
            .status,
        200
    );
    let p = sb.cmd(&t, "New-ApplicationAccessPolicy", json!({"AppId": CRM_APP_ID, "PolicyScopeGroupId": "fresh", "AccessRight": "RestrictAccess"})).await;
    let id = p[0]["Identity"].as_str().unwrap().to_string();
    assert_eq!(
        sb.invoke(&t, "Get-ApplicationAccessPolicy", json!({"Identity": id}))
            .await
            .json()["value"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Test- reads the live directory.
    let r = sb
        .cmd(
            &t,
            "Test-ApplicationAccessPolicy",
            json!({"Identity": "alice", "AppId": CRM_APP_ID}),
        )
        .await;
    assert_eq!(r[0]["AccessCheckResult"], "Denied");
}

#[tokio::test]
async fn tenant_forms_and_anchor_header() {
    let sb = Sb::fast().await;
    let t = sb.mgmt_token(EXCHANGE_SCOPE).await;
    let r = sb
        .invoke_on(
            "contoso-sandbox.onmicrosoft.com",
            &t,
            "Get-Mailbox",
            json!({"Identity": "alice"}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "the domain form addresses the tenant too");
    let fab = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9";
    assert_eq!(
        sb.invoke_on(fab, &t, "Get-Mailbox", Value::Null, &[])
            .await
            .status,
        401,
        "token of another tenant"
    );
    let r = sb
        .invoke_on(&sb.tenant.clone(), &t, "Get-Mailbox", Value::Null, &[("X-AnchorMailbox", "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9")])
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "ErrorIncorrectRoutingHint");
    let ok = sb
        .invoke_on(
            &sb.tenant.clone(),
            &t,
            "Get-Mailbox",
            Value::Null,
            &[("X-AnchorMailbox", &format!("UPN:{}", upn("alice")))],
        )
        .await;
    assert_eq!(ok.status, 200);
    // Strict mode rejects a missing anchor.
    sb.control(
        "PATCH",
        &format!("tenants/{}/settings", sb.tenant),
        Some(json!({"anchorMailbox": "strict"})),
    )
    .await;
    let r =
        sb.c.post(sb.url(&format!("/adminapi/beta/{}/InvokeCommand", sb.tenant)))
            .bearer_auth(&t)
            .json(&json!({"CmdletInput": {"CmdletName": "Get-Mailbox"}}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 400);
}
