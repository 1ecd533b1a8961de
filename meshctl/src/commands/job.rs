//! `meshctl job`: validate, run, status, promote and stop jobs.

use std::time::Duration;

use mesh_proto::convert::{instance_state_name, job_kind_name, job_state_name};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::cli::{JobCommand, Output};
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, command: JobCommand, output: Output) -> Result<(), Failure> {
    let mut jobs = JobsClient::new(session.channel.clone());
    match command {
        JobCommand::Validate { file } => validate(&file)?,
        JobCommand::Run { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
            // Checked here too, so the error names the file.
            mesh_scheduler::job::parse_job(&text)
                .map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
            let dir = std::path::absolute(&file)
                .ok()
                .and_then(|path| path.parent().map(|p| p.display().to_string()))
                .unwrap_or_default();
            let reply = jobs.run(pb::RunJobRequest { text, dir }).await?.into_inner();
            if reply.changed {
                println!("job {} submitted", reply.name);
                println!("{}", placement_outcome(&mut jobs, &reply.name).await);
            } else {
                println!("job {} unchanged", reply.name);
            }
        }
        JobCommand::Status { name } => {
            let status = jobs.status(pb::JobName { name }).await?.into_inner();
            if output == Output::Table {
                println!(
                    "job {}: a {} job of service {}, version {}, {}",
                    status.name,
                    job_kind_name(status.kind()),
                    status.service,
                    status.version,
                    job_state_name(status.state())
                );
                println!(
                    "instances: {} wanted, {} running, {} ready",
                    status.replicas, status.running, status.ready
                );
                if !status.pending_reason.is_empty() {
                    println!("pending: {}", status.pending_reason);
                }
                if !status.deployment.is_empty() {
                    println!("update: {}", status.deployment);
                }
                if !status.scale.is_empty() {
                    println!("scale: {}", status.scale);
                }
                for decision in &status.scale_decisions {
                    println!("scaled {decision}");
                }
                let rows: Rows = status.instances.iter().map(instance_row).collect();
                print_rows(output, &rows);
            } else {
                print_rows(output, &vec![job_row(&status)]);
            }
        }
        JobCommand::Promote { name } => {
            let reply = jobs.promote(pb::JobName { name }).await?.into_inner();
            println!("job {} promoted: the update continues", reply.name);
        }
        JobCommand::Stop { name } => {
            let reply = jobs.stop(pb::JobName { name }).await?.into_inner();
            println!("job {} stopped", reply.name);
        }
    }
    Ok(())
}

/// Where a job just submitted was placed, once the scheduler's next round
/// has seen it (bounded: a busy server gets a plain answer).
async fn placement_outcome(jobs: &mut JobsClient<Channel>, name: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let status = jobs.status(pb::JobName { name: name.to_owned() }).await.map(|s| s.into_inner());
        if let Ok(status) = &status {
            let placed = status.instances.len() as u32;
            if !status.pending_reason.is_empty() {
                return format!("placed {placed} of {}; {}", status.replicas, status.pending_reason);
            }
            if placed >= status.replicas {
                return format!("placed {placed} of {} (see `meshctl job status {name}`)", status.replicas);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return format!("placement under way (see `meshctl job status {name}`)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn validate(file: &std::path::Path) -> Result<(), Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
    let job =
        mesh_scheduler::job::parse_job(&text).map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
    println!(
        "job {} is valid: {} × {} {} of service {} ({} CPU millis, {} MB each)",
        job.name,
        job.replicas,
        job.command,
        job.version,
        job.service,
        job.resources.cpu_millis,
        job.resources.memory_mb
    );
    Ok(())
}

pub fn job_row(status: &pb::JobStatus) -> Vec<(&'static str, Value)> {
    vec![
        ("name", json!(status.name)),
        ("service", json!(status.service)),
        ("version", json!(status.version)),
        ("kind", json!(job_kind_name(status.kind()))),
        ("state", json!(job_state_name(status.state()))),
        ("replicas", json!(status.replicas)),
        ("running", json!(status.running)),
        ("ready", json!(status.ready)),
        ("pending", json!(status.pending_reason)),
        ("deployment", json!(status.deployment)),
        ("scale", json!(status.scale)),
        ("scale_decisions", json!(status.scale_decisions)),
    ]
}

pub fn instance_row(instance: &pb::Instance) -> Vec<(&'static str, Value)> {
    vec![
        ("id", json!(instance.id)),
        ("job", json!(instance.job)),
        ("version", json!(instance.version)),
        ("node", json!(instance.node)),
        ("state", json!(instance_state_name(instance.state()))),
        ("ready", json!(instance.ready)),
        ("pid", json!(instance.pid)),
        ("proxy_pid", json!(instance.proxy_pid)),
        ("addr", json!(instance.addr)),
        ("restarts", json!(instance.restarts)),
        ("proxy_restarts", json!(instance.proxy_restarts)),
        ("message", json!(instance.message)),
    ]
}
