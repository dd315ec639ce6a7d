//! `Idempotency-Key` for POST and PATCH under `/v1`, following the IETF draft
//! (draft-ietf-httpapi-idempotency-key-header):
//!
//! - the same key with the same request (method, path, body) replays the stored response, marked
//!   `Idempotent-Replayed: true`, success or client error alike;
//! - the same key with a different body answers 422 `idempotency_key_reused`;
//! - while the first request is still running, 409 `idempotency_key_in_use` (retry unchanged);
//! - keys are scoped to the caller's identity *and authorization* (role, visible tenants), to the
//!   method and to the path, and kept for `idempotency.retention_hours`. A replay is thus only
//!   served to a caller the handler would authorize exactly as it did the first request; callers
//!   whose token names no identity cannot use keys (400).
//!
//! Transient failures (5xx, 429) are not stored: the key is released so that a retry runs again,
//! which is safe because every provisioning operation is idempotent by its natural key. A request
//! that crashed mid-way is taken over at once: its record names the holding process, whose lease
//! (`store::liveness`) ends with its connection, and within a process a claim ends with its task.
//! A record without a holder waits for its lock to lapse.
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::Next;
use actix_web::{Error, HttpResponse, web};
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::{ApiError, ProblemKind};
use crate::auth::{Caller, Verifier};
use crate::store::liveness::{self, Held};

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long a running request holds its key before a retry may take over.
const LOCK: Duration = Duration::from_secs(300);
/// Response headers worth replaying.
const KEPT_HEADERS: &[&str] = &["content-type", "location", "link", "retry-after"];

/// Parse the header: an RFC 8941 string (`"…"`) as the draft specifies, or a bare token.
pub fn parse_key(raw: &str) -> Result<String, ApiError> {
    let raw = raw.trim();
    let key = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ApiError::new(
            ProblemKind::InvalidIdempotencyKey,
            "Idempotency-Key must be 1 to 255 printable ASCII characters",
        ));
    }
    Ok(key.to_string())
}

