//! The floor for the API benchmark (`bench/api.sh`): a bare actix-web server that runs the same
//! single-row queries as mailscope's handlers, with and without JWT verification, and nothing
//! else (no middleware, no problem rendering, no metrics). The difference between mailscope and
//! this floor is what mailscope's own layers cost.
//!
//! Usage: cargo bench --bench api_floor -- <database-url> <listen-addr> <hs256-secret>
use std::sync::Arc;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use uuid::Uuid;

struct Floor {
    pool: Pool,
    key: DecodingKey,
    validation: Validation,
}

async fn tenant(floor: web::Data<Arc<Floor>>, id: web::Path<Uuid>) -> HttpResponse {
    let Ok(c) = floor.pool.get().await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    match c
        .query_opt(
            "SELECT tenant_id, display_name, cloud, default_domain, endpoints, client_id, \
             credential_kind, canary_mailboxes, created_at, updated_at FROM tenants WHERE tenant_id = $1",
            &[&*id],
        )
        .await
    {
        Ok(Some(r)) => HttpResponse::Ok().json(serde_json::json!({
            "tenant_id": r.get::<_, Uuid>(0), "display_name": r.get::<_, String>(1),
            "cloud": r.get::<_, String>(2), "default_domain": r.get::<_, String>(3),
            "endpoints": r.get::<_, serde_json::Value>(4), "client_id": r.get::<_, Uuid>(5),
            "kind": r.get::<_, String>(6), "canary_mailboxes": r.get::<_, Vec<String>>(7),
        })),
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

async fn replay(floor: web::Data<Arc<Floor>>, key: web::Path<String>) -> HttpResponse {
    let Ok(c) = floor.pool.get().await else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    match c
        .query_opt(
            "SELECT response_status, response_body FROM idempotency_keys WHERE key = $1 LIMIT 1",
            &[&*key],
        )
        .await
    {
        Ok(Some(r)) => HttpResponse::Ok()
            .content_type("application/json")
            .body(r.get::<_, Option<Vec<u8>>>(1).unwrap_or_default()),
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

fn authorized(floor: &Floor, req: &HttpRequest) -> bool {
    let Some(token) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    jsonwebtoken::decode::<serde_json::Value>(token, &floor.key, &floor.validation).is_ok()
}

async fn tenant_auth(
    floor: web::Data<Arc<Floor>>,
    req: HttpRequest,
    id: web::Path<Uuid>,
) -> HttpResponse {
    if !authorized(&floor, &req) {
        return HttpResponse::Unauthorized().finish();
    }
    tenant(floor, id).await
}

async fn replay_auth(
    floor: web::Data<Arc<Floor>>,
    req: HttpRequest,
    key: web::Path<String>,
) -> HttpResponse {
    if !authorized(&floor, &req) {
        return HttpResponse::Unauthorized().finish();
    }
    replay(floor, key).await
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; take the positional arguments after it.
    let pos: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [db, listen, secret] = [pos.first(), pos.get(1), pos.get(2)];
    let (Some(db), Some(listen), Some(secret)) = (db, listen, secret) else {
        anyhow::bail!("usage: api_floor <database-url> <listen-addr> <hs256-secret>");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cfg: tokio_postgres::Config = db.parse()?;
        let mgr = Manager::from_config(
            cfg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr).max_size(16).build()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&["mailscope-local"]);
        validation.set_audience(&["mailscope"]);
        let floor = Arc::new(Floor {
            pool,
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        });
        HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(floor.clone()))
                .route("/floor/tenants/{id}", web::get().to(tenant))
                .route("/floor-auth/tenants/{id}", web::get().to(tenant_auth))
                .route("/floor/replay/{key}", web::post().to(replay))
                .route("/floor-auth/replay/{key}", web::post().to(replay_auth))
        })
        .bind(listen.as_str())?
        .run()
        .await?;
        Ok(())
    })
}
