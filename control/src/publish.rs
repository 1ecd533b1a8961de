//! What is pushed to proxies: the state as per-service routes, each
//! encoded once and shared between consecutive publications (a change
//! rebuilds only the service it touched) and between every proxy's
//! stream; the pure diff that decides what one proxy still needs; and how
//! an update is cut into messages.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_proto::mesh::v1 as pb;
use prost::bytes::Bytes;
use prost::Message;

use crate::convert;
use crate::state::{MeshDefaults, MeshState};

/// A service's route as proxies receive it.
#[derive(Clone)]
pub struct PublishedService {
    pub stamp: u64,
    /// The `pb::ServiceRoute`, encoded.
    pub encoded: Bytes,
}

/// One published version of the routing state.
#[derive(Clone, Default)]
pub struct Published {
    pub version: u64,
    pub services: BTreeMap<String, PublishedService>,
    /// The roots proxies trust; a new bundle comes in a new version.
    pub bundle: Option<Arc<pb::Bundle>>,
    /// What changed since the publication this one was built from, so a
    /// proxy that holds that one is sent the change without a walk over
    /// the table.
    pub delta: Delta,
}

/// The services that changed between two consecutive publications.
#[derive(Clone, Default)]
pub struct Delta {
    pub from: u64,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// Services to send, by name.
pub type Changed<'a> = Vec<(&'a str, &'a PublishedService)>;

impl Published {
    /// The publication for `state`, reusing the routes of `previous` whose
    /// stamps did not move (`defaults` are the server's for its life).
    pub fn build(state: &MeshState, previous: &Published, defaults: &MeshDefaults) -> Published {
        let mut delta = Delta { from: previous.version, ..Delta::default() };
        let services = state
            .services
            .iter()
            .map(|(name, service)| {
                let reused = previous.services.get(name).filter(|p| p.stamp == service.stamp).cloned();
                let published = reused.unwrap_or_else(|| {
                    delta.changed.push(name.clone());
                    let encoded = convert::route(name, service, defaults).encode_to_vec().into();
                    PublishedService { stamp: service.stamp, encoded }
                });
                (name.clone(), published)
            })
            .collect();
        delta.removed =
            previous.services.keys().filter(|name| !state.services.contains_key(*name)).cloned().collect();
        Published { version: state.version, services, bundle: previous.bundle.clone(), delta }
    }

    /// What a proxy that holds publication `version`, whose services and
    /// stamps are `sent`, needs to reach this one. From the delta when the
    /// proxy holds the publication just before this one (the usual case:
    /// O(change)); by comparing the tables otherwise.
    pub fn since(&self, version: u64, sent: &BTreeMap<String, u64>) -> (Changed<'_>, Vec<String>) {
        if version == self.delta.from && version != 0 {
            let changed = self
                .delta
                .changed
                .iter()
                .filter_map(|name| Some((name.as_str(), self.services.get(name)?)))
                .collect();
            return (changed, self.delta.removed.clone());
        }
        diff(sent, self)
    }
}

/// What a proxy that has `sent` (service → stamp) needs to reach
/// `current`: the services whose stamp moved or that are new, and the
/// names of those that are gone. Empty when it is up to date.
pub fn diff<'a>(sent: &BTreeMap<String, u64>, current: &'a Published) -> (Changed<'a>, Vec<String>) {
    let changed = current
        .services
        .iter()
        .filter(|(name, service)| sent.get(*name) != Some(&service.stamp))
        .map(|(name, service)| (name.as_str(), service))
        .collect();
    let removed = sent.keys().filter(|name| !current.services.contains_key(*name)).cloned().collect();
    (changed, removed)
}

/// Records in `sent` (service → stamp) that a proxy was sent `changed`
/// and told `removed` are gone: O(change).
pub fn record_sent(sent: &mut BTreeMap<String, u64>, changed: &Changed<'_>, removed: &[String]) {
    for (name, service) in changed {
        match sent.get_mut(*name) {
            Some(stamp) => *stamp = service.stamp,
            None => {
                sent.insert((*name).to_owned(), service.stamp);
            }
        }
    }
    for name in removed {
        sent.remove(name);
    }
}

/// About the most route bytes one message carries. A larger update goes
/// in parts, so no stream's send buffer grows to the size of the whole
/// table and stays that size.
pub const PART_BYTES: usize = 8 * 1024;

