//! The full mesh path: app → outbound proxy → inbound proxy → app, the
//! two proxies on the proxy core. mesh-proxy in plaintext, with mTLS
//! (HTTP/2 between the proxies, certificates from files) and with mTLS
//! over QUIC (HTTP/3 between the proxies), Envoy doing the
//! same two hops with mTLS from the same static certificates, and one
//! HAProxy hop as the yardstick (target: the mTLS path costs at most two
//! of it).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::contenders::{envoy_listener, free_port, Setup};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    MeshPlaintext,
    MeshMtls,
    MeshQuic,
    EnvoyMtls,
    HaproxyOneHop,
}

impl PathKind {
    pub const ALL: [PathKind; 5] = [
        PathKind::MeshPlaintext,
        PathKind::MeshMtls,
        PathKind::MeshQuic,
        PathKind::EnvoyMtls,
        PathKind::HaproxyOneHop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::MeshPlaintext => "mesh path (plaintext)",
            PathKind::MeshMtls => "mesh path (mTLS)",
            PathKind::MeshQuic => "mesh path (mTLS over QUIC)",
            PathKind::EnvoyMtls => "Envoy path (mTLS)",
            PathKind::HaproxyOneHop => "HAProxy 1 hop",
        }
    }

    /// Whether the second hop takes mTLS (and so has a handshake rate).
    pub fn has_mtls(self) -> bool {
        matches!(self, PathKind::MeshMtls | PathKind::MeshQuic | PathKind::EnvoyMtls)
    }
}

/// Static certificates: one CA, a leaf for the caller's sidecar and one
/// for the callee's, each naming its service as a SPIFFE ID.
pub struct Certs {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

pub const TRUST_DOMAIN: &str = "mesh.local";
/// The callee's service: the entry proxy routes `Host: backend` to it.
pub const SERVICE: &str = "backend";

pub fn write_certs(dir: &Path) -> Result<Certs, String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "bench root");
    let ca_pem = ca.clone().self_signed(&ca_key).map_err(|e| e.to_string())?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |service: &str| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let id = format!("spiffe://{TRUST_DOMAIN}/service/{service}");
        params.subject_alt_names =
            vec![SanType::URI(rcgen::string::Ia5String::try_from(id).map_err(|e| e.to_string())?)];
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (client_pem, client_key) = leaf("bench-client")?;
    let (server_pem, server_key) = leaf(SERVICE)?;
    let write = |name: &str, text: &str| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Ok(path)
    };
    Ok(Certs {
        ca: write("ca.pem", &ca_pem)?,
        client_cert: write("client.pem", &client_pem)?,
        client_key: write("client.key", &client_key)?,
        server_cert: write("server.pem", &server_pem)?,
        server_key: write("server.key", &server_key)?,
    })
}

/// A started path: where the load goes, where a new connection meets the
/// second hop (for handshakes), and the commands of its proxies.
pub struct PathCommands {
    pub entry_port: u16,
    pub inbound_port: Option<u16>,
    pub commands: Vec<Command>,
}

