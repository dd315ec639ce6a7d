//! Overhead of the Microsoft 365 connector per call, against a local HTTP server.
//!
//! Both sides hit the same tiny keep-alive HTTP/1.1 server on 127.0.0.1 with the same answer:
//! * baseline: a bare `reqwest::Client` doing the request and reading the body;
//! * connector: `GraphClient::get_json` / `ExchangeClient::invoke`, i.e. token cache lookup,
//!   per-tenant admission, tracing span, metrics, error classification and JSON parsing.
//!
//! The difference is what the connector adds per call. Rate limits are lifted for the run (the
//! default budget, 20 Graph and 5 Exchange calls per second per tenant, would otherwise be what
//! is measured). Run with `bench/m365_overhead.sh`; `M365_BENCH_CALLS` sets the sample size.
#![allow(clippy::unwrap_used)]

use mailscope::domain::cloud::{Cloud, CloudEndpoints, EndpointOverrides};
use mailscope::domain::credential::ManagementCredential;
use mailscope::m365::exchange::InvokeOptions;
use mailscope::m365::{M365Client, M365Settings, TenantContext};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TENANT: &str = "6f0c7a3e-1111-4c3b-9e2d-0a1b2c3d4e5f";

fn response_for(head: &str) -> &'static str {
    if head.contains("/oauth2/v2.0/token") {
        r#"{"token_type":"Bearer","expires_in":3599,"access_token":"eyJhbGciOiJub25lIn0.eyJ0aWQiOiI2ZjBjN2EzZS0xMTExLTRjM2ItOWUyZC0wYTFiMmMzZDRlNWYifQ.c2ln"}"#
    } else if head.contains("InvokeCommand") {
        r##"{"@odata.context":"x","value":[{"Name":"alice","Guid@odata.type":"#Guid","Guid":"g","PrimarySmtpAddress":"alice@contoso.test"}]}"##
    } else {
        r#"{"id":"u1","userPrincipalName":"alice@contoso.test","displayName":"Alice","mail":"alice@contoso.test"}"#
    }
}

/// Minimal keep-alive HTTP/1.1 server: fixed JSON answers, no routing cost worth measuring.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            let mut chunk = [0u8; 8192];
            loop {
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..head_end + len);
                let body = response_for(&head);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if sock.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    Stats {
        mean,
        p50: v[v.len() / 2],
        p99: v[(v.len() * 99 / 100).min(v.len() - 1)],
    }
}

async fn time_n<F, Fut>(n: usize, mut f: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm-up: connections, token, lazily created limiters and metric series.
    for _ in 0..50 {
        f().await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        samples.push(t.elapsed());
    }
    stats(samples)
}

fn line(name: &str, s: &Stats) {
    println!(
        "{name:<28} mean {:>8.1} µs   p50 {:>8.1} µs   p99 {:>8.1} µs",
        s.mean.as_secs_f64() * 1e6,
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("M365_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener));

    let settings = M365Settings {
        graph_rate_per_sec: 1e9,
        graph_burst: 1_000_000,
        exchange_rate_per_sec: 1e9,
        exchange_burst: 1_000_000,
        ..M365Settings::default()
    };
    let registry = prometheus::Registry::new();
    let client = M365Client::new(settings, &registry).unwrap();
    let u = Some(base.clone());
    let endpoints = CloudEndpoints::resolve(
        Cloud::Custom,
        &EndpointOverrides {
            login: u.clone(),
            graph: u.clone(),
            exchange: u,
        },
    )
    .unwrap();
    let tenant = client.tenant(TenantContext {
        tenant_id: TENANT.into(),
        endpoints,
        credential: ManagementCredential::ClientSecret {
            client_id: "bench".into(),
            client_secret: "bench-secret".to_string().into(),
        },
    });
    let graph = tenant.graph();
    let exchange = tenant.exchange();
    let raw = reqwest::Client::new();

    println!("m365 connector overhead, {n} sequential calls each, local keep-alive server");
    let get_url = format!("{base}/v1.0/users/alice@contoso.test");
    let base_get = time_n(n, || async {
        let r = raw.get(&get_url).bearer_auth("t").send().await.unwrap();
        let _: serde_json::Value = r.json().await.unwrap();
    })
    .await;
    let conn_get = time_n(n, || async {
        graph.get_user("alice@contoso.test").await.unwrap().unwrap();
    })
    .await;
    let invoke_url = format!("{base}/adminapi/beta/{TENANT}/InvokeCommand");
    let body = serde_json::json!({"CmdletInput":{"CmdletName":"Get-Mailbox","Parameters":{"ResultSize":"1"}}});
    let base_post = time_n(n, || async {
        let r = raw
            .post(&invoke_url)
            .bearer_auth("t")
            .json(&body)
            .send()
            .await
            .unwrap();
        let _: serde_json::Value = r.json().await.unwrap();
    })
    .await;
    let conn_post = time_n(n, || async {
        let mut p = serde_json::Map::new();
        p.insert("ResultSize".into(), "1".into());
        exchange
            .invoke("Get-Mailbox", p, &InvokeOptions::read())
            .await
            .unwrap();
    })
    .await;
    line("graph GET   bare reqwest", &base_get);
    line("graph GET   connector", &conn_get);
    line("exchange    bare reqwest", &base_post);
    line("exchange    connector", &conn_post);
    let over = |a: &Stats, b: &Stats| (b.mean.as_secs_f64() - a.mean.as_secs_f64()) * 1e6;
    println!(
        "overhead per call (mean): graph {:.1} µs, exchange {:.1} µs",
        over(&base_get, &conn_get),
        over(&base_post, &conn_post)
    );
}
