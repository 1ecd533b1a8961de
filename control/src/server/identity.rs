//! The Identity API: bootstrap tokens for agents, certificates for
//! proxies, the trust bundle, and root rotation. Tokens are held in memory
//! only: a server restart invalidates the unredeemed ones, and agents ask
//! again.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_server::Identity;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::jobs::Scheduler;
use super::liveness::NodeRegistry;
use super::ControlPlane;
use crate::identity::ca::{self, Authority, CaError};
use crate::identity::rotation::{lagging, lagging_nodes, NodeView, ProxyView, Stage, Trust};
use crate::identity::tokens::{new_token, Grant, Tokens};
use crate::store::StoreError;

/// A CA failure as a client sees it: the request's fault, the certificate's,
/// or the server's.
impl From<CaError> for Status {
    fn from(error: CaError) -> Status {
        match error {
            CaError::BadRequest(message) => Status::invalid_argument(message),
            CaError::NotRenewable(message) => Status::permission_denied(message),
            CaError::Authority(message) | CaError::Signing(message) => Status::internal(message),
        }
    }
}

/// Why a change of trust (a rotation stage, a credential) did not happen:
/// the CA failed, or the store did, and nothing was applied.
#[derive(Debug)]
pub enum TrustError {
    Ca(CaError),
    Store(StoreError),
}

impl From<CaError> for TrustError {
    fn from(error: CaError) -> Self {
        TrustError::Ca(error)
    }
}

impl From<StoreError> for TrustError {
    fn from(error: StoreError) -> Self {
        TrustError::Store(error)
    }
}

impl std::fmt::Display for TrustError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustError::Ca(error) => error.fmt(f),
            TrustError::Store(error) => write!(f, "the store: {error}"),
        }
    }
}

impl std::error::Error for TrustError {}

impl From<TrustError> for Status {
    fn from(error: TrustError) -> Status {
        match error {
            TrustError::Ca(error) => error.into(),
            TrustError::Store(error) => super::store_failure(error),
        }
    }
}

/// How long a token waits to be redeemed: the sidecar's start.
const TOKEN_TTL: Duration = Duration::from_secs(120);
/// How long a rotation stage waits for the proxies and nodes unless told otherwise.
const DEFAULT_STAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a waiting stage says who it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What is told of each new trust state.
type Follower = Box<dyn Fn(&Trust) + Send + Sync>;

/// The trust state in force and the one rotation that may change it.
pub struct TrustKeeper {
    trust: RwLock<Arc<Trust>>,
    control: Arc<ControlPlane>,
    /// A stage waits for the nodes too: their agents call meshd with
    /// certificates from the CA and give the roots to their sidecars.
    nodes: Arc<NodeRegistry>,
    /// Rotations replace roots one at a time.
    rotating: tokio::sync::Mutex<()>,
    /// An operator's CA (from files) is rotated by the operator.
    operator_ca: bool,
    /// How long certificates live: how long a retired root vouches for renewals.
    cert_ttl: Duration,
    /// Told of every new trust state before its bundle is published (meshd's
    /// own TLS follows it, so no client meets a certificate from a root it
    /// was not yet given).
    follower: std::sync::OnceLock<Follower>,
}

impl TrustKeeper {
    /// Keeps `trust` and has the control plane hand its bundle to proxies.
    pub fn new(
        trust: Trust,
        control: Arc<ControlPlane>,
        nodes: Arc<NodeRegistry>,
        operator_ca: bool,
        cert_ttl: Duration,
    ) -> Arc<TrustKeeper> {
        let keeper = TrustKeeper {
            trust: RwLock::new(Arc::new(trust)),
            control,
            nodes,
            rotating: Default::default(),
            operator_ca,
            cert_ttl,
            follower: std::sync::OnceLock::new(),
        };
        keeper.control.set_bundle(keeper.bundle());
        keeper.control.set_trusted_roots(root_serials(&keeper.current()));
        Arc::new(keeper)
    }

    /// Sets what follows every change of the trust state (once).
    pub fn follow_with(&self, follower: impl Fn(&Trust) + Send + Sync + 'static) {
        let _ = self.follower.set(Box::new(follower));
    }

