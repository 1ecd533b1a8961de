//! Whether a request matches a route: pure, compiled once per routing
//! table, and pinned by a table test. Every condition a route gives must
//! hold; the cheap ones (method, exact path) are tested first.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use mesh_common::traffic_policy::file::compile_regex;
use mesh_common::traffic_policy::{PathMatch, RouteMatch};
use regex::Regex;

enum PathTest {
    Exact(String),
    /// By path segments: `/api` takes `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(Regex),
}

/// A route's match, ready to run.
pub struct CompiledMatch {
    method: Option<Method>,
    path: Option<PathTest>,
    headers: Vec<(HeaderName, HeaderValue)>,
    headers_regex: Vec<(HeaderName, Regex)>,
    headers_present: Vec<HeaderName>,
    query: Vec<(String, String)>,
    /// A gRPC call: the request is gRPC and its path passes this test.
    grpc: Option<PathTest>,
}

impl CompiledMatch {
    pub fn compile(spec: &RouteMatch) -> Result<CompiledMatch, String> {
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not an HTTP header name"))
        };
        let path = match &spec.path {
            Some(PathMatch::Exact(p)) => Some(PathTest::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => Some(PathTest::Prefix(p.trim_end_matches('/').to_owned())),
            Some(PathMatch::Regex(p)) => Some(PathTest::Regex(compile_regex(p)?)),
            None => None,
        };
        let method = match &spec.method {
            Some(m) => Some(Method::from_bytes(m.as_bytes()).map_err(|_| format!("{m:?} is not a method"))?),
            None => None,
        };
        let mut headers = Vec::new();
        for (name, value) in &spec.headers {
            let value =
                HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a header value"))?;
            headers.push((header(name)?, value));
        }
        let mut headers_regex = Vec::new();
        for (name, pattern) in &spec.headers_regex {
            headers_regex.push((header(name)?, compile_regex(pattern)?));
        }
        let headers_present = spec.headers_present.iter().map(|n| header(n)).collect::<Result<_, _>>()?;
        let grpc = spec.grpc_method.as_ref().map(|g| match &g.method {
            Some(method) => PathTest::Exact(format!("/{}/{method}", g.service)),
            None => PathTest::Prefix(format!("/{}", g.service)),
        });
        let query = spec.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(CompiledMatch { method, path, headers, headers_regex, headers_present, query, grpc })
    }

    /// A match no request passes (no path is empty).
    pub fn never() -> CompiledMatch {
        CompiledMatch {
            method: None,
            path: Some(PathTest::Exact(String::new())),
            headers: Vec::new(),
            headers_regex: Vec::new(),
            headers_present: Vec::new(),
            query: Vec::new(),
            grpc: None,
        }
    }

    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let path = uri.path();
        if self.path.as_ref().is_some_and(|test| !test.passes(path)) {
            return false;
        }
        if let Some(test) = &self.grpc {
            if !crate::http::is_grpc(headers) || !test.passes(path) {
                return false;
            }
        }
        let has_value =
            |name: &HeaderName, ok: &dyn Fn(&HeaderValue) -> bool| headers.get_all(name).iter().any(ok);
        self.headers.iter().all(|(name, want)| has_value(name, &|v| v == want))
            && self
                .headers_regex
                .iter()
                .all(|(name, re)| has_value(name, &|v| v.to_str().is_ok_and(|v| re.is_match(v))))
            && self.headers_present.iter().all(|name| headers.contains_key(name))
            && self.query.iter().all(|(name, want)| query_has(uri.query(), name, want))
    }
}

impl PathTest {
    fn passes(&self, path: &str) -> bool {
        match self {
            PathTest::Exact(p) => path == p,
            PathTest::Prefix(p) => {
                path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathTest::Regex(re) => re.is_match(path),
        }
    }
}

/// Whether the query string has parameter `name` with value `want`, both
/// compared decoded (`%20` and `+` are a space).
fn query_has(query: Option<&str>, name: &str, want: &str) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        decoded_equals(key, name) && decoded_equals(value, want)
    })
}

