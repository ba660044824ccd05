//! Proxy routes: their upstreams, which one a new client goes to, and which ones are down.
//!
//! Round-robin over the healthy upstreams of a route, with passive health: an upstream that fails
//! to connect, or connects but does not complete the WebSocket upgrade (any answer but a valid
//! 101, or none in time), is skipped for a back-off period (5 s, doubling up to 60 s, reset by a
//! completed upgrade). The pool is shared by every worker through atomics (one round-robin counter
//! per route, one down-until time and failure count per upstream), so no lock is taken per
//! connection. Time is an argument (milliseconds on the caller's monotonic clock), which keeps
//! this testable.
//!
//! Must never: do I/O (the io layer connects and reports back), or hand out an upstream that is
//! marked down while a healthy one exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::gateway::auth::{Verified, strip_token_protocols, strip_token_query};
use crate::metrics::{UpstreamLabels, UpstreamStats};
use crate::proto::deflate::Agreement;
use crate::proto::handshake::{AcceptKey, ClientHandshake, Request};

/// Request headers copied to the upstream as they are.
const FORWARDED_AS_IS: [&str; 3] = ["Cookie", "Authorization", "Origin"];

/// The first back-off after a failed connect; each further failure doubles it.
pub const BACKOFF_START: Duration = Duration::from_secs(5);
/// The longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// One `ws://` upstream as configured: where to connect and what to say in the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The URL as written, for logs and metric labels.
    pub url: String,
    /// `host[:port]` as written: the upstream request's `Host`.
    pub authority: String,
    /// The resolved address (resolved once, at start).
    pub addr: SocketAddr,
    /// The URL's path without a trailing slash (often empty); the client's rest is appended.
    pub base_path: String,
    /// For a `wss://` upstream, the host its certificate must cover (and the SNI we send);
    /// `None` for `ws://`.
    pub tls_name: Option<String>,
}

/// One proxy route as configured: a path prefix and its upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRouteSpec {
    /// Whether the route needs a token (TOML `auth`; else `--proxy-auth`).
    pub auth: Option<crate::gateway::auth::AuthMode>,
    /// The path prefix, as `/app` (no trailing slash, except the catch-all `/`).
    pub prefix: String,
    /// Where clients of this route go, round-robin.
    pub upstreams: Vec<UpstreamUrl>,
}

/// One upstream's health and counters.
#[derive(Debug)]
pub struct Upstream {
    /// Where it is.
    pub url: UpstreamUrl,
    /// Its counters, for `/metrics`.
    pub stats: UpstreamStats,
    /// Until when (pool clock, ms) it is skipped; 0 when healthy.
    down_until_ms: AtomicU64,
    /// Connect failures in a row.
    failures: AtomicU32,
}

/// One proxy route at run time.
#[derive(Debug)]
pub struct ProxyRoute {
    /// The path prefix.
    pub prefix: String,
    /// Its upstreams.
    pub upstreams: Vec<Upstream>,
    next: AtomicUsize,
}

/// Every proxy route, shared by all workers.
#[derive(Debug, Default)]
pub struct ProxyPool {
    routes: Vec<ProxyRoute>,
}

