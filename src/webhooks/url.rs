//! Callback URLs come from API callers, so they are an SSRF vector: refuse non-https URLs,
//! credentials in the URL, hosts outside the allow-list, and addresses in private, loopback,
//! link-local, CGNAT, multicast or reserved ranges (also when an IPv6 address embeds one, and
//! `localhost` in every spelling); at delivery, resolve again and check every
//! address ([`resolve_checked`]).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reqwest::Url;

use super::WebhookSettings;

/// Check an allow-list entry: a host name, `*.suffix`, or an IP address; no scheme, port or path.
pub fn validate_host_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_prefix("*.").unwrap_or(p);
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return if p.starts_with("*.") {
            Err("cannot be a wildcard of an IP address".into())
        } else {
            Ok(())
        };
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if ok {
        Ok(())
    } else {
        Err(
            "must be a host name, `*.example.com` or an IP address (no scheme, port or path)"
                .into(),
        )
    }
}

enum HostMatch {
    /// Not on the list (and the list is not empty).
    No,
    /// Allowed by the list being empty or by a `*.suffix` entry: public addresses only.
    Public,
    /// Named exactly: the operator vouches for it, private addresses included.
    Exact,
}

fn match_host(host: &str, settings: &WebhookSettings) -> HostMatch {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut wildcard = false;
    for entry in &settings.allowed_hosts {
        let entry = entry.to_ascii_lowercase();
        let bare = entry.trim_start_matches('[').trim_end_matches(']');
        if let Some(suffix) = entry.strip_prefix("*.") {
            if host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")) {
                wildcard = true;
            }
        } else if bare == host {
            return HostMatch::Exact;
        }
    }
    if wildcard || settings.allowed_hosts.is_empty() {
        HostMatch::Public
    } else {
        HostMatch::No
    }
}

/// Addresses a callback must never reach unless the operator lists them: this host, private
/// networks, link-local (cloud metadata at 169.254.169.254), CGNAT, multicast and reserved ranges.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            if embedded_v4(v6).into_iter().any(forbidden_v4) {
                return true;
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0 && s[1..6] == [0, 0, 0, 0, 0]) // IPv4-compatible ::/96
        }
    }
}