    pub fn current(&self) -> Arc<Trust> {
        self.trust.read().expect("trust lock").clone()
    }

    /// Takes the trust state another server stored (a rotation's step):
    /// meshd's TLS follows it, and the bundle goes out with the version
    /// that server publishes for it.
    pub fn adopt(&self, stored: crate::identity::rotation::StoredTrust) {
        let current = self.current();
        if current.to_stored() == stored {
            return;
        }
        let next = match Trust::from_stored(stored, current.signer.trust_domain()) {
            Ok(next) => Arc::new(next),
            Err(error) => {
                tracing::error!(%error, "the trust state another server stored cannot be used");
                return;
            }
        };
        *self.trust.write().expect("trust lock") = next.clone();
        if let Some(follower) = self.follower.get() {
            follower(&next);
        }
        self.control.set_trusted_roots(root_serials(&next));
        self.control.set_bundle(bundle_of(&next));
        tracing::info!(bundle_version = next.bundle_version, "took the trust state another server stored");
    }

    pub fn bundle(&self) -> pb::Bundle {
        bundle_of(&self.current())
    }

    /// Moves to the next stage: stored first, then in force, then published.
    /// Returns the new trust and the routing version that carries its bundle.
    async fn advance(&self) -> Result<(Arc<Trust>, u64), TrustError> {
        let current = self.current();
        let trust_domain = current.signer.trust_domain().to_owned();
        // The stored form round-trips the keys, so the current state can be rebuilt owned.
        let owned = Trust::from_stored(current.to_stored(), &trust_domain)?;
        // A retired root vouches for renewals as long as a certificate lives.
        let next = Arc::new(owned.advance(|| Authority::generate(&trust_domain), now_ms(), self.cert_ttl)?);
        let stored = next.to_stored();
        self.control.durably(move |store| store.save_trust(&stored)).await?;
        *self.trust.write().expect("trust lock") = next.clone();
        if let Some(follower) = self.follower.get() {
            follower(&next);
        }
        self.control.set_trusted_roots(root_serials(&next));
        let version = self.control.publish_bundle(bundle_of(&next)).await?;
        Ok((next, version))
    }

    /// Runs (or resumes) a rotation, reporting each step to `report`.
    pub async fn rotate(
        &self,
        stage_timeout: Duration,
        report: &mpsc::Sender<Result<pb::RotationProgress, Status>>,
    ) {
        let say = |stage: &str, message: String, done: bool, failed: bool| {
            let progress = pb::RotationProgress { stage: stage.to_owned(), message, done, failed };
            // A caller that went away does not stop the rotation.
            let _ = report.try_send(Ok(progress));
        };
        if self.operator_ca {
            let message =
                "the CA comes from --ca-cert/--ca-key: rotate it by restarting meshd with the new files";
            say("add-root", message.to_owned(), true, true);
            return;
        }
        let Ok(_only_one) = self.rotating.try_lock() else {
            say("add-root", "a rotation is already running".to_owned(), true, true);
            return;
        };
        let mut trust = self.current();
        // A rotation that stopped part way resumes by waiting on its stage again.
        let mut advance = trust.stage == Stage::Steady;
        let mut finished_any = false;
        loop {
            let version = if advance {
                match self.advance().await {
                    Ok((next, version)) => {
                        trust = next;
                        version
                    }
                    Err(error) => return say(trust.stage.step_name(), error.to_string(), true, true),
                }
            } else {
                self.control.current_version()
            };
            let stage = trust.stage.step_name();
            say(stage, stage_started(&trust, version), false, false);
            if let Err(waiting_for) = self.wait_stage(&trust, version, stage_timeout, &say).await {
                let message = format!(
                    "stopped: after {} these still lag: {}; both roots stay trusted and traffic is unaffected; run `meshctl identity rotate-root` again to resume",
                    humantime::format_duration(stage_timeout),
                    waiting_for.join(", ")
                );
                return say(stage, message, true, true);
            }
            finished_any |= advance;
            if trust.stage == Stage::Steady && finished_any {
                let message = format!(
                    "the root is now {} (bundle version {})",
                    trust.signer.serial(),
                    trust.bundle_version
                );
                return say("done", message, true, false);
            }
            advance = true;
        }
    }

