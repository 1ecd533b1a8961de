//! A real grpcio client calls a real grpcio server through mesh-proxy:
//! unary, streaming both ways, trailers and error statuses arrive intact.

use std::process::Command;

use mesh_tests::process::{run, Process, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{python, workspace_dir, TempDir};

#[test]
fn grpcio_calls_pass_through_intact() {
    let dir = TempDir::new("grpc");
    let server_script = workspace_dir().join("tests/python/grpc_server.py");
    let server = Process::start_with(Command::new(python()).arg(&server_script));
    let server_addr = server.first_line.split_whitespace().last().unwrap().to_owned();
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("pyecho").protocol("grpc").endpoint(&server_addr, "v1");
    std::fs::write(&path, render(&[service], &["pyecho"], None)).unwrap();
    let proxy = Proxy::start(&path);

    let client_script = workspace_dir().join("tests/python/grpc_client.py");
    // Through the outbound listener (routing by :authority) and through the
    // per-upstream port.
    for target in [proxy.outbound(), proxy.upstream("pyecho")] {
        let (code, stdout, stderr) = run(&python(), &[client_script.to_str().unwrap(), &target, "pyecho"]);
        assert_eq!(code, 0, "client via {target} failed: {stderr}");
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("client prints JSON");
        assert_eq!(result["unary"], "echo:hello", "{result}");
        assert_eq!(result["unary_trailers"]["x-trailer"], "kept", "{result}");
        assert_eq!(
            result["server_stream"],
            serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"])
        );
        assert_eq!(result["client_stream"], "a+b+c");
        assert_eq!(result["bidi"], serde_json::json!(["bidi:x", "bidi:y"]));
        assert_eq!(result["fail"]["code"], "NOT_FOUND", "{result}");
        assert_eq!(result["fail"]["details"], "no such thing: gizmo");
    }
}
