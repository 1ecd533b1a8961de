//! Health checks the agent runs against an instance: HTTP, TCP, gRPC
//! (grpc.health.v1) and exec; and the pure rule that turns results into a
//! ready/live verdict after `failures` in a row.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use mesh_proto::health::v1::health_check_response::ServingStatus;
use mesh_proto::health::v1::health_client::HealthClient;
use mesh_proto::health::v1::HealthCheckRequest;

use mesh_scheduler::job::Probe;

/// Runs one probe against the instance at `addr`; `Err` says why it failed.
/// A sidecar's `/ready` (its admin port): `None` until it answers 200;
/// then whether it serves QUIC (its `x-mesh-quic` header).
pub async fn sidecar_ready(admin: SocketAddr, timeout: Duration) -> Option<SidecarReady> {
    let answer = tokio::time::timeout(timeout, http_get(admin, "/ready")).await.ok()?.ok()?;
    answer.status.is_success().then(|| SidecarReady { quic: answer.headers.contains_key("x-mesh-quic") })
}

/// What a ready sidecar tells of itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SidecarReady {
    /// It serves QUIC on UDP at its inbound's port number.
    pub quic: bool,
}

/// The head of the answer to `GET path` at `addr`, over a new HTTP/1.1 connection.
async fn http_get(addr: SocketAddr, path: &str) -> Result<http::response::Parts, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "meshd-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("http: {e}"))?;
    Ok(response.into_parts().0)
}

pub async fn probe(probe: &Probe, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    probe_as(probe, addr, timeout, None).await
}

/// `probe`, with an exec check run as `user` (the app's user: a check is
/// the job's code, as the app is).
pub async fn probe_as(
    probe: &Probe,
    addr: SocketAddr,
    timeout: Duration,
    user: Option<super::users::RunAs>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, run(probe, addr, user)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

async fn run(probe: &Probe, addr: SocketAddr, user: Option<super::users::RunAs>) -> Result<(), String> {
    match probe {
        Probe::Tcp => {
            tokio::net::TcpStream::connect(addr).await.map(drop).map_err(|e| format!("connect: {e}"))
        }
        Probe::Http(path) => {
            let status = http_get(addr, path).await?.status;
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        Probe::Grpc => {
            let mut client =
                HealthClient::connect(format!("http://{addr}")).await.map_err(|e| format!("grpc: {e}"))?;
            let response = client
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map_err(|e| format!("grpc: {}", e.message()))?;
            match response.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("grpc health: {}", other.as_str_name())),
            }
        }
        Probe::Exec(command) => {
            let (program, args) = command.split_first().ok_or("exec: empty command")?;
            let mut command = tokio::process::Command::new(program);
            if let Some(user) = user {
                // As root, std also drops the supplementary groups.
                command.uid(user.uid).gid(user.gid);
            }
            let status = command
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("exec {program}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("exec {program}: {status}"))
            }
        }
    }
}

/// The verdict of a check over time: it turns bad after `failures` failed
/// probes in a row and good again after one success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub failures_in_a_row: u32,
}

impl Verdict {
    /// Instances start unhealthy: not ready until a probe passes.
    pub fn initial() -> Verdict {
        Verdict { healthy: false, failures_in_a_row: 0 }
    }

    pub fn observe(self, passed: bool, failures: u32) -> Verdict {
        if passed {
            Verdict { healthy: true, failures_in_a_row: 0 }
        } else {
            let failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            Verdict { healthy: self.healthy && failures_in_a_row < failures, failures_in_a_row }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_need_failures_in_a_row() {
        // (sequence of probe results, failures threshold, healthy at the end)
        let table: &[(&[bool], u32, bool)] = &[
            (&[], 3, false),
            (&[true], 3, true),
            (&[true, false, false], 3, true),
            (&[true, false, false, false], 3, false),
            (&[true, false, false, true, false, false], 3, true),
            (&[true, false], 1, false),
            (&[false, false, true], 1, true),
        ];
        for (results, failures, healthy) in table {
            let verdict = results.iter().fold(Verdict::initial(), |v, passed| v.observe(*passed, *failures));
            assert_eq!(verdict.healthy, *healthy, "{results:?} with {failures}");
        }
    }
}
