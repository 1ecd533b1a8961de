//! Loop detection: every outbound hop counts itself in `x-mesh-hops`, and
//! a request that has crossed too many proxies without reaching an app is
//! answered `508 loop-detected` instead of going round again. An inbound
//! proxy removes the header before the app, so a call the app makes is a
//! new request with a count of its own.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const MESH_HOPS: HeaderName = HeaderName::from_static("x-mesh-hops");

/// Proxy hops one request may take between apps. Real chains take one or
/// two (an outbound, perhaps an egress); a loop takes all of them.
pub const MAX_HOPS: usize = 16;

/// The count this hop sends on, or `None` when the request has already
/// made `MAX_HOPS` hops. A missing or unreadable count is a first hop.
pub fn next_hop(headers: &HeaderMap) -> Option<HeaderValue> {
    let seen = headers
        .get(MESH_HOPS)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<usize>().ok())
        .unwrap_or(0);
    COUNTS.get(seen).cloned()
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
        // (incoming header, next count; None = a loop)
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
            let got = next_hop(&headers);
            assert_eq!(got.as_ref().map(|v| v.to_str().unwrap()), next, "{incoming:?}");
        }
    }
}
