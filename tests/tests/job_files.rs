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

/// The ```toml blocks of a Markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_example_in_the_job_file_reference_is_valid() {
    let reference = std::fs::read_to_string(mesh_tests::workspace_dir().join("docs/jobs.md")).unwrap();
    let examples = toml_blocks(&reference);
    assert!(
        examples.len() >= 4,
        "an HTTP service, a gRPC service, a batch job, a canary update: {}",
        examples.len()
    );
    let dir = TempDir::new("job-docs");
    for (index, example) in examples.iter().enumerate() {
        let path = dir.path(&format!("example-{index}.toml"));
        std::fs::write(&path, example).unwrap();
        let (code, stdout, stderr) = run(&bin("meshctl"), &["job", "validate", path.to_str().unwrap()]);
        assert_eq!(code, 0, "example {index} of docs/jobs.md:\n{example}\n{stdout}{stderr}");
    }
    let readme = std::fs::read_to_string(mesh_tests::workspace_dir().join("README.md")).unwrap();
    assert!(readme.contains("docs/jobs.md"), "the README points at the job-file reference");
}