fn fingerprint(method: &Method, path: &str, query: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in [
        method.as_str().as_bytes(),
        path.as_bytes(),
        query.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    h.finalize().to_vec()
}

/// Set by a handler (as a response extension) when its answer must not be replayed as sent: this
/// body is stored for replays instead. The secrets endpoint stores its answer without the secret
/// text, which is shown once and never written to the database.
#[derive(Clone)]
pub struct ReplayBody(pub Vec<u8>);

/// What to do with a request that carries an Idempotency-Key.
enum Decision {
    PassThrough,
    Replay(HttpResponse),
    /// We hold the key: run the request, then store its response.
    Run(Claim),
}

/// A key this request holds. `held` ends the claim inside this process when the request ends in
/// any way (also when its future is dropped), so a retry need not wait for the lease to lapse.
struct Claim {
    scope: Scope,
    _held: Held,
}

/// Where a key lives: whom it belongs to, and the endpoint it was used on.
#[derive(Clone)]
struct Scope {
    caller: String,
    method: String,
    path: String,
    key: String,
}

/// Whom a key belongs to: the caller's identity (`oid`/`sub`, `azp`/`appid`) together with what
/// its token authorizes (role and visible tenants). A replay therefore only ever reaches a caller
/// whose request the handler would authorize exactly as it authorized the first one; any other
/// caller — another role or tenant set under the same `sub` — reaches the handler, which checks.
/// A caller without an identity has no scope of its own, so it may not use keys at all.
fn caller_scope(who: &Caller) -> Result<String, ApiError> {
    fn named(v: &Option<String>) -> Option<&str> {
        v.as_deref().filter(|s| !s.trim().is_empty())
    }
    let (subject, app) = (named(&who.subject), named(&who.app));
    if subject.is_none() && app.is_none() {
        return Err(ApiError::new(
            ProblemKind::InvalidIdempotencyKey,
            "an Idempotency-Key needs a caller to belong to, and this token names none (no `oid`, \
             `sub`, `azp` or `appid` claim): send the request without the key, or with a token \
             that identifies its caller",
        ));
    }
    let tenants = who.visible_tenants().map(|mut t| {
        t.sort();
        t
    });
    let canonical = serde_json::json!([subject, app, format!("{:?}", who.role), tenants]);
    Ok(Sha256::digest(canonical.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub async fn middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let decision = match decide(&mut req).await {
        Ok(d) => d,
        // Attach the error to the request so the request-context middleware renders it.
        Err(e) => return Ok(req.error_response(e)),
    };
    let claim = match decision {
        Decision::PassThrough => {
            return next
                .call(req)
                .await
                .map(ServiceResponse::map_into_boxed_body);
        }
        Decision::Replay(res) => {
            let (http_req, _) = req.into_parts();
            return Ok(ServiceResponse::new(http_req, res));
        }
        Decision::Run(claim) => claim,
    };
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?;
    let status = res.status();
    let (http_req, res) = res.into_parts();
    let (head, body) = res.into_parts();
    let bytes = actix_web::body::to_bytes(body).await.unwrap_or_default();
    let replay = head.extensions().get::<ReplayBody>().map(|r| r.0.clone());
    let stored: &[u8] = replay.as_deref().unwrap_or(&bytes);
    if let Some(state) = state
        && let Err(e) = store_outcome(&state, &claim.scope, status, head.headers(), stored).await
    {
        // The operation happened; only its replay record is missing. A retry re-runs it,
        // which the natural-key idempotency of every operation makes harmless.
        tracing::warn!(error = %e, "could not store the idempotent response");
    }
    // Only now does the claim end in this process (a retry meanwhile is told to wait).
    drop(claim);
    let res = head.set_body(BoxBody::new(bytes));
    Ok(ServiceResponse::new(http_req, res))
}

async fn decide(req: &mut ServiceRequest) -> Result<Decision, ApiError> {
    let applies = matches!(*req.method(), Method::POST | Method::PATCH);
    let Some(raw_key) = req.headers().get(HEADER).filter(|_| applies) else {
        return Ok(Decision::PassThrough);
    };
    let key = parse_key(raw_key.to_str().unwrap_or("\u{0}"))?;
    let (Some(state), Some(verifier)) = (
        req.app_data::<web::Data<AppState>>().cloned(),
        req.app_data::<web::Data<Verifier>>().cloned(),
    ) else {
        return Ok(Decision::PassThrough);
    };
    // Keys are scoped to the caller; an unauthenticated request goes on to its 401.
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .map(|(_, t)| t.trim().to_string());
    let Some(token) = token else {
        return Ok(Decision::PassThrough);
    };
    let Ok(who) = verifier.verify(&token).await else {
        return Ok(Decision::PassThrough);
    };
    let scope = Scope {
        caller: caller_scope(&who)?,
        method: req.method().to_string(),
        path: req.path().to_string(),
        key,
    };

    let body = req.extract::<web::Bytes>().await.map_err(|e| {
        ApiError::new(
            ProblemKind::PayloadTooLarge,
            format!("cannot read the body: {e}"),
        )
    })?;
    let fp = fingerprint(req.method(), req.path(), req.query_string(), &body);
    // Put the body back for the handler.
    let replay_body = body.clone();
    req.set_payload(Payload::Stream {
        payload: Box::pin(futures_util::stream::once(async move { Ok(replay_body) })),
    });

    let liveness = state.liveness.clone();
    let db = state.db().await?;
    let sql_err = |e| ApiError::from(crate::store::StoreError::from(e));
    let ids: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&scope.caller, &scope.method, &scope.path, &scope.key];
    let in_process = format!(
        "{} {} {} {}",
        scope.caller, scope.method, scope.path, scope.key
    );
    // Read first, without locks: replays (the common case for a repeated key) are one indexed
    // read. Only an unknown key, or one whose holder is gone, is claimed with a write.
    let row = db
        .query_opt(
            &format!(
                "SELECT fingerprint, response_status, response_headers, response_body,
                        locked_until > now(), holder, {}
                 FROM idempotency_keys
                 WHERE caller = $1 AND method = $2 AND path = $3 AND key = $4",
                liveness::alive_sql("holder")
            ),
            &ids,
        )
        .await
        .map_err(sql_err)?;
    if let Some(row) = row {
        if row.get::<_, Vec<u8>>(0) != fp {
            return Err(reused());
        }
        if let Some(status) = row.get::<_, Option<i32>>(1) {
            return Ok(Decision::Replay(replay(&row, status)));
        }
        if row.get::<_, Option<bool>>(4).unwrap_or(false) {
            match row.get::<_, Option<i32>>(5) {
                // Held in this process: `hold` below tells whether a task here still runs it.
                Some(h) if h == liveness.id() => {}
                // Held by a process whose lease is gone: it died, the key is free.
                Some(_) if !row.get::<_, bool>(6) => {}
                // A live holder elsewhere, or a record without one: wait for it or its lease.
                _ => return Err(in_use()),
            }
        }
    }
    // Claim it in this process first: a live holder here is in the set, so getting the slot
    // means that nobody in this process runs the key any more.
    let Some(held) = liveness.hold(in_process) else {
        return Err(in_use());
    };
    liveness.ensure(&state.pool).await?;
    let claimed = db
        .query_opt(
            &format!(
                "INSERT INTO idempotency_keys
                     (caller, method, path, key, fingerprint, locked_until, holder)
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)
                 ON CONFLICT (caller, method, path, key) DO UPDATE
                     SET locked_until = EXCLUDED.locked_until, holder = EXCLUDED.holder
                     WHERE idempotency_keys.response_status IS NULL
                       AND idempotency_keys.fingerprint = EXCLUDED.fingerprint
                       AND (idempotency_keys.locked_until < now()
                            OR idempotency_keys.holder = EXCLUDED.holder
                            OR (idempotency_keys.holder IS NOT NULL
                                AND NOT {}))
                 RETURNING 1",
                liveness::alive_sql("idempotency_keys.holder")
            ),
            &[
                ids[0],
                ids[1],
                ids[2],
                ids[3],
                &fp,
                &LOCK.as_secs_f64(),
                &liveness.id(),
            ],
        )
        .await
        .map_err(sql_err)?
        .is_some();
    if claimed {
        return Ok(Decision::Run(Claim { scope, _held: held }));
    }
    drop(held);
    // Someone else claimed or finished it between our read and our claim.
    let row = db
        .query_opt(
            "SELECT fingerprint, response_status, response_headers, response_body
             FROM idempotency_keys
             WHERE caller = $1 AND method = $2 AND path = $3 AND key = $4",
            &ids,
        )
        .await
        .map_err(sql_err)?;
    // Gone between insert and read: the first attempt failed transiently and released it.
    let Some(row) = row else { return Err(in_use()) };
    if row.get::<_, Vec<u8>>(0) != fp {
        return Err(reused());
    }
    match row.get::<_, Option<i32>>(1) {
        Some(status) => Ok(Decision::Replay(replay(&row, status))),
        None => Err(in_use()),
    }
}

fn reused() -> ApiError {
    ApiError::new(
        ProblemKind::IdempotencyKeyReused,
        "this Idempotency-Key was used with a different request; use a new key for a new request",
    )
}

/// The stored response, marked as a replay. Columns: 1 status (given), 2 headers, 3 body.
fn replay(row: &tokio_postgres::Row, status: i32) -> HttpResponse {
    let mut res =
        HttpResponse::build(StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK));
    if let Some(serde_json::Value::Object(headers)) = row.get::<_, Option<serde_json::Value>>(2) {
        for (k, v) in headers {
            if let Some(v) = v.as_str() {
                res.insert_header((k.as_str(), v));
            }
        }
    }
    res.insert_header((REPLAYED_HEADER, "true"));
    res.body(row.get::<_, Option<Vec<u8>>>(3).unwrap_or_default())
}

