//! What the proxy, the control plane and the CLI share, with no async
//! runtime: values with their parsing and rules (names, SPIFFE IDs,
//! durations, file errors, backoff), so that each program checks them the
//! same way, the binaries' log set-up, handing freed heap back, and lock-free
//! duration histograms.

pub mod backoff;
pub mod duration;
pub mod file_error;
pub mod heap;
pub mod histogram;
pub mod join_token;
pub mod logging;
pub mod name;
pub mod policy;
pub mod spiffe;
pub mod traffic_policy;
