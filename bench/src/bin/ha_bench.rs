//! The control plane on three servers sharing a three-member etcd, beside
//! one server on its embedded store, in one run: how fast a split change
//! reaches every proxy (1 000 subscriptions, spread over the servers),
//! how many registrations per second the store takes, meshd's memory per
//! subscription, and a failover: from the leader's kill -9 to the first
//! placement by the new leader, and to every proxy of the dead server
//! connected to another. Everything listens on loopback.

use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_bench::simulated::{percentile, rss_mb, simulated_proxy, wait_all_acked, Received};
use mesh_proto::mesh::v1 as pb;
use pb::access_client::AccessClient;
use pb::admin_client::AdminClient;
use pb::jobs_client::JobsClient;
use pb::registry_client::RegistryClient;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "mesh-ha-bench", about = "Several meshd servers on etcd against one on redb")]
struct Args {
    #[command(flatten)]
    common: mesh_bench::simulated::CommonArgs,
    /// Endpoint registrations for the write rate.
    #[arg(long, default_value_t = 2000)]
    writes: u32,
}

/// A child process in its own group, killed (with the group) on drop.
struct Child {
    child: std::process::Child,
    first_line: String,
}

impl Child {
    fn start(command: &mut std::process::Command, wait_for_line: bool) -> Child {
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        command.stdout(std::process::Stdio::piped());
        std::os::unix::process::CommandExt::process_group(command, 0);
        let mut child = command.spawn().expect("start a child");
        let stdout = child.stdout.take().expect("piped");
        let mut reader = std::io::BufReader::new(stdout);
        let mut first_line = String::new();
        if wait_for_line {
            reader.read_line(&mut first_line).expect("a ready line");
        }
        std::thread::spawn(move || for _ in reader.lines() {});
        Child { child, first_line }
    }

    fn field(&self, key: &str) -> String {
        self.first_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in: {}", self.first_line))
            .to_owned()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A three-member etcd cluster on loopback.
fn start_etcd(dir: &std::path::Path) -> (Vec<Child>, String) {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>();
    let members = ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            let (client, peer) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
            let mut command = std::process::Command::new("etcd");
            command.args(["--name", &format!("e{i}")]);
            command.arg("--data-dir").arg(dir.join(format!("etcd{i}")));
            command.args(["--listen-client-urls", &client, "--advertise-client-urls", &client]);
            command.args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer]);
            command.args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"]);
            command.args(["--log-level", "error"]).stderr(std::process::Stdio::null());
            Child::start(&mut command, false)
        })
        .collect();
    let endpoints =
        ports.iter().map(|(client, _)| format!("127.0.0.1:{client}")).collect::<Vec<_>>().join(",");
    (members, endpoints)
}

struct Server {
    process: Child,
    listen: String,
}

fn start_meshd(args: &Args, dir: &std::path::Path, name: &str, store: &[&str]) -> Server {
    let mut command = std::process::Command::new(args.common.bin_dir.join("meshd"));
    command.arg("server").arg("--data-dir").arg(dir.join(name));
    command.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--heartbeat-ttl", "2s"]);
    command.args(store);
    let process = Child::start(&mut command, true);
    let listen = process.field("listen");
    Server { process, listen }
}

async fn channel(server: &str, tls: &mesh_client::ClientTls) -> Channel {
    mesh_client::connect(server, tls, Duration::from_secs(5)).await.expect("connect to meshd")
}

