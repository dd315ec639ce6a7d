//! Sandbox settings: the pace of simulated delays, throttling and faults (process-wide), and the
//! per-tenant behaviour switches for every place where Microsoft's behaviour is unverified
//! (`docs/microsoft-365.md`). Defaults follow that page; the control API can change both at run time.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::rules::Nesting;

/// A duration or a range of durations, written `2s`, `500ms`, `30s..5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayRange {
    pub min: Duration,
    pub max: Duration,
}

impl DelayRange {
    pub const ZERO: DelayRange = DelayRange {
        min: Duration::ZERO,
        max: Duration::ZERO,
    };

    pub fn fixed(d: Duration) -> Self {
        DelayRange { min: d, max: d }
    }

    pub fn between(min: Duration, max: Duration) -> Self {
        DelayRange { min, max }
    }

    /// Draw uniformly from the range.
    pub fn draw(&self, rng: &mut impl Rng) -> Duration {
        if self.max <= self.min {
            return self.min;
        }
        let span = (self.max - self.min).as_micros() as u64;
        self.min + Duration::from_micros(rng.gen_range(0..=span))
    }

    pub fn is_zero(&self) -> bool {
        self.max.is_zero()
    }
}

/// Parse `250ms`, `2s`, `1.5s`, `5m`, `2h`, `1d` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration `{s}`"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => {
            return Err(format!(
                "invalid duration unit `{u}` in `{s}` (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl FromStr for DelayRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once("..") {
            Some((a, b)) => {
                let (min, max) = (parse_duration(a)?, parse_duration(b)?);
                if max < min {
                    return Err(format!("range `{s}` ends before it starts"));
                }
                Ok(DelayRange { min, max })
            }
            None => Ok(DelayRange::fixed(parse_duration(s)?)),
        }
    }
}

impl fmt::Display for DelayRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", format_duration(self.min))
        } else {
            write!(
                f,
                "{}..{}",
                format_duration(self.min),
                format_duration(self.max)
            )
        }
    }
}

