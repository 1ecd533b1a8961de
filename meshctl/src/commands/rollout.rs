//! `meshctl rollout`: a canary rollout's step, weights and gates, and
//! pause, resume, abort and promote.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use mesh_proto::mesh::v1::rollout_action::Action;
use serde_json::json;

use crate::cli::{Output, RolloutCommand};
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, command: RolloutCommand, output: Output) -> Result<(), Failure> {
    let mut jobs = JobsClient::new(session.channel.clone());
    let (name, action) = match command {
        RolloutCommand::Status { job } => (job, None),
        RolloutCommand::Pause { job } => (job, Some(Action::Pause)),
        RolloutCommand::Resume { job } => (job, Some(Action::Resume)),
        RolloutCommand::Abort { job } => (job, Some(Action::Abort)),
        RolloutCommand::Promote { job } => (job, Some(Action::Promote)),
    };
    let report = match action {
        None => jobs.rollout_status(pb::JobName { name }).await?.into_inner(),
        Some(action) => {
            let request = pb::RolloutAction { name: name.clone(), action: action as i32 };
            let report = jobs.set_rollout(request).await?.into_inner();
            if output == Output::Table {
                let what = action.as_str_name().to_lowercase();
                println!("{what} of job {name}'s rollout: taken; the next round acts on it");
            }
            report
        }
    };
    print_report(&report, output);
    Ok(())
}

fn weights(report: &pb::RolloutReport) -> String {
    let mut weights: Vec<(&String, &u32)> = report.weights.iter().collect();
    weights.sort();
    weights.iter().map(|(version, weight)| format!("{version}={weight}")).collect::<Vec<_>>().join(" ")
}

fn print_report(report: &pb::RolloutReport, output: Output) {
    let gates: Rows = report
        .gates
        .iter()
        .map(|g| {
            vec![
                ("gate", json!(g.name)),
                ("measured", json!(g.measured)),
                ("threshold", json!(g.threshold)),
                ("passed", json!(g.passed)),
            ]
        })
        .collect();
    if output != Output::Table {
        let gates: Vec<serde_json::Value> =
            gates.iter().map(|row| row.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()).collect();
        let row = vec![
            ("job", json!(report.job)),
            ("service", json!(report.service)),
            ("from", json!(report.from_version)),
            ("to", json!(report.to_version)),
            ("state", json!(report.state)),
            ("step", json!(report.step)),
            ("steps", json!(report.steps)),
            ("weights", json!(report.weights)),
            ("gates", json!(gates)),
            ("message", json!(report.message)),
            ("interval_ms", json!(report.interval_ms)),
        ];
        print_rows(output, &vec![row]);
        return;
    }
    println!(
        "rollout of job {} (service {}): {} → {}, {}",
        report.job, report.service, report.from_version, report.to_version, report.state
    );
    let steps: Vec<String> = report.steps.iter().map(|s| format!("{s}%")).collect();
    if report.step > 0 {
        println!("step {} of {}: {}", report.step, report.steps.len(), steps.join(" → "));
    }
    println!("weights: {}", weights(report));
    println!("{}", report.message);
    if !gates.is_empty() {
        let interval = humantime::format_duration(std::time::Duration::from_millis(report.interval_ms));
        println!("gates over the last {interval}, as the new version's callers measured:");
        print_rows(output, &gates);
    }
}
