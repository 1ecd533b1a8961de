//! meshctl's exit codes follow one rule for every subcommand: what was
//! asked is wrong (bad input, an unknown name, a change the state refuses)
//! exits 2 and names the cause; an unreachable server exits 1.

use mesh_tests::process::{run, Meshd};
use mesh_tests::{bin, TempDir};

#[test]
fn every_subcommand_exits_2_on_what_was_asked_and_1_when_the_server_is_gone() {
    let dir = TempDir::new("cli");
    let meshd = Meshd::start(&dir.path("data"));
    meshd.ctl_ok(&["register", "echo", "--version", "v1", "--addr", "127.0.0.1:9"]);
    let missing = dir.path("missing.toml");
    let missing = missing.to_str().unwrap();
    // (arguments, a part of the message that names the cause)
    let cases: &[(&[&str], &str)] = &[
        (&["job", "status", "nosuch"], "no job \"nosuch\""),
        (&["job", "stop", "nosuch"], "no job \"nosuch\""),
        (&["job", "promote", "nosuch"], "no job \"nosuch\""),
        (&["job", "run", missing], "No such file"),
        (&["job", "validate", missing], "No such file"),
        (&["logs", "nosuch"], "no job \"nosuch\""),
        (&["split", "nosuch", "v1=100"], "unknown service \"nosuch\""),
        (&["split", "echo", "v1=50", "v1=50"], "\"v1\" is given twice"),
        (&["split", "echo", "v3=100"], "unknown version \"v3\""),
        (&["split", "echo", "v1=150"], "add up to 150"),
        (&["policy", "nosuch", "--timeout", "1s"], "unknown service \"nosuch\""),
        (&["policy", "echo", "--retry-attempts", "0"], "retry-attempts"),
        (&["register", "echo", "--version", "v1", "--addr", "bad"], "not an IP:port"),
        (&["deregister", "nosuch", "--addr", "127.0.0.1:1"], "unknown service \"nosuch\""),
        (&["deregister", "echo", "--addr", "127.0.0.1:1"], "has no endpoint 127.0.0.1:1"),
        (&["top", "--interval", "0s"], "too short"),
        (&["get", "bogus"], "possible values"),
    ];
    for (args, cause) in cases {
        let (code, stdout, stderr) = meshd.ctl(args);
        assert_eq!(code, 2, "meshctl {args:?}: {stdout}{stderr}");
        assert!(stderr.contains(cause), "meshctl {args:?} names the cause ({cause}): {stderr}");
    }
    // Nothing of it reached the table.
    let endpoints = meshd.ctl_json(&["get", "endpoints"]);
    assert_eq!(endpoints.as_array().unwrap().len(), 1, "{endpoints}");
    assert_eq!(meshd.ctl_json(&["get", "splits"]), serde_json::json!([]));

    let (code, _, stderr) = run(
        &bin("meshctl"),
        &["--server", "127.0.0.1:1", "--credentials", &meshd.credentials, "get", "services"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot reach meshd at 127.0.0.1:1"), "{stderr}");
}
