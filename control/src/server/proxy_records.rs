//! Which record of a proxy counts when several servers list it: a proxy
//! that moved from one server to another is listed, for a while, by both.

use std::collections::HashMap;

use super::ProxyRecord;

/// This server's proxies and the other servers', one record per proxy: a
/// proxy connected here is taken from here; otherwise the record heard
/// from most recently (a proxy that moved is still listed, for a while,
/// by the server it left).
pub(super) fn merge_proxies<'a>(
    local: &'a HashMap<String, ProxyRecord>,
    remote: &'a HashMap<String, HashMap<String, ProxyRecord>>,
) -> HashMap<&'a String, &'a ProxyRecord> {
    let mut merged: HashMap<&String, &ProxyRecord> = local.iter().collect();
    for (id, record) in remote.values().flatten() {
        match merged.get(id) {
            Some(mine) if mine.connected && !record.connected => {}
            Some(mine) if mine.connected && local.contains_key(id) => {}
            Some(other)
                if other.connected == record.connected && other.last_contact >= record.last_contact => {}
            _ => {
                merged.insert(id, record);
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn record(connected: bool, contact_s: u64, version: u64) -> ProxyRecord {
        ProxyRecord {
            connected,
            last_contact: Some(UNIX_EPOCH + Duration::from_secs(contact_s)),
            acked_version: version,
            ..ProxyRecord::default()
        }
    }

    #[test]
    fn the_record_that_counts_is_the_connected_and_newest_one() {
        // (here, elsewhere, the version that counts)
        let cases = [
            (Some(record(true, 10, 1)), vec![record(true, 20, 2)], 1), // connected here: here counts
            (Some(record(false, 30, 1)), vec![record(true, 20, 2)], 2), // gone from here, connected elsewhere
            (None, vec![record(true, 5, 1), record(true, 9, 3)], 3),   // listed by two others: the newest
            (None, vec![record(false, 50, 1), record(true, 9, 3)], 3), // connected beats newer but gone
            (Some(record(false, 10, 4)), vec![record(false, 5, 1)], 4), // gone everywhere: the newest
        ];
        for (i, (here, elsewhere, counts)) in cases.into_iter().enumerate() {
            let local: HashMap<String, ProxyRecord> = here.into_iter().map(|r| ("p".to_owned(), r)).collect();
            let remote: HashMap<String, HashMap<String, ProxyRecord>> = elsewhere
                .into_iter()
                .enumerate()
                .map(|(n, r)| (format!("server-{n}"), HashMap::from([("p".to_owned(), r)])))
                .collect();
            let merged = merge_proxies(&local, &remote);
            assert_eq!(merged.len(), 1, "case {i}: one record per proxy");
            assert_eq!(merged[&"p".to_owned()].acked_version, counts, "case {i}");
        }
    }
}
