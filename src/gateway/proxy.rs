//! Proxy routes: their upstreams, which one a new client goes to, and which ones are down.
//!
//! Round-robin over the healthy upstreams of a route, with passive health: an upstream that fails
//! to connect is skipped for a back-off period (5 s, doubling up to 60 s, reset by a success). The
//! pool is shared by every worker through atomics (one round-robin counter per route, one
//! down-until time and failure count per upstream), so no lock is taken per connection. Time is an
//! argument (milliseconds on the caller's monotonic clock), which keeps this testable.
//!
//! Must never: do I/O (the io layer connects and reports back), or hand out an upstream that is
//! marked down while a healthy one exists.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::metrics::{UpstreamLabels, UpstreamStats};

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
}

/// One proxy route as configured: a path prefix and its upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRouteSpec {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(upstreams: usize) -> ProxyPool {
        let urls = (0..upstreams)
            .map(|i| UpstreamUrl {
                url: format!("ws://127.0.0.1:{}", 9000 + i),
                authority: format!("127.0.0.1:{}", 9000 + i),
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                base_path: String::new(),
            })
            .collect();
        ProxyPool::new(&[ProxyRouteSpec { prefix: "/app".into(), upstreams: urls }])
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
