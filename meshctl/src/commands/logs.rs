//! `meshctl logs`: an instance's output, read through meshd from its node.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use tonic::transport::Channel;

use crate::failure::Failure;
use crate::session::Session;

pub async fn run(
    session: &Session,
    job: String,
    instance: Option<String>,
    follow: bool,
    stderr: bool,
) -> Result<(), Failure> {
    let channel = &session.channel;
    let instances =
        JobsClient::new(channel.clone()).list_instances(pb::Empty {}).await?.into_inner().instances;
    let chosen: Vec<pb::Instance> = instances
        .into_iter()
        .filter(|i| i.job == job && instance.as_ref().is_none_or(|id| &i.id == id))
        .collect();
    if chosen.is_empty() {
        let what =
            instance.map_or_else(|| format!("job {job:?}"), |id| format!("instance {id:?} of job {job:?}"));
        return Err(Failure(format!("no {what}"), 2));
    }
    let stream = if stderr { "stderr" } else { "stdout" };
    let prefix = chosen.len() > 1;
    let mut readers = Vec::new();
    for instance in &chosen {
        let request = pb::LogsRequest { instance: instance.id.clone(), stream: stream.into(), follow };
        let label = prefix.then(|| format!("[{}] ", instance.id));
        readers.push(tokio::spawn(print_log(JobsClient::new(channel.clone()), request, label)));
    }
    for reader in readers {
        if let Ok(Err(message)) = reader.await {
            eprintln!("meshctl: {message}");
        }
    }
    Ok(())
}

/// Prints one instance's log as it arrives, each line after `label`.
async fn print_log(
    mut jobs: JobsClient<Channel>,
    request: pb::LogsRequest,
    label: Option<String>,
) -> Result<(), String> {
    use std::io::Write;
    let instance = request.instance.clone();
    let mut chunks =
        jobs.logs(request).await.map_err(|e| format!("logs of {instance}: {}", e.message()))?.into_inner();
    let mut pending = Vec::new();
    while let Some(chunk) =
        chunks.message().await.map_err(|e| format!("logs of {instance}: {}", e.message()))?
    {
        pending.extend_from_slice(&chunk.data);
        // Whole lines only, so that several instances' lines do not mix.
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(label.as_deref().unwrap_or("").as_bytes());
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
    if !pending.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(label.as_deref().unwrap_or("").as_bytes());
        let _ = out.write_all(&pending);
        let _ = out.write_all(b"\n");
    }
    Ok(())
}
