//! One module per command (or group of commands), each calling meshd
//! through a [`crate::session::Session`] and printing through
//! [`crate::render`].

pub mod access;
pub mod check;
pub mod get;
pub mod identity;
pub mod job;
pub mod logs;
pub mod registry;
pub mod rollout;
pub mod routes;
pub mod status;
pub mod top;
pub mod traffic;