impl ProxyPool {
    /// The pool for the configured routes, every upstream healthy.
    pub fn new(specs: &[ProxyRouteSpec]) -> ProxyPool {
        let routes = specs
            .iter()
            .map(|spec| ProxyRoute {
                prefix: spec.prefix.clone(),
                upstreams: spec
                    .upstreams
                    .iter()
                    .map(|url| Upstream {
                        url: url.clone(),
                        stats: UpstreamStats::default(),
                        down_until_ms: AtomicU64::new(0),
                        failures: AtomicU32::new(0),
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        ProxyPool { routes }
    }

    /// Proxy route `index` (as the router numbers them).
    pub fn route(&self, index: usize) -> Option<&ProxyRoute> {
        self.routes.get(index)
    }

    /// Labels and counters of every upstream, for `/metrics`.
    pub fn labels(&self) -> Vec<UpstreamLabels<'_>> {
        self.routes
            .iter()
            .flat_map(|route| {
                route.upstreams.iter().map(|u| UpstreamLabels {
                    route: &route.prefix,
                    upstream: &u.url.url,
                    stats: &u.stats,
                })
            })
            .collect()
    }
}

impl ProxyRoute {
    /// The next healthy upstream in round-robin order, skipping `exclude` (one that just failed);
    /// `None` when every upstream is down.
    pub fn choose(&self, now_ms: u64, exclude: Option<usize>) -> Option<usize> {
        let count = self.upstreams.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&i| Some(i) != exclude && self.upstreams[i].is_up(now_ms))
    }

    /// Upstream `index` failed to connect: skip it for the back-off period.
    pub fn mark_down(&self, index: usize, now_ms: u64) {
        let upstream = &self.upstreams[index];
        let failures = upstream.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let doublings = failures.saturating_sub(1).min(16);
        let backoff = BACKOFF_START.saturating_mul(1 << doublings).min(BACKOFF_MAX);
        let until = now_ms.saturating_add(backoff.as_millis() as u64);
        upstream.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Upstream `index` connected: healthy again, back-off reset.
    pub fn mark_up(&self, index: usize) {
        let upstream = &self.upstreams[index];
        if upstream.failures.load(Ordering::Relaxed) != 0 {
            upstream.failures.store(0, Ordering::Relaxed);
            upstream.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

impl Upstream {
    /// Whether it may be tried at `now_ms`.
    pub fn is_up(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) <= now_ms
    }
}

/// What the upstream request of one proxied client needs, copied out of the client's request
/// (whose bytes live in a buffer that is reused before the upstream answers).
#[derive(Debug)]
pub struct UpstreamRequest {
    /// Which proxy route.
    pub route: usize,
    /// The rest of the path and the query (see `Route::Proxy`).
    pub rest: String,
    /// The client's `Sec-WebSocket-Accept`, for the 101 once the upstream accepted.
    pub client_accept: AcceptKey,
    /// The subprotocols the client offered, in its order.
    pub subprotocols: Vec<String>,
    /// Headers for the upstream: `X-Forwarded-*`, and `Cookie`, `Authorization`, `Origin` as sent.
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// permessage-deflate as agreed with the client (the relay names it in the client's 101 and
    /// compresses towards it); the hop to the upstream is negotiated on its own.
    pub client_deflate: Option<Agreement>,
    /// The client offered the [`TOKEN_PROTOCOL`](crate::gateway::auth::TOKEN_PROTOCOL) subprotocol
    /// (a browser sending its token): if the upstream picks no subprotocol, the client is answered
    /// with it (a browser fails a connection otherwise).
    pub token_protocol: bool,
    /// When the client's token expires (Unix seconds; 0: no token): the relay closes then.
    pub token_expires: u64,
    /// The verified token's `sub`, and the header it goes upstream in.
    pub subject: Option<(Arc<str>, String)>,
}

impl UpstreamRequest {
    /// Copies what goes upstream out of a validated client request. `client_ip` is appended to
    /// `X-Forwarded-For`; `secure` (the client came in over TLS) makes `X-Forwarded-Proto` https.
    pub fn new(
        route: usize,
        rest: &str,
        request: &Request<'_, '_>,
        client_accept: AcceptKey,
        client_ip: Option<std::net::IpAddr>,
        secure: bool,
    ) -> UpstreamRequest {
        let mut forwarded_for: Vec<u8> = Vec::new();
        for value in request.header_values("X-Forwarded-For") {
            if !forwarded_for.is_empty() {
                forwarded_for.extend_from_slice(b", ");
            }
            forwarded_for.extend_from_slice(value.trim().as_bytes());
        }
        if let Some(ip) = client_ip {
            if !forwarded_for.is_empty() {
                forwarded_for.extend_from_slice(b", ");
            }
            forwarded_for.extend_from_slice(ip.to_string().as_bytes());
        }
        let mut headers = Vec::with_capacity(6);
        if !forwarded_for.is_empty() {
            headers.push(("X-Forwarded-For", forwarded_for));
        }
        headers.push(("X-Forwarded-Proto", if secure { b"https".to_vec() } else { b"http".to_vec() }));
        headers.push(("X-Forwarded-Host", request.host.as_bytes().to_vec()));
        for header in request.headers {
            if let Some(name) = FORWARDED_AS_IS.iter().find(|n| header.name.eq_ignore_ascii_case(n)) {
                headers.push((name, header.value.to_vec()));
            }
        }
        UpstreamRequest {
            route,
            rest: strip_token_query(rest),
            client_accept,
            // Nothing of a token goes upstream (it would end up in the upstream's logs).
            subprotocols: strip_token_protocols(request.subprotocols()).map(str::to_string).collect(),
            headers,
            client_deflate: None,
            token_protocol: false,
            token_expires: 0,
            subject: None,
        }
    }

    /// The client's token was verified: its `sub` goes upstream in `subject_header`, and nothing
    /// of the token itself does (the subprotocol entries and the `token` query parameter were
    /// already left out by [`UpstreamRequest::new`]).
    pub fn authenticated(&mut self, verified: &Verified, subject_header: &Arc<str>, token_protocol: bool) {
        self.token_protocol = token_protocol;
        self.token_expires = verified.identity.expires_at;
        self.subject = verified.identity.subject.clone().map(|subject| (Arc::clone(subject_header), subject));
    }

    /// The subprotocols offered, as `parse_response` wants them.
    pub fn offered(&self) -> Vec<&str> {
        self.subprotocols.iter().map(String::as_str).collect()
    }

    /// Writes the upgrade request for `upstream`.
    pub fn write(&self, dst: &mut Vec<u8>, handshake: &ClientHandshake, upstream: &UpstreamUrl) {
        let target = crate::gateway::router::upstream_target(&upstream.base_path, &self.rest);
        let mut extra: Vec<(&str, &[u8])> = self.headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        if let Some((name, subject)) = &self.subject {
            extra.push((name, subject.as_bytes()));
        }
        handshake.write_request_with_headers(dst, &upstream.authority, &target, &self.offered(), &extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(upstreams: usize) -> ProxyPool {
        let urls = (0..upstreams)
            .map(|i| UpstreamUrl {
                url: format!("ws://127.0.0.1:{}", 9000 + i),
                authority: format!("127.0.0.1:{}", 9000 + i),
                tls_name: None,
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                base_path: String::new(),
            })
            .collect();
        ProxyPool::new(&[ProxyRouteSpec { prefix: "/app".into(), upstreams: urls, auth: None }])
    }

    #[test]
    fn round_robin_over_healthy_upstreams() {
        let pool = pool(3);
        let route = pool.route(0).expect("route 0");
        let picks: Vec<_> = (0..6).map(|_| route.choose(0, None).expect("healthy")).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        route.mark_down(1, 1000);
        let picks: Vec<_> = (0..4).map(|_| route.choose(1000, None).expect("healthy")).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
    }

    #[test]
    fn a_down_upstream_comes_back_after_a_doubling_backoff() {
        let pool = pool(1);
        let route = pool.route(0).expect("route 0");
        route.mark_down(0, 0);
        assert_eq!(route.choose(4_999, None), None);
        assert_eq!(route.choose(5_000, None), Some(0));
        route.mark_down(0, 5_000); // second failure in a row: 10 s
        assert_eq!(route.choose(14_999, None), None);
        assert_eq!(route.choose(15_000, None), Some(0));
        for _ in 0..10 {
            route.mark_down(0, 15_000);
        }
        assert_eq!(route.choose(15_000 + 59_999, None), None, "capped at 60 s");
        assert_eq!(route.choose(15_000 + 60_000, None), Some(0));
        route.mark_up(0);
        route.mark_down(0, 100_000);
        assert_eq!(route.choose(105_000, None), Some(0), "a success resets the back-off");
    }

    #[test]
    fn the_upstream_request_forwards_identity_and_credentials() {
        use crate::proto::handshake::{DEFAULT_MAX_HEADERS, Parsed, parse_request};
        let raw = b"GET /app/x?q=1 HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nCookie: a=1\r\nAuthorization: Bearer t\r\n\
Origin: http://site\r\nX-Forwarded-For: 10.1.1.1\r\nUser-Agent: x\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let Ok(Parsed::Complete(request, _)) = parse_request(raw, &mut headers, 8192) else {
            panic!("valid")
        };
        let accept = AcceptKey::for_key(request.key);
        let ip = Some(std::net::IpAddr::from([127, 0, 0, 9]));
        let up = UpstreamRequest::new(0, "/x?q=1", &request, accept, ip, false);
        let over_tls = UpstreamRequest::new(0, "/x?q=1", &request, AcceptKey::for_key(request.key), ip, true);
        assert!(over_tls.headers.iter().any(|(n, v)| *n == "X-Forwarded-Proto" && v == b"https"));
        let pool = pool(1);
        let url = &pool.route(0).expect("route").upstreams[0].url;
        let mut out = Vec::new();
        up.write(&mut out, &ClientHandshake::new([1; 16]), url);
        let text = String::from_utf8(out).expect("ascii");
        for line in [
            "GET /x?q=1 HTTP/1.1\r\n",
            "Host: 127.0.0.1:9000\r\n",
            "Sec-WebSocket-Protocol: chat, superchat\r\n",
            "X-Forwarded-For: 10.1.1.1, 127.0.0.9\r\n",
            "X-Forwarded-Proto: http\r\n",
            "X-Forwarded-Host: gw.example\r\n",
            "Cookie: a=1\r\n",
            "Authorization: Bearer t\r\n",
            "Origin: http://site\r\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from {text}");
        }
        assert!(!text.contains("User-Agent") && !text.contains("dGhlIHNhbXBsZSBub25jZQ=="), "{text}");
    }

    #[test]
    fn the_retry_skips_the_upstream_that_failed() {
        let pool = pool(2);
        let route = pool.route(0).expect("route 0");
        for _ in 0..4 {
            let first = route.choose(0, None).expect("healthy");
            let second = route.choose(0, Some(first)).expect("the other one");
            assert_ne!(first, second);
        }
        let single = self::pool(1);
        let route = single.route(0).expect("route 0");
        assert_eq!(route.choose(0, Some(0)), None);
    }
}
