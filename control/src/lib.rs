//! The mesh's control plane: routing state, its store, the gRPC APIs that
//! serve proxies, agents and meshctl, and the CLI's client side.

pub mod agent;
pub mod auth;
pub mod convert;
pub mod identity;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod state;
pub mod store;
