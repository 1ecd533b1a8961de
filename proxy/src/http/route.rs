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

/// What the outbound routes by, read with one lookup of `Host`: the
/// authority from an absolute-form URI (or `:authority` in HTTP/2), else
/// the `Host` header; `Err` when the request carries several `Host` headers.
pub fn routing_authority<B>(request: &Request<B>) -> Result<Option<&str>, SeveralHosts> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(SeveralHosts);
    }
    if let Some(authority) = request.uri().authority() {
        return Ok(Some(authority.as_str()));
    }
    Ok(host.and_then(|h| h.to_str().ok()))
}

/// A request with more than one `Host` header.
#[derive(Debug, PartialEq, Eq)]
pub struct SeveralHosts;

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
    fn routing_reads_one_host_and_refuses_two() {
        let request = Request::get("/x").header("host", "web").body(()).unwrap();
        assert_eq!(routing_authority(&request), Ok(Some("web")));
        let request = Request::get("http://api/x").header("host", "web").body(()).unwrap();
        assert_eq!(routing_authority(&request), Ok(Some("api")));
        let request = Request::get("/x").header("host", "web").header("host", "api").body(()).unwrap();
        assert_eq!(routing_authority(&request), Err(SeveralHosts));
        let request = Request::get("/x").body(()).unwrap();
        assert_eq!(routing_authority(&request), Ok(None));
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let request = Request::get("http://web/x").header("host", "other").body(()).unwrap();
        assert_eq!(routing_authority(&request), Ok(Some("web")));
        let request = Request::get("/x").header("host", "web.mesh:80").body(()).unwrap();
        assert_eq!(routing_authority(&request).unwrap().map(service_name), Some("web"));
    }
}
