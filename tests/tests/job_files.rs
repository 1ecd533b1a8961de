//! `meshctl job validate`: a job file is checked whole, without a server,
//! and every mistake is named by line and field.

use mesh_tests::process::run;
use mesh_tests::{bin, TempDir};

const WEB: &str = r#"name = "web"
version = "v1"
replicas = 3

[task]
command = "mesh-echo"
args = ["--message", "hello from v1"]

[resources]
cpu_millis = 100
memory_mb = 64

[health]
readiness = { http = "/ready", interval = "1s", timeout = "500ms", failures = 1 }
"#;

#[test]
fn job_files_are_validated_with_line_and_field() {
    let dir = TempDir::new("jobs");
    let path = dir.path("web.toml");
    std::fs::write(&path, WEB).unwrap();
    let file = path.to_str().unwrap();
    let (code, stdout, stderr) = run(&bin("meshctl"), &["job", "validate", file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("job web is valid: 3 × mesh-echo v1"), "{stdout}");

    // (what, replace, with, line, field)
    let cases = [
        ("negative replicas", "replicas = 3", "replicas = -3", 3, "replicas"),
        ("unknown field", "replicas = 3", "replica = 3", 3, "replica"),
        ("bad duration", "interval = \"1s\"", "interval = \"often\"", 14, "health.readiness.interval"),
        ("no command", "command = \"mesh-echo\"", "command = \" \"", 6, "task.command"),
    ];
    for (what, from, to, line, field) in cases {
        std::fs::write(&path, WEB.replacen(from, to, 1)).unwrap();
        let (code, _, stderr) = run(&bin("meshctl"), &["job", "validate", file]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains(&format!("line {line}, field `{field}`")), "{what}: {stderr}");
    }
}
