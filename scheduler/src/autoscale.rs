//! Autoscaling, pure: given what the mesh measured for a job's service,
//! decide how many instances it should run, and say why.
//!
//! The rule is the one Kubernetes' HPA documents, on the mesh's own
//! measurements and a one-second tick instead of a 15 s sync:
//! - a recommendation is `ceil(total / target)` (for p99, the current
//!   count times measured / target), left at the current count while the
//!   measurement is within 10 % of the target, so steady load never
//!   flaps;
//! - a recommendation above the current count is taken at once;
//! - a lower one only when every recommendation over `scale_down_after`
//!   asked for fewer, and then the highest of them.
//!
//! In-flight counts are sampled once a second by each sidecar; the mean
//! over the last two seconds is used, so one odd sample moves nothing.

use std::collections::VecDeque;
use std::time::Duration;

use crate::job::{ScalePolicy, ScaleTarget};

/// Within this fraction of the target, the count stays.
pub const TOLERANCE: f64 = 0.1;

/// In-flight samples are averaged over this long.
pub const SMOOTHING: Duration = Duration::from_secs(2);

/// Fewer requests than this in the window say nothing about a p99.
pub const MIN_REQUESTS_FOR_P99: u64 = 20;

/// What the mesh measured for one service over the last seconds, summed
/// over its versions and its sidecars.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests in flight now.
    pub in_flight: f64,
    pub requests_per_second: f64,
    /// Requests in the window.
    pub requests: u64,
    /// p99 latency over the window; `None` without requests.
    pub p99: Option<Duration>,
    /// Callers' requests that wait for an instance or found none.
    pub waiting: u64,
}

/// A change of the instance count, with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} → {}: {}", self.from, self.to, self.reason)
    }
}

/// One job's autoscaling state: its count and recent recommendations.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    replicas: u32,
    /// (when, count wanted) over the last `scale_down_after`.
    recommendations: VecDeque<(Duration, u32)>,
    /// (when, in flight) over the last `SMOOTHING`.
    in_flight: VecDeque<(Duration, f64)>,
    /// When this state began: nothing is removed before a whole
    /// stabilization window has been seen.
    since: Duration,
    /// The latest measurement, as a user would read it.
    measured: String,
}

impl Autoscaler {
    /// Starts at `replicas` (kept within the policy's bounds) at `now`.
    pub fn new(policy: &ScalePolicy, replicas: u32, now: Duration) -> Autoscaler {
        let replicas = replicas.clamp(policy.min, policy.max);
        Autoscaler {
            replicas,
            recommendations: VecDeque::new(),
            in_flight: VecDeque::new(),
            since: now,
            measured: "no measurement yet".to_owned(),
        }
    }

    /// The count the job should run.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// The latest measurement against the target, e.g. "41.0 in flight
    /// per instance > target 20".
    pub fn measured(&self) -> &str {
        &self.measured
    }

    /// Takes the measurement of `now` and decides; `None`: no change.
    pub fn observe(&mut self, policy: &ScalePolicy, now: Duration, load: &Load) -> Option<Decision> {
        let from = self.replicas;
        // New bounds in the job file apply at once.
        if !(policy.min..=policy.max).contains(&from) {
            self.replicas = from.clamp(policy.min, policy.max);
            self.recommendations.clear();
            let reason = format!("the job's bounds are now min {} and max {}", policy.min, policy.max);
            return Some(Decision { from, to: self.replicas, reason });
        }
        self.in_flight.push_back((now, load.in_flight));
        while self.in_flight.front().is_some_and(|(at, _)| *at + SMOOTHING <= now) {
            self.in_flight.pop_front();
        }
        let in_flight = self.in_flight.iter().map(|(_, n)| n).sum::<f64>() / self.in_flight.len() as f64;
        let load = Load { in_flight, ..load.clone() };
        let (wanted, measured) = recommend(policy, from, &load);
        self.measured.clone_from(&measured);
        self.recommendations.push_back((now, wanted));
        while self.recommendations.front().is_some_and(|(at, _)| *at + policy.scale_down_after <= now) {
            self.recommendations.pop_front();
        }
        if wanted > from {
            self.replicas = wanted;
            return Some(Decision { from, to: wanted, reason: measured });
        }
        let seen_whole_window = now.saturating_sub(self.since) >= policy.scale_down_after;
        let stable = self.recommendations.iter().map(|(_, n)| *n).max().unwrap_or(from);
        if stable < from && seen_whole_window {
            self.replicas = stable;
            let window = humantime::format_duration(policy.scale_down_after);
            let reason = format!("no more than {stable} wanted for {window} ({measured})");
            return Some(Decision { from, to: stable, reason });
        }
        None
    }
}

fn requests(n: u64) -> String {
    if n == 1 {
        "1 request".to_owned()
    } else {
        format!("{n} requests")
    }
}

