//! Traffic policy beyond a service's defaults: routes (with mirroring and
//! fault injection) on the outbound side, rate limits on the inbound side.
//! Only services that have them reach this code; the request path of every
//! other service pays one pointer test.

pub mod matching;
pub mod rate_limit;
pub mod routes;
