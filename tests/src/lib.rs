//! Helpers for the end-to-end tests: start the mesh's real binaries on
//! port 0, learn their ports from their first line of output, wait for
//! conditions with deadlines, and clean every process up on drop.

pub mod client;
pub mod etcd;
pub mod grpcio;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod proxy_config;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: next to this test executable's
/// profile directory, or `MESH_BIN_DIR`.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("MESH_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The Python with grpcio that the test command installs: `MESH_TEST_PYTHON`,
/// or the virtualenv under `target/`.
pub fn python() -> PathBuf {
    if let Ok(python) = std::env::var("MESH_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let path = workspace_dir().join("target/test-python/bin/python");
    assert!(path.exists(), "{} is missing: run ./scripts/test, which installs grpcio", path.display());
    path
}

pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A free loopback port, for programs that cannot listen on port 0 and
/// report it (Prometheus). The tiny race with other binders is accepted.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A loopback address of its own for a node of one test (127.0.N.2).
/// Tests of one binary run in parallel, and an agent hands its apps ports
/// the kernel says are free on its address: two agents on one address
/// could hand out the same port, and one test's sidecar would forward to
/// another test's app. A real node has its address to itself.
pub fn node_ip() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(100);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 250;
    format!("127.0.{n}.2")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
