//! Exchange Online admin client over the `InvokeCommand` transport (docs/microsoft-365.md §1.3).
//!
//! `POST {exchange}/adminapi/beta/{tenant}/InvokeCommand` with
//! `{"CmdletInput":{"CmdletName":…,"Parameters":{…}}}`, the app-only `X-AnchorMailbox` header and
//! `Prefer: odata.maxpagesize`. Pages are followed through `@odata.nextLink` (same body, same
//! headers), `@`-annotated keys are stripped from output items, and errors are parsed from
//! `details[0].message` (`ErrorId|ExceptionType|text`) into [`ErrorKind`]s. Typed wrappers for
//! every cmdlet mailscope uses live in [`cmdlets`].
pub mod cmdlets;
mod errors;

pub use cmdlets::*;
pub(crate) use errors::classify_exchange;

use super::error::{ErrorKind, M365Error, Service};
use super::token::TokenResource;
use super::transport::{Auth, Call, Core, rebase_next_link};
use super::{ExchangeTenantForm, TenantContext};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::time::Instant;

/// Guard against a server that keeps handing out next links.
const MAX_PAGES: usize = 10_000;

/// How one cmdlet invocation may be retried.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Safe to send twice (Get-/Test- cmdlets, and Set/Remove/Add whose repeat is harmless).
    pub safe_to_retry: bool,
    /// Retry 404 NotFound for the replication window (use right after a `New-*`).
    pub wait_for_replication: bool,
    /// `$select` properties, when only a few are needed.
    pub select: Vec<String>,
}

impl InvokeOptions {
    pub fn read() -> Self {
        InvokeOptions {
            safe_to_retry: true,
            ..Default::default()
        }
    }
    pub fn write() -> Self {
        InvokeOptions::default()
    }
}

/// Output of one cmdlet across all pages.
#[derive(Debug, Clone, Default)]
pub struct CmdletOutput {
    /// One object per output item, annotations removed.
    pub items: Vec<Map<String, Value>>,
    /// `@adminapi.warnings`, if any.
    pub warnings: Vec<String>,
}

impl CmdletOutput {
    /// Deserialize every item; fails with `Protocol` naming the cmdlet.
    pub fn typed<T: DeserializeOwned>(self, cmdlet: &str) -> Result<Vec<T>, M365Error> {
        self.items
            .into_iter()
            .map(|m| {
                serde_json::from_value(Value::Object(m)).map_err(|e| {
                    M365Error::new(
                        ErrorKind::Protocol,
                        Service::Exchange,
                        format!("InvokeCommand:{cmdlet}"),
                    )
                    .with_message(format!("unexpected output item: {e}"))
                })
            })
            .collect()
    }
}

/// Exchange admin client bound to one tenant.
#[derive(Clone)]
pub struct ExchangeClient {
    core: Arc<Core>,
    ctx: Arc<TenantContext>,
}

impl ExchangeClient {
    pub(crate) fn new(core: Arc<Core>, ctx: Arc<TenantContext>) -> Self {
        ExchangeClient { core, ctx }
    }

    /// The tenant GUID for the URL and anchor: the configured id when it is a GUID, else the
    /// token's `tid`, else the configured id as is.
    async fn tenant_guid(&self) -> Result<String, M365Error> {
        if uuid::Uuid::parse_str(&self.ctx.tenant_id).is_ok() {
            return Ok(self.ctx.tenant_id.clone());
        }
        let t = self
            .core
            .tokens
            .get(&self.core, &self.ctx, TokenResource::Exchange, None)
            .await?;
        Ok(t.tenant_guid()
            .map(str::to_string)
            .unwrap_or_else(|| self.ctx.tenant_id.clone()))
    }

    /// Run a cmdlet and collect every page of its output.
    pub async fn invoke(
        &self,
        cmdlet: &str,
        parameters: Map<String, Value>,
        opts: &InvokeOptions,
    ) -> Result<CmdletOutput, M365Error> {
        let s = &self.core.settings;
        let guid = self.tenant_guid().await?;
        let tenant_in_path = match s.exchange_tenant_form {
            ExchangeTenantForm::Guid => guid.clone(),
            ExchangeTenantForm::AsConfigured => self.ctx.tenant_id.clone(),
        };
        let base = &self.ctx.endpoints.exchange;
        let mut url = format!(
            "{base}{}",
            s.exchange_invoke_path.replace("{tenant}", &tenant_in_path)
        );
        if !opts.select.is_empty() {
            url.push_str("?$select=");
            url.push_str(&opts.select.join(","));
        }
        let anchor = s
            .exchange_anchor_mailbox
            .replace("{tenant_guid}", &guid)
            .replace("{tenant}", &self.ctx.tenant_id);
        let mut input = Map::new();
        input.insert("CmdletName".into(), Value::String(cmdlet.into()));
        if !parameters.is_empty() {
            input.insert("Parameters".into(), Value::Object(parameters));
        }
        let body = serde_json::json!({ "CmdletInput": input });
        let op = format!("InvokeCommand:{cmdlet}");
        let not_found_until = opts
            .wait_for_replication
            .then(|| Instant::now() + std::time::Duration::from_secs(s.replication_window_secs));

        let mut out = CmdletOutput::default();
        let mut pages = 0usize;
        loop {
            pages += 1;
            let mut call = Call::new(
                &self.ctx.tenant_id,
                Service::Exchange,
                &op,
                Method::POST,
                url.clone(),
            )
            .json_body(&body)
            .header("x-anchormailbox", &anchor)
            .header(
                "prefer",
                &format!("odata.maxpagesize={}", s.exchange_page_size),
            )
            .header("accept", "application/json")
            .header("x-cmdletname", cmdlet)
            .header("x-responseformat", "json")
            .header("client-request-id", &uuid::Uuid::new_v4().to_string());
            call.idempotent = opts.safe_to_retry;
            call.not_found_until = not_found_until;
            call.auth = Some(Auth {
                ctx: &self.ctx,
                resource: TokenResource::Exchange,
            });
            let resp = self.core.execute(&call, classify_exchange).await?;
            let next = parse_page(&resp.body, &mut out).map_err(|m| {
                M365Error::new(ErrorKind::Protocol, Service::Exchange, &op)
                    .with_status(resp.status)
                    .with_message(m)
                    .with_request_id(resp.request_id())
            })?;
            match next {
                Some(link) if pages < MAX_PAGES => {
                    let next_url = rebase_next_link(base, &link);
                    if next_url == url {
                        return Err(M365Error::new(ErrorKind::Protocol, Service::Exchange, &op)
                            .with_message("@odata.nextLink points at the page just read"));
                    }
                    url = next_url;
                }
                Some(_) => {
                    return Err(M365Error::new(ErrorKind::Protocol, Service::Exchange, &op)
                        .with_message(format!("more than {MAX_PAGES} pages")));
                }
                None => return Ok(out),
            }
        }
    }