pub fn commands(kind: PathKind, setup: &Setup, certs: &Certs) -> PathCommands {
    let dir = setup.work.join(format!("path-{kind:?}"));
    std::fs::create_dir_all(&dir).expect("path dir");
    let backend = setup.backends[0];
    let (entry_port, inbound_port) = (free_port(), free_port());
    let pinned = |program: &Path, args: Vec<String>| {
        let mut command = Command::new("taskset");
        command.arg("-c").arg(&setup.proxy_core).arg(program).args(args);
        command
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write path config");
        path.display().to_string()
    };
    match kind {
        PathKind::MeshPlaintext | PathKind::MeshMtls | PathKind::MeshQuic => {
            let mtls = kind != PathKind::MeshPlaintext;
            let quic = kind == PathKind::MeshQuic;
            let transport = if quic { "transport = \"quic\"\n" } else { "" };
            let identity = |cert: &Path, key: &Path| {
                if mtls {
                    format!(
                        "[identity]\ncertificate = \"{}\"\nkey = \"{}\"\nroots = \"{}\"\n\n",
                        cert.display(),
                        key.display(),
                        certs.ca.display()
                    )
                } else {
                    String::new()
                }
            };
            let caller = format!(
                "service = \"bench-client\"\n[listen]\noutbound = \"127.0.0.1:{entry_port}\"\nadmin = \"127.0.0.1:0\"\n\n{}[[services]]\nname = \"{SERVICE}\"\n{transport}timeout = \"5s\"\nretry = {{ attempts = 3, on = [\"connect-failure\", \"5xx\"] }}\nendpoints = [{{ addr = \"127.0.0.1:{inbound_port}\", meshed = {mtls}, quic = {quic} }}]\n",
                identity(&certs.client_cert, &certs.client_key)
            );
            // The callee lists its own service to say what its app speaks.
            let callee = format!(
                "service = \"{SERVICE}\"\n[listen]\ninbound = \"127.0.0.1:{inbound_port}\"\napp = \"127.0.0.1:{backend}\"\nadmin = \"127.0.0.1:0\"\n\n{}[[services]]\nname = \"{SERVICE}\"\nprotocol = \"http\"\n",
                identity(&certs.server_cert, &certs.server_key)
            );
            let program = setup.bin_dir.join("mesh-proxy");
            let run = |config: String| vec!["--config".into(), config, "--threads".into(), "1".into()];
            PathCommands {
                entry_port,
                inbound_port: mtls.then_some(inbound_port),
                commands: vec![
                    pinned(&program, run(write("callee.toml", callee))),
                    pinned(&program, run(write("caller.toml", caller))),
                ],
            }
        }
        PathKind::EnvoyMtls => {
            let envoy = |config: String| {
                ["-c", &config, "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
            };
            let callee = envoy_callee(inbound_port, backend, certs);
            let caller = envoy_caller(entry_port, inbound_port, certs);
            PathCommands {
                entry_port,
                inbound_port: Some(inbound_port),
                commands: vec![
                    pinned(&setup.envoy, envoy(write("callee.yaml", callee))),
                    pinned(&setup.envoy, envoy(write("caller.yaml", caller))),
                ],
            }
        }
        PathKind::HaproxyOneHop => {
            let config = format!(
                "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\nfrontend front\n  bind 127.0.0.1:{entry_port}\n  default_backend back\n\nbackend back\n  server s0 127.0.0.1:{backend}\n"
            );
            let args = vec!["-db".into(), "-f".into(), write("haproxy.cfg", config)];
            PathCommands {
                entry_port,
                inbound_port: None,
                commands: vec![pinned(Path::new("haproxy"), args)],
            }
        }
    }
}

/// Envoy's TLS settings on either side, indented by `indent`: TLS 1.3,
/// ALPN h2, this side's certificate, the CA, and `validation_extra`
/// (lines under `validation_context`).
fn envoy_tls(indent: &str, cert: &Path, key: &Path, ca: &Path, validation_extra: &[String]) -> String {
    let mut lines = vec![
        "common_tls_context:".to_owned(),
        "  alpn_protocols: [\"h2\"]".to_owned(),
        "  tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }"
            .to_owned(),
        "  tls_certificates:".to_owned(),
        format!("  - certificate_chain: {{ filename: \"{}\" }}", cert.display()),
        format!("    private_key: {{ filename: \"{}\" }}", key.display()),
        "  validation_context:".to_owned(),
        format!("    trusted_ca: {{ filename: \"{}\" }}", ca.display()),
    ];
    lines.extend(validation_extra.iter().map(|line| format!("    {line}")));
    lines.iter().map(|line| format!("{indent}{line}\n")).collect()
}

/// The callee's Envoy: mTLS in (client certificate from the CA required), HTTP/1.1 to the app.
fn envoy_callee(port: u16, backend: u16, certs: &Certs) -> String {
    let transport = format!(
        "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n{}",
        envoy_tls("          ", &certs.server_cert, &certs.server_key, &certs.ca, &[])
    );
    format!(
        "static_resources:\n{}  clusters:\n  - name: app\n    type: STATIC\n    load_assignment:\n      cluster_name: app\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend} }} }} }}\n",
        envoy_listener(port, "app", &transport)
    )
}

/// The caller's Envoy: HTTP/1.1 in, HTTP/2 over mTLS to the callee's
/// Envoy, whose certificate must name the callee's SPIFFE ID.
fn envoy_caller(port: u16, peer: u16, certs: &Certs) -> String {
    let san = [
        "match_typed_subject_alt_names:".to_owned(),
        "- san_type: URI".to_owned(),
        format!("  matcher: {{ exact: \"spiffe://{TRUST_DOMAIN}/service/{SERVICE}\" }}"),
    ];
    format!(
        r#"static_resources:
{}  clusters:
  - name: peer
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
{}    load_assignment:
      cluster_name: peer
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {peer} }} }} }}
"#,
        envoy_listener(port, "peer", ""),
        envoy_tls("        ", &certs.client_cert, &certs.client_key, &certs.ca, &san)
    )
}
