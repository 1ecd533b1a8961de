//! Writing mesh-proxy config files for tests.

use std::fmt::Write;

/// One `[[services]]` entry.
pub struct ServiceSpec {
    pub name: String,
    pub protocol: String,
    /// Extra TOML lines for the service (timeout, split, retry, breaker...).
    pub extra: Vec<String>,
    /// (address, version, ready)
    pub endpoints: Vec<(String, String, bool)>,
}

impl ServiceSpec {
    pub fn new(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            protocol: "http".to_owned(),
            extra: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    pub fn protocol(mut self, protocol: &str) -> Self {
        protocol.clone_into(&mut self.protocol);
        self
    }

    pub fn line(mut self, line: &str) -> Self {
        self.extra.push(line.to_owned());
        self
    }

    pub fn endpoint(mut self, addr: &str, version: &str) -> Self {
        self.endpoints.push((addr.to_owned(), version.to_owned(), true));
        self
    }

    pub fn not_ready_endpoint(mut self, addr: &str, version: &str) -> Self {
        self.endpoints.push((addr.to_owned(), version.to_owned(), false));
        self
    }
}

/// A whole config file: listeners on port 0 and the given services.
pub fn render(services: &[ServiceSpec], upstreams: &[&str], app: Option<&str>) -> String {
    let mut out = String::from(
        "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
    );
    if let Some(app) = app {
        let _ = writeln!(out, "app = \"{app}\"");
    }
    for service in services {
        let _ =
            writeln!(out, "\n[[services]]\nname = \"{}\"\nprotocol = \"{}\"", service.name, service.protocol);
        for line in &service.extra {
            let _ = writeln!(out, "{line}");
        }
        out.push_str("endpoints = [\n");
        for (addr, version, ready) in &service.endpoints {
            let _ = writeln!(out, "  {{ addr = \"{addr}\", version = \"{version}\", ready = {ready} }},");
        }
        out.push_str("]\n");
    }
    for upstream in upstreams {
        let _ = writeln!(out, "\n[[upstreams]]\nservice = \"{upstream}\"\nlisten = \"127.0.0.1:0\"");
    }
    out
}