    /// Waits until no proxy lags behind `trust`'s stage published in
    /// `version`, then until no node that is up lags behind its bundle; on
    /// timeout, the proxies and nodes that lag.
    async fn wait_stage(
        &self,
        trust: &Trust,
        version: u64,
        timeout: Duration,
        say: &impl Fn(&str, String, bool, bool),
    ) -> Result<(), Vec<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let signer = trust.signer.serial();
        let stage = trust.stage.step_name();
        let counted = loop {
            let next_report = (tokio::time::Instant::now() + PROGRESS_EVERY).min(deadline);
            let (done, proxies) = self
                .control
                .wait_for_proxies(next_report, |proxies| {
                    lagging(trust.stage, version, &signer, &views(proxies.iter())).is_empty()
                })
                .await;
            let counted = proxies.iter().filter(|(_, p)| p.counts_for_convergence()).count();
            if done {
                break counted;
            }
            let behind =
                lagging(trust.stage, version, &signer, &views(proxies.iter().map(|(id, p)| (id, p))));
            if tokio::time::Instant::now() >= deadline {
                return Err(behind);
            }
            let waiting = format!("waiting for {} of {counted} proxies: {}", behind.len(), behind.join(", "));
            say(stage, waiting, false, false);
        };
        // Nodes say what they hold in their heartbeats: polled, not pushed.
        let mut next_report = tokio::time::Instant::now() + PROGRESS_EVERY;
        loop {
            let nodes = node_views(&self.nodes);
            let up = nodes.iter().filter(|n| n.up).count();
            let behind: Vec<String> = lagging_nodes(trust.stage, trust.bundle_version, &signer, &nodes)
                .into_iter()
                .map(|name| format!("node {name}"))
                .collect();
            if behind.is_empty() {
                let message = format!("{counted} of {counted} proxies caught up, and {up} of {up} nodes");
                say(stage, message, false, false);
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(behind);
            }
            if now >= next_report {
                say(
                    stage,
                    format!("waiting for {} of {up} nodes: {}", behind.len(), behind.join(", ")),
                    false,
                    false,
                );
                next_report = now + PROGRESS_EVERY;
            }
            tokio::time::sleep(NODE_POLL.min(deadline - now)).await;
        }
    }
}

/// How often a stage looks at the nodes' heartbeats again.
const NODE_POLL: Duration = Duration::from_millis(100);

fn node_views(nodes: &NodeRegistry) -> Vec<NodeView> {
    nodes
        .list()
        .into_iter()
        .map(|n| NodeView {
            name: n.info.map(|info| info.name).unwrap_or_default(),
            up: n.up,
            bundle_version: n.bundle_version,
            certificate_root: n.certificate_root,
        })
        .collect()
}

fn views<'a>(proxies: impl Iterator<Item = (&'a String, &'a super::ProxyRecord)>) -> Vec<ProxyView> {
    proxies
        .map(|(id, p)| ProxyView {
            id: id.clone(),
            counts: p.counts_for_convergence(),
            connected: p.connected,
            acked_version: p.acked_version,
            certificate_root: p.certificate_root.clone(),
        })
        .collect()
}

fn stage_started(trust: &Trust, version: u64) -> String {
    let new = trust.signer.serial();
    match trust.stage {
        Stage::Staged => {
            let next =
                trust.other.as_ref().and_then(|o| ca::serial_hex(&o.cert_pem).ok()).unwrap_or_default();
            format!("new root {next} joins the trust bundle (bundle version {}, routing version {version}); waiting for every proxy and node to trust it", trust.bundle_version)
        }
        Stage::Switched => format!(
            "root {new} signs now (bundle version {}); waiting for every proxy and node to hold a certificate from it",
            trust.bundle_version
        ),
        Stage::Steady => format!(
            "the old root leaves the trust bundle (bundle version {}); waiting for every proxy and node to ack",
            trust.bundle_version
        ),
    }
}

fn root_serials(trust: &Trust) -> Vec<String> {
    trust.roots().into_iter().filter_map(|pem| ca::serial_hex(pem).ok()).collect()
}

