//! [`Access`]: what keeps web pages out of the admin API (DNS rebinding, cross-site
//! requests), checked before anything else.

use std::net::SocketAddr;

use http::header;
use http::{Method, Request, Response, StatusCode};

use super::reply::{ApiError, Body};

/// Keeps web pages out of the admin API. A browser always sends `Host`, sends `Origin` on
/// every cross-origin POST and `Sec-Fetch-Site` on every request, and without a CORS
/// preflight (which this API never grants) a page can only send a body as `text/plain`,
/// `application/x-www-form-urlencoded` or `multipart/form-data`. So:
///
/// - `Host` (and an absolute request target's authority) must be one of this endpoint's
///   own names: its bound address, `localhost:PORT`, the IP the client connected to, or a
///   name in `[admin] hosts`. A rebinding page's requests carry the page's own name.
/// - A state-changing call (any method but GET and HEAD) is refused when `Sec-Fetch-Site`
///   is `cross-site` or `same-site`, or when `Origin` is present and is not `http://` (or
///   `https://`) followed by one of those names. Clients that are no browser send neither.
/// - Its body type must be the one the call reads: `application/json`, or
///   `application/wasm` / `application/octet-stream` for an upload; `POST /reload` takes no
///   body (none, or JSON). A form-submittable type is refused on every POST.
///
/// `GET /healthz` is exempt: it reveals and changes nothing, and probes use any name.
#[derive(Debug)]
pub struct Access {
    /// Accepted names, lower case, as `Host` carries them (`name:port`, `[v6]:port`).
    hosts: Vec<String>,
}

impl Access {
    /// The rules for an endpoint bound to `bound`, also reachable as `names` (`[admin]
    /// hosts`; a name given without a port is accepted without one, and with ours).
    pub fn new(bound: SocketAddr, names: &[String]) -> Self {
        let port = bound.port();
        let mut hosts = vec![bound.to_string(), format!("localhost:{port}")];
        for name in names {
            let name = name.trim().to_ascii_lowercase();
            if !has_port(&name) {
                hosts.push(format!("{name}:{port}"));
            }
            hosts.push(name);
        }
        Access { hosts }
    }

    fn allows(&self, host: &str, local: Option<SocketAddr>) -> bool {
        let host = host.trim().to_ascii_lowercase();
        self.hosts.contains(&host) || local.is_some_and(|a| a.to_string() == host)
    }

    /// The refusal (403, or 415 for a body type) of a request a web page could have made
    /// against the operator's will; none when it may go on. `local` is the address the
    /// client connected to.
    pub fn check<B>(&self, req: &Request<B>, local: Option<SocketAddr>) -> Option<Response<Body>> {
        let path = req.uri().path();
        if path == "/healthz" {
            return None;
        }
        let forbidden = |why: String| Some(ApiError::new(StatusCode::FORBIDDEN, why).response());
        let Some(host) = req.headers().get(header::HOST) else {
            return forbidden(
                "no Host header: the admin API answers only requests that name it".into(),
            );
        };
        let host = String::from_utf8_lossy(host.as_bytes());
        if !self.allows(&host, local) {
            return forbidden(format!(
                "Host {host:?} is not a name of this admin endpoint (add it to [admin] hosts or --admin-host to use it)"
            ));
        }
        if let Some(authority) = req.uri().authority()
            && !self.allows(authority.as_str(), local)
        {
            return forbidden(format!(
                "the request target names another host ({authority})"
            ));
        }
        let method = req.method();
        if method == Method::GET || method == Method::HEAD {
            return None;
        }
        let text = |name: &str| {
            req.headers().get(name).map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .trim()
                    .to_ascii_lowercase()
            })
        };
        if let Some(site) = text("sec-fetch-site")
            && (site == "cross-site" || site == "same-site")
        {
            return forbidden(format!(
                "{method} {path} from a {site} web page refused: only the admin's own page may change state"
            ));
        }
        if let Some(origin) = text("origin") {
            let own = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|h| self.allows(h, local));
            if !own {
                return forbidden(format!(
                    "{method} {path} from origin {origin} refused: only the admin's own origin may change state"
                ));
            }
        }
        let media = text("content-type").map(|ct| {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            essence.to_string()
        });
        let wanted: &[&str] = match path {
            "/plugin/upload" => &["application/wasm", "application/octet-stream"],
            _ => &["application/json"],
        };
        let reads_body = matches!(
            path,
            "/backends/add"
                | "/add"
                | "/backends/remove"
                | "/rm"
                | "/backends/drain"
                | "/plugin"
                | "/plugin/upload"
        );
        // No form-submittable type is ever wanted, so a form is refused on every POST; a call
        // that reads no body (`/reload`) may come without one.
        let fine = match media.as_deref() {
            None => !reads_body,
            Some(m) => wanted.contains(&m),
        };
        if fine {
            return None;
        }
        let got = media.map_or_else(|| "none".to_string(), |m| m.to_string());
        Some(
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{method} {path} needs Content-Type: {} (got {got}; with curl: -H 'Content-Type: {}')",
                    wanted.join(" or "),
                    wanted[0]
                ),
            )
            .response(),
        )
    }
}

/// Whether a `Host`-style name carries a port (`name:1`, `[::1]:1`; not `[::1]`).
fn has_port(name: &str) -> bool {
    match name.rsplit_once(']') {
        Some((_, rest)) => rest.starts_with(':'),
        None => name.contains(':'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_names_and_origins() {
        let bound: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        let a = Access::new(bound, &["Admin.Test".into(), "lb.internal:8443".into()]);
        let req = |method: &str, host: Option<&str>, extra: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).uri("/backends/add");
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            for (k, v) in extra {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let json = ("content-type", "application/json");
        let status = |r: &Request<()>| a.check(r, Some(bound)).map(|res| res.status().as_u16());
        for ok in [
            "127.0.0.1:9900",
            "localhost:9900",
            "admin.test",
            "ADMIN.test:9900",
            "lb.internal:8443",
        ] {
            assert_eq!(status(&req("POST", Some(ok), &[json])), None, "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost",
            "lb.internal",
            "127.0.0.1:9901",
            "admin.test:1",
        ] {
            assert_eq!(status(&req("GET", Some(bad), &[])), Some(403), "{bad}");
        }
        assert_eq!(status(&req("GET", None, &[])), Some(403));
        let host = Some("127.0.0.1:9900");
        let post = |extra: &[(&str, &str)]| status(&req("POST", host, extra));
        assert_eq!(post(&[json, ("origin", "http://127.0.0.1:9900")]), None);
        assert_eq!(post(&[json, ("origin", "http://admin.test:9900")]), None);
        assert_eq!(post(&[json, ("origin", "http://evil.example")]), Some(403));
        assert_eq!(post(&[json, ("origin", "null")]), Some(403));
        assert_eq!(post(&[json, ("sec-fetch-site", "same-origin")]), None);
        assert_eq!(post(&[json, ("sec-fetch-site", "same-site")]), Some(403));
        assert_eq!(post(&[("content-type", "text/plain")]), Some(415));
        assert_eq!(
            post(&[("content-type", "Application/JSON; charset=utf-8")]),
            None
        );
        assert_eq!(post(&[]), Some(415));
        assert!(has_port("[::1]:9") && !has_port("[::1]") && has_port("a:1") && !has_port("a"));
    }
}
