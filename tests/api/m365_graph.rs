//! Graph client: mailbox probes, `$batch` splitting and partial re-sends, app role resolution,
//! applications, secrets and paging, against a mock Graph over real HTTP.
use crate::m365_support::*;
use mailscope::m365::ErrorKind;
use mailscope::m365::graph::{
    AppRoleSource, BatchRequest, GRAPH_APP_ID, MailboxProbe, NewApplication, ProbeOutcome,
};
use secrecy::ExposeSecret;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wiremock::matchers::{body_json, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn mailbox_access_denied_is_recognised_by_code() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("GET"))
        .and(path("/v1.0/users/blocked@contoso.test/messages"))
        .and(query_param("$top", "1"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"error": {"code": "ErrorAccessDenied",
            "message": "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
            "innerError": {"request-id": "req-1", "date": "2026-01-01T00:00:00"}}})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/users/open@contoso.test/mailboxSettings"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"timeZone": "UTC"})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/users/other@contoso.test/events"))
        .respond_with(
            ResponseTemplate::new(403)
                .set_body_json(json!({"error": {"code": "Authorization_RequestDenied",
            "message": "Access to OData is disabled."}})),
        )
        .mount(&server)
        .await;
    let g = tenant(&server).graph();
    match g
        .probe_mailbox("blocked@contoso.test", MailboxProbe::Messages)
        .await
        .unwrap()
    {
        ProbeOutcome::Denied { message } => assert!(message.unwrap().contains("RAOP")),
        other => panic!("expected denied, got {other:?}"),
    }
    assert_eq!(
        g.probe_mailbox("open@contoso.test", MailboxProbe::MailboxSettings)
            .await
            .unwrap(),
        ProbeOutcome::Allowed
    );
    // Same message text under another code is a permission problem, not a mailbox denial.
    let err = g
        .probe_mailbox("other@contoso.test", MailboxProbe::Events)
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::GraphPermissionMissing);
}

#[tokio::test]
async fn batch_of_45_is_split_20_20_5_and_only_throttled_parts_are_resent() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let throttled_once: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen = throttled_once.clone();
    let script = Script::new(move |req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let mut responses: Vec<serde_json::Value> = body["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let id = r["id"].as_str().unwrap().to_string();
                let n: u32 = id.parse().unwrap();
                let mut seen = seen.lock().unwrap();
                let times = seen.entry(id.clone()).or_insert(0);
                *times += 1;
                if n.is_multiple_of(7) && *times == 1 {
                    json!({"id": id, "status": 429, "headers": {"Retry-After": "1"},
                           "body": {"error": {"code": "TooManyRequests", "message": "Please retry again later."}}})
                } else if n == 44 {
                    json!({"id": id, "status": 404, "body": {"error": {"code": "Request_ResourceNotFound", "message": "gone"}}})
                } else {
                    json!({"id": id, "status": 200, "body": {"id": format!("user-{n}")}})
                }
            })
            .collect();
        // Graph may answer in any order.
        responses.reverse();
        json(200, json!({"responses": responses}))
    });
    Mock::given(method("POST"))
        .and(path("/v1.0/$batch"))
        .respond_with(script.clone())
        .mount(&server)
        .await;

    let requests: Vec<BatchRequest> = (0..45)
        .map(|i| BatchRequest::get(i.to_string(), format!("/users/u{i}")))
        .collect();
    let out = tenant(&server).graph().batch(requests).await.unwrap();

    let sizes: Vec<usize> = script
        .hits()
        .iter()
        .map(|h| {
            serde_json::from_slice::<serde_json::Value>(&h.body).unwrap()["requests"]
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    // 0,7,14,...,42 were throttled once: 7 parts re-sent together.
    assert_eq!(sizes, vec![20, 20, 5, 7]);
    let resent: Vec<String> = serde_json::from_slice::<serde_json::Value>(&script.hits()[3].body)
        .unwrap()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(resent, vec!["0", "7", "14", "21", "28", "35", "42"]);
    // The re-send waited for the inner Retry-After.
    let hits = script.hits();
    assert!(hits[3].at.duration_since(hits[2].at) >= std::time::Duration::from_secs(1));
    // One answer per request, in request order; the 404 is final and classified.
    assert_eq!(out.len(), 45);
    assert!(out.iter().enumerate().all(|(i, r)| r.id == i.to_string()));
    assert!(out[..44].iter().all(|r| r.status == 200));
    assert_eq!(out[44].status, 404);
    assert!(out[44].error("users.get").unwrap().is_not_found());
    assert_eq!(out[7].body.as_ref().unwrap()["id"], "user-7");
}

#[tokio::test]
async fn batch_rejects_duplicate_ids_before_sending() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let err = tenant(&server)
        .graph()
        .batch(vec![
            BatchRequest::get("1", "/users/a"),
            BatchRequest::get("1", "/users/b"),
        ])
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidParameter);
}

