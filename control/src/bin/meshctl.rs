//! meshctl: the mesh's command line. Every listing takes `-o table|json`;
//! JSON is an array of objects with stable snake_case fields.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::access_client::AccessClient;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use mesh_proto::mesh::v1::registry_client::RegistryClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about = "Command line of the mesh")]
struct Cli {
    /// The control plane's gRPC address; default: the one in the
    /// credential, else 127.0.0.1:7400.
    #[arg(long, global = true, env = "MESH_SERVER")]
    server: Option<String>,
    /// The credential file (from meshd's data dir or `meshctl user create`);
    /// default: ~/.config/mesh/credentials.toml, then the admin credential
    /// of a `meshd dev`/`meshd server` with its default data dir.
    #[arg(long, global = true, env = "MESH_CREDENTIALS")]
    credentials: Option<std::path::PathBuf>,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List services, endpoints, proxies, splits, nodes, jobs or instances.
    Get {
        /// What to list.
        #[arg(value_enum)]
        what: Listing,
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
    Status,
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
    /// Per service and version: request rate, success rate, p50/p99 latency, from every proxy's metrics.
    Top {
        /// How long to measure (at least 100ms).
        #[arg(long, value_parser = parse_interval, default_value = "2s")]
        interval: Duration,
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
enum UserCommand {
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
enum NodeCommand {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
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
enum IdentityCommand {
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
enum JobCommand {
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
enum Listing {
    /// Services with their policy and endpoint counts.
    Services,
    /// Every endpoint: service, version, address, ready.
    Endpoints,
    /// Connected proxies: acked version, lag, last contact, refusals.
    Proxies,
    /// Traffic splits by version.
    Splits,
    /// Nodes with their capacity, attributes and liveness.
    Nodes,
    /// Jobs with their state and instance counts.
    Jobs,
    /// Instances: node, state, pids, endpoint, restarts.
    Instances,
}

#[derive(Args, Debug)]
struct Wait {
    /// Return once every connected proxy has applied the change.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits before failing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", requires = "wait")]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// http, h2, grpc or tcp.
    #[arg(long, value_parser = ["http", "h2", "grpc", "tcp"])]
    protocol: Option<String>,
    /// Whole-request timeout, retries included, e.g. 2s.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    #[arg(long)]
    retry_attempts: Option<u32>,
    /// Comma-separated: connect-failure, 5xx, gateway-error, unavailable.
    #[arg(long, value_delimiter = ',')]
    retry_on: Option<Vec<String>>,
    #[arg(long)]
    retry_non_idempotent: Option<bool>,
    #[arg(long)]
    retry_budget_ratio: Option<f64>,
    #[arg(long)]
    retry_budget_min_per_second: Option<u32>,
    #[arg(long)]
    breaker_failures: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    breaker_base_ejection: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    breaker_max_ejection: Option<Duration>,
    /// Let the service's sidecars also take plaintext callers (migration into the mesh); `false` for mTLS only.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    permissive: Option<bool>,
    /// Only these services' sidecars may call this one (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "allow_all_mesh")]
    allow_from: Option<Vec<String>>,
    /// Every mesh identity may call this service (the default).
    #[arg(long)]
    allow_all_mesh: bool,
}

fn parse_weight(text: &str) -> Result<(String, u32), String> {
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

/// A measuring interval: long enough to see requests in.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(100) {
        return Err(format!("{text:?} is too short to measure anything; give 100ms or more"));
    }
    Ok(interval)
}

/// The weights by version, refusing a version given twice.
fn distinct_versions(weights: Vec<(String, u32)>) -> Result<std::collections::HashMap<String, u32>, Failure> {
    let mut by_version = std::collections::HashMap::new();
    for (version, weight) in weights {
        if by_version.insert(version.clone(), weight).is_some() {
            return Err(Failure(format!("version {version:?} is given twice; give each version once"), 2));
        }
    }
    Ok(by_version)
}

/// A failure to report: the message and the exit code.
struct Failure(String, u8);

/// Exit code when the server is up but cannot write its store: nothing
/// was applied, and retrying will not help until the server's disk does.
const EXIT_STORE_WRITE: u8 = 5;

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        let store_write = status.metadata().get("mesh-failure").is_some_and(|v| v == "store-write");
        // One rule for every subcommand: what the caller asked for is wrong
        // (bad input, an unknown name, a request the state refuses) is 2;
        // the server unreachable or failing is 1.
        let code = match status.code() {
            _ if store_write => EXIT_STORE_WRITE,
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::AlreadyExists
            | tonic::Code::OutOfRange
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied => 2,
            _ => 1,
        };
        Failure(status.message().to_owned(), code)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("meshctl: {message}");
            ExitCode::from(code)
        }
    }
}

/// The credential to call meshd with: `--credentials`/`MESH_CREDENTIALS`,
/// else the first default path that exists.
fn credentials(explicit: Option<&std::path::Path>) -> Result<mesh_client::Credentials, Failure> {
    if let Some(path) = explicit {
        return mesh_client::Credentials::read(path).map_err(|e| Failure(format!("--credentials: {e}"), 2));
    }
    let defaults = mesh_client::credentials::default_paths();
    for path in &defaults {
        if path.exists() {
            return mesh_client::Credentials::read(path).map_err(|e| Failure(e, 2));
        }
    }
    let looked: Vec<String> = defaults.iter().map(|p| p.display().to_string()).collect();
    Err(Failure(
        format!(
            "no credential: give --credentials FILE or set MESH_CREDENTIALS (meshd writes the admin one to admin.credentials.toml in its data dir); looked in {}",
            looked.join(", ")
        ),
        2,
    ))
}

async fn connect(server: &str, credentials: &mesh_client::Credentials) -> Result<Channel, Failure> {
    let tls = credentials.tls().map_err(|e| Failure(format!("the credential: {e}"), 2))?;
    mesh_client::connect(server, &tls, Duration::from_secs(3)).await.map_err(|e| Failure(e, 1))
}

/// The serial of the root among `roots_pem` that signed `der`, and its
/// expiry (Unix seconds).
fn issued_by(der: &[u8], roots_pem: &str) -> (String, Option<u64>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return (String::new(), None) };
    let expires = Some(cert.validity().not_after.timestamp().max(0) as u64);
    let root = x509_parser::pem::Pem::iter_from_buffer(roots_pem.as_bytes())
        .filter_map(|pem| pem.ok())
        .find_map(|pem| {
            let root = pem.parse_x509().ok()?;
            cert.verify_signature(Some(root.public_key())).ok()?;
            Some(root.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<String>())
        })
        .unwrap_or_default();
    (root, expires)
}

/// After a root rotation, the credential in use is renewed under the new
/// root (over the connection still open), so that meshctl keeps reaching
/// meshd. Other users get theirs with `meshctl user rotate NAME`.
async fn refresh_credential(channel: &Channel, explicit: Option<&std::path::Path>) {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => match mesh_client::credentials::default_paths().into_iter().find(|p| p.exists()) {
            Some(path) => path,
            None => return,
        },
    };
    let renewed = match AccessClient::new(channel.clone()).renew_credential(pb::Empty {}).await {
        Ok(renewed) => renewed.into_inner(),
        Err(status) => return eprintln!("meshctl: cannot renew the credential: {}", status.message()),
    };
    match mesh_client::credentials::write_private(&path, &renewed.text) {
        Ok(()) => eprintln!(
            "meshctl: {} now holds a credential from the new root; other users need `meshctl user rotate NAME`",
            path.display()
        ),
        Err(error) => eprintln!("meshctl: cannot update {}: {error}", path.display()),
    }
}

/// Writes a credential's text to `out` (default ./NAME.credentials.toml), 0600.
fn write_credential(text: &str, name: &str, out: Option<std::path::PathBuf>) -> Result<(), Failure> {
    let path = out.unwrap_or_else(|| std::path::PathBuf::from(format!("{name}.credentials.toml")));
    mesh_client::credentials::write_private(&path, text).map_err(|e| Failure(e, 1))?;
    println!(
        "wrote the credential of {name} to {} (it holds a private key: keep it private)",
        path.display()
    );
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Local commands need no server.
    if let Command::Job { command: JobCommand::Validate { file } } = &cli.command {
        return validate_job(file);
    }
    let credentials = credentials(cli.credentials.as_deref())?;
    let server = cli.server.clone().unwrap_or_else(|| credentials.server.clone());
    let server = if server.is_empty() { "127.0.0.1:7400".to_owned() } else { server };
    let channel = connect(&server, &credentials).await?;
    let mut admin = AdminClient::new(channel.clone());
    match cli.command {
        Command::Whoami => {
            let me = AccessClient::new(channel).who_am_i(pb::Empty {}).await?.into_inner();
            match cli.output {
                Output::Table => println!("user {} (role {})", me.name, me.role),
                Output::Json => println!("{}", json!({"name": me.name, "role": me.role})),
            }
        }
        Command::User { command } => {
            let mut access = AccessClient::new(channel);
            match command {
                UserCommand::Create { name, role, out } => {
                    let request = pb::CreateUserRequest { name: name.clone(), role, replace: false };
                    let credential = access.create_user(request).await?.into_inner();
                    write_credential(&credential.text, &name, out)?;
                }
                UserCommand::Rotate { name, role, out } => {
                    let role = match role {
                        Some(role) => role,
                        None => {
                            let users = access.list_users(pb::Empty {}).await?.into_inner().users;
                            let user = users.into_iter().find(|u| u.name == name);
                            user.ok_or_else(|| Failure(format!("no user {name:?}"), 2))?.role
                        }
                    };
                    let request = pb::CreateUserRequest { name: name.clone(), role, replace: true };
                    let credential = access.create_user(request).await?.into_inner();
                    write_credential(&credential.text, &name, out)?;
                }
                UserCommand::Revoke { name } => {
                    access.revoke_user(pb::UserName { name: name.clone() }).await?;
                    println!("revoked the credential of {name}");
                }
                UserCommand::List => {
                    let users = access.list_users(pb::Empty {}).await?.into_inner().users;
                    let rows: Rows = users
                        .iter()
                        .map(|u| {
                            vec![
                                ("name", json!(u.name)),
                                ("role", json!(u.role)),
                                ("serial", json!(u.serial)),
                            ]
                        })
                        .collect();
                    print_rows(cli.output, &rows);
                }
            }
        }
        Command::Node { command: NodeCommand::Token { command: TokenCommand::Create { ttl, uses } } } => {
            let request = pb::JoinTokenRequest { ttl_ms: ttl.as_millis() as u64, uses };
            let token = AccessClient::new(channel).create_join_token(request).await?.into_inner();
            match cli.output {
                Output::Table => println!("{}", token.token),
                Output::Json => println!(
                    "{}",
                    json!({"token": token.token, "uses": token.uses, "expires_unix_ms": token.expires_unix_ms})
                ),
            }
        }
        Command::Get { what } => {
            let rows = match what {
                Listing::Services => services(&mut admin, &mut JobsClient::new(channel.clone())).await?,
                Listing::Endpoints => endpoints(&mut admin).await?,
                Listing::Proxies => proxies(&admin.list_proxies(pb::Empty {}).await?.into_inner().proxies),
                Listing::Splits => splits(&mut admin).await?,
                Listing::Nodes => nodes(&mut admin).await?,
                Listing::Jobs => {
                    let list = JobsClient::new(channel).list(pb::Empty {}).await?.into_inner();
                    let mut rows: Rows = list.jobs.iter().map(job_row).collect();
                    if cli.output == Output::Table {
                        // Reasons are long: `job status` and `-o json` give them.
                        for row in &mut rows {
                            row.retain(|(column, _)| !matches!(*column, "pending" | "deployment"));
                        }
                    }
                    rows
                }
                Listing::Instances => {
                    let list = JobsClient::new(channel).list_instances(pb::Empty {}).await?.into_inner();
                    list.instances.iter().map(instance_row).collect()
                }
            };
            print_rows(cli.output, &rows);
        }
        Command::Split { service, weights, clear, wait } => {
            let version = if clear {
                admin.clear_split(pb::ServiceName { service: service.clone() }).await?.into_inner().version
            } else {
                let weights = distinct_versions(weights)?;
                admin
                    .set_split(pb::SetSplitRequest { service: service.clone(), weights })
                    .await?
                    .into_inner()
                    .version
            };
            println!("split of {service} set (version {version})");
            wait_for(&mut admin, version, &wait).await?;
        }
        Command::Policy { service, policy, wait, wait_timeout } => {
            let wait = Wait { wait, timeout: wait_timeout };
            let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
            let policy = pb::Policy {
                protocol: policy.protocol,
                timeout_ms: ms(policy.timeout),
                connect_timeout_ms: ms(policy.connect_timeout),
                retry_attempts: policy.retry_attempts,
                retry_on: policy.retry_on.unwrap_or_default(),
                retry_non_idempotent: policy.retry_non_idempotent,
                retry_budget_ratio: policy.retry_budget_ratio,
                retry_budget_min_per_second: policy.retry_budget_min_per_second,
                breaker_consecutive_failures: policy.breaker_failures,
                breaker_base_ejection_ms: ms(policy.breaker_base_ejection),
                breaker_max_ejection_ms: ms(policy.breaker_max_ejection),
                permissive: policy.permissive,
                allow_from: if policy.allow_all_mesh {
                    Some(String::new())
                } else {
                    policy.allow_from.map(|names| names.join(","))
                },
            };
            let request = pb::SetPolicyRequest { service: service.clone(), policy: Some(policy) };
            let version = admin.set_policy(request).await?.into_inner().version;
            println!("policy of {service} set (version {version})");
            wait_for(&mut admin, version, &wait).await?;
        }
        Command::Logs { job, instance, follow, stderr } => {
            let instances =
                JobsClient::new(channel.clone()).list_instances(pb::Empty {}).await?.into_inner().instances;
            let chosen: Vec<pb::Instance> = instances
                .into_iter()
                .filter(|i| i.job == job && instance.as_ref().is_none_or(|id| &i.id == id))
                .collect();
            if chosen.is_empty() {
                let what = instance
                    .map_or_else(|| format!("job {job:?}"), |id| format!("instance {id:?} of job {job:?}"));
                return Err(Failure(format!("no {what}"), 2));
            }
            // Through meshd, which reads them from each instance's node.
            let stream = if stderr { "stderr" } else { "stdout" };
            let prefix = chosen.len() > 1;
            let mut readers = Vec::new();
            for instance in &chosen {
                let request =
                    pb::LogsRequest { instance: instance.id.clone(), stream: stream.into(), follow };
                let label = prefix.then(|| format!("[{}] ", instance.id));
                readers.push(tokio::spawn(print_log(JobsClient::new(channel.clone()), request, label)));
            }
            for reader in readers {
                if let Ok(Err(message)) = reader.await {
                    eprintln!("meshctl: {message}");
                }
            }
        }
        Command::Identity { command: IdentityCommand::RotateRoot { stage_timeout } } => {
            let request = pb::RotateRootRequest { stage_timeout_ms: stage_timeout.as_millis() as u64 };
            let mut progress = IdentityClient::new(channel.clone()).rotate_root(request).await?.into_inner();
            while let Some(step) = progress.message().await? {
                match cli.output {
                    Output::Table => println!("[{}] {}", step.stage, step.message),
                    Output::Json => println!(
                        "{}",
                        json!({"stage": step.stage, "message": step.message, "done": step.done, "failed": step.failed})
                    ),
                }
                if step.done {
                    if !step.failed {
                        refresh_credential(&channel, cli.credentials.as_deref()).await;
                    }
                    if step.failed {
                        return Err(Failure(
                            format!("root rotation stopped at {}: {}", step.stage, step.message),
                            1,
                        ));
                    }
                    return Ok(());
                }
            }
            return Err(Failure(
                "the control plane ended the rotation's report early; run again to resume".into(),
                1,
            ));
        }
        Command::Check { warn_within } => {
            let bundle = IdentityClient::new(channel).trust_bundle(pb::Empty {}).await?.into_inner();
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut rows: Rows = Vec::new();
            let mut warnings = 0;
            let mut row = |what: &str,
                           name: String,
                           root: String,
                           bundle_version: u64,
                           expires: Option<u64>,
                           within: Duration,
                           problem: Option<String>| {
                let left = expires.map(|e| e.saturating_sub(now));
                let status = match (problem, left) {
                    (Some(why), _) => why,
                    (None, None) => "no certificate".to_owned(),
                    (None, Some(left)) if left <= within.as_secs() => "WARN: expires soon".to_owned(),
                    (None, Some(_)) => "ok".to_owned(),
                };
                warnings += usize::from(status != "ok");
                rows.push(vec![
                    ("what", json!(what)),
                    ("name", json!(name)),
                    ("root", json!(root)),
                    ("bundle_version", json!(bundle_version)),
                    ("expires_unix", json!(expires)),
                    (
                        "expires_in",
                        json!(left.map(|l| humantime::format_duration(Duration::from_secs(l)).to_string())),
                    ),
                    ("status", json!(status)),
                ]);
            };
            let roots = mesh_control::identity::ca::certificates(&bundle.roots_pem);
            let trusted: Vec<String> = roots.iter().map(|r| r.serial.clone()).collect();
            for root in roots {
                // The root that signs; another is only trusted (a rotation is under way).
                let signs = if root.serial == bundle.signer_serial { " (signs)" } else { " (trusted)" };
                row(
                    "ca",
                    root.subject,
                    format!("{}{signs}", root.serial),
                    bundle.version,
                    Some(root.expires_unix),
                    warn_within * 10,
                    None,
                );
            }
            // meshd's own certificate, as a new connection meets it.
            let tls = credentials.tls().map_err(|e| Failure(e, 2))?;
            match mesh_client::channel::server_certificate(&server, &tls, Duration::from_secs(3)).await {
                Ok(der) => {
                    let (root, expires) = issued_by(&der, &bundle.roots_pem);
                    row("server", server.clone(), root, bundle.version, expires, warn_within, None);
                }
                Err(error) => row(
                    "server",
                    server.clone(),
                    String::new(),
                    0,
                    None,
                    warn_within,
                    Some(format!("FAILED: {error}")),
                ),
            }
            let nodes = admin.list_nodes(pb::Empty {}).await?.into_inner().nodes;
            for node in &nodes {
                let name = node.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
                let expires =
                    (node.certificate_expires_unix_ms > 0).then_some(node.certificate_expires_unix_ms / 1000);
                let down = (!node.up).then(|| "DOWN: no heartbeat within the TTL".to_owned());
                row("node", name, String::new(), node.bundle_version, expires, warn_within, down);
            }
            let proxies = admin.list_proxies(pb::Empty {}).await?.into_inner().proxies;
            for proxy in proxies.iter().filter(|p| p.connected && !p.admin_addr.is_empty()) {
                let expires =
                    match tokio::time::timeout(Duration::from_secs(2), scrape(&proxy.admin_addr)).await {
                        Ok(Ok(text)) => text.lines().find_map(|line| {
                            let value = line.strip_prefix("mesh_identity_cert_expiry_timestamp_seconds ")?;
                            value.trim().parse::<f64>().ok().map(|v| v as u64)
                        }),
                        _ => None,
                    };
                let (id, root) = (proxy.proxy_id.clone(), proxy.certificate_root.clone());
                // A proxy whose certificate no trusted root vouches for fails
                // every handshake until it renews; a stalled one may be next.
                let behind = if !root.is_empty() && !trusted.contains(&root) {
                    Some(format!(
                        "BEHIND: its certificate is from root {root}, which the bundle no longer holds"
                    ))
                } else if proxy.stalled {
                    Some("BEHIND: stalled: it has not acked the latest update".to_owned())
                } else {
                    None
                };
                row("proxy", id, root, proxy.bundle_version, expires, warn_within, behind);
            }
            print_rows(cli.output, &rows);
            if warnings > 0 {
                return Err(Failure(format!("{warnings} certificate(s) need attention"), 4));
            }
        }
        Command::Top { interval } => {
            let proxies = admin.list_proxies(pb::Empty {}).await?.into_inner().proxies;
            let addrs: Vec<String> = proxies
                .into_iter()
                .filter(|p| p.connected && !p.admin_addr.is_empty())
                .map(|p| p.admin_addr)
                .collect();
            let before = scrape_all(&addrs).await;
            let started = std::time::Instant::now();
            tokio::time::sleep(interval).await;
            let after = scrape_all(&addrs).await;
            let rows = mesh_control::top::rows(&before, &after, started.elapsed().as_secs_f64());
            let rows: Rows = rows.iter().map(top_row).collect();
            print_rows(cli.output, &rows);
        }
        Command::Status => {
            let status = admin.status(pb::Empty {}).await?.into_inner();
            if cli.output == Output::Table {
                let state = if status.converged { "converged" } else { "converging" };
                println!("version {} ({state})", status.version);
            }
            let rows = status_rows(&status);
            print_rows(cli.output, &rows);
        }
        Command::Register { service, version, addr, not_ready, plaintext_ok } => {
            let endpoint = pb::Endpoint {
                service: service.clone(),
                version,
                addr: addr.clone(),
                ready: !not_ready,
                meshed: false,
            };
            let mut registry = RegistryClient::new(channel);
            let reply = registry
                .register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok })
                .await?
                .into_inner();
            println!("registered {addr} for {service} (version {})", reply.version);
        }
        Command::Deregister { service, addr } => {
            let mut registry = RegistryClient::new(channel);
            let request = pb::DeregisterRequest { service: service.clone(), addr: addr.clone() };
            let reply = registry.deregister(request).await?.into_inner();
            println!("deregistered {addr} from {service} (version {})", reply.version);
        }
        Command::Job { command } => job_command(JobsClient::new(channel), command, cli.output).await?,
    }
    Ok(())
}

