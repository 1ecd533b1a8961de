//! A real etcd cluster (Debian's `etcd-server`, installed by the test
//! command) for the tests of several meshd servers: one member per lab
//! host, on the host's own address, so that a host's loss or a cut link
//! takes its member with it as it would in a real cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::netns::Host;
use crate::process::Process;

const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

pub struct EtcdMember {
    pub name: String,
    namespace: String,
    ip: std::net::Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Process>,
}

pub struct Etcd {
    pub members: Vec<EtcdMember>,
    initial_cluster: String,
}

impl Etcd {
    /// Starts one member on each of `hosts` and waits until the cluster
    /// has a leader and commits writes.
    pub fn start(hosts: &[&Host], dir: &Path) -> Etcd {
        let members: Vec<EtcdMember> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| EtcdMember {
                name: format!("etcd{i}"),
                namespace: host.namespace.clone(),
                ip: host.ip,
                data_dir: dir.join(format!("etcd{i}")),
                log: dir.join(format!("etcd{i}.log")),
                process: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd { members, initial_cluster };
        for i in 0..etcd.members.len() {
            etcd.launch(i, "new");
        }
        etcd.wait_healthy(0, Duration::from_secs(60));
        etcd
    }

    /// The client endpoints, as meshd's --etcd-endpoints takes them.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("{}:{CLIENT_PORT}", m.ip)).collect::<Vec<_>>().join(",")
    }

    /// SIGKILL to member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(process) = self.members[i].process.take() {
            process.signal(libc::SIGKILL);
            drop(process);
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.launch(i, "existing");
    }

    fn launch(&mut self, i: usize, state: &str) {
        let member = &self.members[i];
        let client = format!("http://{}:{CLIENT_PORT}", member.ip);
        let peer = format!("http://{}:{PEER_PORT}", member.ip);
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &member.namespace, "etcd"]);
        command.args(["--name", &member.name]);
        command.arg("--data-dir").arg(&member.data_dir);
        command.args(["--listen-client-urls", &client, "--advertise-client-urls", &client]);
        command.args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer]);
        command.args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", state]);
        command.args(["--initial-cluster-token", "mesh-tests", "--logger", "zap"]);
        command.arg("--log-outputs").arg(&member.log);
        let process = Process::start_quiet(&mut command);
        self.members[i].process = Some(process);
    }

    /// Waits until member `i` reports a healthy cluster (a write through
    /// consensus succeeds).
    pub fn wait_healthy(&self, i: usize, within: Duration) {
        let member = &self.members[i];
        let endpoint = format!("{}:{CLIENT_PORT}", member.ip);
        let deadline = Instant::now() + within;
        loop {
            let output = std::process::Command::new("ip")
                .args(["netns", "exec", &member.namespace, "etcdctl", "--endpoints", &endpoint])
                .args(["--command-timeout", "2s", "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .expect("run etcdctl");
            if output.status.success() {
                return;
            }
            let log = std::fs::read_to_string(&member.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            assert!(
                Instant::now() < deadline,
                "etcd member {} is not healthy within {within:?}: {}{}\nits log ends: {tail:#?}",
                member.name,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
