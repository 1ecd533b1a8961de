//! The behaviour knobs of mesh-echo, changeable at run time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the echo server behaves right now. A whole value is swapped at once,
/// so a request sees one consistent set of knobs.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Knobs {
    #[serde(with = "humantime_serde_compat")]
    pub latency: Duration,
    pub fail_rate: f64,
    pub hang: bool,
    pub not_ready: bool,
    pub not_live: bool,
}

/// A partial update posted to `/_echo/config`; absent fields keep their value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsUpdate {
    pub latency: Option<String>,
    pub fail_rate: Option<f64>,
    pub hang: Option<bool>,
    pub not_ready: Option<bool>,
    pub not_live: Option<bool>,
}

impl Knobs {
    /// Applies an update, or names the field that is wrong and changes nothing.
    pub fn updated(&self, update: KnobsUpdate) -> Result<Knobs, String> {
        let mut next = self.clone();
        if let Some(latency) = update.latency {
            next.latency = humantime::parse_duration(&latency)
                .map_err(|e| format!("field `latency`: {e}: {latency:?}"))?;
        }
        if let Some(rate) = update.fail_rate {
            next.fail_rate = check_fail_rate(rate)?;
        }
        if let Some(hang) = update.hang {
            next.hang = hang;
        }
        if let Some(not_ready) = update.not_ready {
            next.not_ready = not_ready;
        }
        if let Some(not_live) = update.not_live {
            next.not_live = not_live;
        }
        Ok(next)
    }
}

pub fn check_fail_rate(rate: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("field `fail_rate`: must be between 0 and 1, got {rate}"))
    }
}

mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_changes_only_given_fields() {
        let knobs = Knobs { fail_rate: 0.5, ..Knobs::default() };
        let next = knobs.updated(KnobsUpdate { latency: Some("50ms".into()), ..Default::default() }).unwrap();
        assert_eq!(next.latency, Duration::from_millis(50));
        assert_eq!(next.fail_rate, 0.5);
    }

    #[test]
    fn bad_update_names_the_field_and_changes_nothing() {
        let knobs = Knobs::default();
        let err = knobs.updated(KnobsUpdate { fail_rate: Some(1.5), ..Default::default() }).unwrap_err();
        assert!(err.contains("fail_rate"), "{err}");
        let err =
            knobs.updated(KnobsUpdate { latency: Some("soon".into()), ..Default::default() }).unwrap_err();
        assert!(err.contains("latency"), "{err}");
    }
}
