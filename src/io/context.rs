//! What every connection of a worker shares: configuration, routes, counters, the pub/sub broker.
//!
//! One per worker thread, lent to each state machine call (connections hold no pointer to it, so
//! an idle connection does not pay 8 bytes for one). Must never: be shared across threads (it
//! holds the worker's `Rc` broker and `Cell`s); anything global lives behind an `Arc` inside.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use crate::gateway::address_limits::AddressLimits;
use crate::gateway::auth::{Authenticator, RefusedPublish, RouteAuth};
use crate::gateway::cluster::Link;
use crate::gateway::compression::Compressor;
use crate::gateway::http::Endpoints;
use crate::gateway::proxy::ProxyPool;
use crate::gateway::publish_key::PublishKey;
use crate::gateway::pubsub::Broker;
use crate::gateway::rate_limit::MessageRates;
use crate::gateway::router::Router;
use crate::metrics::{
    ProcessInfo, WorkerStats, process_rss_bytes, render_address_table, render_broker, render_prometheus,
    render_upstreams,
};
use crate::proto::handshake::StaticPolicy;
use crate::proto::message::{Limits, MessageKind};
use crate::tls::TlsTerminator;

/// A worker's shared state.
pub struct WorkerContext {
    /// Frame and message size limits.
    pub limits: Limits,
    /// Bytes that may be queued for one client before we stop reading from it.
    pub max_backpressure: usize,
    /// Bound on the request's header section.
    pub max_header_bytes: usize,
    /// Time to complete the upgrade request.
    pub handshake_timeout: Duration,
    /// Time without traffic before the connection is closed (a ping goes out at half).
    pub idle_timeout: Duration,
    /// Origin allow-list (for upgrades and plain endpoints alike) and subprotocols.
    pub policy: StaticPolicy,
    /// The key `POST /publish` requires, if one is configured.
    pub publish_key: Option<PublishKey>,
    /// Path to route.
    pub router: Router,
    /// This worker's counters.
    pub stats: Arc<WorkerStats>,
    /// Connections open on all workers, for `--max-conns`.
    pub open_connections: Arc<AtomicUsize>,
    /// Connection cap across all workers.
    pub max_conns: usize,
    /// This worker's pub/sub broker.
    pub broker: Rc<Broker>,
    /// This worker's permessage-deflate compression (shared with the broker).
    pub compressor: Rc<Compressor>,
    /// Every worker's counters, for `/metrics`.
    pub all_stats: Arc<[Arc<WorkerStats>]>,
    /// When the process started (Unix seconds), for `/metrics`.
    pub start_time_seconds: f64,
    /// Which io backend runs the workers, for `/metrics`.
    pub io_backend: &'static str,
    /// HTTP keep-alive connections of this worker waiting for their next request: draining does not
    /// wait for them (they are answered `Connection: close` if they ask anything meanwhile).
    pub keepalive_connections: Cell<u64>,
    /// Set when the gateway starts draining.
    pub draining: Cell<bool>,
    /// The proxy routes' upstreams, shared by all workers.
    pub proxies: Arc<ProxyPool>,
    /// Time an upstream gets to accept a connection and to answer the upgrade.
    pub upstream_timeout: Duration,
    /// JWT verification, shared by every worker (its keys reload on SIGHUP).
    pub auth: Arc<Authenticator>,
    /// Which WebSocket routes need a token.
    pub route_auth: RouteAuth,
    /// What a pub/sub message to a topic the token may not publish to gets.
    pub refused_publish: RefusedPublish,
    /// The header carrying a verified token's `sub` to proxy upstreams.
    pub subject_header: Arc<str>,
    /// What each client may send per second.
    pub rates: MessageRates,
    /// Per-address connection counts, shared by every worker; `None` when no per-address limit
    /// is configured.
    pub address_limits: Option<Arc<AddressLimits>>,
    /// Each listener's TLS (`None`: plain), by listener index.
    pub listener_tls: Arc<[Option<Arc<TlsTerminator>>]>,
    /// How to speak TLS to wss:// upstreams (`None` when no route has one).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// The cross-node broker link (`--broker`), for `/healthz` and `/metrics`.
    pub cluster: Option<Arc<Link>>,
}