impl Serialize for DelayRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DelayRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A request budget per tenant and API: `limit` requests per fixed `window`, written `100/10s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: u64,
    pub window: Duration,
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, w) = s
            .split_once('/')
            .ok_or_else(|| format!("budget `{s}` must look like `100/10s`"))?;
        let limit: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("invalid budget count in `{s}`"))?;
        let window = parse_duration(w)?;
        if window.is_zero() {
            return Err("budget window must be positive".into());
        }
        Ok(Budget { limit, window })
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.limit, format_duration(self.window))
    }
}

impl Serialize for Budget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The simulated APIs (used for fault targeting and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Login,
    Graph,
    Exchange,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Login => "login",
            Api::Graph => "graph",
            Api::Exchange => "exchange",
        }
    }
}

impl FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "login" => Ok(Api::Login),
            "graph" => Ok(Api::Graph),
            "exchange" => Ok(Api::Exchange),
            o => Err(format!("unknown api `{o}` (login, graph, exchange)")),
        }
    }
}

/// Process-wide pacing: delays, throttling and faults. Changeable at run time through
/// `PATCH /_sandbox/settings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Pacing {
    /// How long a Graph front end takes to adopt a change to application access policies or
    /// group membership (docs/microsoft-365.md §2.7, §8.3: "more than an hour", even when
    /// Exchange's Test cmdlet already shows it). Default 1 minute to 2 hours.
    pub propagation_delay: DelayRange,
    /// How long a Graph front end takes to adopt an RBAC for Applications change (docs/microsoft-365.md §3.5: the
    /// permission cache, 30 minutes to 2 hours, unverified).
    pub rbac_propagation_delay: DelayRange,
    /// RBAC for Applications permission cache per app (docs/microsoft-365.md §3.5, §8.3): an app
    /// idle for longer than this (seconds) refills its cached RBAC view from the front end at its
    /// next Graph call. Microsoft: an idle app's entry expires after 30 minutes. 0 turns the
    /// per-app cache off.
    #[serde(with = "secs")]
    pub rbac_app_cache_idle: Duration,
    /// Maximum age (seconds) of an app's cached RBAC view, however busy the app is. Microsoft: an
    /// app in constant use keeps its entry for up to 2 hours. 0 turns the per-app cache off.
    #[serde(with = "secs")]
    pub rbac_app_cache_lifetime: Duration,
    /// How long an object created by an Exchange `New-*` cmdlet stays invisible (404) to other
    /// calls (docs/microsoft-365.md §1.3: "seconds to minutes").
    pub replication_delay: DelayRange,
    /// Entra's eventual consistency (docs/microsoft-365.md §8.4): how long a write through Graph
    /// stays unusable elsewhere. A new application reads as 404 and `POST /servicePrincipals`
    /// for it answers 400 `NoBackingApplicationObject`; a new client secret is refused with
    /// AADSTS7000215; a new app role assignment is missing from the app's tokens. Microsoft gives
    /// no figure ("typically seconds"): the default is a guess.
    pub entra_consistency_delay: DelayRange,
    /// Graph front ends, each with its own cache (more front ends, more flapping).
    pub front_ends: usize,
    /// Lifetime of issued access tokens (`expires_in`).
    #[serde(with = "secs")]
    pub token_lifetime: Duration,
    /// Graph request budget per tenant (None: unlimited).
    pub graph_budget: Option<Budget>,
    /// Exchange InvokeCommand budget per tenant (None: unlimited).
    pub exchange_budget: Option<Budget>,
    /// Token endpoint budget per tenant (None: unlimited).
    pub login_budget: Option<Budget>,
    /// Concurrent InvokeCommand requests allowed per tenant (0: unlimited).
    pub exchange_concurrency: usize,
    /// Latency added to every simulated API request.
    pub latency: DelayRange,
    /// Fraction (0..=1) of requests answered with a 5xx.
    pub fault_5xx_rate: f64,
    /// Fraction (0..=1) of requests whose connection is dropped before a complete response.
    pub fault_drop_rate: f64,
    /// Which APIs faults and latency apply to.
    pub fault_apis: Vec<Api>,
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            // Microsoft: a policy change "can take longer than 1 hour" to apply in Graph, even
            // once Test-ApplicationAccessPolicy shows it (docs/microsoft-365.md §8.3); the range
            // reaches twice that so a client's patience past the first hour gets exercised.
            propagation_delay: DelayRange::between(
                Duration::from_secs(60),
                Duration::from_secs(2 * 3600),
            ),
            rbac_propagation_delay: DelayRange::between(
                Duration::from_secs(30 * 60),
                Duration::from_secs(2 * 3600),
            ),
            // Microsoft's own figures (docs/microsoft-365.md §8.3): 30 minutes idle, 2 hours in use.
            rbac_app_cache_idle: Duration::from_secs(30 * 60),
            rbac_app_cache_lifetime: Duration::from_secs(2 * 3600),
            replication_delay: DelayRange::between(Duration::from_secs(5), Duration::from_secs(60)),
            entra_consistency_delay: DelayRange::between(
                Duration::from_secs(1),
                Duration::from_secs(5),
            ),
            front_ends: 4,
            token_lifetime: Duration::from_secs(3599),
            // Outlook's documented mailbox budget is 10,000 requests per 10 minutes.
            graph_budget: Some(Budget {
                limit: 10_000,
                window: Duration::from_secs(600),
            }),
            // Matches the `Rate-Limit-Limit: 30000` seen on InvokeCommand; the window is unverified.
            exchange_budget: Some(Budget {
                limit: 30_000,
                window: Duration::from_secs(3600),
            }),
            login_budget: None,
            exchange_concurrency: 10,
            latency: DelayRange::ZERO,
            fault_5xx_rate: 0.0,
            fault_drop_rate: 0.0,
            fault_apis: vec![Api::Login, Api::Graph, Api::Exchange],
        }
    }
}