/// Store a final response for replay, or release the key after a transient failure.
async fn store_outcome(
    state: &AppState,
    scope: &Scope,
    status: StatusCode,
    headers: &header::HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let db = state.db().await?;
    let sql_err = |e| ApiError::from(crate::store::StoreError::from(e));
    let ids: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&scope.caller, &scope.method, &scope.path, &scope.key];
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        db.execute(
            "DELETE FROM idempotency_keys
             WHERE caller = $1 AND method = $2 AND path = $3 AND key = $4",
            &ids,
        )
        .await
        .map_err(sql_err)?;
        return Ok(());
    }
    let kept: serde_json::Map<String, serde_json::Value> = KEPT_HEADERS
        .iter()
        .filter_map(|h| {
            let v = headers.get(*h)?.to_str().ok()?;
            Some((h.to_string(), serde_json::Value::String(v.to_string())))
        })
        .collect();
    db.execute(
        "UPDATE idempotency_keys SET response_status = $5, response_headers = $6,
             response_body = $7, locked_until = NULL
         WHERE caller = $1 AND method = $2 AND path = $3 AND key = $4",
        &[
            ids[0],
            ids[1],
            ids[2],
            ids[3],
            &(status.as_u16() as i32),
            &serde_json::Value::Object(kept),
            &body,
        ],
    )
    .await
    .map_err(sql_err)?;
    Ok(())
}

fn in_use() -> ApiError {
    let mut e = ApiError::new(
        ProblemKind::IdempotencyKeyInUse,
        "the first request with this Idempotency-Key is still running; retry shortly",
    );
    e.retry_after = Some(1);
    e
}

/// Forget keys older than the retention period (run by the worker's maintenance loop).
pub async fn purge_expired(state: &AppState, retention: Duration) -> Result<u64, ApiError> {
    let db = state.db().await?;
    Ok(db
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
        .map_err(crate::store::StoreError::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_structured_strings_or_tokens() {
        assert_eq!(parse_key("\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(parse_key("abc").unwrap(), "abc");
        assert!(parse_key("\"\"").is_err());
        assert!(parse_key(&"x".repeat(256)).is_err());
        assert!(parse_key("caf\u{e9}").is_err());
    }

    #[test]
    fn fingerprint_separates_fields() {
        let a = fingerprint(&Method::POST, "/a", "b", b"");
        let b = fingerprint(&Method::POST, "/ab", "", b"");
        assert_ne!(a, b);
        assert_eq!(a, fingerprint(&Method::POST, "/a", "b", b""));
    }
}
