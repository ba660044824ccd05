//! Request path -> route. The I/O layer asks once per request, before it answers, so that an unknown
//! path gets a 404 instead of a WebSocket that goes nowhere, and plain HTTP endpoints never upgrade.
//!
//! Order: the exact built-in routes (echo, metrics, healthz) first, then the built-in topic routes
//! (`{pubsub}/{topic}`, `{publish}/{topic}`), then proxy routes by path prefix, the longest matching
//! prefix winning. A proxy prefix matches at a segment boundary: `/app` matches `/app`, `/app/x` and
//! `/app?q`, never `/apple`.

/// What a request is for. Borrows the topic from the request target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// WebSocket: send every message back.
    Echo,
    /// WebSocket: subscribe to a topic; every message the client sends is published to it.
    PubSub {
        /// The topic named by the path's last segment.
        topic: &'a str,
    },
    /// HTTP `POST`: the body is published to the topic.
    Publish {
        /// The topic named by the path's last segment.
        topic: &'a str,
    },
    /// HTTP `GET`: Prometheus text exposition.
    Metrics,
    /// HTTP `GET`: 200 while serving, 503 while draining.
    Healthz,
    /// WebSocket: relayed to an upstream of proxy route `index` (in `Router::proxies` order).
    Proxy {
        /// Which proxy route.
        index: usize,
        /// What goes upstream: the path after the prefix (`/` when empty) and the query, e.g.
        /// `/x?q=1`; the query alone when the rest of the path is empty (`?q=1`, sent as `/?q=1`).
        rest: &'a str,
    },
}

impl Route<'_> {
    /// Whether the route speaks WebSocket (needs an upgrade) rather than plain HTTP.
    pub fn is_websocket(&self) -> bool {
        matches!(self, Route::Echo | Route::PubSub { .. } | Route::Proxy { .. })
    }
}

/// The longest topic name accepted: topics are map keys and metric-free, but still bounded.
pub const MAX_TOPIC_LEN: usize = 256;

/// Where each built-in route lives; `None` disables it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Router {
    /// Exact path of the echo route.
    pub echo: Option<String>,
    /// Prefix of pub/sub routes: `{prefix}/{topic}`.
    pub pubsub: Option<String>,
    /// Prefix of the HTTP publish API: `{prefix}/{topic}`.
    pub publish: Option<String>,
    /// Exact path of the metrics endpoint.
    pub metrics: Option<String>,
    /// Exact path of the health endpoint.
    pub healthz: Option<String>,
    /// Prefixes of the proxy routes, in configuration order (the index is the route's number).
    pub proxies: Vec<String>,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            echo: Some("/echo".into()),
            pubsub: Some("/pubsub".into()),
            publish: Some("/publish".into()),
            metrics: Some("/metrics".into()),
            healthz: Some("/healthz".into()),
            proxies: Vec::new(),
        }
    }
}

impl Router {
    /// The route for a request target (path plus optional query), or `None` for a 404.
    pub fn route<'a>(&self, target: &'a str) -> Option<Route<'a>> {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        let exact = |configured: &Option<String>| configured.as_deref() == Some(path);
        if exact(&self.echo) {
            return Some(Route::Echo);
        }
        if exact(&self.metrics) {
            return Some(Route::Metrics);
        }
        if exact(&self.healthz) {
            return Some(Route::Healthz);
        }
        if let Some(topic) = topic_under(self.pubsub.as_deref(), path) {
            return Some(Route::PubSub { topic });
        }
        if let Some(topic) = topic_under(self.publish.as_deref(), path) {
            return Some(Route::Publish { topic });
        }
        self.proxy_route(target)
    }

    /// The proxy route with the longest prefix that `target` starts with at a segment boundary.
    fn proxy_route<'a>(&self, target: &'a str) -> Option<Route<'a>> {
        let path_len = target.find('?').unwrap_or(target.len());
        let mut best: Option<(usize, usize)> = None;
        for (index, prefix) in self.proxies.iter().enumerate() {
            let prefix = prefix.trim_end_matches('/');
            if path_len < prefix.len() || !target.starts_with(prefix) {
                continue;
            }
            let boundary = prefix.len() == path_len || target.as_bytes()[prefix.len()] == b'/';
            if boundary && best.is_none_or(|(_, len)| prefix.len() > len) {
                best = Some((index, prefix.len()));
            }
        }
        best.map(|(index, len)| Route::Proxy { index, rest: &target[len..] })
    }
}

/// The request target to send upstream for a proxy route's `rest`: `base` (the upstream URL's path,
/// without a trailing slash) followed by the rest, with `/` for an empty path (`ws://h:1/echo`
/// serves `/app` as `/echo`, `/app/x?q` as `/echo/x?q`).
pub fn upstream_target(base: &str, rest: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut target = String::with_capacity(base.len() + rest.len() + 1);
    target.push_str(base);
    if target.is_empty() && !rest.starts_with('/') {
        target.push('/');
    }
    target.push_str(rest);
    target
}

