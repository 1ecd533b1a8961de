//! Who an instance's app runs as. An agent running as root starts apps as
//! the job's `user`, or else as its `--default-user` (`nobody`), so that a
//! job cannot read the node's credentials, the agent's data dir or another
//! instance's files. An agent that is not root cannot switch users: apps
//! run as the agent's user, and a job that names another user fails to
//! start, saying why.

/// A user to switch to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// The uid and primary gid of the user `name`.
pub fn lookup(name: &str) -> Result<RunAs, String> {
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("user {name:?}: not a user name"))?;
    // SAFETY: passwd is plain data; all zeroes is a valid value to be filled in.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives it.
    let code = unsafe {
        libc::getpwnam_r(c_name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found)
    };
    if code != 0 || found.is_null() {
        return Err(format!("user {name:?} does not exist on this node"));
    }
    Ok(RunAs { uid: entry.pw_uid, gid: entry.pw_gid })
}

/// Whom a job's app runs as: `None` means as the agent itself.
pub fn run_as(job_user: Option<&str>, default_user: &str) -> Result<Option<RunAs>, String> {
    // SAFETY: geteuid has no preconditions.
    let agent_uid = unsafe { libc::geteuid() };
    decide(agent_uid, job_user, default_user, lookup)
}

/// The rule, apart from the system's user database.
fn decide(
    agent_uid: u32,
    job_user: Option<&str>,
    default_user: &str,
    lookup: impl Fn(&str) -> Result<RunAs, String>,
) -> Result<Option<RunAs>, String> {
    if agent_uid == 0 {
        return lookup(job_user.unwrap_or(default_user)).map(Some);
    }
    match job_user {
        None => Ok(None),
        Some(name) if lookup(name)?.uid == agent_uid => Ok(None),
        Some(name) => Err(format!(
            "the job runs as user {name:?}, but this node's agent is not root (uid {agent_uid}) and cannot switch users"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(name: &str) -> Result<RunAs, String> {
        match name {
            "root" => Ok(RunAs { uid: 0, gid: 0 }),
            "nobody" => Ok(RunAs { uid: 65534, gid: 65534 }),
            "alice" => Ok(RunAs { uid: 1000, gid: 1000 }),
            other => Err(format!("user {other:?} does not exist on this node")),
        }
    }

    #[test]
    fn an_app_runs_as_the_job_says_if_the_agent_can_switch() {
        let nobody = Some(RunAs { uid: 65534, gid: 65534 });
        // (agent uid, job's user, expected: Ok(switch to) or an error containing)
        type Case<'a> = (u32, Option<&'a str>, Result<Option<RunAs>, &'a str>);
        let cases: Vec<Case> = vec![
            (0, None, Ok(nobody)),
            (0, Some("alice"), Ok(Some(RunAs { uid: 1000, gid: 1000 }))),
            (0, Some("root"), Ok(Some(RunAs { uid: 0, gid: 0 }))),
            (0, Some("mallory"), Err("does not exist")),
            (1000, None, Ok(None)),
            (1000, Some("alice"), Ok(None)),
            (1000, Some("nobody"), Err("cannot switch users")),
        ];
        for (agent, job_user, expected) in cases {
            let got = decide(agent, job_user, "nobody", users);
            match expected {
                Ok(run_as) => assert_eq!(got, Ok(run_as), "{agent} {job_user:?}"),
                Err(words) => {
                    assert!(got.as_ref().is_err_and(|e| e.contains(words)), "{agent} {job_user:?}: {got:?}")
                }
            }
        }
    }
}
