//! Naming the service a request is for, from its authority. Pure, so the
//! accepted spellings are pinned by a table test.

use http::{header, HeaderMap, Request};

/// `web`, `web.mesh`, `web:80`, `WEB.mesh:8080` all name service `web`.
pub fn service_name(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        // A bracketed IPv6 literal keeps its colons.
        Some((host, port)) if !host.ends_with(']') || port.chars().all(|c| c.is_ascii_digit()) => {
            if port.chars().all(|c| c.is_ascii_digit()) {
                host
            } else {
                authority
            }
        }
        _ => authority,
    };
    host.strip_suffix(".mesh").unwrap_or(host)
}

/// The authority of a request: from an absolute-form URI, or `:authority`
/// in HTTP/2, or else the `Host` header.
pub fn authority_of<B>(request: &Request<B>) -> Option<&str> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str());
    }
    request.headers().get(header::HOST).and_then(|h| h.to_str().ok())
}

/// Whether a request carries more than one `Host`: which one names the
/// service would be a guess, and RFC 9112 (3.2) asks for a 400.
pub fn has_several_hosts(headers: &HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hosts_are_told_apart_from_one() {
        // (Host values, several?)
        let table: [(&[&str], bool); 3] = [(&[], false), (&["web"], false), (&["web", "api"], true)];
        for (hosts, several) in table {
            let mut headers = HeaderMap::new();
            for host in hosts {
                headers.append(header::HOST, host.parse().unwrap());
            }
            assert_eq!(has_several_hosts(&headers), several, "{hosts:?}");
        }
    }

    #[test]
    fn authorities_name_services() {
        let table = [
            ("web", "web"),
            ("web.mesh", "web"),
            ("web:80", "web"),
            ("web.mesh:8080", "web"),
            ("api.internal", "api.internal"),
            ("127.0.0.1:4140", "127.0.0.1"),
        ];
        for (authority, service) in table {
            assert_eq!(service_name(authority), service, "{authority}");
        }
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let request = Request::get("http://web/x").header("host", "other").body(()).unwrap();
        assert_eq!(authority_of(&request), Some("web"));
        let request = Request::get("/x").header("host", "web.mesh:80").body(()).unwrap();
        assert_eq!(authority_of(&request).map(service_name), Some("web"));
        let request = Request::get("/x").body(()).unwrap();
        assert_eq!(authority_of(&request), None);
    }
}
