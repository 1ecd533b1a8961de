//! The command line as clap reads it: every command, option and its help.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mesh_common::policy::{Protocol, RetryOn};

#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about = "Command line of the mesh")]
pub struct Cli {
    /// The control plane's gRPC address, or several servers' (comma-
    /// separated: the first that answers is used, and a call only the
    /// leader serves is sent on to it); default: the one in the
    /// credential, else 127.0.0.1:7400.
    #[arg(long, global = true, env = "MESH_SERVER")]
    pub server: Option<String>,
    /// The credential file (from meshd's data dir or `meshctl user create`);
    /// default: ~/.config/mesh/credentials.toml, then the admin credential
    /// of a `meshd dev`/`meshd server` with its default data dir.
    #[arg(long, global = true, env = "MESH_CREDENTIALS")]
    pub credentials: Option<std::path::PathBuf>,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List services, endpoints, proxies, splits, routes, nodes, jobs or instances.
    Get {
        /// What to list.
        #[arg(value_enum)]
        what: Listing,
        /// With `routes`: only this service's.
        service: Option<String>,
    },
    /// Routes and rate limits from a file (`[[routes]]`, `[[rate_limits]]`):
    /// checked whole first, then applied at once. Each service the file
    /// names under [[routes]] gets exactly the file's routes, in order;
    /// each under [[rate_limits]] gets the file's limit.
    Apply {
        /// The routes file.
        #[arg(short = 'f', long)]
        file: std::path::PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// Remove a route or a rate limit.
    Delete {
        #[command(subcommand)]
        what: DeleteCommand,
    },
    /// Shift a service's traffic between versions: `meshctl split web v1=90 v2=10`.
    Split {
        /// The service whose traffic moves.
        service: String,
        /// VERSION=WEIGHT pairs adding up to 100.
        #[arg(value_parser = parse_weight, required_unless_present = "clear", conflicts_with = "clear")]
        weights: Vec<(String, u32)>,
        /// Remove the split: every ready endpoint shares.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Set a service's policy; options not given keep their value.
    Policy {
        /// The service the policy is for.
        service: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Return once every connected proxy has applied the change.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits before failing (`--timeout` is the policy's).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", requires = "wait")]
        wait_timeout: Duration,
    },
    /// The current version, and per proxy its acked version, lag and last contact.
    Status {
        /// Instead, per proxy, how it reaches each peer of the services it
        /// calls over QUIC: quic, or tcp and why (fallback, no-quic, idle).
        #[arg(long)]
        peers: bool,
    },
    /// Identity health: the CA's and every proxy's certificate expiry, the
    /// trust bundle's version; exits 4 when something expires too soon.
    Check {
        /// Warn about a proxy certificate expiring within this long (the CA: ten times as long).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "6h")]
        warn_within: Duration,
    },
    /// An instance's output (every instance of the job unless --instance), from its node's agent.
    Logs {
        job: String,
        #[arg(long)]
        instance: Option<String>,
        /// Keep printing what the instances write.
        #[arg(long, short)]
        follow: bool,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
    },
    /// Per service and version, as callers saw it: request rate, success rate, p50/p99 latency and
    /// requests in flight at the instances, from the summaries proxies send meshd every second.
    Top {
        /// How far back to look (1s to 60s).
        #[arg(long, alias = "interval", value_parser = parse_window, default_value = "10s")]
        window: Duration,
    },
    /// One service's traffic (or every service's), both ways: what its instances served
    /// (inbound) and what its callers got (outbound), by version, with status classes and
    /// the mesh's own errors by reason.
    Stat {
        service: Option<String>,
        /// How far back to look (1s to 60s).
        #[arg(long, value_parser = parse_window, default_value = "10s")]
        window: Duration,
    },
    /// Register an endpoint that runs outside the scheduler.
    Register {
        /// The service the endpoint serves.
        service: String,
        /// The version it runs (what splits choose by).
        #[arg(long)]
        version: String,
        /// IP:port that peers connect to.
        #[arg(long)]
        addr: String,
        /// Register it without traffic until registered again ready.
        #[arg(long)]
        not_ready: bool,
        /// Allow a plaintext endpoint in a service served by mesh sidecars
        /// (its callers then go plaintext to it); admin only.
        #[arg(long)]
        plaintext_ok: bool,
    },
    /// Remove an endpoint registered with `register`.
    Deregister {
        /// The service the endpoint serves.
        service: String,
        /// IP:port it was registered with.
        #[arg(long)]
        addr: String,
    },
    /// Jobs for the scheduler.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// A canary rollout (`[update] strategy = "canary"`): where it stands, and steering it.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Operators: credentials with a role (viewer, operator, admin).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Nodes: join tokens for new agents.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Who this credential names, and its role.
    Whoami,
    /// Workload identity: the root CA.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user and write their credential to a file (mode 0600).
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Where the credential goes; default: ./NAME.credentials.toml.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Give a user a new credential; the old one stops working at once.
    Rotate {
        name: String,
        /// The role from now on; default: the current one.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: Option<String>,
        /// Where the credential goes; default: ./NAME.credentials.toml.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Take a user's credential away at once.
    Revoke { name: String },
    /// Every user with their role.
    List,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a join token for `meshd agent --join-token-file`.
    Create {
        /// How long the token can be used.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Replace the root CA without failing traffic, reporting each stage: the
    /// new root joins the trust bundle (every proxy acks), certificates are
    /// reissued under it, the old root leaves the bundle (every proxy acks).
    /// A stage that times out stops with both roots trusted; running this
    /// again resumes.
    RotateRoot {
        /// How long each stage waits for the proxies.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
        stage_timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// The step, each version's weight, and each gate's measured value against its threshold
    /// (or how the last rollout ended).
    Status { job: String },
    /// Hold the current step: no gate is judged until resumed.
    Pause { job: String },
    /// Go on from the current step.
    Resume { job: String },
    /// Roll back now: all traffic to the old version, then its new instances stop.
    Abort { job: String },
    /// Skip the remaining steps: the new version takes all traffic and the old one stops.
    Promote { job: String },
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Check a job file without sending it anywhere: the first error, with its line and field.
    Validate {
        /// The job file (TOML; see docs/jobs.md).
        file: std::path::PathBuf,
    },
    /// Submit a job file (checked fully first: a bad file changes nothing),
    /// then say where its instances were placed, or why not.
    Run {
        /// The job file (TOML; see docs/jobs.md).
        file: std::path::PathBuf,
    },
    /// A job and its instances.
    Status {
        /// The job's name.
        name: String,
    },
    /// Stop a job: its instances drain and stop.
    Stop {
        /// The job's name.
        name: String,
    },
    /// Let an update's canaries be followed by the rest of the new version.
    Promote {
        /// The job's name.
        name: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Listing {
    /// Services with their policy and endpoint counts.
    Services,
    /// Every endpoint: service, version, address, ready.
    Endpoints,
    /// Connected proxies: acked version, lag, last contact, refusals.
    Proxies,
    /// Traffic splits by version.
    Splits,
    /// Routes (match, backends, timeout, retry, mirror, fault) and rate limits.
    Routes,
    /// Nodes with their capacity, attributes and liveness.
    Nodes,
    /// Jobs with their state and instance counts.
    Jobs,
    /// Instances: node, state, pids, endpoint, restarts.
    Instances,
}

#[derive(Subcommand, Debug)]
pub enum DeleteCommand {
    /// One route of a service: `meshctl delete route echo canary-by-header`.
    Route {
        service: String,
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// A service's rate limit.
    RateLimit {
        service: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Args, Debug)]
pub struct Wait {
    /// Return once every connected proxy has applied the change.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits before failing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", requires = "wait")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// http, h2, grpc or tcp.
    #[arg(long)]
    pub protocol: Option<Protocol>,
    /// Whole-request timeout, retries included, e.g. 2s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    #[arg(long)]
    pub retry_attempts: Option<u32>,
    /// Comma-separated: connect-failure, 5xx, gateway-error, unavailable.
    #[arg(long, value_delimiter = ',')]
    pub retry_on: Option<Vec<RetryOn>>,
    #[arg(long)]
    pub retry_non_idempotent: Option<bool>,
    #[arg(long)]
    pub retry_budget_ratio: Option<f64>,
    #[arg(long)]
    pub retry_budget_min_per_second: Option<u32>,
    #[arg(long)]
    pub breaker_failures: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub breaker_base_ejection: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub breaker_max_ejection: Option<Duration>,
    /// Let the service's sidecars also take plaintext callers (migration into the mesh); `false` for mTLS only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub permissive: Option<bool>,
    /// Only these services' sidecars may call this one (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "allow_all_mesh")]
    pub allow_from: Option<Vec<String>>,
    /// Every mesh identity may call this service (the default).
    #[arg(long)]
    pub allow_all_mesh: bool,
    /// With no ready instance, callers' sidecars hold a request this long
    /// for one (a job with `[scale] min = 0` sets it); 0s: answer 503 at once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub hold_when_empty: Option<Duration>,
    /// How callers' sidecars reach this service's: tcp (mTLS over TCP), or
    /// quic (HTTP/3 with the same mTLS, falling back to TCP per peer).
    #[arg(long)]
    pub transport: Option<mesh_common::policy::Transport>,
}

pub fn parse_weight(text: &str) -> Result<(String, u32), String> {
    let (version, weight) =
        text.split_once('=').ok_or_else(|| format!("{text:?} is not VERSION=WEIGHT, e.g. v1=90"))?;
    let weight: u32 = weight
        .parse()
        .map_err(|_| format!("weight {weight:?} of {version:?} is not a whole number from 0 to 100"))?;
    if version.is_empty() {
        return Err(format!("{text:?} names no version"));
    }
    Ok((version.to_owned(), weight))
}

/// A measuring interval: long enough to see requests in.
/// A traffic window: meshd keeps a minute of summaries, which come every second.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if window < Duration::from_secs(1) {
        return Err(format!("{text:?} is too short: proxies report every second; give 1s or more"));
    }
    if window > Duration::from_secs(60) {
        return Err(format!("{text:?} is too long: meshd keeps the last 60s of traffic"));
    }
    Ok(window)
}
