//! The repository's grpcio server and client (`tests/python/grpc_*.py`):
//! a real gRPC implementation on both ends of a path through the mesh.

use std::process::Command;

use crate::process::{run, Process};
use crate::{python, workspace_dir};

/// Starts the grpcio echo server; its address is `server_addr(&process)`.
pub fn start_server() -> Process {
    let script = workspace_dir().join("tests/python/grpc_server.py");
    Process::start_with(Command::new(python()).arg(&script))
}

/// Where the server listens, from its ready line.
pub fn server_addr(server: &Process) -> String {
    server.first_line.split_whitespace().last().expect("an address on the ready line").to_owned()
}

/// Runs the client's calls against `target` with `authority`, and checks
/// each arrived intact: unary with its trailer, server, client and
/// bidirectional streaming, and an error status with its details.
pub fn assert_calls_intact(target: &str, authority: &str) {
    let script = workspace_dir().join("tests/python/grpc_client.py");
    let (code, stdout, stderr) = run(&python(), &[script.to_str().unwrap(), target, authority]);
    assert_eq!(code, 0, "the grpcio client via {target} failed: {stderr}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("the client prints JSON");
    assert_eq!(result["unary"], "echo:hello", "{result}");
    assert_eq!(result["unary_trailers"]["x-trailer"], "kept", "{result}");
    assert_eq!(
        result["server_stream"],
        serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"])
    );
    assert_eq!(result["client_stream"], "a+b+c", "{result}");
    assert_eq!(result["bidi"], serde_json::json!(["bidi:x", "bidi:y"]), "{result}");
    assert_eq!(result["fail"]["code"], "NOT_FOUND", "{result}");
    assert_eq!(result["fail"]["details"], "no such thing: gizmo", "{result}");
}
