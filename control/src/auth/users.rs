//! Operators of the mesh: a name, a role, and the serial of the one
//! credential that is theirs now. Held in memory for the per-call check
//! and written through to the store, so a revocation or a new credential
//! counts at the next call, also after a restart.

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use super::policy::Role;
use crate::store::{Store, StoreError};

/// One user as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUser {
    pub role: Role,
    /// The serial (hex) of the user's current certificate; any other is refused.
    pub serial: String,
}

#[derive(Debug, Default)]
pub struct Users {
    users: RwLock<BTreeMap<String, StoredUser>>,
}

impl Users {
    pub fn load(store: &dyn Store) -> Result<Users, StoreError> {
        Ok(Users { users: RwLock::new(store.load_users()?.into_iter().collect()) })
    }

    /// The role of `name` when `serial` is their current credential.
    pub fn role_of(&self, name: &str, serial: &str) -> Result<Role, String> {
        let users = self.users.read().expect("users lock");
        match users.get(name) {
            None => Err(format!("the credential of user {name:?} was revoked (or never issued here)")),
            Some(user) if user.serial != serial => {
                Err(format!("this credential of user {name:?} was replaced by a newer one"))
            }
            Some(user) => Ok(user.role),
        }
    }

    /// Another server stored `user` under `name` (or, `None`, revoked it).
    pub fn follow(&self, name: &str, user: Option<StoredUser>) {
        let mut users = self.users.write().expect("users lock");
        match user {
            Some(user) => users.insert(name.to_owned(), user),
            None => users.remove(name),
        };
    }

    pub fn replace_all(&self, all: Vec<(String, StoredUser)>) {
        *self.users.write().expect("users lock") = all.into_iter().collect();
    }

    pub fn get(&self, name: &str) -> Option<StoredUser> {
        self.users.read().expect("users lock").get(name).cloned()
    }

    pub fn list(&self) -> Vec<(String, StoredUser)> {
        self.users.read().expect("users lock").iter().map(|(n, u)| (n.clone(), u.clone())).collect()
    }

    /// Stores `user` under `name` (a new user, or a new credential for one).
    pub fn put(&self, store: &dyn Store, name: &str, user: StoredUser) -> Result<(), StoreError> {
        store.swap_user(name, self.get(name).as_ref(), Some(&user))?;
        self.users.write().expect("users lock").insert(name.to_owned(), user);
        Ok(())
    }

    /// Revokes `name`'s credential; false if there was no such user.
    pub fn remove(&self, store: &dyn Store, name: &str) -> Result<bool, StoreError> {
        let Some(previous) = self.get(name) else { return Ok(false) };
        store.swap_user(name, Some(&previous), None)?;
        self.users.write().expect("users lock").remove(name);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_credential_of_a_known_user_counts() {
        let users = Users::default();
        users
            .users
            .write()
            .unwrap()
            .insert("ci".into(), StoredUser { role: Role::Viewer, serial: "02".into() });
        let cases =
            [("ci", "02", Ok(Role::Viewer)), ("ci", "01", Err("replaced")), ("bob", "02", Err("revoked"))];
        for (name, serial, expected) in cases {
            let got = users.role_of(name, serial);
            match expected {
                Ok(role) => assert_eq!(got, Ok(role)),
                Err(word) => {
                    assert!(got.as_ref().is_err_and(|e| e.contains(word)), "{name} {serial}: {got:?}")
                }
            }
        }
    }
}
