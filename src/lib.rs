//! mailscope: scope an Entra app's Graph application permissions to chosen Exchange Online
//! mailboxes, and prove the restriction is in force.
#![forbid(unsafe_code)]

pub mod domain;
pub mod m365;
