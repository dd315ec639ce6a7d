//! mailscope: scope an Entra app's Graph application permissions to chosen Exchange Online
//! mailboxes, and prove the restriction is in force.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod jobs;
pub mod m365;
pub mod provisioning;
pub mod queue;
pub mod sandbox;
pub mod store;
pub mod telemetry;
pub mod webhooks;
