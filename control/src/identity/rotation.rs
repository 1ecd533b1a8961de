//! The trust state and its rotation, as pure data and pure functions.
//!
//! A root is replaced in three stages, each published to every proxy as a
//! new trust bundle and finished only when every proxy has caught up:
//!
//! 1. `Staged`: the new root joins the bundle; the old one still signs.
//!    Done when every proxy has acked the bundle (so all trust both).
//! 2. `Switched`: the new root signs; proxies whose certificate comes from
//!    the old one renew at once. Done when every proxy with a certificate
//!    holds one from the new root.
//! 3. `Steady`: the old root leaves the bundle. Done when every proxy has
//!    acked it.
//!
//! At no stage does a proxy meet a certificate from a root it does not
//! trust, so traffic never fails. A stage that times out leaves both roots
//! trusted; the rotation resumes from where it stopped.

use serde::{Deserialize, Serialize};

use super::ca::{Authority, CaError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// One root, which signs.
    Steady,
    /// Old root signs; the new one is trusted too.
    Staged,
    /// New root signs; the old one is still trusted.
    Switched,
}

impl Stage {
    /// The name `meshctl identity rotate-root` reports for the work of
    /// reaching this stage.
    pub fn step_name(self) -> &'static str {
        match self {
            Stage::Staged => "add-root",
            Stage::Switched => "reissue",
            Stage::Steady => "remove-old-root",
        }
    }
}

/// The root trusted beside the signer during a rotation.
pub struct OtherRoot {
    pub cert_pem: String,
    /// Kept while `Staged`: this root signs next.
    pub key_pem: Option<String>,
}

pub struct Trust {
    pub signer: Authority,
    pub other: Option<OtherRoot>,
    pub stage: Stage,
    /// Grows with every change of the bundle.
    pub bundle_version: u64,
    /// Roots that left the bundle, still accepted to renew a certificate
    /// until their grace ends: a proxy that missed a rotation (stalled,
    /// cut off from meshd) recovers by itself.
    pub retired: Vec<RetiredRoot>,
}

/// A root no longer trusted for traffic, kept to vouch for renewals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetiredRoot {
    pub cert_pem: String,
    /// Renewals under it are accepted until then (Unix ms): a certificate
    /// lifetime after it left, since no certificate it signed lives longer.
    pub renews_until_unix_ms: u64,
}

/// The trust state as the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredTrust {
    pub cert_pem: String,
    pub key_pem: String,
    pub stage: Stage,
    pub other_cert_pem: Option<String>,
    pub other_key_pem: Option<String>,
    pub bundle_version: u64,
    #[serde(default)]
    pub retired: Vec<RetiredRoot>,
}

impl Trust {
    pub fn steady(signer: Authority) -> Trust {
        Trust { signer, other: None, stage: Stage::Steady, bundle_version: 1, retired: Vec::new() }
    }

    /// Every root proxies must trust, as one PEM bundle.
    pub fn roots_pem(&self) -> String {
        let mut roots = self.signer.cert_pem().trim_end().to_owned();
        if let Some(other) = &self.other {
            roots.push('\n');
            roots.push_str(other.cert_pem.trim_end());
        }
        roots.push('\n');
        roots
    }

    /// The roots one by one, for checking certificates against.
    pub fn roots(&self) -> Vec<&str> {
        std::iter::once(self.signer.cert_pem())
            .chain(self.other.as_ref().map(|o| o.cert_pem.as_str()))
            .collect()
    }

    /// Every root a certificate to renew may come from at `now_ms`: the
    /// trusted ones and the retired ones still in their grace.
    pub fn renewal_roots(&self, now_ms: u64) -> Vec<&str> {
        let retired = self.retired.iter().filter(|r| now_ms < r.renews_until_unix_ms);
        self.roots().into_iter().chain(retired.map(|r| r.cert_pem.as_str())).collect()
    }

    /// The state after the next stage: a new root (made by `new_root`)
    /// joins; it starts signing; the old one leaves, and vouches for
    /// renewals for `grace` after `now_ms`.
    pub fn advance(
        self,
        new_root: impl FnOnce() -> Result<Authority, CaError>,
        now_ms: u64,
        grace: std::time::Duration,
    ) -> Result<Trust, CaError> {
        let trust_domain = self.signer.trust_domain().to_owned();
        let bundle_version = self.bundle_version + 1;
        let mut retired: Vec<RetiredRoot> =
            self.retired.into_iter().filter(|r| now_ms < r.renews_until_unix_ms).collect();
        match (self.stage, self.other) {
            (Stage::Steady, _) => {
                let next = new_root()?;
                let other = OtherRoot { cert_pem: next.cert_pem().to_owned(), key_pem: Some(next.key_pem()) };
                let stage = Stage::Staged;
                Ok(Trust { signer: self.signer, other: Some(other), stage, bundle_version, retired })
            }
            (Stage::Staged, Some(OtherRoot { cert_pem, key_pem: Some(key_pem) })) => {
                let signer = Authority::from_pem(&cert_pem, &key_pem, &trust_domain)?;
                let old = OtherRoot { cert_pem: self.signer.cert_pem().to_owned(), key_pem: None };
                Ok(Trust { signer, other: Some(old), stage: Stage::Switched, bundle_version, retired })
            }
            (Stage::Staged, _) => Err(CaError::Authority(
                "the staged root has no key: the stored trust state is damaged".into(),
            )),
            (Stage::Switched, other) => {
                if let Some(old) = other {
                    let renews_until_unix_ms = now_ms + grace.as_millis() as u64;
                    retired.push(RetiredRoot { cert_pem: old.cert_pem, renews_until_unix_ms });
                }
                Ok(Trust { signer: self.signer, other: None, stage: Stage::Steady, bundle_version, retired })
            }
        }
    }