fn graph_sp(app_roles: serde_json::Value) -> serde_json::Value {
    json!({"id": "graph-sp-object-id", "appId": GRAPH_APP_ID, "displayName": "Microsoft Graph", "appRoles": app_roles})
}

#[tokio::test]
async fn app_roles_resolve_from_the_tenant_and_are_cached_with_documented_fallback() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("GET"))
        .and(path(format!("/v1.0/servicePrincipals(appId='{GRAPH_APP_ID}')")))
        .and(query_param("$select", "id,appId,displayName,appRoles"))
        .respond_with(ResponseTemplate::new(200).set_body_json(graph_sp(json!([
            {"id": "tenant-mail-read-id", "value": "Mail.Read", "allowedMemberTypes": ["Application"], "isEnabled": true},
            // A delegated-only role of the same family must not be picked.
            {"id": "delegated-send-id", "value": "Mail.Send", "allowedMemberTypes": ["User"], "isEnabled": true}
        ]))))
        .expect(1)
        .mount(&server)
        .await;
    let g = tenant(&server).graph();
    let r = g.resolve_app_role(GRAPH_APP_ID, "Mail.Read").await.unwrap();
    assert_eq!(
        (r.id.as_str(), r.source),
        ("tenant-mail-read-id", AppRoleSource::Tenant)
    );
    let s = g.resolve_app_role(GRAPH_APP_ID, "Mail.Send").await.unwrap();
    assert_eq!(
        (s.id.as_str(), s.source),
        (
            "b633e1c5-b582-4048-a93e-9f11b44c7e96",
            AppRoleSource::WellKnown
        )
    );
    let err = g
        .resolve_app_role(GRAPH_APP_ID, "Made.Up")
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidParameter);
    assert_eq!(
        g.resource_service_principal(GRAPH_APP_ID).await.unwrap().id,
        "graph-sp-object-id"
    );
}

#[tokio::test]
async fn app_role_lookup_denied_falls_back_to_documented_ids() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("GET"))
        .and(path(format!("/v1.0/servicePrincipals(appId='{GRAPH_APP_ID}')")))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"error": {"code": "Authorization_RequestDenied", "message": "Insufficient privileges"}})))
        .mount(&server)
        .await;
    let r = tenant(&server)
        .graph()
        .resolve_app_role(GRAPH_APP_ID, "Mail.Read")
        .await
        .unwrap();
    assert_eq!(
        (r.id.as_str(), r.source),
        (
            "810c84a8-4a9e-49e6-bf7d-12d183f40d01",
            AppRoleSource::WellKnown
        )
    );
}