fn bundle_of(trust: &Trust) -> pb::Bundle {
    pb::Bundle {
        roots_pem: trust.roots_pem(),
        version: trust.bundle_version,
        signer_serial: trust.signer.serial(),
    }
}

pub struct IdentityService {
    pub control: Arc<ControlPlane>,
    pub trust: Arc<TrustKeeper>,
    pub scheduler: Arc<Scheduler>,
    pub tokens: Mutex<Tokens>,
    pub cert_ttl: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl IdentityService {
    fn reply(&self, trust: &Trust, certificate_pem: String, service: &str) -> pb::SignReply {
        pb::SignReply {
            certificate_pem,
            bundle: Some(bundle_of(trust)),
            spiffe_id: crate::identity::spiffe_id(trust.signer.trust_domain(), service),
            expires_unix_ms: now_ms() + self.cert_ttl.as_millis() as u64,
        }
    }
}

type ProgressStream = ReceiverStream<Result<pb::RotationProgress, Status>>;

#[tonic::async_trait]
impl Identity for IdentityService {
    type RotateRootStream = ProgressStream;

    async fn issue_token(&self, request: Request<pb::TokenRequest>) -> Result<Response<pb::Token>, Status> {
        // Tokens are the leader's: it placed the instances, and it redeems them.
        self.scheduler.require_leader()?;
        super::nodes::calling_node(&request, &request.get_ref().node, &self.control)?;
        let request = request.into_inner();
        let Some(service) = self.scheduler.service_of(&request.node, &request.instance) else {
            return Err(Status::permission_denied(format!(
                "instance {:?} is not placed on node {:?}",
                request.instance, request.node
            )));
        };
        let token = new_token();
        let grant = Grant { instance: request.instance, service: service.clone() };
        self.tokens.lock().expect("tokens lock").issue(token.clone(), grant, now_ms(), TOKEN_TTL);
        Ok(Response::new(pb::Token { token, service }))
    }

    async fn sign(&self, request: Request<pb::SignRequest>) -> Result<Response<pb::SignReply>, Status> {
        self.scheduler.require_leader()?;
        let request = request.into_inner();
        // A bad request is refused before the token is spent.
        Authority::check_request(&request.csr_pem)?;
        let grant = self
            .tokens
            .lock()
            .expect("tokens lock")
            .redeem(&request.token, now_ms())
            .map_err(|refusal| Status::permission_denied(refusal.to_string()))?;
        let trust = self.trust.current();
        let certificate_pem = trust.signer.sign(&request.csr_pem, &grant.service, self.cert_ttl)?;
        tracing::info!(instance = %grant.instance, service = %grant.service, "certificate issued");
        Ok(Response::new(self.reply(&trust, certificate_pem, &grant.service)))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::SignReply>, Status> {
        let request = request.into_inner();
        let trust = self.trust.current();
        // A certificate from any trusted root renews: during a rotation, the
        // old root's certificates are renewed under the new one; after it, a
        // retired root's for a certificate lifetime (a proxy that missed the
        // rotation recovers by itself).
        let identity = ca::renewal_identity(
            &trust.renewal_roots(now_ms()),
            trust.signer.trust_domain(),
            &request.certificate_pem,
            &request.csr_pem,
        )?;
        let id = identity.to_string();
        let certificate_pem = trust.signer.sign_id(&request.csr_pem, &id, self.cert_ttl)?;
        tracing::debug!(%identity, "certificate renewed");
        let mut reply = self.reply(&trust, certificate_pem, "");
        reply.spiffe_id = id;
        Ok(Response::new(reply))
    }

    async fn trust_bundle(&self, _: Request<pb::Empty>) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(self.trust.bundle()))
    }

    async fn rotate_root(
        &self,
        request: Request<pb::RotateRootRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        // The signing key's rotation happens once, on the leader.
        self.scheduler.require_leader()?;
        let timeout = match request.into_inner().stage_timeout_ms {
            0 => DEFAULT_STAGE_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let (report, progress) = mpsc::channel(64);
        let trust = self.trust.clone();
        // The rotation runs to its end even if the caller leaves.
        tokio::spawn(async move { trust.rotate(timeout, &report).await });
        Ok(Response::new(ReceiverStream::new(progress)))
    }
}
