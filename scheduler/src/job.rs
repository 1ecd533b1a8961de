//! Job files: TOML, one job per file, as `docs/jobs.md` documents them. Parsing
//! and validation are pure and complete, so `meshctl job run` can refuse a
//! bad file before anything changes; errors name the line and the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::canary::CanaryPolicy;
use crate::{Constraint, JobSpec, Resources, Strategy};
use mesh_common::duration::HumanDuration as Dur;
use mesh_common::file_error::{parse_toml, FileError};
use mesh_common::name::check_name;
use mesh_common::policy::Protocol;

/// A validated job.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    pub service: String,
    pub version: String,
    pub replicas: u32,
    pub kind: JobKind,
    pub command: String,
    pub args: Vec<String>,
    /// Whom the app runs as; `None`: the agent's default (`nobody`).
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub protocol: Protocol,
    pub readiness: Option<Check>,
    pub liveness: Option<Check>,
    pub update: UpdatePolicy,
    pub upstreams: Vec<String>,
    pub constraints: Vec<Constraint>,
    pub strategy: Strategy,
    pub anti_affinity: bool,
    /// Replicas follow the traffic within these bounds; `replicas` is then
    /// only the count to start with.
    pub scale: Option<ScalePolicy>,
    /// The task revision of this version: not in the file, counted by the
    /// server as the task changes under one version (see `same_task`).
    pub revision: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Service,
    Batch,
}

/// A health check the agent runs against an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    Http(String),
    Tcp,
    Grpc,
    Exec(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpdatePolicy {
    pub max_parallel: u32,
    pub min_healthy: Duration,
    pub canary: u32,
    pub auto_revert: bool,
    /// A new version not healthy within this long has failed its update.
    pub healthy_deadline: Duration,
    /// `strategy = "canary"`: traffic moves to the new version in steps,
    /// each gated on its callers' measurements. `None`: a rolling update.
    pub gated: Option<CanaryPolicy>,
}

/// How a job scales on the traffic its sidecars report (`[scale]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScalePolicy {
    pub min: u32,
    pub max: u32,
    pub target: ScaleTarget,
    /// Instances are removed only when every recommendation over this
    /// long asked for fewer.
    pub scale_down_after: Duration,
    /// With no instance ready (scaled to zero), how long callers' sidecars
    /// hold a request for one.
    pub hold_requests_for: Duration,
}

/// What one instance should carry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleTarget {
    InFlightPerInstance(f64),
    RpsPerInstance(f64),
    /// The service's p99 latency, as its own sidecars measure it.
    P99(Duration),
}

