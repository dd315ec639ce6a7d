//! Leases on natural keys (migration 0018): who may write a key on every replica while it calls
//! Microsoft with no connection held. The provisioning layer's `key_lease` wraps these statements
//! with the in-process turn, waiting and renewal.
use std::time::Duration;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::StoreError;
use super::liveness;

/// Take `name` for `token` of process `holder` until `for_at_most` from now, if it is free: no
/// row, a row of this process (its previous holder here is gone: the caller holds the key's
/// in-process lock), a row past `locked_until`, or one whose process is no longer alive.
/// `false` while another live process holds it.
pub async fn try_take(
    c: &impl GenericClient,
    name: &str,
    holder: i32,
    token: Uuid,
    for_at_most: Duration,
) -> Result<bool, StoreError> {
    let taken = c
        .query_opt(
            &format!(
                "INSERT INTO key_leases AS l (name, holder, token, locked_until)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4))
                 ON CONFLICT (name) DO UPDATE
                     SET holder = EXCLUDED.holder, token = EXCLUDED.token, taken_at = now(),
                         locked_until = EXCLUDED.locked_until
                     WHERE l.holder = EXCLUDED.holder OR l.locked_until < now() OR NOT {}
                 RETURNING 1",
                liveness::alive_sql("l.holder")
            ),
            &[&name, &holder, &token, &for_at_most.as_secs_f64()],
        )
        .await?;
    Ok(taken.is_some())
}

/// Inside the transaction that records a leased use case's result: lock the lease row and tell
/// whether it still carries `token`. While the row is locked nobody can take the lease over, so
/// the writes that follow commit under it or not at all.
pub async fn still_held(
    c: &impl GenericClient,
    name: &str,
    token: Uuid,
) -> Result<bool, StoreError> {
    let row = c
        .query_opt(
            "SELECT 1 FROM key_leases WHERE name = $1 AND token = $2 FOR UPDATE",
            &[&name, &token],
        )
        .await?;
    Ok(row.is_some())
}

/// Push `locked_until` on while the holder works; `false` when the lease is no longer its own.
pub async fn renew(
    c: &impl GenericClient,
    name: &str,
    token: Uuid,
    for_at_most: Duration,
) -> Result<bool, StoreError> {
    let n = c
        .execute(
            "UPDATE key_leases SET locked_until = now() + make_interval(secs => $3)
             WHERE name = $1 AND token = $2",
            &[&name, &token, &for_at_most.as_secs_f64()],
        )
        .await?;
    Ok(n == 1)
}

/// Give the lease back (nothing when it was taken over meanwhile).
pub async fn release(c: &impl GenericClient, name: &str, token: Uuid) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM key_leases WHERE name = $1 AND token = $2",
        &[&name, &token],
    )
    .await?;
    Ok(())
}
