//! Microsoft cloud instances and the base URLs mailscope talks to for each.
//!
//! Hosts follow docs/microsoft-365.md §1.1. `Custom` exists so the same code path reaches the
//! sandbox (or a proxy) with explicit base URLs; the token *resources* stay the global ones there,
//! because the sandbox, like Microsoft, identifies the resource by its URI, not by the host it runs on.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A Microsoft 365 cloud instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    /// Worldwide and GCC.
    Global,
    /// GCC High.
    Usgov,
    /// Department of Defense.
    Usgovdod,
    /// Microsoft 365 operated by 21Vianet.
    China,
    /// Explicit base URLs (the sandbox, or a proxy in front of Microsoft).
    Custom,
}

impl Cloud {
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Global => "global",
            Cloud::Usgov => "usgov",
            Cloud::Usgovdod => "usgovdod",
            Cloud::China => "china",
            Cloud::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<Cloud> {
        Some(match s {
            "global" => Cloud::Global,
            "usgov" => Cloud::Usgov,
            "usgovdod" => Cloud::Usgovdod,
            "china" => Cloud::China,
            "custom" => Cloud::Custom,
            _ => return None,
        })
    }
}

/// Base URLs given explicitly for a tenant (required for `custom`, optional overrides otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointOverrides {
    /// Login authority base, e.g. `https://login.microsoftonline.com` (no tenant, no trailing slash).
    #[schema(example = "http://127.0.0.1:8090")]
    pub login: Option<String>,
    /// Graph base, e.g. `https://graph.microsoft.com` (no version segment).
    #[schema(example = "http://127.0.0.1:8090")]
    pub graph: Option<String>,
    /// Exchange admin host base, e.g. `https://outlook.office365.com`.
    #[schema(example = "http://127.0.0.1:8090")]
    pub exchange: Option<String>,
}

/// The resolved endpoints of one tenant: where to send requests and which resources to ask tokens for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEndpoints {
    pub login: String,
    pub graph: String,
    pub exchange: String,
    /// Resource URI for Graph tokens; the scope is `{graph_resource}/.default`.
    pub graph_resource: String,
    /// Resource URI for Exchange admin tokens; the scope is `{exchange_resource}/.default`.
    pub exchange_resource: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("cloud `custom` needs `endpoints.{0}`")]
    MissingCustom(&'static str),
    #[error(
        "endpoints.{field} must be an absolute http(s) URL without query or fragment, got `{value}`"
    )]
    InvalidUrl { field: &'static str, value: String },
}

impl CloudEndpoints {
    /// Resolve a tenant's endpoints from its cloud and optional overrides.
    pub fn resolve(cloud: Cloud, overrides: &EndpointOverrides) -> Result<Self, EndpointError> {
        let (login, graph, exchange, graph_res, exo_res) = match cloud {
            Cloud::Global | Cloud::Custom => (
                "https://login.microsoftonline.com",
                "https://graph.microsoft.com",
                "https://outlook.office365.com",
                "https://graph.microsoft.com",
                "https://outlook.office365.com",
            ),
            Cloud::Usgov => (
                "https://login.microsoftonline.us",
                "https://graph.microsoft.us",
                "https://outlook.office365.us",
                "https://graph.microsoft.us",
                "https://outlook.office365.us",
            ),
            Cloud::Usgovdod => (
                "https://login.microsoftonline.us",
                "https://dod-graph.microsoft.us",
                "https://outlook-dod.office365.us",
                "https://dod-graph.microsoft.us",
                "https://outlook-dod.office365.us",
            ),
            // The Exchange host differs between Microsoft's own sources (docs/microsoft-365.md §1.1), so it
            // can be overridden per tenant; the scope for it is unverified and follows the host.
            Cloud::China => (
                "https://login.partner.microsoftonline.cn",
                "https://microsoftgraph.chinacloudapi.cn",
                "https://partner.outlook.cn",
                "https://microsoftgraph.chinacloudapi.cn",
                "https://partner.outlook.cn",
            ),
        };
        let pick = |field: &'static str, given: &Option<String>, default: &str| match given {
            Some(v) => validate_base_url(field, v),
            None if cloud == Cloud::Custom => Err(EndpointError::MissingCustom(field)),
            None => Ok(default.to_string()),
        };
        let login_url = pick("login", &overrides.login, login)?;
        let graph_url = pick("graph", &overrides.graph, graph)?;
        let exchange_url = pick("exchange", &overrides.exchange, exchange)?;
        let exchange_resource = if cloud == Cloud::China && overrides.exchange.is_some() {
            exchange_url.clone()
        } else {
            exo_res.to_string()
        };
        Ok(CloudEndpoints {
            login: login_url,
            graph: graph_url,
            exchange: exchange_url,
            graph_resource: graph_res.to_string(),
            exchange_resource,
        })
    }

    pub fn graph_scope(&self) -> String {
        format!("{}/.default", self.graph_resource)
    }

    pub fn exchange_scope(&self) -> String {
        format!("{}/.default", self.exchange_resource)
    }
}

/// Accept `http(s)://host[:port][/path]`, strip one trailing slash.
pub fn validate_base_url(field: &'static str, value: &str) -> Result<String, EndpointError> {
    let bad = || EndpointError::InvalidUrl {
        field,
        value: value.to_string(),
    };
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || value.contains(['?', '#', ' ']) {
        return Err(bad());
    }
    Ok(value.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_defaults() {
        let e = CloudEndpoints::resolve(Cloud::Global, &EndpointOverrides::default()).unwrap();
        assert_eq!(e.exchange, "https://outlook.office365.com");
        assert_eq!(e.exchange_scope(), "https://outlook.office365.com/.default");
        assert_eq!(e.graph_scope(), "https://graph.microsoft.com/.default");
    }

    #[test]
    fn custom_requires_all_three() {
        let o = EndpointOverrides {
            login: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        assert_eq!(
            CloudEndpoints::resolve(Cloud::Custom, &o),
            Err(EndpointError::MissingCustom("graph"))
        );
    }

    #[test]
    fn custom_keeps_global_resources() {
        let u = Some("http://127.0.0.1:8090/".to_string());
        let o = EndpointOverrides {
            login: u.clone(),
            graph: u.clone(),
            exchange: u,
        };
        let e = CloudEndpoints::resolve(Cloud::Custom, &o).unwrap();
        assert_eq!(e.graph, "http://127.0.0.1:8090");
        assert_eq!(e.exchange_scope(), "https://outlook.office365.com/.default");
    }

    #[test]
    fn rejects_non_http() {
        assert!(validate_base_url("login", "ftp://x").is_err());
        assert!(validate_base_url("login", "https://").is_err());
        assert!(validate_base_url("login", "https://x?y=1").is_err());
    }

    #[test]
    fn dod_and_gcch_hosts() {
        let d = CloudEndpoints::resolve(Cloud::Usgovdod, &EndpointOverrides::default()).unwrap();
        assert_eq!(d.graph, "https://dod-graph.microsoft.us");
        let g = CloudEndpoints::resolve(Cloud::Usgov, &EndpointOverrides::default()).unwrap();
        assert_eq!(g.exchange_scope(), "https://outlook.office365.us/.default");
    }
}
