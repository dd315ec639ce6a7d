//! Schema migrations: plain SQL files in `migrations/`, embedded into the binary, applied in
//! order under a PostgreSQL advisory lock so that replicas starting together cannot race.
//! Each migration runs in its own transaction and is recorded with a checksum; an applied file
//! that was edited afterwards is refused rather than silently diverging.
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// (version, name, sql). Append only; never edit an applied file.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (2, "jobs", include_str!("../../migrations/0002_jobs.sql")),
    (
        3,
        "idempotency_keys",
        include_str!("../../migrations/0003_idempotency_keys.sql"),
    ),
    (
        4,
        "scope_groups_and_policies",
        include_str!("../../migrations/0004_scope_groups_and_policies.sql"),
    ),
    (
        5,
        "applications",
        include_str!("../../migrations/0005_applications.sql"),
    ),
    (
        6,
        "propagation_checks",
        include_str!("../../migrations/0006_propagation_checks.sql"),
    ),
    (
        7,
        "webhook_deliveries",
        include_str!("../../migrations/0007_webhook_deliveries.sql"),
    ),
    (
        8,
        "rbac_restrictions",
        include_str!("../../migrations/0008_rbac_restrictions.sql"),
    ),
    (
        9,
        "idempotency_scope_and_holder",
        include_str!("../../migrations/0009_idempotency_scope_and_holder.sql"),
    ),
    (
        10,
        "access_grants",
        include_str!("../../migrations/0010_access_grants.sql"),
    ),
    (
        11,
        "rbac_migrations",
        include_str!("../../migrations/0011_rbac_migrations.sql"),
    ),
    (
        12,
        "queue_claim",
        include_str!("../../migrations/0012_queue_claim.sql"),
    ),
    (
        13,
        "rbac_migrations_job",
        include_str!("../../migrations/0013_rbac_migrations_job.sql"),
    ),
    (
        14,
        "grant_expiry_notice",
        include_str!("../../migrations/0014_grant_expiry_notice.sql"),
    ),
    (
        15,
        "verdict_latency",
        include_str!("../../migrations/0015_verdict_latency.sql"),
    ),
    (
        16,
        "queue_claim_function",
        include_str!("../../migrations/0016_queue_claim_function.sql"),
    ),
    (
        17,
        "step_runs",
        include_str!("../../migrations/0017_step_runs.sql"),
    ),
    (
        18,
        "key_leases",
        include_str!("../../migrations/0018_key_leases.sql"),
    ),
];

/// Arbitrary but fixed: "mailscop" in ASCII.
const MIGRATION_LOCK: i64 = 0x6d61_696c_7363_6f70;

pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

fn checksum(sql: &str) -> String {
    let d = Sha256::digest(sql.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Apply pending migrations; returns the versions applied by this call.
pub async fn run(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    // Lock first: even `CREATE TABLE IF NOT EXISTS` races when two sessions run it at once.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        apply_pending(client).await
    }
    .await;
    // Unlock even on failure; the session ending would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_pending(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    let rows = client
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await?;
    let applied: std::collections::HashMap<i32, String> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let sum = checksum(sql);
        match applied.get(version) {
            Some(existing) if *existing == sum => continue,
            Some(_) => anyhow::bail!(
                "migration {version} ({name}) was changed after it was applied; \
                 add a new migration instead of editing an applied one"
            ),
            None => {}
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await.map_err(|e| {
            anyhow::anyhow!("migration {version} ({name}) failed: {}", describe(&e))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &sum],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        done.push(*version);
    }
    if let Some(max) = applied.keys().max()
        && *max > latest_version()
    {
        anyhow::bail!(
            "the database is at schema version {max}, newer than this binary knows ({}); \
                 run a newer mailscope",
            latest_version()
        );
    }
    Ok(done)
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The highest applied version, or `None` when the schema table does not exist yet.
pub async fn current_version(client: &Client) -> Result<Option<i32>, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?;
    Ok(row.get(0))
}
