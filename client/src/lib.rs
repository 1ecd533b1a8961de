//! How any process reaches meshd's gRPC port: over TLS, the server's
//! certificate verified against the mesh's trust roots (or, before a node
//! has joined, against the CA its join token pins), with a client
//! certificate when the caller has one. `credentials` is the operator's
//! file that `meshctl` reads.

pub mod channel;
pub mod credentials;
pub mod error;
pub mod pem;
pub mod servers;

pub use channel::{connect, connect_lazy, connect_lazy_to, connect_to, ClientTls};
pub use credentials::Credentials;
pub use error::ClientError;
pub use servers::ServerList;
