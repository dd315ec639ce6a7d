//! The single integration-test binary: every test starts the real service (or the sandbox) over
//! HTTP, the service against its own PostgreSQL database.
#![allow(clippy::unwrap_used)]

mod helpers;

mod access_grants;
mod access_policies;
mod applications;
mod auth;
mod connection_test;
mod documented_access;
mod entra_consistency;
mod idempotency;
mod job_throttling;
mod layers;
mod operations;
mod problems;
mod propagation_checks;
mod provisioning_flow;
mod queue;
mod rbac_migrations;
mod rbac_restrictions;
mod scope_groups;
mod spec;
mod tenants;
mod webhooks;

mod sandbox_control;
mod sandbox_exchange;
mod sandbox_fidelity;
mod sandbox_graph;
mod sandbox_helpers;
mod sandbox_login;
mod sandbox_propagation;
mod sandbox_throttling;

mod m365_connection_test;
mod m365_exchange;
mod m365_graph;
mod m365_resilience;
mod m365_sandbox;
mod m365_sandbox_faults;
mod m365_support;
mod m365_tokens;