/// Whether form-encoded `raw` decodes to `plain`, without allocating.
fn decoded_equals(raw: &str, plain: &str) -> bool {
    let (raw, mut plain) = (raw.as_bytes(), plain.as_bytes().iter());
    let mut i = 0;
    while i < raw.len() {
        let byte = match raw[i] {
            b'+' => b' ',
            b'%' if i + 2 < raw.len() => {
                let hex =
                    std::str::from_utf8(&raw[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(decoded) => {
                        i += 2;
                        decoded
                    }
                    None => b'%',
                }
            }
            other => other,
        };
        if plain.next() != Some(&byte) {
            return false;
        }
        i += 1;
    }
    plain.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::traffic_policy::file::parse_traffic_policy;

    /// The compiled match of a route whose `match = { ... }` is `fields`.
    fn compiled(fields: &str) -> CompiledMatch {
        let text = format!(
            "[[routes]]\nservice = \"s\"\nname = \"r\"\nmatch = {{ {fields} }}\nbackends = {{ v1 = 100 }}\n"
        );
        let file = parse_traffic_policy(&text).unwrap();
        CompiledMatch::compile(&file.routes["s"][0].matches).unwrap()
    }

    #[test]
    fn requests_match_routes_by_every_kind() {
        // (match, method, URI, headers, matches?)
        type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], bool);
        const GRPC: (&str, &str) = ("content-type", "application/grpc");
        let table: &[Case] = &[
            ("", "GET", "/anything", &[], true),
            ("path = \"/a\"", "GET", "/a", &[], true),
            ("path = \"/a\"", "GET", "/a/", &[], false),
            ("path = \"/a\"", "GET", "/a?x=1", &[], true),
            ("path_prefix = \"/api\"", "GET", "/api", &[], true),
            ("path_prefix = \"/api\"", "GET", "/api/users", &[], true),
            ("path_prefix = \"/api\"", "GET", "/apix", &[], false),
            ("path_prefix = \"/api/\"", "GET", "/api/v1", &[], true),
            ("path_prefix = \"/\"", "GET", "/x", &[], true),
            ("path_regex = \"/users/[0-9]+\"", "GET", "/users/42", &[], true),
            ("path_regex = \"/users/[0-9]+\"", "GET", "/users/42/posts", &[], false),
            ("path_regex = \"/users/[0-9]+\"", "GET", "/x/users/42", &[], false),
            ("method = \"POST\"", "POST", "/", &[], true),
            ("method = \"POST\"", "GET", "/", &[], false),
            ("path_prefix = \"/api\", method = \"POST\"", "POST", "/api/x", &[], true),
            ("path_prefix = \"/api\", method = \"POST\"", "GET", "/api/x", &[], false),
            ("headers = { \"x-canary\" = \"1\" }", "GET", "/", &[("x-canary", "1")], true),
            ("headers = { \"X-Canary\" = \"1\" }", "GET", "/", &[("x-canary", "1")], true),
            ("headers = { \"x-canary\" = \"1\" }", "GET", "/", &[("x-canary", "0")], false),
            ("headers = { \"x-canary\" = \"1\" }", "GET", "/", &[], false),
            ("headers = { \"x-canary\" = \"1\" }", "GET", "/", &[("x-canary", "0"), ("x-canary", "1")], true),
            ("headers = { \"x-a\" = \"1\", \"x-b\" = \"2\" }", "GET", "/", &[("x-a", "1")], false),
            ("headers_regex = { \"x-user\" = \"admin-.*\" }", "GET", "/", &[("x-user", "admin-7")], true),
            ("headers_regex = { \"x-user\" = \"admin-.*\" }", "GET", "/", &[("x-user", "my-admin-7")], false),
            ("headers_present = [\"x-debug\"]", "GET", "/", &[("x-debug", "")], true),
            ("headers_present = [\"x-debug\"]", "GET", "/", &[], false),
            ("query = { tier = \"gold\" }", "GET", "/p?tier=gold", &[], true),
            ("query = { tier = \"gold\" }", "GET", "/p?a=1&tier=gold&b", &[], true),
            ("query = { tier = \"gold\" }", "GET", "/p?tier=golden", &[], false),
            ("query = { tier = \"gold\" }", "GET", "/p", &[], false),
            ("query = { q = \"a b\" }", "GET", "/p?q=a+b", &[], true),
            ("query = { q = \"a b\" }", "GET", "/p?q=a%20b", &[], true),
            ("query = { q = \"a%\" }", "GET", "/p?q=a%", &[], true),
            ("grpc_method = \"mesh.echo.v1.Echo/Greet\"", "POST", "/mesh.echo.v1.Echo/Greet", &[GRPC], true),
            ("grpc_method = \"mesh.echo.v1.Echo/Greet\"", "POST", "/mesh.echo.v1.Echo/Echo", &[GRPC], false),
            ("grpc_method = \"mesh.echo.v1.Echo/Greet\"", "POST", "/mesh.echo.v1.Echo/Greet", &[], false),
            ("grpc_method = \"mesh.echo.v1.Echo\"", "POST", "/mesh.echo.v1.Echo/Any", &[GRPC], true),
            ("grpc_method = \"mesh.echo.v1.Echo\"", "POST", "/mesh.echo.v1.EchoX/Any", &[GRPC], false),
        ];
        for (fields, method, uri, headers, expected) in table {
            let matcher = compiled(fields);
            let mut map = HeaderMap::new();
            for (name, value) in *headers {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(
                matcher.matches(&method, &uri, &map),
                *expected,
                "{fields} | {method} {uri} {headers:?}"
            );
        }
    }
}
