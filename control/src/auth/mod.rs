//! Who may call what on meshd. Every connection is TLS; a client
//! certificate from the mesh's CA names the caller (`principal`); every
//! gRPC method has a requirement in one table (`policy`), checked by one
//! layer in front of all services (`layer`) before any handler runs. A
//! method missing from the table is refused, so a new one cannot be added
//! unprotected. Users and their roles live in the store (`users`); nodes
//! join with single-use tokens (`join`).

pub mod join;
pub mod layer;
pub mod policy;
pub mod principal;
pub mod users;
