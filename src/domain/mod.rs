//! Pure domain types and rules: no I/O, no clocks, no randomness passed in implicitly.
//! Everything here is unit-tested in place and shared by the API, the connector and the sandbox.
pub mod access;
pub mod address;
pub mod certificate;
pub mod cloud;
pub mod credential;
pub mod field_error;
pub mod grant;
pub mod permissions;
pub mod propagation;
pub mod rbac;
pub mod rbac_migration;
pub mod secret;
pub mod spelling;
