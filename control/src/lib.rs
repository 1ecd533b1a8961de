//! The mesh's control plane (meshd's server): routing state, its store, the
//! CA and the gRPC APIs that serve proxies, agents and meshctl. The node
//! agent and meshctl are crates of their own.

pub mod auth;
pub mod convert;
pub mod identity;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod state;
pub mod store;
pub mod traffic;
