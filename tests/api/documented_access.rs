//! One table of documented access cases (`tests/fixtures/documented-access-cases.json`, each case
//! citing its Microsoft page) against both readings of the rules: mailscope's (`domain::access`,
//! `domain::rbac`, in the nesting modes mailscope uses) and the sandbox's own
//! (`sandbox::rules`, in the sandbox's default settings). A case either gets wrong fails, so a
//! rule mailscope misreads can no longer hide behind a sandbox that reads it the same way.
use std::collections::{BTreeMap, BTreeSet};

use mailscope::domain::access as dom;
use mailscope::domain::rbac as dom_rbac;
use mailscope::sandbox::rules as sb;
use mailscope::sandbox::settings::Behaviour;
use serde_json::Value;

const APP: &str = "6f1d7c55-0000-4000-8000-000000000001";
const OTHER_APP: &str = "6f1d7c55-0000-4000-8000-000000000002";
const READ: &[&str] = &["Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"];

struct Directory {
    /// Recipient id → (RecipientTypeDetails, properties).
    recipients: BTreeMap<String, (String, BTreeMap<String, String>)>,
    members: BTreeMap<String, Vec<String>>,
    dns: BTreeMap<String, String>,
}

fn table() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/documented-access-cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn directory(t: &Value) -> Directory {
    let mut d = Directory {
        recipients: BTreeMap::new(),
        members: BTreeMap::new(),
        dns: BTreeMap::new(),
    };
    let entries = t["directory"]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .chain(t["directory"]["groups"].as_array().unwrap());
    for r in entries {
        let id = r["id"].as_str().unwrap().to_string();
        let kind = r["type"].as_str().unwrap().to_string();
        let mut props: BTreeMap<String, String> = r["properties"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        props.insert("Alias".into(), id.clone());
        props.insert("Name".into(), id.clone());
        props.insert(
            "PrimarySmtpAddress".into(),
            format!("{id}@contoso.onmicrosoft.com"),
        );
        props.insert("RecipientTypeDetails".into(), kind.clone());
        if let Some(dn) = r["dn"].as_str() {
            d.dns.insert(id.clone(), dn.to_string());
            d.members.insert(id.clone(), strings(&r["members"]));
        }
        d.recipients.insert(id, (kind, props));
    }
    d
}

fn app_of(p: &Value) -> &'static str {
    match p["app"].as_str().unwrap() {
        "self" => APP,
        "other" => OTHER_APP,
        _ => "*",
    }
}

fn accepted(case: &Value) -> Vec<String> {
    let a = strings(&case["accepted"]);
    if a.is_empty() {
        READ.iter().map(|s| s.to_string()).collect()
    } else {
        a
    }
}

/// mailscope's reading: (mailbox call outcome per expected mailbox, policy verdict per recipient).
fn domain_answers(d: &Directory, case: &Value) -> BTreeMap<String, String> {
    let policies: Vec<dom::AccessPolicy> = case["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| dom::AccessPolicy {
            app_id: app_of(p).into(),
            scope_id: p["scope"].as_str().unwrap().into(),
            access_right: dom::AccessRight::parse(p["right"].as_str().unwrap()).unwrap(),
        })
        .collect();
    let assignments: Vec<dom_rbac::AppRoleAssignment> = case["rbac"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, a)| {
            let scope = if let Some(f) = a["filter"].as_str() {
                dom_rbac::AssignmentScope::Custom(dom_rbac::ManagementScope {
                    name: format!("scope{i}"),
                    filter: dom_rbac::RecipientFilter::parse(f).unwrap(),
                    exclusive: a["exclusive"].as_bool().unwrap_or(false),
                })
            } else if let Some(g) = a["group"].as_str() {
                dom_rbac::AssignmentScope::Group {
                    name: g.into(),
                    distinguished_name: d.dns[g].clone(),
                }
            } else {
                dom_rbac::AssignmentScope::Organization
            };
            dom_rbac::AppRoleAssignment {
                name: format!("a{i}"),
                role: a["role"].as_str().unwrap().into(),
                scope,
                enabled: true,
            }
        })
        .collect();
    let entra = strings(&case["entra"]);
    let accepted = accepted(case);
    let accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
    let mut out = BTreeMap::new();
    // mailscope evaluates access policies with nested members counted (provisioning::access_test)
    // and RBAC's MemberOfGroup with direct members only (domain::rbac's documented default).
    let verdict = |id: &str| {
        dom::evaluate_application_access(
            APP,
            id,
            &policies,
            &d.members,
            dom::NestedGroups::Transitive,
        )
    };
    for (id, want) in case["expect"].as_object().into_iter().flatten() {
        let _ = want;
        let (_, props) = &d.recipients[id];
        let facts = dom_rbac::RecipientFacts {
            id: id.clone(),
            properties: props.clone(),
            email_addresses: vec![],
            member_of: dom::groups_containing(&d.members, id, dom::NestedGroups::DirectOnly)
                .iter()
                .map(|g| d.dns[g].clone())
                .collect(),
        };
        let rbac = dom_rbac::rbac_permissions_on(&assignments, &facts);
        let got = match dom::authorize_mailbox_call(&accepted, &entra, &verdict(id), &rbac) {
            dom::MailboxAccess::Granted {
                via: dom::GrantPath::Entra,
                ..
            } => "entra",
            dom::MailboxAccess::Granted { .. } => "rbac",
            dom::MailboxAccess::DeniedByPolicy { .. } => "denied",
            dom::MailboxAccess::NoPermission => "none",
        };
        out.insert(format!("expect {id}"), got.to_string());
    }
    for (id, _) in case["policy"].as_object().into_iter().flatten() {
        out.insert(
            format!("policy {id}"),
            verdict(id).access_check_result().to_string(),
        );
    }
    out
}

