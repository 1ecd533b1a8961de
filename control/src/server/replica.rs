//! What a server sharing its store with others follows besides the
//! routing state: jobs another server took or stopped, operators added or
//! revoked elsewhere, and a new trust state from a rotation the leader
//! ran. With the embedded store there is nothing to follow.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use super::identity::TrustKeeper;
use super::jobs::Scheduler;
use super::ControlPlane;
use crate::auth::users::Users;
use crate::store::Stored;

pub fn follow_store(
    control: &Arc<ControlPlane>,
    scheduler: Arc<Scheduler>,
    users: Arc<Users>,
    trust: Arc<TrustKeeper>,
) {
    if !control.replicated() {
        return;
    }
    let mut events = control.store_events();
    let control = control.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    for change in &event.changes {
                        match change {
                            Stored::Job(name, job) => scheduler.follow_job(name, job.clone()),
                            Stored::User(name, user) => users.follow(name, user.clone()),
                            Stored::Trust(Some(stored)) => trust.adopt(stored.clone()),
                            Stored::Trust(None) | Stored::Service(..) => {}
                        }
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    // Too far behind to know what changed: read it all again.
                    tracing::warn!(
                        missed,
                        "fell behind the store's feed; reading jobs, operators and the CA again"
                    );
                    let store = control.store();
                    match (store.load_jobs(), store.load_users(), store.load_trust()) {
                        (Ok(jobs), Ok(all_users), Ok(stored_trust)) => {
                            scheduler.follow_all_jobs(jobs);
                            users.replace_all(all_users);
                            if let Some(stored) = stored_trust {
                                trust.adopt(stored);
                            }
                        }
                        (jobs, all_users, stored_trust) => {
                            tracing::error!(?jobs, ?all_users, ?stored_trust, "cannot read the store again");
                        }
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}
