//! The proxies under test, each configured as one keep-alive
//! reverse-proxy hop in front of the same two backend ports, with one
//! worker thread, pinned to the proxy core.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    MeshProxy,
    /// The cheapest hyper forwarder (bench/src/bin/bare_hyper.rs): the floor under mesh-proxy.
    BareHyper,
    Haproxy,
    Nginx,
    Envoy,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Direct, Kind::MeshProxy, Kind::BareHyper, Kind::Haproxy, Kind::Nginx, Kind::Envoy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct (no proxy)",
            Kind::MeshProxy => "mesh-proxy",
            Kind::BareHyper => "bare hyper",
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Envoy => "Envoy",
        }
    }

    /// Whether the contender takes part in the HTTP/2 and gRPC table.
    pub fn speaks_h2(self) -> bool {
        self != Kind::BareHyper
    }
}

/// What the contender carries: the caller's protocol, and what it speaks
/// to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 in, HTTP/1.1 to the nginx backend.
    Http1,
    /// HTTP/2 (prior knowledge) in, HTTP/1.1 to the nginx backend.
    H2,
    /// gRPC in, gRPC (HTTP/2) to the mesh-echo backend.
    Grpc,
}

/// Where things are and which ports to use.
pub struct Setup {
    pub work: PathBuf,
    pub bin_dir: PathBuf,
    pub envoy: PathBuf,
    pub proxy_core: String,
    /// The two backend ports (versions v1 and v2 for mesh-proxy's split).
    pub backends: [u16; 2],
    /// The backend's HTTP/2 prior-knowledge port, for the direct baseline.
    pub backend_h2: u16,
    /// The mesh-echo gRPC backend.
    pub grpc_backend: u16,
}

impl Setup {
    /// The port a client reaches directly, without a proxy.
    pub fn direct_port(&self, mode: Mode) -> u16 {
        match mode {
            Mode::Http1 => self.backends[0],
            Mode::H2 => self.backend_h2,
            Mode::Grpc => self.grpc_backend,
        }
    }
}

/// A free loopback port; the programs configured with it cannot report a
/// port of their own.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local addr").port()
}

/// The backend: nginx answering 200 from one worker on two ports.
pub fn backend_command(setup: &Setup) -> Command {
    let dir = setup.work.join("backend");
    std::fs::create_dir_all(&dir).expect("backend dir");
    let [a, b] = setup.backends;
    let h2 = setup.backend_h2;
    // A 1 MiB answer, for the mesh path's throughput.
    let large = dir.join("1mib.bin");
    std::fs::write(&large, vec![b'x'; 1 << 20]).expect("write the 1 MiB answer");
    let config = format!(
        "{}http {{\n  access_log off;\n  {}\n  server {{\n    listen 127.0.0.1:{a} backlog=4096;\n    listen 127.0.0.1:{b} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{ return 200 \"ok\\n\"; }}\n    location = /1mib {{ alias {}; }}\n  }}\n  server {{\n    listen 127.0.0.1:{h2} http2;\n    keepalive_requests 1000000;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        nginx_main(&dir),
        nginx_temp_paths(&dir),
        large.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).expect("write backend config");
    let mut command = Command::new("nginx");
    command.args(["-p", dir.to_str().expect("utf-8"), "-c", path.to_str().expect("utf-8")]);
    command
}

fn nginx_main(dir: &Path) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\npid {}/nginx.pid;\nerror_log {}/error.log warn;\nevents {{ worker_connections 8192; }}\n",
        dir.display(),
        dir.display()
    )
}

fn nginx_temp_paths(dir: &Path) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|name| format!("{name}_temp_path {}/{name}_temp;", dir.display()))
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// The gRPC backend: mesh-echo.
pub fn grpc_backend_command(setup: &Setup) -> Command {
    let mut command = Command::new(setup.bin_dir.join("mesh-echo"));
    command.args(["--port", &setup.grpc_backend.to_string()]);
    command
}