/// The messages that carry one update: the routes in parts of about
/// `part_bytes` (a route larger than that is a part of its own), the
/// first part `full` when the update is the whole table, every part but
/// the last marked `more`, and the last carrying the removed names and
/// the bundle. At least one message.
pub fn parts(
    version: u64,
    full: bool,
    changed: &Changed<'_>,
    removed: Vec<String>,
    bundle: Bytes,
    part_bytes: usize,
) -> Vec<pb::RoutingUpdateWire> {
    let mut parts = Vec::new();
    let mut current = pb::RoutingUpdateWire { version, full, ..Default::default() };
    let mut bytes = 0;
    for (_, service) in changed {
        if bytes > 0 && bytes + service.encoded.len() > part_bytes {
            let next = pb::RoutingUpdateWire { version, ..Default::default() };
            parts.push(std::mem::replace(&mut current, next));
            bytes = 0;
        }
        bytes += service.encoded.len();
        current.services.push(service.encoded.clone());
    }
    current.removed_services = removed;
    current.bundle = bundle;
    parts.push(current);
    let last = parts.len() - 1;
    for part in &mut parts[..last] {
        part.more = true;
    }
    parts
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
        let first = Published::build(&state, &Published::default(), &MeshDefaults::default());
        let sent: BTreeMap<String, u64> = first.services.iter().map(|(n, s)| (n.clone(), s.stamp)).collect();
        let (changed, removed) = diff(&sent, &first);
        assert!(changed.is_empty() && removed.is_empty(), "up to date");

        let state = state.apply(&register("b", "127.0.0.1:3")).unwrap();
        let second = Published::build(&state, &first, &MeshDefaults::default());
        assert_eq!(
            first.services["a"].encoded.as_ptr(),
            second.services["a"].encoded.as_ptr(),
            "a is reused"
        );
        let (changed, removed) = diff(&sent, &second);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, "b");
        assert!(removed.is_empty());

        let state =
            state.apply(&Change::Deregister { service: "a".into(), addr: "127.0.0.1:1".into() }).unwrap();
        let third = Published::build(&state, &second, &MeshDefaults::default());
        let (_, removed) = diff(&sent, &third);
        assert_eq!(removed, vec!["a".to_owned()]);
        // A fresh proxy gets everything.
        assert_eq!(diff(&BTreeMap::new(), &third).0.len(), 1);
    }

    #[test]
    fn the_delta_sends_what_the_full_comparison_would() {
        let mut state = MeshState::default();
        for change in
            [register("a", "127.0.0.1:1"), register("b", "127.0.0.1:2"), register("c", "127.0.0.1:3")]
        {
            state = state.apply(&change).unwrap();
        }
        let first = Published::build(&state, &Published::default(), &MeshDefaults::default());
        let mut sent = BTreeMap::new();
        let (changed, removed) = first.since(0, &sent);
        assert_eq!(changed.len(), 3, "a new proxy gets every service");
        record_sent(&mut sent, &changed, &removed);

        let state = state.apply(&register("b", "127.0.0.1:4")).unwrap();
        let state =
            state.apply(&Change::Deregister { service: "c".into(), addr: "127.0.0.1:3".into() }).unwrap();
        let second = Published::build(&state, &first, &MeshDefaults::default());
        let names =
            |changed: &Changed<'_>| changed.iter().map(|(name, _)| name.to_string()).collect::<Vec<_>>();
        let (by_delta, removed_by_delta) = second.since(first.version, &sent);
        let (by_diff, removed_by_diff) = diff(&sent, &second);
        assert_eq!(names(&by_delta), ["b"]);
        assert_eq!((names(&by_delta), removed_by_delta.clone()), (names(&by_diff), removed_by_diff));
        assert_eq!(removed_by_delta, ["c"]);
        record_sent(&mut sent, &by_delta, &removed_by_delta);
        let expected: BTreeMap<String, u64> =
            second.services.iter().map(|(name, service)| (name.clone(), service.stamp)).collect();
        assert_eq!(sent, expected, "what was sent is the second publication");

        // A proxy two publications behind is compared, not given the last delta.
        let state = state.apply(&register("a", "127.0.0.1:5")).unwrap();
        let third = Published::build(&state, &second, &MeshDefaults::default());
        let (changed, removed) = third.since(first.version, &BTreeMap::from([("b".to_owned(), 0)]));
        assert_eq!((names(&changed), removed), (vec!["a".to_owned(), "b".to_owned()], vec![]));
    }

    #[test]
    fn an_update_is_cut_into_parts_that_decode_as_one_routing_update() {
        let service = |name: &str, endpoints: usize| {
            let route = pb::ServiceRoute {
                name: name.into(),
                endpoints: (0..endpoints)
                    .map(|i| pb::Endpoint { addr: format!("127.0.0.1:{}", 1000 + i), ..Default::default() })
                    .collect(),
                ..Default::default()
            };
            (
                name.to_owned(),
                route.clone(),
                PublishedService { stamp: 1, encoded: route.encode_to_vec().into() },
            )
        };
        // (routes' sizes in endpoints, part size, parts expected)
        let cases: [(&[usize], usize, usize); 5] = [
            (&[], 100, 1),
            (&[1, 1, 1], 10_000, 1),
            (&[10, 10, 10], 200, 3),
            (&[10, 10, 10], 400, 2),
            (&[100, 1], 100, 2),
        ];
        for (sizes, part_bytes, expected) in cases {
            let services: Vec<_> =
                sizes.iter().enumerate().map(|(i, n)| service(&format!("s{i}"), *n)).collect();
            let changed: Changed<'_> = services.iter().map(|(name, _, p)| (name.as_str(), p)).collect();
            let bundle = pb::Bundle { version: 7, ..Default::default() };
            let parts =
                parts(9, true, &changed, vec!["gone".into()], bundle.encode_to_vec().into(), part_bytes);
            let case = format!("{sizes:?} in parts of {part_bytes}");
            assert_eq!(parts.len(), expected, "{case}");
            // What a proxy decodes: the parts as RoutingUpdates, merged.
            let decoded: Vec<pb::RoutingUpdate> = parts
                .iter()
                .map(|part| pb::RoutingUpdate::decode(part.encode_to_vec().as_slice()).unwrap())
                .collect();
            for (i, part) in decoded.iter().enumerate() {
                assert_eq!(part.version, 9, "{case}");
                assert_eq!(part.full, i == 0, "{case}: only the first part is full");
                assert_eq!(part.more, i + 1 < decoded.len(), "{case}: every part but the last has more");
                let last = i + 1 == decoded.len();
                assert_eq!(part.bundle.as_ref().map(|b| b.version), last.then_some(7), "{case}");
                assert_eq!(part.removed_services.len(), usize::from(last), "{case}");
            }
            let routes: Vec<pb::ServiceRoute> = decoded.into_iter().flat_map(|part| part.services).collect();
            let sent: Vec<pb::ServiceRoute> = services.into_iter().map(|(_, route, _)| route).collect();
            assert_eq!(routes, sent, "{case}: every route, in order, as it was");
        }
    }
}
