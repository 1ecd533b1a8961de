//! Prometheus HTTP service discovery (`http_sd_configs`): every connected
//! proxy's metrics address, and meshd's own, with labels that say what each
//! is. Pure: built from the proxy records and the scheduler's instances.

use mesh_proto::mesh::v1 as pb;
use serde_json::{json, Value};

use crate::server::ProxyRecord;

/// The target groups, one per target: `[{"targets": [..], "labels": {..}}]`.
/// A sidecar the scheduler runs is labelled with its instance's job,
/// version and node; a proxy started by hand with its id and service.
pub fn targets(meshd_admin: &str, proxies: &[(String, ProxyRecord)], instances: &[pb::Instance]) -> Value {
    let mut groups = vec![json!({"targets": [meshd_admin], "labels": {"job": "meshd"}})];
    for (id, proxy) in proxies {
        if !proxy.connected || proxy.admin_addr.is_empty() {
            continue;
        }
        let mut labels = json!({"job": "mesh-proxy", "service": proxy.service, "instance": id});
        if let Some(instance) = instances.iter().find(|i| &i.id == id) {
            labels["job"] = json!(instance.job);
            labels["version"] = json!(instance.version);
            labels["node"] = json!(instance.node);
        }
        groups.push(json!({"targets": [proxy.admin_addr], "labels": labels}));
    }
    Value::Array(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(service: &str, admin: &str, connected: bool) -> ProxyRecord {
        ProxyRecord {
            service: service.into(),
            admin_addr: admin.into(),
            acked_version: 0,
            rejected: None,
            last_contact: None,
            connected,
            pushed: None,
            unacked_since: None,
            stream: 0,
            certificate_root: String::new(),
            bundle_version: 0,
            server: String::new(),
            peers: Vec::new(),
        }
    }

    #[test]
    fn every_connected_proxy_is_a_target_with_its_instance_labels() {
        let proxies = vec![
            ("web-0".to_owned(), proxy("web", "127.0.0.2:4191", true)),
            ("web-1".to_owned(), proxy("web", "127.0.0.2:4192", false)),
            ("client-7".to_owned(), proxy("client", "127.0.0.1:4193", true)),
            ("starting".to_owned(), proxy("web", "", true)),
        ];
        let instances = vec![pb::Instance {
            id: "web-0".into(),
            job: "web-v2".into(),
            version: "v2".into(),
            node: "node-a".into(),
            ..Default::default()
        }];
        let got = targets("127.0.0.1:9000", &proxies, &instances);
        let expected = json!([
            {"targets": ["127.0.0.1:9000"], "labels": {"job": "meshd"}},
            {"targets": ["127.0.0.2:4191"], "labels": {"job": "web-v2", "service": "web", "instance": "web-0", "version": "v2", "node": "node-a"}},
            {"targets": ["127.0.0.1:4193"], "labels": {"job": "mesh-proxy", "service": "client", "instance": "client-7"}},
        ]);
        assert_eq!(got, expected);
    }
}
