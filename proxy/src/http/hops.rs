//! Loop detection: every outbound hop counts itself in `x-mesh-hops`, and
//! a request that has crossed too many proxies without reaching an app is
//! answered `508 loop-detected` instead of going round again. An inbound
//! proxy removes the header before the app, so a call the app makes is a
//! new request with a count of its own.

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue};

pub const MESH_HOPS: HeaderName = HeaderName::from_static("x-mesh-hops");

/// Proxy hops one request may take between apps. Real chains take one or
/// two (an outbound, perhaps an egress); a loop takes all of them.
pub const MAX_HOPS: usize = 16;

/// Counts this hop in `headers`: a missing or unreadable count is a first
/// hop. Returns false, leaving the headers as they were, when the request
/// has already made `MAX_HOPS` hops. One hash of the name, whatever the
/// outcome.
pub fn count_hop(headers: &mut HeaderMap) -> bool {
    match headers.entry(MESH_HOPS) {
        Entry::Vacant(vacant) => {
            vacant.insert(COUNTS[0].clone());
            true
        }
        Entry::Occupied(mut occupied) => {
            let seen = std::str::from_utf8(occupied.get().as_bytes())
                .ok()
                .and_then(|text| text.parse::<usize>().ok())
                .unwrap_or(0);
            match COUNTS.get(seen) {
                Some(next) => {
                    occupied.insert(next.clone());
                    true
                }
                None => false,
            }
        }
    }
}

/// The counts a hop can send, made once: a request allocates none.
static COUNTS: [HeaderValue; MAX_HOPS] = [
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
    HeaderValue::from_static("4"),
    HeaderValue::from_static("5"),
    HeaderValue::from_static("6"),
    HeaderValue::from_static("7"),
    HeaderValue::from_static("8"),
    HeaderValue::from_static("9"),
    HeaderValue::from_static("10"),
    HeaderValue::from_static("11"),
    HeaderValue::from_static("12"),
    HeaderValue::from_static("13"),
    HeaderValue::from_static("14"),
    HeaderValue::from_static("15"),
    HeaderValue::from_static("16"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_make_max_hops_and_no_more() {
        // (incoming header, header after this hop; None = a loop, headers untouched)
        let table = [
            (None, Some("1")),
            (Some("0"), Some("1")),
            (Some("1"), Some("2")),
            (Some("15"), Some("16")),
            (Some("16"), None),
            (Some("99999"), None),
            (Some("garbage"), Some("1")),
        ];
        for (incoming, next) in table {
            let mut headers = HeaderMap::new();
            if let Some(value) = incoming {
                headers.insert(MESH_HOPS, HeaderValue::from_static(value));
            }
            let counted = count_hop(&mut headers);
            assert_eq!(counted, next.is_some(), "{incoming:?}");
            let now = headers.get(MESH_HOPS).map(|v| v.to_str().unwrap());
            assert_eq!(now, next.or(incoming), "{incoming:?}");
        }
    }
}