/// Starts `count` simulated proxies, proxy `i` on `servers[i % n]` first
/// and on any of them after a failure (bounded reconnects).
fn subscribe(
    servers: &[String],
    tls: &mesh_client::ClientTls,
    count: u32,
    received: &Arc<Received>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    let all = servers.join(",");
    for id in 0..count {
        let first = servers[id as usize % servers.len()].clone();
        let (all, tls, received) = (all.clone(), tls.clone(), received.clone());
        set.spawn(async move {
            let mut server = first;
            for _ in 0..100 {
                let _ = simulated_proxy(server.clone(), tls.clone(), id, received.clone()).await;
                server = all.clone();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    set
}

/// Split changes, each through the next server, timed to the last ack.
async fn convergence(admins: &mut [AdminClient<Channel>], changes: u32) -> (f64, f64) {
    let mut latencies = Vec::new();
    for i in 0..changes {
        let admin = &mut admins[i as usize % admins.len()];
        let v2 = if i % 2 == 0 { 10 } else { 20 };
        let weights = [("v1".to_owned(), 100 - v2), ("v2".to_owned(), v2)].into_iter().collect();
        let started = Instant::now();
        let split = pb::SetSplitRequest { service: "echo".into(), weights };
        let version = admin.set_split(split).await.expect("split").into_inner().version;
        let converged = admin
            .wait_converged(pb::WaitRequest { version, timeout_ms: 30_000 })
            .await
            .expect("wait")
            .into_inner();
        assert!(converged.converged, "change {i} did not converge");
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

/// Endpoint registrations, 64 in flight, spread over `servers`: per second.
/// Also returns how many failed (none should: a write that loses a race
/// with another server's is retried by meshd).
async fn write_rate(servers: &[String], tls: &mesh_client::ClientTls, writes: u32, first: u32) -> (f64, u32) {
    let mut clients = Vec::new();
    for server in servers {
        clients.push(RegistryClient::new(channel(server, tls).await));
    }
    let started = Instant::now();
    let mut flying = tokio::task::JoinSet::new();
    let mut failed = 0;
    for i in 0..writes {
        if flying.len() >= 64 {
            failed += u32::from(!flying.join_next().await.and_then(Result::ok).unwrap_or(false));
        }
        let mut client = clients[i as usize % clients.len()].clone();
        // Every registration is of a new endpoint: none is a no-op.
        let n = first + i;
        flying.spawn(async move {
            let endpoint = pb::Endpoint {
                service: format!("w{}", n % 50),
                version: "v1".into(),
                addr: format!("127.0.{}.{}:{}", 1 + n / 60_000 / 250, 1 + (n / 60_000) % 250, 1 + n % 60_000),
                ready: true,
                meshed: false,
                quic: false,
            };
            let request = pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false };
            let answer = client.register(request).await;
            if let Err(status) = &answer {
                eprintln!("a registration failed: {}", status.message());
            }
            answer.is_ok()
        });
    }
    while let Some(done) = flying.join_next().await {
        failed += u32::from(!done.unwrap_or(false));
    }
    (f64::from(writes) / started.elapsed().as_secs_f64(), failed)
}

async fn setup(servers: &[String], tls: &mesh_client::ClientTls) {
    let mut registry = RegistryClient::new(channel(&servers[0], tls).await);
    for (version, addr) in [("v1", "127.0.0.8:1"), ("v2", "127.0.0.8:2")] {
        let endpoint = pb::Endpoint {
            service: "echo".into(),
            version: version.into(),
            addr: addr.into(),
            ready: true,
            meshed: false,
            quic: false,
        };
        registry
            .register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false })
            .await
            .expect("register");
    }
}

fn tls_of(server: &Server) -> mesh_client::ClientTls {
    let path = server.process.field("credentials");
    mesh_client::Credentials::read(std::path::Path::new(&path))
        .expect("the admin credential")
        .tls()
        .expect("TLS")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = Args::parse();
    if args.common.quick {
        (args.common.proxies, args.common.changes, args.writes) = (30, 5, 100);
    }
    let dir = std::env::temp_dir().join(format!("mesh-ha-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a work dir");
    let key = dir.join("store.key");
    std::fs::write(&key, [9u8; 32]).expect("the store key");

    // One server on redb: the figure to compare with.
    let single = start_meshd(&args, &dir, "redb", &[]);
    let single_tls = tls_of(&single);
    let single_addr = vec![single.listen.clone()];
    setup(&single_addr, &single_tls).await;
    let received = Arc::new(Received::default());
    let rss_before = rss_mb(single.process.pid());
    let mut sims = subscribe(&single_addr, &single_tls, args.common.proxies, &received);
    let mut admins = vec![AdminClient::new(channel(&single.listen, &single_tls).await)];
    let version = admins[0].status(pb::Empty {}).await.expect("status").into_inner().version;
    wait_all_acked(&mut admins[0], version, args.common.proxies).await;
    let single_memory = (rss_mb(single.process.pid()) - rss_before) * 1024.0 / f64::from(args.common.proxies);
    let (single_p50, single_p99) = convergence(&mut admins, args.common.changes).await;
    sims.abort_all();
    let (single_writes, single_failed) = write_rate(&single_addr, &single_tls, args.writes, 0).await;
    drop(single);

    // Three servers on a three-member etcd.
    let (_etcd, endpoints) = start_etcd(&dir);
    let store = ["--store", "etcd", "--etcd-endpoints", &endpoints, "--store-key", key.to_str().unwrap()];
    let mut servers = vec![start_meshd(&args, &dir, "etcd-0", &store)];
    for i in 1..3 {
        servers.push(start_meshd(&args, &dir, &format!("etcd-{i}"), &store));
    }
    let tls = tls_of(&servers[0]);
    let addrs: Vec<String> = servers.iter().map(|s| s.listen.clone()).collect();
    setup(&addrs, &tls).await;
    // Writes with no proxy connected, as for the single server: through one
    // server (as the leader's scheduler registers its instances), then
    // spread over all three, each racing the others for the same services.
    let (cluster_writes, cluster_failed) = write_rate(&addrs[..1], &tls, args.writes, 0).await;
    let (spread_writes, spread_failed) = write_rate(&addrs, &tls, args.writes, args.writes).await;
    let before: Vec<f64> = servers.iter().map(|s| rss_mb(s.process.pid())).collect();
    let received = Arc::new(Received::default());
    let _sims = subscribe(&addrs, &tls, args.common.proxies, &received);
    let mut admins = Vec::new();
    for addr in &addrs {
        admins.push(AdminClient::new(channel(addr, &tls).await));
    }
    let version = admins[0].status(pb::Empty {}).await.expect("status").into_inner().version;
    wait_all_acked(&mut admins[0], version, args.common.proxies).await;
    let grown: f64 = servers.iter().zip(&before).map(|(s, b)| rss_mb(s.process.pid()) - b).sum();
    let cluster_memory = grown * 1024.0 / f64::from(args.common.proxies);
    let (cluster_p50, cluster_p99) = convergence(&mut admins, args.common.changes).await;

    // A node to place on, then the leader's kill -9.
    let all = addrs.join(",");
    let token = AccessClient::new(channel(&all, &tls).await)
        .create_join_token(pb::JoinTokenRequest { ttl_ms: 60_000, uses: 1 })
        .await;
    let token = match token {
        Ok(token) => token.into_inner().token,
        Err(_) => {
            let status = admins[0].status(pb::Empty {}).await.expect("status").into_inner();
            let mut leader = AccessClient::new(channel(&status.leader, &tls).await);
            leader
                .create_join_token(pb::JoinTokenRequest { ttl_ms: 60_000, uses: 1 })
                .await
                .expect("token")
                .into_inner()
                .token
        }
    };
    let mut agent_command = std::process::Command::new(args.common.bin_dir.join("meshd"));
    agent_command.args(["agent", "--server", &all, "--name", "bench-node", "--advertise-ip", "127.0.0.1"]);
    agent_command
        .args(["--cpu-millis", "4000", "--memory-mb", "4096"])
        .arg("--data-dir")
        .arg(dir.join("agent"));
    agent_command.env("MESH_JOIN_TOKEN", token);
    let _agent = Child::start(&mut agent_command, true);
    // A node that has been up a while (its lease in etcd, kept by several
    // heartbeats), as the nodes of a cluster that loses its leader are.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = admins[0].status(pb::Empty {}).await.expect("status").into_inner();
    let leader = addrs.iter().position(|a| *a == status.leader).expect("the leader is one of the servers");
    let orphans: Vec<String> =
        status.proxies.iter().filter(|p| p.server == status.leader).map(|p| p.proxy_id.clone()).collect();
    let survivors: Vec<String> = addrs.iter().filter(|a| **a != status.leader).cloned().collect();
    let mut survivor = AdminClient::new(channel(&survivors[0], &tls).await);
    let job = "name = \"after\"\nversion = \"v1\"\nreplicas = 1\nkind = \"batch\"\n\n[task]\ncommand = \"/bin/sleep\"\nargs = [\"60\"]\n\n[resources]\ncpu_millis = 10\nmemory_mb = 16\n";

    let killed = Instant::now();
    servers[leader].process.kill();
    let mut reconnected = None;
    let mut placed = None;
    let mut submitted = false;
    let deadline = killed + Duration::from_secs(60);
    while (reconnected.is_none() || placed.is_none()) && Instant::now() < deadline {
        if reconnected.is_none() {
            let status = survivor.status(pb::Empty {}).await.expect("status").into_inner();
            let moved = orphans.iter().all(|id| {
                status.proxies.iter().any(|p| p.proxy_id == *id && p.connected && p.server != addrs[leader])
            });
            if moved {
                reconnected = Some(killed.elapsed());
            }
        }
        if placed.is_none() {
            for server in &survivors {
                let mut jobs = JobsClient::new(channel(server, &tls).await);
                if !submitted {
                    let run = pb::RunJobRequest { text: job.into(), dir: "/".into() };
                    submitted = jobs.run(run).await.is_ok();
                }
                if let Ok(list) = jobs.list_instances(pb::Empty {}).await {
                    if list.into_inner().instances.iter().any(|i| i.job == "after") {
                        placed = Some(killed.elapsed());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms =
        |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));

    println!("| measure | one server, redb | three servers, etcd (3 members) | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| split change acked by all {} proxies, p50 | {single_p50:.1} ms | {cluster_p50:.1} ms | {:.2} |",
        args.common.proxies,
        cluster_p50 / single_p50
    );
    println!("| same, p99 | {single_p99:.1} ms | {cluster_p99:.1} ms | {:.2} |", cluster_p99 / single_p99);
    println!("| endpoint registrations per second through one server (64 in flight; failed) | {single_writes:.0} ({single_failed}) | {cluster_writes:.0} ({cluster_failed}) | {:.2} |", cluster_writes / single_writes);
    println!("| same, spread over the three servers (50 services, each written by all three) | | {spread_writes:.0} ({spread_failed}) | {:.2} |", spread_writes / single_writes);
    println!("| server memory per subscription (RSS growth, all servers) | {single_memory:.1} KB | {cluster_memory:.1} KB | {:.2} |", cluster_memory / single_memory);
    println!();
    println!("failover (leader kill -9, heartbeat TTL 2s, leader TTL 2s):");
    println!("- first placement by the new leader: {}", ms(placed));
    println!(
        "- every one of the {} proxies of the dead server connected to another: {}",
        orphans.len(),
        ms(reconnected)
    );
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
