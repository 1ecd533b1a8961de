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
    Haproxy,
    Nginx,
    Envoy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Direct, Kind::MeshProxy, Kind::Haproxy, Kind::Nginx, Kind::Envoy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct (no proxy)",
            Kind::MeshProxy => "mesh-proxy",
            Kind::Haproxy => "HAProxy",
            Kind::Nginx => "nginx",
            Kind::Envoy => "Envoy",
        }
    }
}

/// Where things are and which ports to use.
pub struct Setup {
    pub work: PathBuf,
    pub bin_dir: PathBuf,
    pub envoy: PathBuf,
    pub proxy_core: String,
    /// The two backend ports (versions v1 and v2 for mesh-proxy's split).
    pub backends: [u16; 2],
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
    let config = format!(
        "{}http {{\n  access_log off;\n  {}\n  server {{\n    listen 127.0.0.1:{a} backlog=4096;\n    listen 127.0.0.1:{b} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        nginx_main(&dir),
        nginx_temp_paths(&dir)
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

/// The command that starts a contender on `port`, pinned to the proxy core;
/// `None` for the direct baseline.
pub fn command(kind: Kind, setup: &Setup, port: u16) -> Option<Command> {
    let dir = setup.work.join(kind.name().split_whitespace().next().unwrap_or("x"));
    std::fs::create_dir_all(&dir).expect("contender dir");
    let [a, b] = setup.backends;
    let (program, args): (PathBuf, Vec<String>) = match kind {
        Kind::Direct => return None,
        Kind::MeshProxy => {
            let config = format!(
                "[listen]\noutbound = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:0\"\n\n[[services]]\nname = \"backend\"\nprotocol = \"http\"\ntimeout = \"5s\"\nsplit = {{ v1 = 50, v2 = 50 }}\nretry = {{ attempts = 3, on = [\"connect-failure\", \"5xx\"] }}\nbreaker = {{ consecutive_failures = 7, base_ejection = \"1s\", max_ejection = \"60s\" }}\nendpoints = [\n  {{ addr = \"127.0.0.1:{a}\", version = \"v1\" }},\n  {{ addr = \"127.0.0.1:{b}\", version = \"v2\" }},\n]\n"
            );
            let path = dir.join("proxy.toml");
            std::fs::write(&path, config).expect("write mesh-proxy config");
            let program = setup.bin_dir.join("mesh-proxy");
            (program, vec!["--config".into(), path.display().to_string(), "--threads".into(), "1".into()])
        }
        Kind::Haproxy => {
            let config = format!(
                "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\nfrontend front\n  bind 127.0.0.1:{port}\n  default_backend back\n\nbackend back\n  balance roundrobin\n  server v1 127.0.0.1:{a}\n  server v2 127.0.0.1:{b}\n"
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, config).expect("write haproxy config");
            ("haproxy".into(), vec!["-db".into(), "-f".into(), path.display().to_string()])
        }
        Kind::Nginx => {
            let mut config = nginx_main(&dir);
            let _ = write!(
                config,
                "http {{\n  access_log off;\n  {}\n  upstream back {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://back;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                nginx_temp_paths(&dir)
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, config).expect("write nginx config");
            (
                "nginx".into(),
                vec!["-p".into(), dir.display().to_string(), "-c".into(), path.display().to_string()],
            )
        }
        Kind::Envoy => {
            let config = format!(
                r#"static_resources:
  listeners:
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
                route: {{ cluster: back }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: back
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: back
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {a} }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {b} }} }} }}
"#
            );
            let path = dir.join("envoy.yaml");
            std::fs::write(&path, config).expect("write envoy config");
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
