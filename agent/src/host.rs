//! What an instance's life asks of the node it runs on: processes started
//! and stopped, a sidecar's identity token, a look at a sidecar's or an
//! app's health, and the wait for a drain. [`NodeHost`] does it for real;
//! the lifecycle's own tests script it, so the lifecycle (restarts,
//! backoff, crash loops, sidecar restarts, draining) runs in-process on a
//! paused clock.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use mesh_scheduler::job::Probe;

pub use super::health::SidecarReady;
use super::link::ControlLink;
use super::process::{Launch, Running};
use super::users::RunAs;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A started process: an instance's app or its sidecar.
pub trait Process: Send {
    fn pid(&self) -> i32;
    /// The exit status, if it has exited.
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;
    /// Waits for it to exit on its own.
    fn wait(&mut self) -> BoxFuture<'_, io::Result<ExitStatus>>;
    /// Asks it to stop, and ends it after `grace`.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, io::Result<ExitStatus>>;
}

pub trait Host: Send + Sync {
    fn start(&self, launch: &Launch) -> io::Result<Box<dyn Process>>;
    /// A one-time token for an instance's identity, from the control plane.
    fn identity_token<'a>(
        &'a self,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<String, String>>;
    /// Whether the sidecar whose admin port is `admin` has its table.
    fn sidecar_ready(&self, admin: SocketAddr) -> BoxFuture<'_, Option<SidecarReady>>;
    /// One health check of the app at `addr`; `Err` says why it failed.
    fn probe<'a>(
        &'a self,
        probe: &'a Probe,
        addr: SocketAddr,
        timeout: Duration,
        user: Option<RunAs>,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Waits (bounded by `within`) until every proxy applied the table that
    /// no longer holds a stopped instance's endpoint.
    fn drain(&self, within: Duration) -> BoxFuture<'_, ()>;
}

/// The node's own: real processes, and the control plane over the node's link.
pub struct NodeHost {
    pub link: Arc<ControlLink>,
}

impl Process for Running {
    fn pid(&self) -> i32 {
        Running::pid(self)
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        Running::try_wait(self)
    }

    fn wait(&mut self) -> BoxFuture<'_, io::Result<ExitStatus>> {
        Box::pin(Running::wait(self))
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, io::Result<ExitStatus>> {
        Box::pin(Running::stop(self, grace))
    }
}

impl Host for NodeHost {
    fn start(&self, launch: &Launch) -> io::Result<Box<dyn Process>> {
        Ok(Box::new(Running::start(launch)?))
    }

    fn identity_token<'a>(
        &'a self,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let mut client = IdentityClient::new(self.link.channel());
            let request = pb::TokenRequest { node: node.to_owned(), instance: instance.to_owned() };
            let reply =
                client.issue_token(request).await.map_err(|e| format!("identity: {}", e.message()))?;
            Ok(reply.into_inner().token)
        })
    }

    fn sidecar_ready(&self, admin: SocketAddr) -> BoxFuture<'_, Option<SidecarReady>> {
        Box::pin(super::health::sidecar_ready(admin, Duration::from_millis(500)))
    }

    fn probe<'a>(
        &'a self,
        probe: &'a Probe,
        addr: SocketAddr,
        timeout: Duration,
        user: Option<RunAs>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(super::health::probe_as(probe, addr, timeout, user))
    }

    fn drain(&self, within: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let wait = async {
                let mut admin = AdminClient::new(self.link.channel());
                let version = admin.status(pb::Empty {}).await.ok()?.into_inner().version;
                let request = pb::WaitRequest { version, timeout_ms: within.as_millis() as u64 };
                admin.wait_converged(request).await.ok()
            };
            let _ = tokio::time::timeout(within + Duration::from_secs(1), wait).await;
        })
    }
}
