//! The control plane's own metrics, served at the admin `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_common::histogram::{Bounds, DurationHistogram};

/// Push-to-ack times, in seconds.
struct AckBounds;

impl Bounds<12> for AckBounds {
    const BOUNDS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
}

#[derive(Default)]
pub struct ControlMetrics {
    connected: AtomicU64,
    version: AtomicU64,
    /// The publish window in force, in microseconds.
    publish_window_micros: AtomicU64,
    pushes: AtomicU64,
    pushed_bytes: AtomicU64,
    push_to_ack: DurationHistogram<AckBounds, 12>,
    refused_unauthenticated: AtomicU64,
    refused_permission: AtomicU64,
    refused_impostor: AtomicU64,
    handshake_failures: AtomicU64,
    write_conflicts: AtomicU64,
    handed_on: PerMethod,
}

/// A count per gRPC method, in the order of `policy::METHODS`.
struct PerMethod([AtomicU64; crate::auth::policy::METHODS.len()]);

impl Default for PerMethod {
    fn default() -> Self {
        PerMethod(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl ControlMetrics {
    /// One proxy stream more (true) or fewer (false).
    pub fn count_connected(&self, connected: bool) {
        if connected {
            self.connected.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn set_version(&self, version: u64) {
        self.version.store(version, Ordering::Relaxed);
    }

    pub fn set_publish_window(&self, window: std::time::Duration) {
        self.publish_window_micros.store(window.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count_push(&self, bytes: u64) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.pushed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn observe_push_to_ack(&self, elapsed: Duration) {
        self.push_to_ack.record(elapsed);
    }

    /// A call refused at the gate: no (valid) credential, or not allowed.
    pub fn count_refused_call(&self, unauthenticated: bool) {
        let counter = if unauthenticated { &self.refused_unauthenticated } else { &self.refused_permission };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A node that spoke of another node or of instances not its own.
    pub fn count_impostor(&self) {
        self.refused_impostor.fetch_add(1, Ordering::Relaxed);
    }

    /// A write to the shared store refused because another server changed
    /// a service it touched first (it is validated again and retried).
    pub fn count_write_conflict(&self) {
        self.write_conflicts.fetch_add(1, Ordering::Relaxed);
    }

    /// A call of the method at `path`, handed on to the leader by this follower.
    pub fn count_handed_on(&self, path: &str) {
        if let Some(index) = crate::auth::policy::METHODS.iter().position(|(method, ..)| *method == path) {
            self.handed_on.0[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A TLS handshake on the gRPC port that failed (plaintext, a foreign CA).
    pub fn count_handshake_failure(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, value: u64, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        gauge(
            &mut out,
            "meshd_connected_proxies",
            "Proxies with an open discovery stream.",
            self.connected.load(Ordering::Relaxed),
            "gauge",
        );
        gauge(
            &mut out,
            "meshd_config_version",
            "Current routing-state version.",
            self.version.load(Ordering::Relaxed),
            "gauge",
        );
        let name = "meshd_publish_window_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How long changes after a publication wait to go out together; grows under fast churn.\n# TYPE {name} gauge\n{name} {}",
            self.publish_window_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        gauge(
            &mut out,
            "meshd_pushes_total",
            "Routing updates sent to proxies.",
            self.pushes.load(Ordering::Relaxed),
            "counter",
        );
        gauge(
            &mut out,
            "meshd_pushed_bytes_total",
            "Bytes of routing updates sent to proxies.",
            self.pushed_bytes.load(Ordering::Relaxed),
            "counter",
        );
        let name = "meshd_refused_calls_total";
        let _ = writeln!(out, "# HELP {name} gRPC calls refused by the access check.\n# TYPE {name} counter");
        for (reason, counter) in [
            ("unauthenticated", &self.refused_unauthenticated),
            ("permission-denied", &self.refused_permission),
            ("impostor", &self.refused_impostor),
        ] {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", counter.load(Ordering::Relaxed));
        }
        gauge(
            &mut out,
            "meshd_tls_handshake_failures_total",
            "TLS handshakes on the gRPC port that failed (plaintext or foreign-CA clients).",
            self.handshake_failures.load(Ordering::Relaxed),
            "counter",
        );
        gauge(
            &mut out,
            "meshd_store_write_conflicts_total",
            "Writes to the shared store (etcd) that lost a race with another server's and were retried.",
            self.write_conflicts.load(Ordering::Relaxed),
            "counter",
        );
        let name = "meshd_calls_handed_to_leader_total";
        let _ = writeln!(
            out,
            "# HELP {name} Calls only the leader serves (node heartbeats, scheduler reads, tokens) that this follower handed on to it, by method.\n# TYPE {name} counter"
        );
        for ((method, ..), count) in crate::auth::policy::METHODS.iter().zip(&self.handed_on.0) {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                let _ = writeln!(out, "{name}{{method=\"{method}\"}} {count}");
            }
        }
        let name = "meshd_push_to_ack_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from sending an update to the proxy's ack.\n# TYPE {name} histogram"
        );
        self.push_to_ack.render_all(&mut out, name, "");
        out
    }
}