async fn job_command(
    mut jobs: JobsClient<Channel>,
    command: JobCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        JobCommand::Validate { file } => validate_job(&file)?,
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
                    status.name, status.kind, status.service, status.version, status.state
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

fn job_row(status: &pb::JobStatus) -> Vec<(&'static str, Value)> {
    vec![
        ("name", json!(status.name)),
        ("service", json!(status.service)),
        ("version", json!(status.version)),
        ("kind", json!(status.kind)),
        ("state", json!(status.state)),
        ("replicas", json!(status.replicas)),
        ("running", json!(status.running)),
        ("ready", json!(status.ready)),
        ("pending", json!(status.pending_reason)),
        ("deployment", json!(status.deployment)),
    ]
}

fn instance_row(instance: &pb::Instance) -> Vec<(&'static str, Value)> {
    vec![
        ("id", json!(instance.id)),
        ("job", json!(instance.job)),
        ("version", json!(instance.version)),
        ("node", json!(instance.node)),
        ("state", json!(instance.state)),
        ("ready", json!(instance.ready)),
        ("pid", json!(instance.pid)),
        ("proxy_pid", json!(instance.proxy_pid)),
        ("addr", json!(instance.addr)),
        ("restarts", json!(instance.restarts)),
        ("proxy_restarts", json!(instance.proxy_restarts)),
        ("message", json!(instance.message)),
    ]
}

/// Every proxy's metrics, summed; a proxy that does not answer within two
/// seconds is skipped. One after another: scrapes are small and local.
async fn scrape_all(addrs: &[String]) -> BTreeMap<mesh_control::top::Key, mesh_control::top::Counts> {
    let mut counts = BTreeMap::new();
    for addr in addrs {
        if let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(2), scrape(addr)).await {
            mesh_control::top::add_scrape(&mut counts, &text);
        }
    }
    counts
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

/// One GET over a fresh HTTP/1.1 connection (proxy admin, agent logs).
async fn http_get(addr: &str, path: &str) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(request).await.map_err(|e| e.to_string())
}