/// The sandbox's reading, in its default settings.
fn sandbox_answers(d: &Directory, case: &Value) -> BTreeMap<String, String> {
    let behaviour = Behaviour::default();
    let policies: Vec<sb::PolicyFact> = case["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| sb::PolicyFact {
            app_id: app_of(p).into(),
            scope_id: p["scope"].as_str().unwrap().into(),
            right: sb::Right::parse(p["right"].as_str().unwrap()).unwrap(),
        })
        .collect();
    let assignments: Vec<sb::Assignment> = case["rbac"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, a)| {
            let scope = if let Some(f) = a["filter"].as_str() {
                sb::ResourceScope::Custom {
                    name: format!("scope{i}"),
                    filter: sb::Filter::parse(f).unwrap(),
                    exclusive: a["exclusive"].as_bool().unwrap_or(false),
                }
            } else if let Some(g) = a["group"].as_str() {
                sb::ResourceScope::Group {
                    name: g.into(),
                    dn: d.dns[g].clone(),
                }
            } else {
                sb::ResourceScope::Organization
            };
            sb::Assignment {
                name: format!("a{i}"),
                role: a["role"].as_str().unwrap().into(),
                scope,
                enabled: true,
            }
        })
        .collect();
    let entra = strings(&case["entra"]);
    let accepted = accepted(case);
    let accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
    let verdict =
        |id: &str| sb::policy_verdict(APP, id, &policies, &d.members, behaviour.aap_nested_groups);
    let mut out = BTreeMap::new();
    for (id, _) in case["expect"].as_object().into_iter().flatten() {
        let (_, props) = &d.recipients[id];
        let facts = sb::Facts {
            id: id.clone(),
            properties: props.clone(),
            addresses: vec![],
            member_of: sb::groups_of(&d.members, id, behaviour.rbac_nested_groups)
                .iter()
                .map(|g| d.dns[g].clone())
                .collect(),
        };
        let rbac = sb::rbac_grants(&assignments, &facts);
        let got = match sb::mailbox_call(&accepted, &entra, verdict(id), &rbac) {
            sb::Outcome::Granted { rbac: false, .. } => "entra",
            sb::Outcome::Granted { rbac: true, .. } => "rbac",
            sb::Outcome::DeniedByPolicy => "denied",
            sb::Outcome::NoPermission => "none",
        };
        out.insert(format!("expect {id}"), got.to_string());
    }
    for (id, _) in case["policy"].as_object().into_iter().flatten() {
        out.insert(
            format!("policy {id}"),
            verdict(id).check_result().to_string(),
        );
    }
    out
}

fn documented(case: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for key in ["expect", "policy"] {
        for (id, v) in case[key].as_object().into_iter().flatten() {
            out.insert(format!("{key} {id}"), v.as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn mailscope_and_the_sandbox_both_agree_with_every_documented_access_case() {
    let t = table();
    let d = directory(&t);
    let cases = t["cases"].as_array().unwrap();
    assert!(cases.len() >= 15, "the table lost cases");
    let mut wrong = vec![];
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let source = case["source"].as_str().unwrap_or("");
        assert!(
            source.starts_with("https://learn.microsoft.com/"),
            "case `{name}` cites no Microsoft page"
        );
        let want = documented(case);
        assert!(!want.is_empty(), "case `{name}` checks nothing");
        for (who, got) in [
            ("mailscope (src/domain)", domain_answers(&d, case)),
            ("sandbox (src/sandbox/rules.rs)", sandbox_answers(&d, case)),
        ] {
            for (k, w) in &want {
                let g = got.get(k).map(String::as_str).unwrap_or("?");
                if g != w {
                    wrong.push(format!(
                        "{who}: `{name}`, {k}: documented {w}, got {g} ({source})"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "disagreements:\n{}", wrong.join("\n"));
}

#[test]
fn both_readings_accept_and_refuse_the_documented_policy_scope_types() {
    let t = table();
    let s = &t["scope_types"];
    let mut wrong = BTreeSet::new();
    for (list, want) in [("allowed", true), ("refused", false)] {
        for ty in strings(&s[list]) {
            if dom::policy_scope_allowed(&ty) != want {
                wrong.insert(format!("mailscope: {ty} should be {list}"));
            }
            if sb::may_scope_policy(&ty) != want {
                wrong.insert(format!("sandbox: {ty} should be {list}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}
