//! The endpoints the scheduler registers for the instances agents report:
//! ready only while the instance runs ready on a node that is up, and its
//! sidecar is not behind a root rotation.

use std::collections::BTreeMap;

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::job::JobKind;
use mesh_scheduler::Node;

use super::{job_of, SchedulerState};
use crate::state::Change;

/// The registry changes that make endpoints match reports: an instance's
/// endpoint is ready only while its agent says so, it is running, its node
/// is up, and its sidecar's certificate is from a trusted root (`behind`:
/// the proxy ids that missed a root rotation); an instance that is gone
/// takes its endpoint with it.
pub(super) fn endpoint_changes(
    state: &mut SchedulerState,
    nodes: &[Node],
    behind: &std::collections::HashSet<String>,
) -> Vec<Change> {
    let node_up = |name: &str| nodes.iter().any(|n| n.name == name && n.up);
    let mut wanted: BTreeMap<(String, String), (String, bool, bool)> = BTreeMap::new();
    for allocation in &state.allocations {
        let Some((node, report)) = state.reports.get(&allocation.id) else { continue };
        let Some(job) = job_of(state, allocation) else { continue };
        if report.addr.is_empty() || *node != allocation.node || job.kind == JobKind::Batch {
            continue;
        }
        let ready = report.ready
            && report.state() == pb::InstanceState::Running
            && node_up(node)
            && !behind.contains(&allocation.id);
        wanted.insert(
            (job.service.clone(), report.addr.clone()),
            (allocation.version.clone(), ready, report.quic),
        );
    }
    let mut changes = Vec::new();
    for ((service, addr), (version, ready, quic)) in &wanted {
        if state.registered.get(&(service.clone(), addr.clone())) != Some(&(version.clone(), *ready, *quic)) {
            changes.push(Change::Register {
                service: service.clone(),
                version: version.clone(),
                addr: addr.clone(),
                ready: *ready,
                meshed: true,
                quic: *quic,
                plaintext_ok: false,
            });
        }
    }
    for (service, addr) in state.registered.keys() {
        if !wanted.contains_key(&(service.clone(), addr.clone())) {
            changes.push(Change::Deregister { service: service.clone(), addr: addr.clone() });
        }
    }
    state.registered = wanted;
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::jobs::SchedulerState;
    use crate::store::StoredJob;
    use mesh_scheduler::job::{parse_job, Job};
    use mesh_scheduler::Allocation;

    fn job(kind: &str) -> Job {
        let text = format!(
            "name = \"web\"\nversion = \"v1\"\nreplicas = 1\nkind = \"{kind}\"\n[task]\ncommand = \"x\"\n"
        );
        parse_job(&text).expect("job")
    }

    fn report(id: &str, state: pb::InstanceState, ready: bool) -> pb::InstanceReport {
        pb::InstanceReport {
            id: id.into(),
            job: "web".into(),
            version: "v1".into(),
            state: state as i32,
            addr: format!("127.0.0.2:{}", 1000 + id.len()),
            ready,
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_follow_reports_and_node_health() {
        let node = |up| Node {
            name: "a".into(),
            cpu_millis: 1000,
            memory_mb: 1000,
            attributes: BTreeMap::new(),
            up,
        };
        let allocation = Allocation {
            id: "web-0".into(),
            job: "web".into(),
            version: "v1".into(),
            revision: 0,
            node: "a".into(),
            resources: Default::default(),
        };
        use pb::InstanceState::{Draining, Running};
        // (report state, ready, node up, kind, sidecar behind a rotation) → registered ready?
        let cases = [
            (Running, true, true, "service", false, Some(true)),
            (Running, false, true, "service", false, Some(false)),
            (Running, true, false, "service", false, Some(false)),
            (Draining, true, true, "service", false, Some(false)),
            (Running, true, true, "batch", false, None),
            (Running, true, true, "service", true, Some(false)),
        ];
        for (report_state, ready, up, kind, lagging, expected) in cases {
            let behind: std::collections::HashSet<String> =
                lagging.then(|| "web-0".to_owned()).into_iter().collect();
            let mut state = SchedulerState::default();
            state
                .jobs
                .insert("web".into(), (StoredJob { text: String::new(), dir: String::new() }, job(kind)));
            state.allocations.push(allocation.clone());
            state.reports.insert("web-0".into(), ("a".into(), report("web-0", report_state, ready)));
            let changes = endpoint_changes(&mut state, &[node(up)], &behind);
            let registered = changes.iter().find_map(|c| match c {
                Change::Register { ready, .. } => Some(*ready),
                _ => None,
            });
            assert_eq!(
                registered, expected,
                "{report_state:?} ready={ready} up={up} {kind} behind={lagging}"
            );
            // Nothing changed: nothing to send again.
            assert!(endpoint_changes(&mut state, &[node(up)], &behind).is_empty());
            // The instance goes: its endpoint goes.
            state.allocations.clear();
            let gone = endpoint_changes(&mut state, &[node(up)], &behind);
            assert_eq!(gone.len(), usize::from(expected.is_some()), "{gone:?}");
        }
    }
}