/// The IPv4 addresses an IPv6 address reaches through a translation or tunnel: NAT64
/// (64:ff9b::/96 and the local-use 64:ff9b:1::/48), SIIT's IPv4-translated ::ffff:0:0/96, 6to4
/// (2002::/16, the gateway's address in bits 16–48) and Teredo (2001::/32: the server's address,
/// and the client's, stored inverted in the last 32 bits).
fn embedded_v4(v6: std::net::Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mut out = Vec::new();
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
        out.push(last);
    }
    if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        out.push(last);
    }
    if s[0] == 0x2002 {
        out.push(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        out.push(Ipv4Addr::new(o[4], o[5], o[6], o[7]));
        out.push(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    out
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || ip.is_documentation()
        || ip.is_multicast()
        || a >= 240 // reserved and broadcast
}

/// The host as an IP address, when it is one (the URL parser has already normalised spellings
/// such as `2130706433` or `0x7f.1` to dotted IPv4).
fn host_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .parse()
        .ok()
}

/// `localhost` and the names under it (RFC 6761: they resolve to loopback), in any spelling:
/// any case, with or without the root's trailing dot.
fn is_localhost(host: &str) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Validate a callback URL before accepting it (the API calls this on input, 422 on `Err`; the
/// delivery job calls it again, as settings may have changed). The error is for the caller.
pub fn validate_callback_url(raw: &str, settings: &WebhookSettings) -> Result<Url, String> {
    if settings.signing_secret.is_none() {
        return Err(
            "callbacks are not enabled on this server (webhooks.signing_secret is not set)".into(),
        );
    }
    let url = Url::parse(raw.trim()).map_err(|e| format!("not a valid URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if settings.allow_http => {}
        "http" => return Err("must use https".into()),
        other => return Err(format!("scheme `{other}` is not allowed; use https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@): receivers authenticate mailscope by the event's signature".into());
    }
    let host = url.host_str().ok_or("must name a host")?;
    let listed = match_host(host, settings);
    if matches!(listed, HostMatch::No) {
        return Err(format!(
            "host `{host}` is not in the allowed callback hosts (webhooks.allowed_hosts)"
        ));
    }
    if let Some(ip) = host_ip(&url)
        && is_forbidden_ip(ip)
        && !matches!(listed, HostMatch::Exact)
    {
        return Err(format!(
            "address {ip} is private, loopback, link-local or reserved"
        ));
    }
    if is_localhost(host) && !matches!(listed, HostMatch::Exact) {
        return Err("host `localhost` is not allowed".into());
    }
    Ok(url)
}

/// Resolve the host and refuse if any address is forbidden (unless the host or that address is
/// listed exactly). Returns the addresses to pin the connection to.
pub async fn resolve_checked(
    url: &Url,
    settings: &WebhookSettings,
) -> Result<Vec<SocketAddr>, Refusal> {
    let host = url
        .host_str()
        .ok_or_else(|| Refusal::Permanent("the URL names no host".into()))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = if let Some(ip) = host_ip(url) {
        vec![SocketAddr::new(ip, port)]
    } else {
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Refusal::Transient(format!("cannot resolve {host}: {e}")))?
            .collect()
    };
    if addrs.is_empty() {
        return Err(Refusal::Transient(format!("{host} resolved to no address")));
    }
    let exact_host = matches!(match_host(host, settings), HostMatch::Exact);
    for a in &addrs {
        let listed =
            exact_host || matches!(match_host(&a.ip().to_string(), settings), HostMatch::Exact);
        if is_forbidden_ip(a.ip()) && !listed {
            return Err(Refusal::Permanent(format!(
                "{host} resolves to {}, a private, loopback, link-local or reserved address",
                a.ip()
            )));
        }
    }
    Ok(addrs)
}

/// Why an address was refused: worth retrying (DNS trouble) or not.
pub enum Refusal {
    Transient(String),
    Permanent(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::secret::Secret;
    fn settings(hosts: &[&str], allow_http: bool) -> WebhookSettings {
        WebhookSettings {
            signing_secret: Some(Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allow_http,
            ..WebhookSettings::default()
        }
    }

    #[test]
    fn https_only_unless_http_is_allowed() {
        let s = settings(&[], false);
        assert!(validate_callback_url("https://hooks.example.com/x", &s).is_ok());
        let e = validate_callback_url("http://hooks.example.com/x", &s).unwrap_err();
        assert!(e.contains("https"), "{e}");
        assert!(validate_callback_url("ftp://hooks.example.com/x", &s).is_err());
        assert!(validate_callback_url("not a url", &s).is_err());
        let s = settings(&[], true);
        assert!(validate_callback_url("http://hooks.example.com/x", &s).is_ok());
    }

    #[test]
    fn credentials_in_the_url_are_refused() {
        let s = settings(&[], false);
        assert!(validate_callback_url("https://user:pw@hooks.example.com/", &s).is_err());
        assert!(validate_callback_url("https://user@hooks.example.com/", &s).is_err());
    }

    #[test]
    fn internal_addresses_are_refused_unless_listed_exactly() {
        let s = settings(&[], true);
        for url in [
            "https://127.0.0.1/",
            "https://10.0.0.5/",
            "https://172.16.3.4/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://224.0.0.1/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://localhost/",
            // The root's trailing dot names the same host.
            "https://localhost./",
            "https://LOCALHOST../",
            "https://api.localhost/",
            "https://127.0.0.1./",
            // IPv6 forms that reach a private IPv4 address: SIIT IPv4-translated, 6to4
            // (2002:a9fe:a9fe:: is 169.254.169.254's gateway), Teredo (server 10.0.0.1; client
            // 127.0.0.1 stored inverted), NAT64 local use.
            "https://[::ffff:0:a00:1]/",
            "https://[::ffff:0:127.0.0.1]/",
            "https://[2002:a9fe:a9fe::1]/",
            "https://[2002:c0a8:101::]/",
            "https://[2001:0:a00:1::1]/",
            "https://[2001:0:808:808:0:0:80ff:fffe]/",
            "https://[64:ff9b:1::a00:1]/",
            // The URL parser normalises these spellings of 127.0.0.1.
            "https://2130706433/",
            "https://0x7f.1/",
        ] {
            assert!(validate_callback_url(url, &s).is_err(), "{url} accepted");
        }
        assert!(validate_callback_url("https://8.8.8.8/", &s).is_ok());
        assert!(validate_callback_url("https://[2606:4700::1111]/", &s).is_ok());
        // The same forms around a public address are fine (8.8.8.8 inside 6to4 and Teredo).
        assert!(validate_callback_url("https://[2002:808:808::1]/", &s).is_ok());
        assert!(validate_callback_url("https://[2001:0:808:808:0:0:f7f7:f7f7]/", &s).is_ok());
        assert!(validate_callback_url("https://notlocalhost.example/", &s).is_ok());
        let s = settings(&["127.0.0.1", "[::1]"], true);
        assert!(validate_callback_url("http://127.0.0.1:9000/hook", &s).is_ok());
        assert!(validate_callback_url("http://[::1]:9000/hook", &s).is_ok());
        assert!(validate_callback_url("http://10.0.0.1/hook", &s).is_err());
    }

    #[test]
    fn the_allow_list_is_honoured_exactly_or_by_suffix() {
        let s = settings(&["hooks.example.com", "*.partner.test"], false);
        assert!(validate_callback_url("https://hooks.example.com/a", &s).is_ok());
        assert!(validate_callback_url("https://HOOKS.example.com./a", &s).is_ok());
        assert!(validate_callback_url("https://a.partner.test/a", &s).is_ok());
        assert!(validate_callback_url("https://a.b.partner.test/a", &s).is_ok());
        for url in [
            "https://partner.test/",
            "https://evilpartner.test/",
            "https://example.com/",
            "https://hooks.example.com.evil.test/",
            "https://8.8.8.8/",
        ] {
            assert!(validate_callback_url(url, &s).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn callbacks_are_refused_without_a_signing_secret() {
        let s = WebhookSettings::default();
        let e = validate_callback_url("https://hooks.example.com/", &s).unwrap_err();
        assert!(e.contains("signing_secret"), "{e}");
    }

    #[test]
    fn allow_list_entries_are_checked() {
        assert!(validate_host_pattern("hooks.example.com").is_ok());
        assert!(validate_host_pattern("*.example.com").is_ok());
        assert!(validate_host_pattern("10.1.2.3").is_ok());
        assert!(validate_host_pattern("https://hooks.example.com").is_err());
        assert!(validate_host_pattern("hooks.example.com:443").is_err());
        assert!(validate_host_pattern("*.10.0.0.1").is_err());
        assert!(validate_host_pattern("").is_err());
    }

    #[tokio::test]
    async fn a_name_resolving_to_an_internal_address_is_refused_at_delivery() {
        // What DNS rebinding looks like: a name that passed validation resolves inside.
        let url = Url::parse("http://localhost:9/hook").unwrap();
        let Err(Refusal::Permanent(e)) = resolve_checked(&url, &settings(&[], true)).await else {
            panic!("localhost was not refused")
        };
        assert!(e.contains("loopback"), "{e}");
        // Listed exactly, the operator vouches for it.
        assert!(
            resolve_checked(&url, &settings(&["localhost"], true))
                .await
                .is_ok()
        );
    }
}
