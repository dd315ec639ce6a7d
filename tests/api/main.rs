//! The single integration-test binary.
#![allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod m365_connection_test;
mod m365_exchange;
mod m365_graph;
mod m365_resilience;
mod m365_support;
mod m365_tokens;