/// The 403 body InvokeCommand sends for an unknown or unpermitted cmdlet (docs/microsoft-365.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForbiddenBody {
    /// NUL bytes labelled `Content-Encoding: gzip` (most reports).
    NulGzip,
    /// A JSON error whose `error.message` is `Invalid Operation` (one tenant).
    InvalidOperationJson,
}

/// The Graph 403 message when an application access policy blocks (docs/microsoft-365.md §2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessDeniedMessage {
    /// `Access to OData is disabled.` (documented).
    Documented,
    /// `Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.`
    Raop,
}

/// What cmdlets without output return in `value` (docs/microsoft-365.md §1.3: unverified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmptyOutput {
    EmptyArray,
    Null,
    Missing,
}

/// How strictly InvokeCommand checks `X-AnchorMailbox` (docs/microsoft-365.md §1.3: which anchor is required is unverified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnchorCheck {
    /// Missing or unrecognised anchors fail with 400 `ErrorIncorrectRoutingHint`.
    Strict,
    /// Missing anchors pass; anchors naming another tenant or unknown mailbox fail.
    Lenient,
    /// Not checked.
    Off,
}

/// Which object id the part after `;` in a policy's `ScopeIdentityRaw` carries (docs/microsoft-365.md §2.2: scripts
/// assume the Entra object id; unverified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeObjectId {
    ExternalDirectoryObjectId,
    ExchangeObjectId,
}

/// Per-tenant switches for behaviour the reference marks unverified or conflicting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Behaviour {
    /// Do nested groups count in application access policy scopes? (docs/microsoft-365.md §2.5; the current
    /// documentation says they do.)
    pub aap_nested_groups: Nesting,
    /// Do nested groups count for `MemberOfGroup` in RBAC scopes? (docs/microsoft-365.md §3.4; default direct only.)
    pub rbac_nested_groups: Nesting,
    /// Storage budget for application access policies, in bytes. Each policy costs
    /// `policy_overhead_bytes` plus its Description's length: the defaults fit 300 policies with a
    /// one-space description (docs/microsoft-365.md §2.6).
    pub policy_storage_limit_bytes: usize,
    pub policy_overhead_bytes: usize,
    pub access_denied_message: AccessDeniedMessage,
    pub exchange_forbidden_body: ForbiddenBody,
    pub exchange_empty_output: EmptyOutput,
    /// Does an Exchange 429 carry `Retry-After`? (docs/microsoft-365.md §1.3: unverified.)
    pub exchange_retry_after: bool,
    /// May a Graph `Retry-After` be fractional such as `2.128`? When true, each answer draws
    /// fractional or whole seconds (Microsoft sends both, docs/microsoft-365.md §8.6); when
    /// false, always whole seconds.
    pub graph_fractional_retry_after: bool,
    /// Do identity endpoints (applications, servicePrincipals…) omit `Retry-After` on 429?
    /// (docs/microsoft-365.md §5.6: third-party observation.)
    pub graph_identity_omits_retry_after: bool,
    pub anchor_mailbox: AnchorCheck,
    pub scope_object_id: ScopeObjectId,
    /// Does Get-ApplicationAccessPolicy fail with ManagementObjectNotFound in a tenant that never
    /// had a policy? (docs/microsoft-365.md §2.1: "may fail".)
    pub policy_get_fails_when_never_used: bool,
    /// Must Add/Remove/Update-DistributionGroupMember pass `-BypassSecurityGroupManagerCheck`
    /// when the caller is not a group manager (an app never is)? (docs/microsoft-365.md §4.2.)
    pub require_bypass_security_group_manager_check: bool,
    /// Does InvokeCommand refuse tokens obtained with a client secret? (docs/microsoft-365.md §1.2: unverified.)
    pub exchange_rejects_secret_tokens: bool,
    /// Does `EwsEnabled = $false` on a mailbox block Graph mail calls? (docs/microsoft-365.md §4.3: unverified.)
    pub ews_disabled_blocks_graph: bool,
    /// Are mailboxes of users holding admin roles refused with the RAOP text regardless of
    /// policy? (docs/microsoft-365.md §2.8: unverified.)
    pub admin_mailboxes_blocked: bool,
    /// Does the token response include `ext_expires_in`? (docs/microsoft-365.md §5.1: unverified.)
    pub token_ext_expires_in: bool,
    /// May InvokeCommand address the tenant by its `*.onmicrosoft.com` domain as well as its GUID?
    pub exchange_accepts_domain_tenant: bool,
    /// Is a throttled token request (429) answered with a JSON `AADSTS` body rather than plain
    /// text? (docs/microsoft-365.md §8.5: "the body may not be JSON"; MSAL.NET saw plain text.)
    pub login_throttle_json_body: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            aap_nested_groups: Nesting::Transitive,
            rbac_nested_groups: Nesting::DirectOnly,
            policy_storage_limit_bytes: 300 * 201,
            policy_overhead_bytes: 200,
            access_denied_message: AccessDeniedMessage::Documented,
            exchange_forbidden_body: ForbiddenBody::NulGzip,
            exchange_empty_output: EmptyOutput::EmptyArray,
            exchange_retry_after: false,
            graph_fractional_retry_after: true,
            graph_identity_omits_retry_after: false,
            anchor_mailbox: AnchorCheck::Lenient,
            scope_object_id: ScopeObjectId::ExternalDirectoryObjectId,
            policy_get_fails_when_never_used: false,
            require_bypass_security_group_manager_check: true,
            exchange_rejects_secret_tokens: false,
            ews_disabled_blocks_graph: false,
            admin_mailboxes_blocked: false,
            token_ext_expires_in: true,
            exchange_accepts_domain_tenant: true,
            login_throttle_json_body: false,
        }
    }
}

