//! Canary rollouts gated on the mesh's own measurements, pure: given where
//! a rollout stands, whether the new version's instances are ready and
//! what its callers measured over the last interval, decide whether the
//! step holds, moves on, completes or fails, and say why.
//!
//! A step's clock starts once its instances are ready; it is judged when
//! a whole interval has passed, on that interval's traffic. Too little
//! traffic holds the step with the reason, and fails the rollout once it
//! has held for `stall_after`: never a silent pass, never a silent stall.

use std::time::Duration;

/// How a canary rollout moves (`[update] strategy = "canary"`).
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryPolicy {
    /// Percent of traffic to the new version at each step; the last is 100.
    pub steps: Vec<u32>,
    pub interval: Duration,
    /// The least share of successful requests, 0–1.
    pub success_rate: f64,
    pub p99: Option<Duration>,
    /// Fewer requests in an interval hold the step.
    pub min_requests: u64,
    /// A step held this long for too little traffic fails the rollout.
    pub stall_after: Duration,
}

/// What the new version's callers measured over the last interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub requests: u64,
    /// 0–1; 1 without requests.
    pub success_rate: f64,
    pub p99: Option<Duration>,
}

/// Where a rollout stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Canary {
    /// The step in force (index into `steps`).
    pub step: usize,
    /// When the step's instances were all ready: its interval runs from here.
    pub step_since: Option<Duration>,
    /// Since when the new version's instances have not all been ready.
    pub unready_since: Option<Duration>,
    /// Since when the step has held for too little traffic.
    pub low_since: Option<Duration>,
    pub paused: bool,
}

/// One gate's verdict, for `meshctl rollout status`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub name: &'static str,
    pub measured: String,
    pub threshold: String,
    pub passed: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The step stays; why.
    Stay(String),
    /// The step passed its gates; the next is in force.
    Advanced(String),
    /// The last step passed: the new version takes all traffic.
    Promoted(String),
    /// Roll back; why (which gate, with the measured value).
    Failed(String),
}

impl CanaryPolicy {
    /// The new version's share at `step`.
    pub fn weight(&self, step: usize) -> u32 {
        self.steps.get(step).copied().unwrap_or(100)
    }

    /// Instances of the new version at `step`: enough for its share of
    /// `replicas`, at least one.
    pub fn new_replicas(&self, step: usize, replicas: u32) -> u32 {
        let share = u64::from(replicas) * u64::from(self.weight(step));
        (share.div_ceil(100) as u32).clamp(1, replicas.max(1))
    }

    /// Each gate against `measured`.
    pub fn gates(&self, measured: &Measured) -> Vec<Gate> {
        let mut gates = vec![
            Gate {
                name: "requests",
                measured: measured.requests.to_string(),
                threshold: format!("≥ {}", self.min_requests),
                passed: measured.requests >= self.min_requests,
            },
            Gate {
                name: "success rate",
                measured: percent(measured.success_rate),
                threshold: format!("≥ {}", percent(self.success_rate)),
                passed: measured.success_rate >= self.success_rate,
            },
        ];
        if let Some(p99) = self.p99 {
            gates.push(Gate {
                name: "p99",
                measured: measured.p99.map_or_else(|| "none".to_owned(), millis),
                threshold: format!("≤ {}", millis(p99)),
                passed: measured.p99.is_none_or(|m| m <= p99),
            });
        }
        gates
    }
}

fn percent(rate: f64) -> String {
    format!("{:.2} %", rate * 100.0)
}

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