    /// Run a cmdlet and deserialize its output items.
    pub async fn invoke_typed<T: DeserializeOwned>(
        &self,
        cmdlet: &str,
        parameters: Map<String, Value>,
        opts: &InvokeOptions,
    ) -> Result<Vec<T>, M365Error> {
        self.invoke(cmdlet, parameters, opts).await?.typed(cmdlet)
    }

    pub(crate) fn confirm_false_on_remove(&self) -> bool {
        self.core.settings.exchange_confirm_false_on_remove
    }
}

/// Append one page's items and warnings to `out`; return the next link.
pub(crate) fn parse_page(body: &[u8], out: &mut CmdletOutput) -> Result<Option<String>, String> {
    // Cmdlets without output may answer with no body at all.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("response is not JSON: {e}"))?;
    let Value::Object(mut top) = v else {
        return Err("response is not a JSON object".into());
    };
    match top.remove("value") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::Object(m) => out.items.push(strip_annotations(m)),
                    // Scalar output (rare): keep it addressable under "Value".
                    other => {
                        let mut m = Map::new();
                        m.insert("Value".into(), other);
                        out.items.push(m);
                    }
                }
            }
        }
        Some(Value::Object(m)) => out.items.push(strip_annotations(m)),
        Some(_) => return Err("`value` is neither an array, an object nor null".into()),
    }
    if let Some(Value::Array(w)) = top.get("@adminapi.warnings") {
        out.warnings
            .extend(w.iter().filter_map(|x| x.as_str()).map(str::to_string));
    }
    Ok(top
        .get("@odata.nextLink")
        .and_then(|l| l.as_str())
        .filter(|l| !l.is_empty())
        .map(str::to_string))
}

/// Remove `@`-annotated keys (`Guid@odata.type`, `@odata.type`, ...), recursively.
pub(crate) fn strip_annotations(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter()
        .filter(|(k, _)| !k.contains('@'))
        .map(|(k, v)| {
            let v = match v {
                Value::Object(inner) => Value::Object(strip_annotations(inner)),
                Value::Array(a) => Value::Array(
                    a.into_iter()
                        .map(|x| match x {
                            Value::Object(inner) => Value::Object(strip_annotations(inner)),
                            x => x,
                        })
                        .collect(),
                ),
                v => v,
            };
            (k, v)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;

    #[test]
    fn annotations_are_stripped_and_next_link_returned() {
        let body = br##"{"@odata.context":"https://outlook.office.com/adminapi/beta/t/$metadata#Collection(Exchange.GenericHashTable)",
            "adminapi.warnings@odata.type":"#Collection(String)","@adminapi.warnings":["careful"],
            "@odata.nextLink":"https://outlook.office.com/adminapi/beta/t/InvokeCommand?$skiptoken=2",
            "value":[{"Name":"a","DatabaseGuid@data.type":"System.Guid","DatabaseGuid@odata.type":"#Guid","DatabaseGuid":"g",
                      "Nested":{"X@odata.type":"#String","X":"y"}}]}"##;
        let mut out = CmdletOutput::default();
        let next = parse_page(body, &mut out).unwrap();
        assert_eq!(
            next.as_deref(),
            Some("https://outlook.office.com/adminapi/beta/t/InvokeCommand?$skiptoken=2")
        );
        assert_eq!(out.warnings, vec!["careful"]);
        let item = &out.items[0];
        assert_eq!(
            item.keys().collect::<Vec<_>>(),
            vec!["DatabaseGuid", "Name", "Nested"]
        );
        assert_eq!(item["Nested"], serde_json::json!({"X":"y"}));
    }

    #[test]
    fn no_output_shapes_are_accepted() {
        for body in [
            &b""[..],
            b"  ",
            br#"{"value":[]}"#,
            br#"{"value":null}"#,
            br#"{"@odata.context":"x"}"#,
        ] {
            let mut out = CmdletOutput::default();
            assert_eq!(parse_page(body, &mut out), Ok(None));
            assert!(out.items.is_empty());
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut out = CmdletOutput::default();
        assert!(parse_page(b"<html>", &mut out).is_err());
        assert!(parse_page(br#"{"value":3}"#, &mut out).is_err());
    }
}
