//! The node agent: joins the control plane and heartbeats (`node.rs`),
//! runs the instances the scheduler assigns (`supervisor.rs`, one task per
//! instance in `instance.rs`) as process groups with a sidecar each, with
//! restart backoff and health checks.

pub mod cgroup;
pub mod files;
pub mod health;
pub mod host;
pub mod instance;
pub mod link;
pub mod logs;
pub mod node;
pub mod process;
pub mod restart;
pub mod shim;
pub mod supervisor;
pub mod users;

#[cfg(test)]
mod instance_tests;
