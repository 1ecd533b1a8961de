//! The operator's credential: a client certificate and key for one user,
//! the mesh's trust roots, and the server it was issued by. One TOML file,
//! written with mode 0600 (it holds a key); `meshctl` finds it by
//! `--credentials`, `MESH_CREDENTIALS`, or a default path.

use crate::error::ClientError;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientTls;

/// The variable `meshctl` reads the credential file's path from.
pub const ENV: &str = "MESH_CREDENTIALS";

#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// The user's name, as `meshctl user list` shows it.
    pub user: String,
    /// The role when issued (the server decides at each call).
    pub role: String,
    /// meshd's gRPC address when issued: meshctl's default `--server`.
    pub server: String,
    pub certificate: String,
    pub key: String,
    /// The mesh's trust roots: meshd's certificate must chain to one.
    pub roots: String,
}

impl std::fmt::Debug for Credentials {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn read(path: &Path) -> Result<Credentials, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        Credentials::from_text(&text).map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        // Plain strings always serialize.
        let fields = toml::to_string(self).expect("a credential is plain strings");
        format!(
            "# A meshd credential for user {:?} (role {}). It holds a private key: keep it private.\n{fields}",
            self.user, self.role,
        )
    }

    pub fn from_text(text: &str) -> Result<Credentials, ClientError> {
        toml::from_str(text)
            .map_err(|e| ClientError::Config(format!("not a mesh credential: {}", e.message())))
    }

    /// Writes the file readable by its owner only; an existing file is
    /// replaced whole (written aside, then renamed).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_private(path, &self.to_text())
    }
}

/// Writes `text` to `path` readable by its owner only; an existing file is
/// replaced whole (written aside, then renamed).
/// The error names the file.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fn naming(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
        move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
    let aside = path.with_extension("tmp");
    let _ = std::fs::remove_file(&aside);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .map_err(naming(&aside))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(naming(&aside))?;
    std::fs::rename(&aside, path).map_err(naming(path))
}

impl Credentials {
    pub fn tls(&self) -> Result<ClientTls, ClientError> {
        ClientTls::from_roots_pem(&self.roots)?.with_identity(&self.certificate, &self.key)
    }
}

/// Where `meshctl` looks when neither `--credentials` nor the variable
/// names a file: the user's own file, then the admin credential of a
/// `meshd dev` or `meshd server` run by this user with its default data
/// dir (root: /var/lib/meshd, others: ~/.local/state/meshd).
pub fn default_paths() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut paths = Vec::new();
    if let Some(config) = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".config")))
    {
        paths.push(config.join("mesh").join("credentials.toml"));
    }
    let state = if is_root() {
        Some(PathBuf::from("/var/lib/meshd"))
    } else {
        home.map(|h| h.join(".local").join("state").join("meshd"))
    };
    if let Some(state) = state {
        paths.push(state.join("dev").join(ADMIN_FILE));
        paths.push(state.join("server").join(ADMIN_FILE));
    }
    paths
}

/// The admin credential's file name in meshd's data dir.
pub const ADMIN_FILE: &str = "admin.credentials.toml";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
