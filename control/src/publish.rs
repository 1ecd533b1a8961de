//! What is pushed to proxies: the state as per-service protobuf routes,
//! shared between consecutive publications so that a change rebuilds only
//! the service it touched, and the pure diff that decides what one proxy
//! still needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_proto::mesh::v1 as pb;

use crate::convert;
use crate::state::MeshState;

#[derive(Clone)]
pub struct PublishedService {
    pub stamp: u64,
    pub route: Arc<pb::ServiceRoute>,
}

/// One published version of the routing state.
#[derive(Clone, Default)]
pub struct Published {
    pub version: u64,
    pub services: BTreeMap<String, PublishedService>,
    /// The roots proxies trust; a new bundle comes in a new version.
    pub bundle: Option<Arc<pb::Bundle>>,
}

impl Published {
    /// The publication for `state`, reusing the routes of `previous` whose
    /// stamps did not move.
    pub fn build(state: &MeshState, previous: &Published) -> Published {
        let services = state
            .services
            .iter()
            .map(|(name, service)| {
                let reused = previous.services.get(name).filter(|p| p.stamp == service.stamp).cloned();
                let published = reused.unwrap_or_else(|| PublishedService {
                    stamp: service.stamp,
                    route: Arc::new(convert::route(name, service)),
                });
                (name.clone(), published)
            })
            .collect();
        Published { version: state.version, services, bundle: previous.bundle.clone() }
    }
}

/// What a proxy that has `sent` (service → stamp) needs to reach
/// `current`: the services whose stamp moved or that are new, and the
/// names of those that are gone. Empty when it is up to date.
pub fn diff<'a>(
    sent: &BTreeMap<String, u64>,
    current: &'a Published,
) -> (Vec<&'a PublishedService>, Vec<String>) {
    let changed = current
        .services
        .iter()
        .filter(|(name, service)| sent.get(*name) != Some(&service.stamp))
        .map(|(_, service)| service)
        .collect();
    let removed = sent.keys().filter(|name| !current.services.contains_key(*name)).cloned().collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Change;

    fn register(service: &str, addr: &str) -> Change {
        Change::ready_endpoint(service, "v1", addr)
    }

    #[test]
    fn a_change_rebuilds_and_resends_only_its_service() {
        let mut state = MeshState::default();
        for change in [register("a", "127.0.0.1:1"), register("b", "127.0.0.1:2")] {
            state = state.apply(&change).unwrap();
        }
        let first = Published::build(&state, &Published::default());
        let sent: BTreeMap<String, u64> = first.services.iter().map(|(n, s)| (n.clone(), s.stamp)).collect();
        let (changed, removed) = diff(&sent, &first);
        assert!(changed.is_empty() && removed.is_empty(), "up to date");

        let state = state.apply(&register("b", "127.0.0.1:3")).unwrap();
        let second = Published::build(&state, &first);
        assert!(Arc::ptr_eq(&first.services["a"].route, &second.services["a"].route), "a is reused");
        let (changed, removed) = diff(&sent, &second);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].route.name, "b");
        assert!(removed.is_empty());

        let state =
            state.apply(&Change::Deregister { service: "a".into(), addr: "127.0.0.1:1".into() }).unwrap();
        let third = Published::build(&state, &second);
        let (_, removed) = diff(&sent, &third);
        assert_eq!(removed, vec!["a".to_owned()]);
        // A fresh proxy gets everything.
        assert_eq!(diff(&BTreeMap::new(), &third).0.len(), 1);
    }
}