async fn scrape(addr: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    let response = http_get(addr, "/metrics").await?;
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn top_row(row: &mesh_control::top::Row) -> Vec<(&'static str, Value)> {
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    vec![
        ("service", json!(row.service)),
        ("version", json!(row.version)),
        ("requests_per_second", json!(round(row.requests_per_second, 1))),
        ("success_rate", json!(row.success.map(|s| round(s * 100.0, 2)))),
        ("p50_ms", json!(row.p50_ms.map(|v| round(v, 2)))),
        ("p99_ms", json!(row.p99_ms.map(|v| round(v, 2)))),
    ]
}

fn validate_job(file: &std::path::Path) -> Result<(), Failure> {
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

async fn wait_for(admin: &mut AdminClient<Channel>, version: u64, wait: &Wait) -> Result<(), Failure> {
    if !wait.wait {
        return Ok(());
    }
    let request = pb::WaitRequest { version, timeout_ms: wait.timeout.as_millis() as u64 };
    let convergence = admin.wait_converged(request).await?.into_inner();
    let connected = convergence.proxies.iter().filter(|p| p.connected && !p.stalled).count();
    if convergence.converged {
        println!(
            "all {connected} connected proxies applied version {version} in {} ms",
            convergence.waited_ms
        );
        for stalled in convergence.proxies.iter().filter(|p| p.stalled) {
            println!(
                "not waited for: {} (service {}) is stalled at version {}",
                stalled.proxy_id, stalled.service, stalled.acked_version
            );
        }
        return Ok(());
    }
    let lagging: Vec<String> = convergence
        .proxies
        .iter()
        .filter(|p| p.connected && p.acked_version < version)
        .map(|p| {
            let reason = if p.rejected_version >= version && !p.rejected_reason.is_empty() {
                format!(", refused: {}", p.rejected_reason)
            } else {
                String::new()
            };
            format!("  {} (service {}, at version {}{reason})", p.proxy_id, p.service, p.acked_version)
        })
        .collect();
    Err(Failure(
        format!(
            "version {version} did not reach every proxy within {}; lagging:\n{}",
            humantime::format_duration(wait.timeout),
            lagging.join("\n")
        ),
        3,
    ))
}

/// Rows of a listing; each keeps its columns in the order shown.
type Rows = Vec<Vec<(&'static str, Value)>>;

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
    set("protocol", p.protocol.clone().map(Value::from));
    set("timeout_ms", p.timeout_ms.map(Value::from));
    set("connect_timeout_ms", p.connect_timeout_ms.map(Value::from));
    set("retry_attempts", p.retry_attempts.map(Value::from));
    set("retry_on", (!p.retry_on.is_empty()).then(|| json!(p.retry_on)));
    set("retry_non_idempotent", p.retry_non_idempotent.map(Value::from));
    set("retry_budget_ratio", p.retry_budget_ratio.map(Value::from));
    set("retry_budget_min_per_second", p.retry_budget_min_per_second.map(Value::from));
    set("breaker_failures", p.breaker_consecutive_failures.map(Value::from));
    set("breaker_base_ejection_ms", p.breaker_base_ejection_ms.map(Value::from));
    set("breaker_max_ejection_ms", p.breaker_max_ejection_ms.map(Value::from));
    set("permissive", p.permissive.map(Value::from));
    set("allow_from", p.allow_from.clone().map(Value::from));
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

fn ago(unix_ms: u64) -> Value {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!(now.saturating_sub(unix_ms))
}

fn proxies(list: &[pb::ProxyStatus]) -> Rows {
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

fn status_rows(status: &pb::Convergence) -> Rows {
    status
        .proxies
        .iter()
        .map(|p| {
            vec![
                ("proxy_id", json!(p.proxy_id)),
                ("service", json!(p.service)),
                ("connected", json!(p.connected)),
                ("stalled", json!(p.stalled)),
                ("acked_version", json!(p.acked_version)),
                ("lag", json!(status.version.saturating_sub(p.acked_version))),
                ("last_contact_ms_ago", ago(p.last_contact_unix_ms)),
                ("rejected_version", json!(p.rejected_version)),
                ("rejected_reason", json!(p.rejected_reason)),
            ]
        })
        .collect()
}

fn print_rows(output: Output, rows: &Rows) {
    // A closed pipe (`meshctl get instances | head`) ends the output quietly.
    let _ = write_rows(&mut std::io::stdout().lock(), output, rows);
}

/// The widest a table cell gets, in characters.
const MAX_CELL: usize = 40;

fn write_rows(out: &mut impl std::io::Write, output: Output, rows: &Rows) -> std::io::Result<()> {
    if output == Output::Json {
        let objects: Vec<serde_json::Map<String, Value>> =
            rows.iter().map(|r| r.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()).collect();
        return writeln!(out, "{}", serde_json::to_string_pretty(&objects).unwrap_or_else(|_| "[]".into()));
    }
    let Some(first) = rows.first() else {
        return writeln!(out, "(none)");
    };
    let columns: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
    // A long text is cut in tables (`-o json` has it whole).
    let cell = |value: &Value| match value {
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) if s.chars().count() > MAX_CELL => {
            format!("{}…", s.chars().take(MAX_CELL - 1).collect::<String>())
        }
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| rows.iter().map(|r| cell(&r[i].1).chars().count()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(columns.iter().map(|c| c.to_uppercase()).collect()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(|(_, v)| cell(v)).collect()))?;
    }
    Ok(())
}
