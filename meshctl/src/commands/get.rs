//! `meshctl get`: listings of services, endpoints, proxies, splits, nodes,
//! jobs and instances.

use std::collections::BTreeMap;

use mesh_proto::convert::{protocol_from_pb, retry_on_from_pb};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::cli::{Listing, Output};
use crate::commands::job::{instance_row, job_row};
use crate::failure::Failure;
use crate::render::{ago, print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, what: Listing, output: Output) -> Result<(), Failure> {
    let channel = session.channel.clone();
    let mut admin = AdminClient::new(channel.clone());
    let rows = match what {
        Listing::Services => services(&mut admin, &mut JobsClient::new(channel)).await?,
        Listing::Endpoints => endpoints(&mut admin).await?,
        Listing::Proxies => proxies(&admin.list_proxies(pb::Empty {}).await?.into_inner().proxies),
        Listing::Splits => splits(&mut admin).await?,
        Listing::Routes => return crate::commands::routes::list(session, None, output).await,
        Listing::Nodes => nodes(&mut admin).await?,
        Listing::Jobs => {
            let list = JobsClient::new(channel).list(pb::Empty {}).await?.into_inner();
            let mut rows: Rows = list.jobs.iter().map(job_row).collect();
            if output == Output::Table {
                // Reasons are long: `job status` and `-o json` give them.
                for row in &mut rows {
                    row.retain(|(column, _)| {
                        !matches!(*column, "pending" | "deployment" | "scale" | "scale_decisions")
                    });
                }
            }
            rows
        }
        Listing::Instances => {
            let list = JobsClient::new(channel).list_instances(pb::Empty {}).await?.into_inner();
            list.instances.iter().map(instance_row).collect()
        }
    };
    print_rows(output, &rows);
    Ok(())
}

fn weights_text(weights: &std::collections::HashMap<String, u32>) -> Value {
    let sorted: BTreeMap<&String, &u32> = weights.iter().collect();
    json!(sorted)
}

async fn services(admin: &mut AdminClient<Channel>, jobs: &mut JobsClient<Channel>) -> Result<Rows, Failure> {
    let list = admin.list_services(pb::Empty {}).await?.into_inner();
    let served: std::collections::HashSet<String> =
        jobs.list(pb::Empty {}).await?.into_inner().jobs.into_iter().map(|j| j.service).collect();
    Ok(list
        .services
        .iter()
        .map(|s| {
            // Kept (its split and policy wait for endpoints to come back), but said.
            let note = if s.endpoints == 0 && !served.contains(&s.name) {
                "orphaned: no job or endpoint"
            } else {
                ""
            };
            vec![
                ("name", json!(s.name)),
                ("endpoints", json!(s.endpoints)),
                ("ready_endpoints", json!(s.ready_endpoints)),
                ("split", weights_text(&s.split)),
                ("policy", policy_json(s.policy.as_ref())),
                ("note", json!(note)),
            ]
        })
        .collect())
}

/// The fields of a policy that are set, by their meshctl option names.
fn policy_json(policy: Option<&pb::Policy>) -> Value {
    let Some(p) = policy else { return json!({}) };
    let mut fields = serde_json::Map::new();
    let mut set = |name: &str, value: Option<Value>| {
        if let Some(value) = value {
            fields.insert(name.to_owned(), value);
        }
    };
    let name = |result: Result<String, String>| Value::from(result.unwrap_or_else(|unknown| unknown));
    set("protocol", p.protocol.map(|v| name(protocol_from_pb(v).map(|p| p.to_string()))));
    set("timeout_ms", p.timeout_ms.map(Value::from));
    set("connect_timeout_ms", p.connect_timeout_ms.map(Value::from));
    set("retry_attempts", p.retry_attempts.map(Value::from));
    let retry_on: Vec<Value> =
        p.retry_on.iter().map(|v| name(retry_on_from_pb(*v).map(|on| on.to_string()))).collect();
    set("retry_on", (!retry_on.is_empty()).then(|| json!(retry_on)));
    set("retry_non_idempotent", p.retry_non_idempotent.map(Value::from));
    set("retry_budget_ratio", p.retry_budget_ratio.map(Value::from));
    set("retry_budget_min_per_second", p.retry_budget_min_per_second.map(Value::from));
    set("breaker_failures", p.breaker_consecutive_failures.map(Value::from));
    set("breaker_base_ejection_ms", p.breaker_base_ejection_ms.map(Value::from));
    set("breaker_max_ejection_ms", p.breaker_max_ejection_ms.map(Value::from));
    set("permissive", p.permissive.map(Value::from));
    set("allow_from", p.allow_from.as_ref().map(|allow| json!(allow.services)));
    set("hold_when_empty_ms", p.hold_when_empty_ms.map(Value::from));
    Value::Object(fields)
}

async fn endpoints(admin: &mut AdminClient<Channel>) -> Result<Rows, Failure> {
    let list = admin.list_endpoints(pb::Empty {}).await?.into_inner();
    Ok(list
        .endpoints
        .iter()
        .map(|e| {
            vec![
                ("service", json!(e.service)),
                ("version", json!(e.version)),
                ("addr", json!(e.addr)),
                ("ready", json!(e.ready)),
                ("meshed", json!(e.meshed)),
                ("quic", json!(e.quic)),
            ]
        })
        .collect())
}

async fn nodes(admin: &mut AdminClient<Channel>) -> Result<Rows, Failure> {
    let list = admin.list_nodes(pb::Empty {}).await?.into_inner();
    Ok(list
        .nodes
        .iter()
        .map(|n| {
            let info = n.info.clone().unwrap_or_default();
            let attributes: BTreeMap<String, String> = info.attributes.into_iter().collect();
            vec![
                ("name", json!(info.name)),
                ("advertise_ip", json!(info.advertise_ip)),
                ("up", json!(n.up)),
                ("cpu_millis", json!(info.cpu_millis)),
                ("memory_mb", json!(info.memory_mb)),
                ("last_heartbeat_ms_ago", json!(n.last_heartbeat_ms_ago)),
                ("attributes", json!(attributes)),
                ("logs_addr", json!(info.logs_addr)),
            ]
        })
        .collect())
}

async fn splits(admin: &mut AdminClient<Channel>) -> Result<Rows, Failure> {
    let list = admin.list_splits(pb::Empty {}).await?.into_inner();
    Ok(list
        .splits
        .iter()
        .map(|s| vec![("service", json!(s.service)), ("weights", weights_text(&s.weights))])
        .collect())
}

pub fn proxies(list: &[pb::ProxyStatus]) -> Rows {
    list.iter()
        .map(|p| {
            vec![
                ("proxy_id", json!(p.proxy_id)),
                ("service", json!(p.service)),
                ("connected", json!(p.connected)),
                ("acked_version", json!(p.acked_version)),
                ("last_contact_ms_ago", ago(p.last_contact_unix_ms)),
                ("rejected_reason", json!(p.rejected_reason)),
                ("admin_addr", json!(p.admin_addr)),
            ]
        })
        .collect()
}