    pub fn to_stored(&self) -> StoredTrust {
        StoredTrust {
            cert_pem: self.signer.cert_pem().to_owned(),
            key_pem: self.signer.key_pem(),
            stage: self.stage,
            other_cert_pem: self.other.as_ref().map(|o| o.cert_pem.clone()),
            other_key_pem: self.other.as_ref().and_then(|o| o.key_pem.clone()),
            bundle_version: self.bundle_version,
            retired: self.retired.clone(),
        }
    }

    pub fn from_stored(stored: StoredTrust, trust_domain: &str) -> Result<Trust, CaError> {
        let signer = Authority::from_pem(&stored.cert_pem, &stored.key_pem, trust_domain)?;
        let other =
            stored.other_cert_pem.map(|cert_pem| OtherRoot { cert_pem, key_pem: stored.other_key_pem });
        let (stage, bundle_version, retired) = (stored.stage, stored.bundle_version, stored.retired);
        Ok(Trust { signer, other, stage, bundle_version, retired })
    }
}

/// What a stage waits on, per proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyView {
    pub id: String,
    /// Connected and not stalled: a proxy that is gone does not hold up a
    /// stage (it gets the bundle when it returns).
    pub counts: bool,
    /// Connected, stalled or not: a stalled proxy may still serve, so a
    /// root it holds a certificate from must not leave the bundle.
    pub connected: bool,
    pub acked_version: u64,
    /// The root of its certificate (serial), "" without a certificate.
    pub certificate_root: String,
}

/// The proxies a stage still waits for: every counting proxy must have
/// acked `published_version` (the routing version that carried the
/// bundle), and in `Switched` every connected one with a certificate, even
/// a stalled one, must hold one from `signer_serial`.
pub fn lagging(
    stage: Stage,
    published_version: u64,
    signer_serial: &str,
    proxies: &[ProxyView],
) -> Vec<String> {
    proxies
        .iter()
        .filter(|p| {
            let behind = p.counts && p.acked_version < published_version;
            let old_certificate = stage == Stage::Switched
                && p.connected
                && !p.certificate_root.is_empty()
                && p.certificate_root != signer_serial;
            behind || old_certificate
        })
        .map(|p| p.id.clone())
        .collect()
}

/// What a stage waits on, per node: its agent calls meshd with the node's
/// certificate and hands the roots to its sidecars.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub name: String,
    /// Heard from within the TTL: a node that is down does not hold up a
    /// stage.
    pub up: bool,
    /// The bundle version the node last renewed with (0: not yet).
    pub bundle_version: u64,
    /// The root of its certificate (serial), "" if it has not said.
    pub certificate_root: String,
}