impl Canary {
    /// Judges the rollout at `now`. `ready`: every instance the step
    /// wants of the new version is ready; `measured`: its callers' view
    /// over the last interval; `healthy_deadline`: how long its instances
    /// may take to become ready.
    pub fn judge(
        &mut self,
        policy: &CanaryPolicy,
        healthy_deadline: Duration,
        now: Duration,
        ready: bool,
        measured: &Measured,
    ) -> Verdict {
        let weight = policy.weight(self.step);
        let at = format!("step {} of {} ({weight} % to the new version)", self.step + 1, policy.steps.len());
        if !ready {
            let since = *self.unready_since.get_or_insert(now);
            self.step_since = None;
            if now.saturating_sub(since) >= healthy_deadline {
                let deadline = humantime::format_duration(healthy_deadline);
                return Verdict::Failed(format!(
                    "the new version's instances were not ready within {deadline}"
                ));
            }
            return Verdict::Stay(format!("{at}: waiting for the new version's instances to be ready"));
        }
        self.unready_since = None;
        if self.paused {
            return Verdict::Stay(format!("{at}: paused (`meshctl rollout resume` goes on)"));
        }
        let since = *self.step_since.get_or_insert(now);
        let elapsed = now.saturating_sub(since);
        if elapsed < policy.interval {
            let left = Duration::from_secs((policy.interval - elapsed).as_secs_f64().ceil() as u64);
            return Verdict::Stay(format!("{at}: judged in {}", humantime::format_duration(left)));
        }
        let window = humantime::format_duration(policy.interval);
        if measured.requests < policy.min_requests {
            let low = *self.low_since.get_or_insert(now);
            let held = now.saturating_sub(low);
            let why = format!(
                "{} requests to the new version in the last {window}, fewer than min_requests {}",
                measured.requests, policy.min_requests
            );
            if held >= policy.stall_after {
                let stall = humantime::format_duration(policy.stall_after);
                return Verdict::Failed(format!(
                    "too little traffic to judge the new version for {stall}: {why}"
                ));
            }
            return Verdict::Stay(format!("{at}: holding: {why}"));
        }
        self.low_since = None;
        let gates = policy.gates(measured);
        if let Some(failed) = gates.iter().find(|g| !g.passed) {
            return Verdict::Failed(format!(
                "{} {} breaks its gate {} over {window} ({} requests) at {at}",
                failed.name, failed.measured, failed.threshold, measured.requests
            ));
        }
        let shown: Vec<String> = gates.iter().skip(1).map(|g| format!("{} {}", g.name, g.measured)).collect();
        let passed =
            format!("{at} passed: {} over {window} ({} requests)", shown.join(", "), measured.requests);
        if self.step + 1 >= policy.steps.len() {
            return Verdict::Promoted(passed);
        }
        self.step += 1;
        self.step_since = None;
        Verdict::Advanced(format!("{passed}; now {} % to the new version", policy.weight(self.step)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CanaryPolicy {
        CanaryPolicy {
            steps: vec![5, 25, 50, 100],
            interval: Duration::from_secs(30),
            success_rate: 0.995,
            p99: Some(Duration::from_millis(300)),
            min_requests: 50,
            stall_after: Duration::from_secs(120),
        }
    }

    fn measured(requests: u64, success_rate: f64, p99_ms: u64) -> Measured {
        Measured { requests, success_rate, p99: Some(Duration::from_millis(p99_ms)) }
    }

    const HEALTHY: Duration = Duration::from_secs(60);

    /// Runs `judge` at each (second, ready, measured); returns each verdict's
    /// kind and the step after it.
    fn run(canary: &mut Canary, events: &[(u64, bool, Measured)]) -> Vec<(u64, &'static str, usize)> {
        events
            .iter()
            .map(|(second, ready, m)| {
                let verdict = canary.judge(&policy(), HEALTHY, Duration::from_secs(*second), *ready, m);
                let kind = match verdict {
                    Verdict::Stay(_) => "stay",
                    Verdict::Advanced(_) => "advanced",
                    Verdict::Promoted(_) => "promoted",
                    Verdict::Failed(_) => "failed",
                };
                (*second, kind, canary.step)
            })
            .collect()
    }

    #[test]
    fn a_healthy_version_moves_a_step_per_interval_from_when_it_is_ready() {
        let good = measured(400, 1.0, 20);
        let mut canary = Canary::default();
        let verdicts = run(
            &mut canary,
            &[
                (0, false, good.clone()),
                (5, true, good.clone()),
                (34, true, good.clone()),
                (35, true, good.clone()),
                (36, true, good.clone()),
                (66, true, good.clone()),
                (67, true, good.clone()),
                (97, true, good.clone()),
                (98, true, good.clone()),
                (128, true, good.clone()),
            ],
        );
        assert_eq!(
            verdicts,
            vec![
                (0, "stay", 0),
                (5, "stay", 0),
                (34, "stay", 0),
                (35, "advanced", 1),
                (36, "stay", 1),
                (66, "advanced", 2),
                (67, "stay", 2),
                (97, "advanced", 3),
                (98, "stay", 3),
                (128, "promoted", 3),
            ]
        );
    }

    #[test]
    fn each_gate_fails_the_rollout_with_its_measured_value() {
        // (measured, the failure names)
        let cases = [
            (measured(400, 0.948, 20), "success rate 94.80 % breaks its gate ≥ 99.50 %"),
            (measured(400, 1.0, 500), "p99 500 ms breaks its gate ≤ 300 ms"),
        ];
        for (m, names) in cases {
            let mut canary = Canary::default();
            canary.judge(&policy(), HEALTHY, Duration::ZERO, true, &m);
            let verdict = canary.judge(&policy(), HEALTHY, Duration::from_secs(30), true, &m);
            let Verdict::Failed(why) = verdict else { panic!("{m:?}: {verdict:?}") };
            assert!(why.starts_with(names) && why.contains("step 1 of 4"), "{why}");
        }
    }

    #[test]
    fn too_little_traffic_holds_with_the_reason_then_fails() {
        let mut canary = Canary::default();
        let few = measured(12, 1.0, 5);
        canary.judge(&policy(), HEALTHY, Duration::ZERO, true, &few);
        let Verdict::Stay(why) = canary.judge(&policy(), HEALTHY, Duration::from_secs(30), true, &few) else {
            panic!("holds")
        };
        assert!(why.ends_with(
            "holding: 12 requests to the new version in the last 30s, fewer than min_requests 50"
        ));
        let Verdict::Stay(_) = canary.judge(&policy(), HEALTHY, Duration::from_secs(149), true, &few) else {
            panic!("still holds before stall_after")
        };
        let Verdict::Failed(why) = canary.judge(&policy(), HEALTHY, Duration::from_secs(150), true, &few)
        else {
            panic!("fails at stall_after")
        };
        assert!(why.starts_with("too little traffic to judge the new version for 2m"), "{why}");
        // Enough traffic again resets the hold.
        let mut canary = Canary::default();
        canary.judge(&policy(), HEALTHY, Duration::ZERO, true, &few);
        canary.judge(&policy(), HEALTHY, Duration::from_secs(30), true, &few);
        let enough = measured(60, 1.0, 5);
        assert!(matches!(
            canary.judge(&policy(), HEALTHY, Duration::from_secs(100), true, &enough),
            Verdict::Advanced(_)
        ));
        assert_eq!(canary.low_since, None);
    }

    #[test]
    fn instances_that_never_become_ready_fail_it_and_a_pause_holds_it() {
        let mut canary = Canary::default();
        let m = Measured::default();
        assert!(matches!(canary.judge(&policy(), HEALTHY, Duration::ZERO, false, &m), Verdict::Stay(_)));
        let Verdict::Failed(why) = canary.judge(&policy(), HEALTHY, Duration::from_secs(60), false, &m)
        else {
            panic!("fails")
        };
        assert_eq!(why, "the new version's instances were not ready within 1m");
        let mut canary = Canary { paused: true, ..Canary::default() };
        let good = measured(400, 1.0, 20);
        for second in [0, 30, 300] {
            let verdict = canary.judge(&policy(), HEALTHY, Duration::from_secs(second), true, &good);
            assert!(matches!(&verdict, Verdict::Stay(why) if why.contains("paused")), "{verdict:?}");
        }
    }

    #[test]
    fn the_new_version_gets_instances_for_its_share() {
        // (replicas, step) → new instances
        let table =
            [(4, 0, 1), (4, 1, 1), (4, 2, 2), (4, 3, 4), (10, 0, 1), (10, 1, 3), (1, 0, 1), (0, 3, 1)];
        for (replicas, step, wanted) in table {
            assert_eq!(policy().new_replicas(step, replicas), wanted, "{replicas} at step {step}");
        }
    }
}