/// Apply `key=value` overrides (camelCase keys of [`Behaviour`] or [`Pacing`]) to a JSON object.
pub fn apply_overrides<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    overrides: &[(String, String)],
) -> Result<T, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let obj = v.as_object_mut().ok_or("settings are not an object")?;
    for (k, raw) in overrides {
        if !obj.contains_key(k) {
            return Err(format!("unknown setting `{k}`"));
        }
        // Values are JSON when they parse as JSON (true, 3, null), strings otherwise.
        let val = serde_json::from_str(raw).unwrap_or(serde_json::Value::String(raw.clone()));
        obj.insert(k.clone(), val);
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parses_durations_and_ranges() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5 parsecs").is_err());
        let r: DelayRange = "30s..5m".parse().unwrap();
        assert_eq!(
            (r.min, r.max),
            (Duration::from_secs(30), Duration::from_secs(300))
        );
        assert_eq!(r.to_string(), "30s..5m");
        assert_eq!("2s".parse::<DelayRange>().unwrap().to_string(), "2s");
        assert!("5m..30s".parse::<DelayRange>().is_err());
    }

    #[test]
    fn draws_stay_in_range() {
        let r: DelayRange = "1s..2s".parse().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let d = r.draw(&mut rng);
            assert!(d >= r.min && d <= r.max);
        }
    }

    #[test]
    fn budgets() {
        let b: Budget = "100/10s".parse().unwrap();
        assert_eq!((b.limit, b.window), (100, Duration::from_secs(10)));
        assert!("100".parse::<Budget>().is_err());
        assert!("x/1s".parse::<Budget>().is_err());
    }

    #[test]
    fn overrides_apply_by_camel_case_key() {
        let b = apply_overrides(
            &Behaviour::default(),
            &[
                ("aapNestedGroups".into(), "direct_only".into()),
                ("exchangeRetryAfter".into(), "true".into()),
            ],
        )
        .unwrap();
        assert_eq!(b.aap_nested_groups, Nesting::DirectOnly);
        assert!(b.exchange_retry_after);
        assert!(apply_overrides(&Behaviour::default(), &[("nope".into(), "1".into())]).is_err());
    }
}
