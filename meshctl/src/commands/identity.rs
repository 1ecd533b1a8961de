//! `meshctl identity rotate-root`: a root rotation, stage by stage.

use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use serde_json::json;

use crate::cli::Output;
use crate::failure::Failure;
use crate::session::{refresh_credential, Session};

pub async fn rotate_root(session: &Session, stage_timeout: Duration, output: Output) -> Result<(), Failure> {
    let channel = &session.channel;
    let request = pb::RotateRootRequest { stage_timeout_ms: stage_timeout.as_millis() as u64 };
    let mut progress = IdentityClient::new(channel.clone()).rotate_root(request).await?.into_inner();
    while let Some(step) = progress.message().await? {
        match output {
            Output::Table => println!("[{}] {}", step.stage, step.message),
            Output::Json => println!(
                "{}",
                json!({"stage": step.stage, "message": step.message, "done": step.done, "failed": step.failed})
            ),
        }
        if step.done {
            if step.failed {
                return Err(Failure(format!("root rotation stopped at {}: {}", step.stage, step.message), 1));
            }
            refresh_credential(channel, session.credentials_path.as_deref()).await;
            return Ok(());
        }
    }
    Err(Failure("the control plane ended the rotation's report early; run again to resume".into(), 1))
}
