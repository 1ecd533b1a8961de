//! Hosts as separate network stacks on one machine: each host is a network
//! namespace with its own address on a bridge, and the bridge lives in a
//! namespace of its own, so nothing of the machine's own network changes.
//! Cutting a host's link (its port on the bridge) makes a partition; the
//! namespaces go when the lab is dropped.
//!
//! Programs run in a host with `ip netns exec`, which enters the namespace
//! and execs the program: the pid is the program's, so the test's process
//! helpers signal and reap it as usual.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Labs made by this test process, for unique namespace names.
static LABS: AtomicU32 = AtomicU32::new(0);

/// The bridge's subnet: every lab has its own bridge in its own namespace,
/// so labs running at once may all use it.
const SUBNET: [u8; 3] = [10, 77, 0];

pub struct Lab {
    /// Prefix of every name this lab makes: short, as interface names
    /// allow 15 bytes.
    prefix: String,
    hub: String,
    hosts: Vec<String>,
}

/// One host of a lab.
pub struct Host {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// This host's port on the bridge, in the hub's namespace.
    port: String,
    hub: String,
}

/// Runs `ip ARGS`, and panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

impl Lab {
    /// A bridge in a namespace of its own, with no host on it yet.
    pub fn new() -> Lab {
        let id = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("m{}x{id}", std::process::id() % 100_000);
        let hub = format!("{prefix}hub");
        ip(&["netns", "add", &hub]);
        let lab = Lab { prefix, hub, hosts: Vec::new() };
        ip(&["-n", &lab.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lab.hub, "link", "set", "br0", "up"]);
        ip(&["-n", &lab.hub, "link", "set", "lo", "up"]);
        lab
    }

    /// A host named `name` at 10.77.0.`number` on the bridge.
    pub fn host(&mut self, name: &str, number: u8) -> Host {
        let namespace = format!("{}h{number}", self.prefix);
        let port = format!("{}p{number}", self.prefix);
        ip(&["netns", "add", &namespace]);
        self.hosts.push(namespace.clone());
        // A veth pair: one end is the host's eth0, the other its bridge port.
        ip(&[
            "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &namespace,
        ]);
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &self.hub, "link", "set", &port, "up"]);
        let ip_addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], number);
        ip(&["-n", &namespace, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"]);
        ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        Host { name: name.to_owned(), namespace, ip: ip_addr, port, hub: self.hub.clone() }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes in a namespace are the tests' to stop (their helpers
        // kill them on drop, before the lab goes); deleting a namespace
        // removes its interfaces.
        for namespace in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "delete", namespace]).output();
        }
    }
}

impl Host {
    /// `program` to run inside this host.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace]).arg(program);
        command
    }

    /// Cuts this host off the bridge: its packets go nowhere, both ways.
    pub fn cut_link(&self) {
        ip(&["-n", &self.hub, "link", "set", &self.port, "down"]);
    }

    /// Puts this host back on the bridge.
    pub fn restore_link(&self) {
        ip(&["-n", &self.hub, "link", "set", &self.port, "up"]);
    }
}