impl Endpoints for WorkerContext {
    fn is_draining(&self) -> bool {
        self.draining.get()
    }

    fn render_metrics(&self, out: &mut String) {
        let process = ProcessInfo {
            rss_bytes: process_rss_bytes(),
            draining: self.draining.get(),
            start_time_seconds: self.start_time_seconds,
            io_backend: self.io_backend,
        };
        render_prometheus(out, &self.all_stats, &process);
        render_upstreams(out, &self.proxies.labels());
        if let Some(limits) = &self.address_limits {
            render_address_table(out, limits.tracked_addresses());
        }
        if let Some(link) = &self.cluster {
            render_broker(out, link.stats(), link.engine());
        }
        if let Some(history) = self.broker.history() {
            // Frees what expired on idle topics, so the gauges say what is held.
            history.sweep();
            crate::metrics::render_history(out, history.stats());
        } else if let Some(link) = self.cluster.as_ref().filter(|link| link.history().is_some()) {
            // The history is in Redis: what it holds is Redis's to count; recoveries are ours.
            crate::metrics::render_history(out, link.history_stats());
        }
    }

    fn is_degraded(&self) -> bool {
        self.cluster.as_ref().is_some_and(|link| link.is_degraded())
    }

    fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize {
        self.broker.publish(topic, kind, payload, None)
    }

    fn allowed_origins(&self) -> &[String] {
        &self.policy.allowed_origins
    }

    fn publish_key(&self) -> Option<&PublishKey> {
        self.publish_key.as_ref()
    }

    fn authenticator(&self) -> Option<&Authenticator> {
        self.auth.enabled().then_some(&*self.auth)
    }
}

#[cfg(test)]
impl WorkerContext {
    /// A context with default limits and one worker's counters, for state machine tests.
    pub fn for_tests() -> WorkerContext {
        let stats: Arc<WorkerStats> = Arc::default();
        let (hub, _deliveries) = crate::gateway::pubsub::Hub::new(1);
        let compressor = Rc::new(Compressor::new(
            crate::gateway::compression::CompressionSettings::default(),
            Arc::clone(&stats),
        ));
        let settings = crate::gateway::pubsub::BrokerSettings {
            policy: crate::gateway::pubsub::SlowConsumerPolicy::Close,
            max_backpressure: 1 << 20,
            echo_to_publisher: false,
            stats: Arc::clone(&stats),
        };
        let broker = Broker::new(0, hub, settings, Rc::clone(&compressor));
        WorkerContext {
            limits: Limits::default(),
            max_backpressure: 1 << 20,
            max_header_bytes: 8192,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            policy: StaticPolicy::default(),
            publish_key: None,
            router: Router::default(),
            stats: Arc::clone(&stats),
            open_connections: Arc::default(),
            max_conns: 100,
            broker: Rc::new(broker),
            compressor,
            all_stats: Arc::from(vec![stats]),
            start_time_seconds: 0.0,
            io_backend: "test",
            keepalive_connections: Cell::new(0),
            draining: Cell::new(false),
            proxies: Arc::default(),
            upstream_timeout: Duration::from_secs(1),
            auth: Arc::new(
                Authenticator::load(crate::gateway::auth::AuthSettings::default()).expect("no keys to load"),
            ),
            route_auth: RouteAuth::default(),
            refused_publish: RefusedPublish::Close,
            subject_header: Arc::from("X-Ringgate-Sub"),
            rates: MessageRates::default(),
            address_limits: None,
            listener_tls: Arc::from(Vec::new()),
            upstream_tls: None,
            cluster: None,
        }
    }
}
