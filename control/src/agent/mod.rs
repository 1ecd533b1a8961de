//! The node agent's building blocks: running instances as process groups,
//! restart backoff, and health checks. The agent loop that ties them to the
//! scheduler comes with the rest of the scheduler issue.

pub mod health;
pub mod node;
pub mod process;
pub mod restart;
