//! The fixed value sets of string fields, as OpenAPI enums. The API keeps these fields as
//! strings (their values come from the store's columns, spelled exactly as here); these types
//! only give the document their `enum`, through `#[schema(value_type = …)]`. The tests below tie
//! each set to the store's own spelling, so the document cannot promise a value the service
//! never sends or miss one it does.
use serde::Serialize;
use utoipa::ToSchema;

/// Where an access policy stands with Microsoft.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyState {
    /// Written; Microsoft takes 30 minutes to hours to apply it.
    PendingPropagation,
    /// Seen in force by a propagation check.
    InForce,
    /// Found in the tenant, never checked by mailscope.
    Unverified,
}

/// How mailscope came to manage a policy.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyOrigin {
    Created,
    Adopted,
    Imported,
}

/// `creating` (the intent is recorded; a PUT completes it) or `ready`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApplicationState {
    Creating,
    Ready,
}

/// `created` (DELETE removes it from the tenant) or `adopted` (DELETE only forgets it).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApplicationOrigin {
    Created,
    Adopted,
}

/// `created` (DELETE removes it from the tenant), `adopted` or `imported` (DELETE only forgets it).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScopeGroupOrigin {
    Created,
    Adopted,
    Imported,
}

/// A propagation check's state; the last five are final.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    Queued,
    Running,
    Succeeded,
    Misconfigured,
    TimedOut,
    Cancelled,
    Failed,
}

/// `configuration` (Exchange's Test cmdlet), `live` (Graph as the app) or `done`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckStage {
    Configuration,
    Live,
    Done,
}

/// `manual` (POST /propagation-checks) or `access_policy` (started by a policy change).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckOrigin {
    Manual,
    AccessPolicy,
}

/// `graph` (seen through Graph as the app) or `exchange_test` (adopted or send-only apps).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifiedBy {
    Graph,
    ExchangeTest,
}

/// Which of the four documented rules decided an access test's local verdict.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessRuleName {
    DenyMatch,
    RestrictMatch,
    RestrictMiss,
    NoPolicy,
}

/// How nested groups were counted: `transitive`, as the current documentation says.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NestedGroupsCount {
    Transitive,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;
    use utoipa::PartialSchema;

    /// The `enum` values the document shows for a schema type.
    fn values<T: PartialSchema>() -> Vec<String> {
        let v = serde_json::to_value(T::schema()).unwrap_or_default();
        v["enum"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A new variant in the store fails to compile here, pointing at the set to extend.
    #[test]
    fn the_store_enums_have_the_variants_listed_below() {
        use store::{access_policies as ap, applications as apps, propagation_checks as pc};
        let _ = |s: ap::PolicyState| match s {
            ap::PolicyState::PendingPropagation | ap::PolicyState::InForce => {}
            ap::PolicyState::Unverified => {}
        };
        let _ = |s: ap::PolicyOrigin| match s {
            ap::PolicyOrigin::Created | ap::PolicyOrigin::Adopted | ap::PolicyOrigin::Imported => {}
        };
        let _ = |s: apps::ApplicationState| match s {
            apps::ApplicationState::Creating | apps::ApplicationState::Ready => {}
        };
        let _ = |s: apps::ApplicationOrigin| match s {
            apps::ApplicationOrigin::Created | apps::ApplicationOrigin::Adopted => {}
        };
        let _ = |s: store::scope_groups::GroupOrigin| match s {
            store::scope_groups::GroupOrigin::Created
            | store::scope_groups::GroupOrigin::Adopted
            | store::scope_groups::GroupOrigin::Imported => {}
        };
        let _ = |s: pc::Stage| match s {
            pc::Stage::Configuration | pc::Stage::Live | pc::Stage::Done => {}
        };
    }

    #[test]
    fn the_documented_sets_are_the_stores_spellings() {
        use store::access_policies as ap;
        assert_eq!(
            values::<PolicyState>(),
            [
                ap::PolicyState::PendingPropagation,
                ap::PolicyState::InForce,
                ap::PolicyState::Unverified
            ]
            .map(|s| s.as_str().to_string())
        );
        assert_eq!(
            values::<PolicyOrigin>(),
            [
                ap::PolicyOrigin::Created,
                ap::PolicyOrigin::Adopted,
                ap::PolicyOrigin::Imported
            ]
            .map(|s| s.as_str().to_string())
        );
        use store::applications as apps;
        assert_eq!(
            values::<ApplicationState>(),
            [
                apps::ApplicationState::Creating,
                apps::ApplicationState::Ready
            ]
            .map(|s| s.as_str().to_string())
        );
        assert_eq!(
            values::<ApplicationOrigin>(),
            [
                apps::ApplicationOrigin::Created,
                apps::ApplicationOrigin::Adopted
            ]
            .map(|s| s.as_str().to_string())
        );
        use store::scope_groups::GroupOrigin;
        assert_eq!(
            values::<ScopeGroupOrigin>(),
            [
                GroupOrigin::Created,
                GroupOrigin::Adopted,
                GroupOrigin::Imported
            ]
            .map(|s| s.as_str().to_string())
        );
        use store::propagation_checks as pc;
        assert_eq!(
            values::<CheckState>(),
            pc::CheckState::ALL.map(|s| s.as_str().to_string())
        );
        assert_eq!(
            values::<CheckStage>(),
            [pc::Stage::Configuration, pc::Stage::Live, pc::Stage::Done]
                .map(|s| s.as_str().to_string())
        );
        assert_eq!(values::<CheckOrigin>(), strs(&["manual", "access_policy"]));
        use crate::domain::access::AccessRule;
        assert_eq!(
            values::<AccessRuleName>(),
            [
                AccessRule::DenyMatch,
                AccessRule::RestrictMatch,
                AccessRule::RestrictMiss,
                AccessRule::NoPolicy
            ]
            .map(|r| super::super::access_policies::rule_name(r).to_string())
        );
        assert_eq!(values::<NestedGroupsCount>(), strs(&["transitive"]));
        use crate::domain::credential::ManagementCredential;
        use crate::m365::connection_test::CredentialKind;
        let kinds = [
            ManagementCredential::ClientSecret {
                client_id: String::new(),
                client_secret: String::new().into(),
            },
            ManagementCredential::Certificate {
                client_id: String::new(),
                certificate_pem: String::new(),
                private_key_pem: String::new().into(),
            },
        ];
        assert_eq!(
            values::<CredentialKind>(),
            kinds.map(|k| k.kind().to_string())
        );
        assert_eq!(values::<VerifiedBy>(), strs(&["graph", "exchange_test"]));
    }
}
