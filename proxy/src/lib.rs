//! mesh-proxy: the sidecar of the mesh. See ARCHITECTURE.md for the life of
//! a request through these modules.

pub mod authz;
pub mod balance;
pub mod clock;
pub mod config;
pub mod control;
pub mod control_tls;
pub mod endpoint;
pub mod errors;
pub mod http;
pub mod identity;
pub mod listen;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod retry_budget;
pub mod snapshot;
pub mod tls;
pub mod traffic;
pub mod transport;
