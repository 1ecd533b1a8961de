//! A list of meshd servers that a client spreads over and fails over
//! between. Each new connection tries the server that answered last, then
//! the others in turn; the first to complete a TLS handshake is used until
//! it fails. A follower that knows the leader can point the list at it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::error::ClientError;

#[derive(Debug)]
pub struct ServerList {
    servers: Vec<(String, ServerName<'static>)>,
    /// The index of the server to try first.
    current: AtomicUsize,
}

impl ServerList {
    /// Parses `host:port[,host:port…]`. The first server tried is chosen
    /// at random, so that many clients given one list spread over it.
    pub fn parse(list: &str) -> Result<Arc<ServerList>, ClientError> {
        let servers = list
            .split(',')
            .map(str::trim)
            .filter(|addr| !addr.is_empty())
            .map(|addr| Ok((addr.to_owned(), server_name(addr)?)))
            .collect::<Result<Vec<_>, ClientError>>()?;
        if servers.is_empty() {
            return Err(ClientError::Config(format!(
                "{list:?} names no server (host:port, comma-separated)"
            )));
        }
        let first = if servers.len() > 1 { spread(servers.len()) } else { 0 };
        Ok(Arc::new(ServerList { servers, current: AtomicUsize::new(first) }))
    }

    /// Parses `list` with the first server chosen by `key` (a proxy's id,
    /// a node's name): clients spread over the servers, and a given client
    /// starts at the same one every time.
    pub fn parse_spread_by(list: &str, key: &str) -> Result<Arc<ServerList>, ClientError> {
        let servers = ServerList::parse(list)?;
        servers.current.store(first_index(key, servers.len()), Ordering::Relaxed);
        Ok(servers)
    }

    /// The server tried first: the one that answered last.
    pub fn current(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()].0
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Makes `addr` the server tried first; false if it is not in the list.
    pub fn prefer(&self, addr: &str) -> bool {
        match self.servers.iter().position(|(known, _)| known == addr) {
            Some(index) => {
                self.current.store(index, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The servers in the order a connection tries them.
    pub(crate) fn in_turn(&self) -> impl Iterator<Item = (usize, &(String, ServerName<'static>))> {
        let start = self.current.load(Ordering::Relaxed);
        (0..self.servers.len()).map(move |i| {
            let index = (start + i) % self.servers.len();
            (index, &self.servers[index])
        })
    }

    pub(crate) fn answered(&self, index: usize) {
        self.current.store(index, Ordering::Relaxed);
    }
}

/// Where a client keyed `key` starts in a list of `n` servers: FNV-1a, a
/// hash that never changes between versions.
pub fn first_index(key: &str, n: usize) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % n.max(1) as u64) as usize
}

/// A start index in `0..n`, different from process to process.
fn spread(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return 0;
    }
    (u64::from_le_bytes(bytes) % n as u64) as usize
}

/// The name the server's certificate must carry for `addr` (host:port).
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, ClientError> {
    let host = match addr.parse::<std::net::SocketAddr>() {
        Ok(socket) => return Ok(ServerName::IpAddress(socket.ip().into())),
        Err(_) => addr.rsplit_once(':').map_or(addr, |(host, _)| host),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Config(format!("{addr:?} is not host:port: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_tried_from_the_server_that_answered_last() {
        let list = ServerList::parse("127.0.0.1:1, 127.0.0.2:2,127.0.0.3:3").unwrap();
        list.answered(1);
        let order: Vec<&str> = list.in_turn().map(|(_, (addr, _))| addr.as_str()).collect();
        assert_eq!(order, ["127.0.0.2:2", "127.0.0.3:3", "127.0.0.1:1"]);
        assert!(list.prefer("127.0.0.3:3"));
        assert_eq!(list.current(), "127.0.0.3:3");
        assert!(!list.prefer("127.0.0.9:9"), "a server outside the list is not preferred");
        assert_eq!(list.current(), "127.0.0.3:3");
    }

    #[test]
    fn a_key_chooses_the_first_server_and_keys_spread() {
        let list = ServerList::parse_spread_by("a:1,b:2,c:3", "web-0").unwrap();
        assert_eq!(list.current(), ["a:1", "b:2", "c:3"][first_index("web-0", 3)]);
        let mut counts = [0usize; 3];
        for i in 0..300 {
            counts[first_index(&format!("web-{i}"), 3)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "300 keys spread over 3 servers: {counts:?}");
    }

    #[test]
    fn bad_lists_are_refused_with_the_cause() {
        for bad in ["", " , ", "no port at all:", "a b:1"] {
            let error = ServerList::parse(bad).err().unwrap_or_else(|| panic!("{bad:?} is refused"));
            assert!(error.to_string().contains(bad.trim()) || bad.trim().is_empty(), "{bad:?}: {error}");
        }
    }
}