/// The command that starts a contender on `port`, pinned to the proxy core;
/// `None` for the direct baseline.
pub fn command(kind: Kind, mode: Mode, setup: &Setup, port: u16) -> Option<Command> {
    let dir = contender_dir(kind, mode, setup);
    std::fs::create_dir_all(&dir).expect("contender dir");
    // HTTP goes to nginx's two ports; gRPC to the one mesh-echo.
    let backends: Vec<u16> = match mode {
        Mode::Http1 | Mode::H2 => setup.backends.to_vec(),
        Mode::Grpc => vec![setup.grpc_backend],
    };
    let (program, args): (PathBuf, Vec<String>) = match kind {
        Kind::Direct => return None,
        Kind::MeshProxy => {
            let path = dir.join("proxy.toml");
            std::fs::write(&path, mesh_proxy_config(mode, port, &backends)).expect("write mesh-proxy config");
            let program = setup.bin_dir.join("mesh-proxy");
            (program, vec!["--config".into(), path.display().to_string(), "--threads".into(), "1".into()])
        }
        Kind::BareHyper => {
            let mut args = vec!["--listen".to_owned(), format!("127.0.0.1:{port}")];
            for backend in &backends {
                args.extend(["--backend".to_owned(), format!("127.0.0.1:{backend}")]);
            }
            (setup.bin_dir.join("bare-hyper-forwarder"), args)
        }
        Kind::Haproxy => {
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, haproxy_config(mode, port, &backends)).expect("write haproxy config");
            ("haproxy".into(), vec!["-db".into(), "-f".into(), path.display().to_string()])
        }
        Kind::Nginx => {
            let path = dir.join("nginx.conf");
            std::fs::write(&path, nginx_config(mode, port, &backends, &dir)).expect("write nginx config");
            (
                "nginx".into(),
                vec!["-p".into(), dir.display().to_string(), "-c".into(), path.display().to_string()],
            )
        }
        Kind::Envoy => {
            let path = dir.join("envoy.yaml");
            std::fs::write(&path, envoy_config(mode, port, &backends)).expect("write envoy config");
            let args = [
                "-c",
                path.to_str().expect("utf-8"),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "error",
            ];
            (setup.envoy.clone(), args.iter().map(|s| s.to_string()).collect())
        }
    };
    let mut command = Command::new("taskset");
    command.arg("-c").arg(&setup.proxy_core).arg(program).args(args);
    Some(command)
}

fn contender_dir(kind: Kind, mode: Mode, setup: &Setup) -> PathBuf {
    let name = kind.name().split_whitespace().next().unwrap_or("x");
    setup.work.join(format!("{name}-{mode:?}"))
}

/// The last lines of a contender's own error log (nginx keeps one), to
/// explain failed requests.
pub fn error_log(kind: Kind, mode: Mode, setup: &Setup) -> String {
    let path = contender_dir(kind, mode, setup).join("error.log");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    tail.iter().map(|line| format!("{line}\n")).collect()
}

/// mesh-proxy as users run it: split, retries, breaker, EWMA and metrics on.
fn mesh_proxy_config(mode: Mode, port: u16, backends: &[u16]) -> String {
    let protocol = if mode == Mode::Grpc { "grpc" } else { "http" };
    let mut config = format!(
        "[listen]\noutbound = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:0\"\n\n[[services]]\nname = \"backend\"\nprotocol = \"{protocol}\"\ntimeout = \"5s\"\nretry = {{ attempts = 3, on = [\"connect-failure\", \"5xx\", \"unavailable\"] }}\nbreaker = {{ consecutive_failures = 7, base_ejection = \"1s\", max_ejection = \"60s\" }}\n"
    );
    if backends.len() > 1 {
        config.push_str("split = { v1 = 50, v2 = 50 }\n");
    }
    config.push_str("endpoints = [\n");
    for (index, backend) in backends.iter().enumerate() {
        let _ = writeln!(config, "  {{ addr = \"127.0.0.1:{backend}\", version = \"v{}\" }},", index + 1);
    }
    config.push_str("]\n");
    config
}

fn haproxy_config(mode: Mode, port: u16, backends: &[u16]) -> String {
    let bind_proto = if mode == Mode::Http1 { "" } else { " proto h2" };
    let server_proto = if mode == Mode::Grpc { " proto h2" } else { "" };
    let mut config = format!(
        "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\nfrontend front\n  bind 127.0.0.1:{port}{bind_proto}\n  default_backend back\n\nbackend back\n  balance roundrobin\n"
    );
    for (index, backend) in backends.iter().enumerate() {
        let _ = writeln!(config, "  server s{index} 127.0.0.1:{backend}{server_proto}");
    }
    config
}

fn nginx_config(mode: Mode, port: u16, backends: &[u16], dir: &Path) -> String {
    let servers: String = backends.iter().map(|b| format!("server 127.0.0.1:{b}; ")).collect();
    let listen = if mode == Mode::Http1 { String::new() } else { " http2".to_owned() };
    let location = if mode == Mode::Grpc {
        "grpc_pass grpc://back;".to_owned()
    } else {
        "proxy_pass http://back;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";"
            .to_owned()
    };
    let mut config = nginx_main(dir);
    let _ = write!(
        config,
        "http {{\n  access_log off;\n  {}\n  upstream back {{ {servers}keepalive 512; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:{port}{listen} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{\n      {location}\n    }}\n  }}\n}}\n",
        nginx_temp_paths(dir)
    );
    config
}

/// Envoy's listener: every request on `port` to `cluster`, with a
/// `transport` (TLS settings, or "" for plaintext).
pub fn envoy_listener(port: u16, cluster: &str, transport: &str) -> String {
    format!(
        r#"  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{transport}"#
    )
}

fn envoy_config(mode: Mode, port: u16, backends: &[u16]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {b} }} }} }}\n"))
        .collect();
    let upstream_h2 = if mode == Mode::Grpc {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {}\n"
    } else {
        ""
    };
    format!(
        r#"static_resources:
{}  clusters:
  - name: back
    type: STATIC
    lb_policy: ROUND_ROBIN
{upstream_h2}    load_assignment:
      cluster_name: back
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        envoy_listener(port, "back", "")
    )
}