#[tokio::test]
async fn applications_lifecycle_and_secrets() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path("/v1.0/applications"))
        .and(body_json(json!({"displayName": "Contoso CRM"})))
        .respond_with(ResponseTemplate::new(201).set_body_json(
            json!({"id": "obj-1", "appId": "app-1", "displayName": "Contoso CRM",
            "requiredResourceAccess": [], "passwordCredentials": null}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/applications(appId='app-1')"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "obj-1", "appId": "app-1"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/applications(appId='missing')"))
        .respond_with(ResponseTemplate::new(404).set_body_json(
            json!({"error": {"code": "Request_ResourceNotFound", "message": "nope"}}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1.0/applications/obj-1/addPassword"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"customKeyIdentifier": null, "keyId": "key-1",
            "secretText": "brand-new-secret-text", "hint": "bra", "displayName": "mailscope"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1.0/applications/obj-1/removePassword"))
        .and(body_json(json!({"keyId": "key-0"})))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path("/v1.0/applications/obj-1"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let g = tenant(&server).graph();
    let app = g
        .create_application(&NewApplication {
            display_name: "Contoso CRM".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(app.app_id, "app-1");
    assert!(app.password_credentials.is_empty());
    assert_eq!(
        g.application_by_app_id("app-1").await.unwrap().unwrap().id,
        "obj-1"
    );
    assert_eq!(g.application_by_app_id("missing").await.unwrap(), None);
    let pw = g.add_password("obj-1", "mailscope", None).await.unwrap();
    assert_eq!(pw.secret_text.expose_secret(), "brand-new-secret-text");
    assert!(!format!("{pw:?}").contains("brand-new-secret-text"));
    g.remove_password("obj-1", "key-0").await.unwrap();
    assert!(g.delete_application("obj-1").await.unwrap());
}

#[tokio::test]
async fn lists_follow_next_links_on_the_configured_host() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    let script = Script::new(|req, _| {
        let page = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "$skiptoken")
            .map(|(_, v)| v.to_string());
        match page.as_deref() {
            None => json(
                200,
                json!({"value": [{"id": "a1", "appRoleId": "r", "principalId": "p", "resourceId": "res"}],
                "@odata.nextLink": "https://graph.microsoft.com/v1.0/servicePrincipals/res/appRoleAssignedTo?$skiptoken=2"}),
            ),
            Some(_) => json(
                200,
                json!({"value": [{"id": "a2", "appRoleId": "r", "principalId": "q", "resourceId": "res"}]}),
            ),
        }
    });
    Mock::given(method("GET"))
        .and(path("/v1.0/servicePrincipals/res/appRoleAssignedTo"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    let list = tenant(&server)
        .graph()
        .app_role_assigned_to("res")
        .await
        .unwrap();
    assert_eq!(
        list.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        vec!["a1", "a2"]
    );
    assert_eq!(script.hits().len(), 2);
}

#[tokio::test]
async fn grant_app_role_posts_the_documented_body() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("POST"))
        .and(path("/v1.0/servicePrincipals/res-sp/appRoleAssignedTo"))
        .and(body_json(json!({"principalId": "client-sp", "resourceId": "res-sp", "appRoleId": "role-1"})))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "asg-1", "appRoleId": "role-1",
            "principalId": "client-sp", "principalType": "ServicePrincipal", "resourceId": "res-sp"})))
        .expect(1)
        .mount(&server)
        .await;
    let a = tenant(&server)
        .graph()
        .grant_app_role("res-sp", "client-sp", "role-1")
        .await
        .unwrap();
    assert_eq!(a.id, "asg-1");
}

/// Every Graph request carries a fresh `client-request-id`; an error keeps Microsoft's own
/// `request-id` (support cases need it), never the echo of mailscope's id
/// (docs/microsoft-365.md §8.6).
#[tokio::test]
async fn errors_keep_microsofts_request_id_and_requests_carry_a_client_request_id() {
    let server = MockServer::start().await;
    mount_token(&server, TENANT, None).await;
    Mock::given(method("GET"))
        .and(path("/v1.0/applications/with-header"))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("request-id", "ms-header-id")
                .insert_header("client-request-id", "echoed-client-id")
                .set_body_json(json!({"error": {"code": "Authorization_RequestDenied",
                    "message": "Insufficient privileges to complete the operation.",
                    "innerError": {"request-id": "ms-header-id", "client-request-id": "echoed-client-id"}}})),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1.0/applications/only-echo"))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("client-request-id", "echoed-client-id")
                .set_body_json(json!({"error": {"code": "Authorization_RequestDenied",
                    "message": "Insufficient privileges to complete the operation.",
                    "innerError": {"request-id": "ms-body-id", "client-request-id": "echoed-client-id"}}})),
        )
        .mount(&server)
        .await;
    let g = tenant(&server).graph();
    let e = g.get_application("with-header").await.unwrap_err();
    assert_eq!(e.request_id(), Some("ms-header-id"));
    let e = g.get_application("only-echo").await.unwrap_err();
    assert_eq!(e.request_id(), Some("ms-body-id"));
    let sent = server.received_requests().await.unwrap();
    let ids: Vec<String> = sent
        .iter()
        .filter(|r| r.url.path().starts_with("/v1.0/"))
        .map(|r| {
            r.headers
                .get("client-request-id")
                .expect("a client-request-id on every Graph request")
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|i| uuid::Uuid::parse_str(i).is_ok()));
}

/// Graph compares `$batch` request ids without case: `A` beside `a` would fail the whole batch,
/// so the connector refuses it before sending (docs/microsoft-365.md §8.6).
#[tokio::test]
async fn batch_ids_differing_only_in_case_are_duplicates() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&server)
        .await;
    let err = tenant(&server)
        .graph()
        .batch(vec![
            BatchRequest::get("probe-A", "/users/a"),
            BatchRequest::get("probe-a", "/users/b"),
        ])
        .await
        .unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::InvalidParameter);
}