/// A job file that cannot be used, with where and why.
pub type JobError = FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    service: Option<Spanned<String>>,
    version: Spanned<String>,
    replicas: Option<Spanned<u32>>,
    kind: Option<RawKind>,
    task: RawTask,
    resources: Option<RawResources>,
    #[serde(default)]
    ports: Vec<RawPort>,
    health: Option<RawHealth>,
    update: Option<Spanned<RawUpdate>>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    constraints: Vec<RawConstraint>,
    placement: Option<RawPlacement>,
    scale: Option<Spanned<RawScale>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScale {
    min: Option<u32>,
    max: u32,
    target: RawScaleTarget,
    scale_down_after: Option<Dur>,
    hold_requests_for: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaleTarget {
    in_flight_per_instance: Option<f64>,
    rps_per_instance: Option<f64>,
    p99: Option<Dur>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Service,
    Batch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    command: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    user: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu_millis: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    /// Read so that a misspelt key is refused; one port per job today.
    #[allow(dead_code)]
    name: String,
    protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    readiness: Option<Spanned<RawCheck>>,
    liveness: Option<Spanned<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    http: Option<String>,
    tcp: Option<bool>,
    grpc: Option<bool>,
    exec: Option<Vec<String>>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    failures: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    max_parallel: Option<Spanned<u32>>,
    min_healthy: Option<Dur>,
    canary: Option<u32>,
    auto_revert: Option<bool>,
    healthy_deadline: Option<Dur>,
    strategy: Option<RawUpdateStrategy>,
    steps: Option<Vec<u32>>,
    interval: Option<Dur>,
    success_rate: Option<f64>,
    p99: Option<Dur>,
    min_requests: Option<u64>,
    stall_after: Option<Dur>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawUpdateStrategy {
    Rolling,
    Canary,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstraint {
    attribute: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    strategy: Option<RawStrategy>,
    anti_affinity: Option<bool>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum RawStrategy {
    BinPack,
    Spread,
}

/// Parses and validates a job file's text; nothing is applied here.
pub fn parse_job(text: &str) -> Result<Job, JobError> {
    let error = |span: Option<std::ops::Range<usize>>, field: &str, message: String| {
        FileError::at(text, span, field, message)
    };
    let raw: RawJob = parse_toml(text)?;
    let named = |field: &str, value: &Spanned<String>| {
        check_name(field, value.get_ref()).map_err(|e| error(Some(value.span()), field, e))
    };
    named("name", &raw.name)?;
    named("version", &raw.version)?;
    if let Some(service) = &raw.service {
        named("service", service)?;
    }
    let starts_at_zero = raw.scale.as_ref().is_some_and(|s| s.get_ref().min == Some(0));
    let replicas = match &raw.replicas {
        // Zero instances only for a job that scales from zero.
        Some(r) if *r.get_ref() > 1000 || (*r.get_ref() == 0 && !starts_at_zero) => {
            return Err(error(
                Some(r.span()),
                "replicas",
                format!("must be from 1 to 1000, got {}", r.get_ref()),
            ))
        }
        Some(r) => *r.get_ref(),
        None => 1,
    };
    if let Some(user) = &raw.task.user {
        let name = user.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && !name.starts_with('-');
        if !valid {
            return Err(error(Some(user.span()), "task.user", format!("{name:?} is not a user name")));
        }
    }
    if raw.task.command.get_ref().trim().is_empty() {
        return Err(error(Some(raw.task.command.span()), "task.command", "must name a program".into()));
    }
    let mut resources = Resources { cpu_millis: 100, memory_mb: 64 };
    if let Some(r) = &raw.resources {
        for (field, value, slot) in [
            ("resources.cpu_millis", &r.cpu_millis, &mut resources.cpu_millis),
            ("resources.memory_mb", &r.memory_mb, &mut resources.memory_mb),
        ] {
            if let Some(value) = value {
                if *value.get_ref() == 0 {
                    return Err(error(Some(value.span()), field, "must be more than 0".into()));
                }
                *slot = *value.get_ref();
            }
        }
    }
    let mut protocol = Protocol::Http;
    if let Some(port) = raw.ports.first() {
        if let Some(p) = &port.protocol {
            protocol = p.get_ref().parse().map_err(|e| error(Some(p.span()), "ports[0].protocol", e))?;
        }
    }
    let check = |field: &str, raw: &Option<Spanned<RawCheck>>| -> Result<Option<Check>, JobError> {
        let Some(raw) = raw else { return Ok(None) };
        let span = Some(raw.span());
        let c = raw.get_ref();
        let mut probes = Vec::new();
        if let Some(path) = &c.http {
            if !path.starts_with('/') {
                return Err(error(
                    span,
                    &format!("{field}.http"),
                    format!("{path:?} must be a path starting with /"),
                ));
            }
            probes.push(Probe::Http(path.clone()));
        }
        if c.tcp == Some(true) {
            probes.push(Probe::Tcp);
        }
        if c.grpc == Some(true) {
            probes.push(Probe::Grpc);
        }
        if let Some(command) = &c.exec {
            if command.is_empty() {
                return Err(error(span, &format!("{field}.exec"), "needs a command".into()));
            }
            probes.push(Probe::Exec(command.clone()));
        }
        if probes.len() != 1 {
            return Err(error(
                span,
                field,
                "needs exactly one of http, tcp = true, grpc = true, exec".into(),
            ));
        }
        let interval = c.interval.as_ref().map_or(Duration::from_secs(1), |d| d.0);
        let timeout = c.timeout.as_ref().map_or(Duration::from_secs(1), |d| d.0);
        if interval.is_zero() || timeout.is_zero() {
            return Err(error(span, field, "interval and timeout must be longer than zero".into()));
        }
        Ok(Some(Check {
            probe: probes.remove(0),
            interval,
            timeout,
            failures: c.failures.unwrap_or(1).max(1),
        }))
    };
    let (readiness, liveness) = match &raw.health {
        Some(h) => (check("health.readiness", &h.readiness)?, check("health.liveness", &h.liveness)?),
        None => (None, None),
    };
    let mut update = UpdatePolicy {
        max_parallel: 1,
        min_healthy: Duration::from_secs(2),
        canary: 0,
        auto_revert: true,
        healthy_deadline: Duration::from_secs(60),
        gated: None,
    };
    if let Some(spanned) = &raw.update {
        let u = spanned.get_ref();
        if let Some(max_parallel) = &u.max_parallel {
            if *max_parallel.get_ref() == 0 {
                return Err(error(
                    Some(max_parallel.span()),
                    "update.max_parallel",
                    "must be at least 1".into(),
                ));
            }
            update.max_parallel = *max_parallel.get_ref();
        }
        update.min_healthy = u.min_healthy.as_ref().map_or(update.min_healthy, |d| d.0);
        update.canary = u.canary.unwrap_or(0);
        update.auto_revert = u.auto_revert.unwrap_or(true);
        update.healthy_deadline = u.healthy_deadline.as_ref().map_or(update.healthy_deadline, |d| d.0);
        update.gated = gated_policy(u).map_err(|(field, e)| error(Some(spanned.span()), field, e))?;
    }
    let kind = match raw.kind.unwrap_or(RawKind::Service) {
        RawKind::Service => JobKind::Service,
        RawKind::Batch => JobKind::Batch,
    };
    let scale = match &raw.scale {
        Some(raw_scale) => {
            let span = Some(raw_scale.span());
            let policy =
                scale_policy(raw_scale.get_ref()).map_err(|(field, e)| error(span.clone(), field, e))?;
            if kind == JobKind::Batch {
                return Err(error(span, "scale", "a batch job runs to completion and does not scale".into()));
            }
            if let Some(r) = &raw.replicas {
                if !(policy.min..=policy.max).contains(r.get_ref()) {
                    return Err(error(
                        Some(r.span()),
                        "replicas",
                        format!(
                            "with [scale], replicas is the count to start with and must be from min {} to max {}, got {}",
                            policy.min,
                            policy.max,
                            r.get_ref()
                        ),
                    ));
                }
            }
            Some(policy)
        }
        None => None,
    };
    // A scaled job starts at its minimum unless it names a count.
    let replicas = match (&scale, &raw.replicas) {
        (Some(policy), None) => policy.min,
        _ => replicas,
    };
    let mut upstreams = Vec::new();
    for (index, upstream) in raw.upstreams.iter().enumerate() {
        named(&format!("upstreams[{index}].service"), &upstream.service)?;
        upstreams.push(upstream.service.get_ref().clone());
    }
    let name = raw.name.into_inner();
    Ok(Job {
        service: raw.service.map_or_else(|| name.clone(), Spanned::into_inner),
        name,
        version: raw.version.into_inner(),
        replicas,
        kind,
        command: raw.task.command.into_inner(),
        args: raw.task.args,
        user: raw.task.user.map(Spanned::into_inner),
        env: raw.task.env,
        resources,
        protocol,
        readiness,
        liveness,
        update,
        upstreams,
        constraints: raw
            .constraints
            .into_iter()
            .map(|c| Constraint { attribute: c.attribute, value: c.value })
            .collect(),
        strategy: match raw.placement.as_ref().and_then(|p| p.strategy) {
            Some(RawStrategy::Spread) => Strategy::Spread,
            _ => Strategy::BinPack,
        },
        anti_affinity: raw.placement.as_ref().and_then(|p| p.anti_affinity).unwrap_or(false),
        scale,
        revision: 0,
    })
}

/// The canary strategy's settings, checked; `None` for a rolling update.
fn gated_policy(raw: &RawUpdate) -> Result<Option<CanaryPolicy>, (&'static str, String)> {
    let canary_fields = [
        ("steps", raw.steps.is_some()),
        ("interval", raw.interval.is_some()),
        ("success_rate", raw.success_rate.is_some()),
        ("p99", raw.p99.is_some()),
        ("min_requests", raw.min_requests.is_some()),
        ("stall_after", raw.stall_after.is_some()),
    ];
    if raw.strategy != Some(RawUpdateStrategy::Canary) {
        if let Some((field, _)) = canary_fields.iter().find(|(_, set)| *set) {
            return Err(("update.strategy", format!("{field} needs strategy = \"canary\"")));
        }
        return Ok(None);
    }
    if raw.canary.is_some_and(|n| n > 0) {
        return Err((
            "update.canary",
            "a count of canaries awaiting promotion belongs to the rolling strategy; strategy = \"canary\" moves traffic in steps".into(),
        ));
    }
    let steps = raw.steps.clone().unwrap_or_else(|| vec![10, 50, 100]);
    if steps.is_empty() || steps.windows(2).any(|w| w[0] >= w[1]) || steps.iter().any(|s| *s == 0 || *s > 100)
    {
        return Err(("update.steps", format!("must rise from 1 to 100 percent, got {steps:?}")));
    }
    if steps.last() != Some(&100) {
        return Err(("update.steps", format!("must end at 100, got {steps:?}")));
    }
    let interval = raw.interval.as_ref().map_or(Duration::from_secs(30), |d| d.0);
    if interval < Duration::from_secs(1) || interval > Duration::from_secs(60) {
        return Err((
            "update.interval",
            "must be from 1s to 60s: meshd keeps a minute of traffic to judge a step on".into(),
        ));
    }
    let success_rate = raw.success_rate.unwrap_or(0.99);
    if !(0.0..=1.0).contains(&success_rate) {
        return Err(("update.success_rate", format!("must be from 0 to 1, got {success_rate}")));
    }
    let p99 = raw.p99.as_ref().map(|d| d.0);
    if p99.is_some_and(|d| d.is_zero()) {
        return Err(("update.p99", "must be longer than zero".into()));
    }
    Ok(Some(CanaryPolicy {
        steps,
        interval,
        success_rate,
        p99,
        min_requests: raw.min_requests.unwrap_or(20),
        stall_after: raw.stall_after.as_ref().map_or(interval * 5, |d| d.0),
    }))
}

/// Checks a `[scale]` table; an error names the field inside it.
fn scale_policy(raw: &RawScale) -> Result<ScalePolicy, (&'static str, String)> {
    let min = raw.min.unwrap_or(1);
    if raw.max == 0 || raw.max > 1000 {
        return Err(("scale.max", format!("must be from 1 to 1000, got {}", raw.max)));
    }
    if min > raw.max {
        return Err(("scale.min", format!("{min} is more than max {}", raw.max)));
    }
    let t = &raw.target;
    let target = match (t.in_flight_per_instance, t.rps_per_instance, &t.p99) {
        (Some(n), None, None) if n > 0.0 && n.is_finite() => ScaleTarget::InFlightPerInstance(n),
        (None, Some(n), None) if n > 0.0 && n.is_finite() => ScaleTarget::RpsPerInstance(n),
        (None, None, Some(p99)) if !p99.0.is_zero() => ScaleTarget::P99(p99.0),
        (None, None, None) => {
            return Err(("scale.target", "needs one of in_flight_per_instance, rps_per_instance, p99".into()))
        }
        (Some(_), None, None) | (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(("scale.target", "must be more than zero".into()))
        }
        _ => {
            return Err((
                "scale.target",
                "takes exactly one of in_flight_per_instance, rps_per_instance, p99".into(),
            ))
        }
    };
    let scale_down_after = raw.scale_down_after.as_ref().map_or(Duration::from_secs(60), |d| d.0);
    let hold_requests_for = raw.hold_requests_for.as_ref().map_or(Duration::from_secs(30), |d| d.0);
    if hold_requests_for.is_zero() || hold_requests_for > Duration::from_secs(600) {
        return Err(("scale.hold_requests_for", "must be longer than zero and at most 10m".into()));
    }
    Ok(ScalePolicy { min, max: raw.max, target, scale_down_after, hold_requests_for })
}

impl Job {
    /// What the scheduler needs of this job.
    /// Whether `other` runs the same task: the same program, arguments,
    /// environment, resources, protocol, checks and upstream ports. Anything
    /// else (replicas, placement, the update policy) changes no instance.
    pub fn same_task(&self, other: &Job) -> bool {
        (&self.kind, &self.command, &self.args, &self.env, &self.resources, &self.protocol, &self.user)
            == (
                &other.kind,
                &other.command,
                &other.args,
                &other.env,
                &other.resources,
                &other.protocol,
                &other.user,
            )
            && (&self.readiness, &self.liveness, &self.upstreams)
                == (&other.readiness, &other.liveness, &other.upstreams)
    }

    pub fn spec(&self) -> JobSpec {
        JobSpec {
            name: self.name.clone(),
            version: self.version.clone(),
            revision: self.revision,
            replicas: self.replicas,
            resources: self.resources,
            constraints: self.constraints.clone(),
            strategy: self.strategy,
            anti_affinity: self.anti_affinity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
name = "web"
service = "web"
version = "v1"
replicas = 3
kind = "service"

[task]
command = "mesh-echo"
args = ["--message", "hello from v1"]
env = { RUST_LOG = "info" }

[resources]
cpu_millis = 100
memory_mb = 64

[[ports]]
name = "http"
protocol = "http"

[health]
readiness = { http = "/ready", interval = "1s", timeout = "500ms", failures = 1 }
liveness = { http = "/live", interval = "2s", failures = 3 }

[update]
max_parallel = 1
min_healthy = "2s"
canary = 0
auto_revert = true

[[upstreams]]
service = "api"
"#;

    #[test]
    fn the_design_sketch_parses() {
        let job = parse_job(WEB).unwrap();
        assert_eq!((job.name.as_str(), job.replicas, job.kind), ("web", 3, JobKind::Service));
        assert_eq!(job.readiness.as_ref().unwrap().probe, Probe::Http("/ready".into()));
        assert_eq!(job.liveness.as_ref().unwrap().failures, 3);
        assert_eq!(job.upstreams, vec!["api".to_owned()]);
        assert_eq!(job.spec().resources.cpu_millis, 100);
    }

    #[test]
    fn only_task_changes_make_a_new_task() {
        let base = parse_job(WEB).unwrap();
        // (change to the file, same task?)
        let cases = [
            (("replicas = 3", "replicas = 5"), true),
            (("max_parallel = 1", "max_parallel = 2"), true),
            (("args = [\"--message\", \"hello from v1\"]", "args = [\"--message\", \"hi\"]"), false),
            (("RUST_LOG = \"info\"", "RUST_LOG = \"debug\""), false),
            (("memory_mb = 64", "memory_mb = 128"), false),
            (("failures = 3", "failures = 4"), false),
            (("service = \"api\"", "service = \"db\""), false),
            (("command = \"mesh-echo\"", "command = \"other\""), false),
        ];
        for ((from, to), same) in cases {
            assert!(WEB.contains(from), "{from}");
            let changed = parse_job(&WEB.replace(from, to)).unwrap();
            assert_eq!(base.same_task(&changed), same, "{from} -> {to}");
        }
    }

    const SCALED: &str = r#"
name = "web"
version = "v1"

[task]
command = "mesh-echo"

[scale]
min = 2
max = 10
target = { in_flight_per_instance = 20 }
scale_down_after = "30s"
"#;

    #[test]
    fn scale_tables_parse_and_bad_ones_say_why() {
        let job = parse_job(SCALED).unwrap();
        let policy = job.scale.clone().unwrap();
        assert_eq!((job.replicas, policy.min, policy.max), (2, 2, 10), "starts at min");
        assert_eq!(policy.target, ScaleTarget::InFlightPerInstance(20.0));
        assert_eq!(policy.scale_down_after, Duration::from_secs(30));
        let p99 = parse_job(&SCALED.replace("in_flight_per_instance = 20", "p99 = \"250ms\"")).unwrap();
        assert_eq!(p99.scale.unwrap().target, ScaleTarget::P99(Duration::from_millis(250)));
        let zero = parse_job(&SCALED.replace("min = 2", "min = 0")).unwrap();
        assert_eq!(zero.replicas, 0);
        // (replace, with, field, message part)
        let cases = [
            ("min = 2", "min = 11", "scale.min", "more than max 10"),
            ("max = 10", "max = 0", "scale.max", "from 1 to 1000"),
            ("in_flight_per_instance = 20", "in_flight_per_instance = 0", "scale.target", "more than zero"),
            ("{ in_flight_per_instance = 20 }", "{ }", "scale.target", "needs one of"),
            (
                "in_flight_per_instance = 20",
                "in_flight_per_instance = 20, rps_per_instance = 5",
                "scale.target",
                "exactly one",
            ),
            ("name = \"web\"", "name = \"web\"\nreplicas = 12", "replicas", "from min 2 to max 10"),
            ("name = \"web\"", "name = \"web\"\nkind = \"batch\"", "scale", "does not scale"),
            (
                "scale_down_after = \"30s\"",
                "scale_down_after = \"later\"",
                "scale.scale_down_after",
                "unparsable",
            ),
            (
                "scale_down_after = \"30s\"",
                "hold_requests_for = \"1h\"",
                "scale.hold_requests_for",
                "at most 10m",
            ),
        ];
        for (from, to, field, message) in cases {
            let text = SCALED.replacen(from, to, 1);
            assert_ne!(text, SCALED, "{to}");
            let error = parse_job(&text).expect_err(to);
            assert!(error.field.starts_with(field), "{to}: field {:?} should be {field:?}", error.field);
            assert!(error.to_string().contains(message), "{to}: {error}");
        }
        // Without [scale], zero replicas is still refused.
        assert!(parse_job(
            &SCALED.replace("name = \"web\"", "name = \"web\"\nreplicas = 0").replace("min = 2", "min = 0")
        )
        .is_ok());
        let unscaled = WEB.replace("replicas = 3", "replicas = 0");
        assert!(parse_job(&unscaled).is_err());
    }

    #[test]
    fn canary_updates_parse_and_bad_ones_say_why() {
        let canary = "[update]\nstrategy = \"canary\"\nsteps = [5, 25, 50, 100]\ninterval = \"30s\"\nsuccess_rate = 0.995\np99 = \"300ms\"\nmin_requests = 50\n";
        let text = SCALED.replace("[scale]", &format!("{canary}\n[scale]"));
        let policy = parse_job(&text).unwrap().update.gated.unwrap();
        assert_eq!(policy.steps, vec![5, 25, 50, 100]);
        assert_eq!((policy.interval, policy.min_requests), (Duration::from_secs(30), 50));
        assert_eq!((policy.success_rate, policy.p99), (0.995, Some(Duration::from_millis(300))));
        assert_eq!(policy.stall_after, Duration::from_secs(150), "five intervals unless given");
        assert_eq!(parse_job(SCALED).unwrap().update.gated, None, "rolling by default");
        // (replace, with, field, message part)
        let cases = [
            ("steps = [5, 25, 50, 100]", "steps = [5, 25, 50]", "update.steps", "must end at 100"),
            ("steps = [5, 25, 50, 100]", "steps = [25, 5, 100]", "update.steps", "must rise"),
            ("interval = \"30s\"", "interval = \"5m\"", "update.interval", "from 1s to 60s"),
            ("success_rate = 0.995", "success_rate = 99.5", "update.success_rate", "from 0 to 1"),
            (
                "strategy = \"canary\"",
                "strategy = \"rolling\"",
                "update.strategy",
                "needs strategy = \"canary\"",
            ),
            (
                "strategy = \"canary\"",
                "strategy = \"canary\"\ncanary = 1",
                "update.canary",
                "rolling strategy",
            ),
            ("strategy = \"canary\"", "strategy = \"blue-green\"", "update.strategy", "unknown variant"),
        ];
        for (from, to, field, message) in cases {
            let bad = text.replacen(from, to, 1);
            assert_ne!(bad, text, "{to}");
            let error = parse_job(&bad).expect_err(to);
            assert!(error.field.starts_with(field), "{to}: field {:?} should be {field:?}", error.field);
            assert!(error.to_string().contains(message), "{to}: {error}");
        }
    }

    #[test]
    fn bad_job_files_name_line_and_field() {
        // (what, replace, with, field); the error must point at the changed line.
        let cases = [
            ("syntax error", "replicas = 3", "replicas = ", "(file)"),
            ("unknown field", "replicas = 3", "replicaz = 3", "replicaz"),
            ("zero replicas", "replicas = 3", "replicas = 0", "replicas"),
            ("negative memory", "memory_mb = 64", "memory_mb = -64", "resources.memory_mb"),
            ("bad duration", "min_healthy = \"2s\"", "min_healthy = \"soon\"", "update.min_healthy"),
            ("bad protocol", "protocol = \"http\"", "protocol = \"smtp\"", "ports[0].protocol"),
            ("bad name", "name = \"web\"", "name = \"Web App\"", "name"),
            ("two probes", "http = \"/ready\",", "http = \"/ready\", tcp = true,", "health.readiness"),
            ("bad kind", "kind = \"service\"", "kind = \"daemon\"", "kind"),
        ];
        for (what, from, to, field) in cases {
            let text = WEB.replacen(from, to, 1);
            assert_ne!(text, WEB, "{what}");
            let line = text.lines().position(|l| l.contains(to)).unwrap() + 1;
            let error = parse_job(&text).expect_err(what);
            assert!(
                error.field.starts_with(field),
                "{what}: field {:?} should be {field:?} ({error})",
                error.field
            );
            assert_eq!(error.line, Some(line), "{what}: {error}");
        }
    }
}