/// The nodes a stage still waits for: every node that is up must have
/// renewed with `bundle_version` (so it holds this stage's roots and a
/// certificate from its signer), and in `Switched` must hold a certificate
/// from `signer_serial`: once the old root leaves, meshd refuses any other.
pub fn lagging_nodes(
    stage: Stage,
    bundle_version: u64,
    signer_serial: &str,
    nodes: &[NodeView],
) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| {
            let behind = n.bundle_version < bundle_version;
            let old_certificate = stage == Stage::Switched
                && !n.certificate_root.is_empty()
                && n.certificate_root != signer_serial;
            n.up && (behind || old_certificate)
        })
        .map(|n| n.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: std::time::Duration = std::time::Duration::from_secs(60);

    #[test]
    fn a_rotation_adds_switches_then_removes() {
        let first = Authority::generate("mesh.local").unwrap();
        let first_serial = first.serial();
        let trust = Trust::steady(first);
        assert_eq!(trust.roots().len(), 1);

        let staged = trust.advance(|| Authority::generate("mesh.local"), 0, GRACE).unwrap();
        assert_eq!((staged.stage, staged.bundle_version), (Stage::Staged, 2));
        assert_eq!(staged.signer.serial(), first_serial, "the old root still signs");
        assert_eq!(staged.roots().len(), 2);
        assert_eq!(staged.roots_pem().matches("BEGIN CERTIFICATE").count(), 2);

        // The stored form comes back the same, key of the next root included.
        let stored = staged.to_stored();
        let staged = Trust::from_stored(stored.clone(), "mesh.local").unwrap();
        assert_eq!(staged.to_stored(), stored);

        let switched = staged.advance(|| unreachable!("no new root while switching"), 0, GRACE).unwrap();
        assert_eq!((switched.stage, switched.bundle_version), (Stage::Switched, 3));
        assert_ne!(switched.signer.serial(), first_serial, "the new root signs");
        assert_eq!(switched.roots().len(), 2, "the old root is still trusted");
        assert!(switched.other.as_ref().unwrap().key_pem.is_none(), "the old key is dropped");

        let steady = switched.advance(|| unreachable!(), 1_000, GRACE).unwrap();
        assert_eq!((steady.stage, steady.bundle_version), (Stage::Steady, 4));
        assert_eq!(steady.roots().len(), 1);
        assert_ne!(steady.signer.serial(), first_serial);
        // The old root no longer carries traffic but vouches for renewals
        // for a certificate lifetime: (now, roots a renewal may come from).
        for (now, count) in [(1_000, 2), (1_000 + 59_999, 2), (1_000 + 60_000, 1)] {
            assert_eq!(steady.renewal_roots(now).len(), count, "at {now} ms");
        }
        // It survives the store, and the next rotation forgets it once its grace is over.
        let stored = Trust::from_stored(steady.to_stored(), "mesh.local").unwrap();
        assert_eq!(stored.retired.len(), 1);
        let next = stored.advance(|| Authority::generate("mesh.local"), 1_000 + 60_000, GRACE).unwrap();
        assert!(next.retired.is_empty());
    }

    #[test]
    fn a_stage_waits_for_every_live_proxy() {
        let proxy = |id: &str, counts: bool, acked: u64, root: &str| ProxyView {
            id: id.into(),
            counts,
            connected: counts,
            acked_version: acked,
            certificate_root: root.into(),
        };
        let stalled =
            |id: &str, acked: u64, root: &str| ProxyView { connected: true, ..proxy(id, false, acked, root) };
        // (stage, proxies, lagging)
        let table: Vec<(Stage, Vec<ProxyView>, Vec<&str>)> = vec![
            (Stage::Staged, vec![proxy("a", true, 10, "old"), proxy("b", true, 9, "old")], vec!["b"]),
            (Stage::Staged, vec![proxy("a", true, 10, "old"), proxy("gone", false, 1, "old")], vec![]),
            (Stage::Switched, vec![proxy("a", true, 10, "new"), proxy("b", true, 11, "old")], vec!["b"]),
            // Without a certificate a proxy only has to ack.
            (Stage::Switched, vec![proxy("plain", true, 10, "")], vec![]),
            (Stage::Steady, vec![proxy("a", true, 10, "old")], vec![]),
            // A stalled proxy holds up no ack, but its old certificate keeps the old root.
            (Stage::Staged, vec![stalled("s", 9, "old")], vec![]),
            (Stage::Switched, vec![stalled("s", 9, "old")], vec!["s"]),
            (Stage::Switched, vec![stalled("s", 9, "new")], vec![]),
        ];
        for (stage, proxies, want) in table {
            assert_eq!(lagging(stage, 10, "new", &proxies), want, "{stage:?} {proxies:?}");
        }
    }

    #[test]
    fn a_stage_waits_for_every_node_that_is_up() {
        let node = |name: &str, up: bool, version: u64, root: &str| NodeView {
            name: name.into(),
            up,
            bundle_version: version,
            certificate_root: root.into(),
        };
        // (stage, nodes, lagging); the stage's bundle version is 3, its signer "new".
        let table: Vec<(Stage, Vec<NodeView>, Vec<&str>)> = vec![
            (Stage::Staged, vec![node("a", true, 3, "old"), node("b", true, 2, "old")], vec!["b"]),
            // A node that is down is not waited for.
            (Stage::Staged, vec![node("down", false, 1, "old")], vec![]),
            // One that has not renewed since it started is.
            (Stage::Staged, vec![node("fresh", true, 0, "old")], vec!["fresh"]),
            (Stage::Switched, vec![node("a", true, 3, "new"), node("b", true, 3, "old")], vec!["b"]),
            // An agent that does not say its root is judged by its version alone.
            (Stage::Switched, vec![node("quiet", true, 3, "")], vec![]),
            (Stage::Steady, vec![node("a", true, 3, "new"), node("b", true, 2, "new")], vec!["b"]),
        ];
        for (stage, nodes, want) in table {
            assert_eq!(lagging_nodes(stage, 3, "new", &nodes), want, "{stage:?} {nodes:?}");
        }
    }
}