/// The count `load` calls for, within the policy's bounds, and the
/// measurement it rests on as a user would read it.
pub fn recommend(policy: &ScalePolicy, current: u32, load: &Load) -> (u32, String) {
    let idle = load.requests == 0 && load.in_flight < 0.5 && load.waiting == 0;
    if current == 0 {
        if load.waiting > 0 || !idle {
            let wanted = match policy.target {
                ScaleTarget::InFlightPerInstance(t) => (load.in_flight / t).ceil() as u32,
                ScaleTarget::RpsPerInstance(t) => (load.requests_per_second / t).ceil() as u32,
                ScaleTarget::P99(_) => 1,
            };
            let why = if load.in_flight >= 0.5 {
                format!("{} held by callers for an instance", requests(load.in_flight.ceil() as u64))
            } else if load.waiting > 0 {
                format!("{} found no instance", requests(load.waiting))
            } else {
                format!("{:.1} requests per second and no instance", load.requests_per_second)
            };
            return (wanted.clamp(policy.min.max(1), policy.max), why);
        }
        return (policy.min, "no requests".to_owned());
    }
    let per_instance = |total: f64| total / f64::from(current);
    let by_total = |total: f64, target: f64, unit: &str| {
        let measured = per_instance(total);
        let ratio = measured / target;
        let (wanted, relation) = if (ratio - 1.0).abs() <= TOLERANCE {
            (current, "≈")
        } else {
            ((total / target).ceil() as u32, if ratio > 1.0 { ">" } else { "<" })
        };
        (wanted, format!("{measured:.1} {unit} per instance {relation} target {target}"))
    };
    let (wanted, why) = match policy.target {
        ScaleTarget::InFlightPerInstance(t) => by_total(load.in_flight, t, "in flight"),
        ScaleTarget::RpsPerInstance(t) => by_total(load.requests_per_second, t, "requests/s"),
        ScaleTarget::P99(target) => match load.p99 {
            _ if idle => (policy.min, "no requests".to_owned()),
            Some(p99) if load.requests >= MIN_REQUESTS_FOR_P99 => {
                let ratio = p99.as_secs_f64() / target.as_secs_f64();
                let shown =
                    |d: Duration| humantime::format_duration(Duration::from_millis(d.as_millis() as u64));
                if (ratio - 1.0).abs() <= TOLERANCE {
                    (current, format!("p99 {} ≈ target {}", shown(p99), shown(target)))
                } else {
                    let relation = if ratio > 1.0 { ">" } else { "<" };
                    let wanted = (f64::from(current) * ratio).ceil() as u32;
                    (wanted, format!("p99 {} {relation} target {}", shown(p99), shown(target)))
                }
            }
            _ => (current, format!("{} requests are too few to judge a p99", load.requests)),
        },
    };
    (wanted.clamp(policy.min, policy.max), why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32, target: ScaleTarget) -> ScalePolicy {
        ScalePolicy {
            min,
            max,
            target,
            scale_down_after: Duration::from_secs(60),
            hold_requests_for: Duration::from_secs(30),
        }
    }

    fn in_flight(n: f64) -> Load {
        Load { in_flight: n, requests_per_second: n * 10.0, requests: (n * 20.0) as u64, ..Load::default() }
    }

    const IN_FLIGHT_20: ScaleTarget = ScaleTarget::InFlightPerInstance(20.0);

    #[test]
    fn recommendations_follow_the_target_with_a_tolerance() {
        let p99 = |ms| Load {
            requests: 500,
            requests_per_second: 50.0,
            p99: Some(Duration::from_millis(ms)),
            in_flight: 3.0,
            ..Load::default()
        };
        // (target, min, max, current, load) → (wanted, reason)
        let table = [
            (IN_FLIGHT_20, 1, 10, 3, in_flight(123.0), (7, "41.0 in flight per instance > target 20")),
            (IN_FLIGHT_20, 1, 10, 2, in_flight(41.0), (2, "20.5 in flight per instance ≈ target 20")),
            (IN_FLIGHT_20, 1, 10, 4, in_flight(30.0), (2, "7.5 in flight per instance < target 20")),
            (IN_FLIGHT_20, 1, 5, 3, in_flight(400.0), (5, "133.3 in flight per instance > target 20")),
            (IN_FLIGHT_20, 2, 10, 3, in_flight(0.0), (2, "0.0 in flight per instance < target 20")),
            (
                ScaleTarget::RpsPerInstance(200.0),
                1,
                10,
                2,
                Load { requests_per_second: 1000.0, requests: 2000, ..Load::default() },
                (5, "500.0 requests/s per instance > target 200"),
            ),
            (
                ScaleTarget::P99(Duration::from_millis(250)),
                1,
                10,
                2,
                p99(500),
                (4, "p99 500ms > target 250ms"),
            ),
            (
                ScaleTarget::P99(Duration::from_millis(250)),
                1,
                10,
                2,
                p99(260),
                (2, "p99 260ms ≈ target 250ms"),
            ),
            (
                ScaleTarget::P99(Duration::from_millis(250)),
                1,
                10,
                4,
                Load { requests: 5, p99: Some(Duration::from_secs(2)), ..Load::default() },
                (4, "5 requests are too few to judge a p99"),
            ),
            (ScaleTarget::P99(Duration::from_millis(250)), 1, 10, 4, Load::default(), (1, "no requests")),
            // From zero: demand wakes it, at least one instance.
            (
                IN_FLIGHT_20,
                0,
                10,
                0,
                Load { waiting: 3, ..Load::default() },
                (1, "3 requests found no instance"),
            ),
            (IN_FLIGHT_20, 0, 10, 0, in_flight(50.0), (3, "50 requests held by callers for an instance")),
            (
                IN_FLIGHT_20,
                0,
                10,
                0,
                Load { requests: 3, requests_per_second: 1.5, ..Load::default() },
                (1, "1.5 requests per second and no instance"),
            ),
            (IN_FLIGHT_20, 0, 10, 0, Load::default(), (0, "no requests")),
            (IN_FLIGHT_20, 0, 10, 1, Load::default(), (0, "0.0 in flight per instance < target 20")),
        ];
        for (target, min, max, current, load, (wanted, why)) in table {
            let got = recommend(&policy(min, max, target), current, &load);
            assert_eq!(got, (wanted, why.to_owned()), "{target:?} {current} {load:?}");
        }
    }

    /// Feeds one load per second from `start`; returns the decisions with their second.
    fn run(
        scaler: &mut Autoscaler,
        policy: &ScalePolicy,
        start: u64,
        loads: impl IntoIterator<Item = Load>,
    ) -> Vec<(u64, u32, u32)> {
        let mut decisions = Vec::new();
        for (i, load) in loads.into_iter().enumerate() {
            let second = start + i as u64;
            if let Some(d) = scaler.observe(policy, Duration::from_secs(second), &load) {
                decisions.push((second, d.from, d.to));
            }
        }
        decisions
    }

    #[test]
    fn a_load_step_scales_up_within_two_ticks_and_down_only_after_the_window() {
        let policy = ScalePolicy { scale_down_after: Duration::from_secs(10), ..policy(1, 10, IN_FLIGHT_20) };
        let mut scaler = Autoscaler::new(&policy, 2, Duration::ZERO);
        // Steady at 30 in flight on 2 instances: nothing changes for a minute.
        let steady = run(&mut scaler, &policy, 0, std::iter::repeat_n(in_flight(30.0), 60));
        assert_eq!(steady, vec![]);
        // A 2× step: the two-second mean crosses at once, the full count follows.
        let step = run(&mut scaler, &policy, 60, std::iter::repeat_n(in_flight(60.0), 5));
        assert_eq!(step, vec![(60, 2, 3)]);
        // Load removed: nothing goes until 10 s of lower recommendations
        // (the first second's two-second mean still wanted 2).
        let idle = run(&mut scaler, &policy, 65, std::iter::repeat_n(in_flight(10.0), 15));
        assert_eq!(idle, vec![(74, 3, 2), (75, 2, 1)]);
    }

    #[test]
    fn noisy_steady_load_never_flaps() {
        let policy = ScalePolicy { scale_down_after: Duration::from_secs(10), ..policy(1, 10, IN_FLIGHT_20) };
        let mut scaler = Autoscaler::new(&policy, 3, Duration::ZERO);
        // 45 in flight ± 20 % on 3 instances (target 20 → 3 wanted).
        let noisy = (0..120).map(|i| in_flight([45.0, 54.0, 36.0, 50.0, 40.0][i % 5]));
        assert_eq!(run(&mut scaler, &policy, 0, noisy), vec![]);
    }

    #[test]
    fn nothing_is_removed_before_a_whole_window_is_seen() {
        let policy = policy(1, 10, IN_FLIGHT_20);
        // A new leader starts from the count it found running.
        let mut scaler = Autoscaler::new(&policy, 5, Duration::from_secs(1000));
        let decisions = run(&mut scaler, &policy, 1000, std::iter::repeat_n(in_flight(0.0), 61));
        assert_eq!(decisions, vec![(1060, 5, 1)]);
    }

    #[test]
    fn scales_to_zero_when_idle_and_back_on_demand() {
        let policy = ScalePolicy { scale_down_after: Duration::from_secs(5), ..policy(0, 3, IN_FLIGHT_20) };
        let mut scaler = Autoscaler::new(&policy, 1, Duration::ZERO);
        assert_eq!(run(&mut scaler, &policy, 0, std::iter::repeat_n(Load::default(), 6)), vec![(5, 1, 0)]);
        let waiting = Load { waiting: 1, in_flight: 1.0, ..Load::default() };
        assert_eq!(run(&mut scaler, &policy, 6, [waiting]), vec![(6, 0, 1)]);
    }

    #[test]
    fn new_bounds_apply_at_once() {
        let mut scaler = Autoscaler::new(&policy(1, 10, IN_FLIGHT_20), 8, Duration::ZERO);
        let tighter = policy(1, 4, IN_FLIGHT_20);
        let decision = scaler.observe(&tighter, Duration::from_secs(1), &in_flight(160.0)).unwrap();
        assert_eq!(decision.to_string(), "8 → 4: the job's bounds are now min 1 and max 4");
    }
}
