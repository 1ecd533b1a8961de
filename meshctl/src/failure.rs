//! What meshctl reports when a command fails, and its exit code: 2 for what
//! the caller asked wrongly (bad input, unknown names, refusals), 1 for a
//! server unreachable or failing, 3 for a wait that timed out, 4 for
//! `check` warnings, 5 for a server that cannot write its store.

/// A failure to report: the message and the exit code.
pub struct Failure(pub String, pub u8);

/// Exit code when the server is up but cannot write its store: nothing
/// was applied, and retrying will not help until the server's disk does.
pub const EXIT_STORE_WRITE: u8 = 5;

/// The leader a follower named when it refused a call only the leader
/// serves: meshctl asks the same of the leader, once.
static LEADER_HINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn leader_hint() -> Option<&'static str> {
    LEADER_HINT.get().map(String::as_str)
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        if let Some(leader) = status.metadata().get("mesh-leader").and_then(|v| v.to_str().ok()) {
            let _ = LEADER_HINT.set(leader.to_owned());
        }
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

/// Reaching meshd: a credential or address that cannot work is the
/// caller's to fix (2); an unreachable server is 1.
impl From<mesh_client::ClientError> for Failure {
    fn from(error: mesh_client::ClientError) -> Failure {
        let code = if error.is_retryable() { 1 } else { 2 };
        Failure(error.to_string(), code)
    }
}
