//! Pieces shared by the benchmarks.

pub mod procstat;
pub mod simulated;
