//! The single integration-test binary.
mod m365_connection_test;
mod m365_exchange;
mod m365_graph;
mod m365_resilience;
mod m365_support;
mod m365_tokens;