/// The value of the first `name=value` pair in `target`'s query, as written (not percent-decoded);
/// `None` without a query or without that name.
pub fn query_value<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// The topic in `{prefix}/{topic}`: one non-empty path segment, at most [`MAX_TOPIC_LEN`] bytes.
fn topic_under<'a>(prefix: Option<&str>, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix?)?.strip_prefix('/')?;
    (!rest.is_empty() && rest.len() <= MAX_TOPIC_LEN && !rest.contains('/')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_routes() {
        let router = Router::default();
        assert_eq!(router.route("/echo"), Some(Route::Echo));
        assert_eq!(router.route("/echo?x=1"), Some(Route::Echo));
        assert_eq!(router.route("/echo/more"), None);
        assert_eq!(router.route("/"), None);
        assert_eq!(router.route("/pubsub/news"), Some(Route::PubSub { topic: "news" }));
        assert_eq!(router.route("/pubsub/news?since=3"), Some(Route::PubSub { topic: "news" }));
        assert_eq!(router.route("/publish/news"), Some(Route::Publish { topic: "news" }));
        assert_eq!(router.route("/metrics"), Some(Route::Metrics));
        assert_eq!(router.route("/healthz"), Some(Route::Healthz));
    }

    #[test]
    fn topics_are_one_bounded_segment() {
        let router = Router::default();
        assert_eq!(router.route("/pubsub/"), None);
        assert_eq!(router.route("/pubsub"), None);
        assert_eq!(router.route("/pubsub/a/b"), None);
        assert_eq!(router.route("/pubsubx/a"), None);
        let long = format!("/pubsub/{}", "t".repeat(MAX_TOPIC_LEN + 1));
        assert_eq!(router.route(&long), None);
    }

    #[test]
    fn proxy_prefixes_match_at_segment_boundaries_longest_first() {
        let router = Router {
            proxies: vec!["/app".into(), "/app/admin".into(), "/".into(), "/echo".into()],
            ..Router::default()
        };
        let proxy = |index, rest| Some(Route::Proxy { index, rest });
        assert_eq!(router.route("/app"), proxy(0, ""));
        assert_eq!(router.route("/app/x/y?q=1"), proxy(0, "/x/y?q=1"));
        assert_eq!(router.route("/app?q"), proxy(0, "?q"));
        assert_eq!(router.route("/apple"), proxy(2, "/apple"), "not /app: the catch-all");
        assert_eq!(router.route("/app/admin/z"), proxy(1, "/z"));
        assert_eq!(router.route("/app/administrator"), proxy(0, "/administrator"));
        // Built-in routes win.
        assert_eq!(router.route("/echo"), Some(Route::Echo));
        assert_eq!(router.route("/echo/x"), proxy(3, "/x"));
        assert_eq!(router.route("/pubsub/t"), Some(Route::PubSub { topic: "t" }));
        assert_eq!(router.route("/metrics"), Some(Route::Metrics));
        let no_catch_all = Router { proxies: vec!["/app".into()], ..Router::default() };
        assert_eq!(no_catch_all.route("/apple"), None);
    }

    #[test]
    fn query_values_are_found_by_name() {
        assert_eq!(query_value("/pubsub/t?since=ab:3", "since"), Some("ab:3"));
        assert_eq!(query_value("/pubsub/t?x=1&since=ab:3&since=c:1", "since"), Some("ab:3"));
        assert_eq!(query_value("/pubsub/t?since", "since"), Some(""));
        assert_eq!(query_value("/pubsub/t?sincere=1", "since"), None);
        assert_eq!(query_value("/pubsub/t", "since"), None);
    }

    #[test]
    fn upstream_targets_keep_the_rest_and_the_query() {
        assert_eq!(upstream_target("", ""), "/");
        assert_eq!(upstream_target("", "?q=1"), "/?q=1");
        assert_eq!(upstream_target("", "/x?q=1"), "/x?q=1");
        assert_eq!(upstream_target("/base/", "/x"), "/base/x");
        assert_eq!(upstream_target("/base", ""), "/base");
        assert_eq!(upstream_target("/echo", "?q"), "/echo?q");
    }

    #[test]
    fn routes_can_be_moved_or_disabled() {
        let router = Router {
            echo: None,
            pubsub: Some("/ws/topics".into()),
            metrics: Some("/internal/metrics".into()),
            ..Router::default()
        };
        assert_eq!(router.route("/echo"), None);
        assert_eq!(router.route("/ws/topics/a"), Some(Route::PubSub { topic: "a" }));
        assert_eq!(router.route("/internal/metrics"), Some(Route::Metrics));
        assert_eq!(router.route("/metrics"), None);
    }
}
