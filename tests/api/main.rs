//! The single integration-test binary: every test starts the real service over HTTP against its
//! own PostgreSQL database.
#![allow(clippy::unwrap_used)]

mod helpers;

mod auth;
mod idempotency;
mod operations;
mod problems;
mod queue;
mod tenants;
