//! A real grpcio client calls a real grpcio server through mesh-proxy:
//! unary, streaming both ways, trailers and error statuses arrive intact.

use mesh_tests::grpcio;
use mesh_tests::process::Proxy;
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::TempDir;

#[test]
fn grpcio_calls_pass_through_intact() {
    let dir = TempDir::new("grpc");
    let server = grpcio::start_server();
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("pyecho").protocol("grpc").endpoint(&grpcio::server_addr(&server), "v1");
    std::fs::write(&path, render(&[service], &["pyecho"], None)).unwrap();
    let proxy = Proxy::start(&path);
    // Through the outbound listener (routing by :authority) and through the
    // per-upstream port.
    for target in [proxy.outbound(), proxy.upstream("pyecho")] {
        grpcio::assert_calls_intact(&target, "pyecho");
    }
}
