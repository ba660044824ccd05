//! The TOML configuration file (`--config FILE`): every flag has a key, and a flag given on the
//! command line wins over the file.
//!
//! The file is parsed strictly: an unknown key or a bad value is an error that names the key and
//! the line (the `toml` crate's error carries the span), so a typo never silently falls back to a
//! default. Must never: accept a key that does nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    Config, IoChoice, RoutePath, parse_duration, parse_proxy_prefix, parse_route_path, parse_size,
    parse_upstream_url,
};
use crate::gateway::auth::{AuthMode, RefusedPublish};
use crate::gateway::cluster::BrokerUrl;
use crate::gateway::compression::CompressionMode;
use crate::gateway::proxy::{ProxyRouteSpec, UpstreamUrl};
use crate::gateway::pubsub::SlowConsumerPolicy;
use crate::gateway::rate_limit::RateLimitAction;
use crate::tls::certs::CertKeyPaths;

/// The whole file. Sections mirror `--help`'s groups.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    rate_limits: RateLimitsSection,
    #[serde(default)]
    websocket: WebSocketSection,
    #[serde(default)]
    pubsub: PubSubSection,
    #[serde(default)]
    routes: RoutesSection,
    #[serde(default)]
    compression: CompressionSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    tls: TlsSection,
    /// `[[listener]]` tables: one per listening address, each with its own TLS (or none).
    listener: Option<Vec<ListenerSection>>,
    #[serde(default)]
    broker: BrokerSection,
    /// `[[proxy]]` tables: one per proxy route.
    proxy: Option<Vec<ProxySection>>,
}

/// Certificates shared by every `[server] listen` address (the file's --tls-cert/--tls-key).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: Option<Vec<PathBuf>>,
    key: Option<Vec<PathBuf>>,
    upstream_ca: Option<Vec<PathBuf>>,
}

/// One listener with its own certificates: `tls_cert` and `tls_key` pair up in order; none
/// makes it plain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    address: SocketAddr,
    #[serde(default)]
    tls_cert: Vec<PathBuf>,
    #[serde(default)]
    tls_key: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    prefix: Prefix,
    upstreams: Vec<Upstream>,
    auth: Option<AuthMode>,
}

/// A proxy route's path prefix.
#[derive(Debug, Clone)]
struct Prefix(String);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_proxy_prefix(&text).map(Prefix).map_err(serde::de::Error::custom)
    }
}

/// An upstream URL, `ws://host:port`.
#[derive(Debug, Clone)]
struct Upstream(UpstreamUrl);

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_upstream_url(&text).map(Upstream).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<Vec<SocketAddr>>,
    workers: Option<usize>,
    io: Option<IoChoice>,
    coalesce_wait: Option<Seconds>,
    backlog: Option<u32>,
    max_conns: Option<usize>,
    drain_timeout: Option<Seconds>,
    log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_message_size: Option<Size>,
    max_frame_size: Option<Size>,
    max_backpressure: Option<Size>,
    handshake_timeout: Option<Seconds>,
    idle_timeout: Option<Seconds>,
    upstream_timeout: Option<Seconds>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitsSection {
    max_message_rate: Option<u32>,
    max_byte_rate: Option<Size>,
    action: Option<RateLimitAction>,
    max_conns_per_ip: Option<u32>,
    max_conn_rate_per_ip: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebSocketSection {
    allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    publish_key_file: Option<std::path::PathBuf>,
}

/// `[broker]`: cross-node pub/sub.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    url: Option<Broker>,
    optional: Option<bool>,
    ca: Option<PathBuf>,
}

/// A broker URL, `redis://HOST:PORT` or `nats://HOST:PORT`.
#[derive(Debug, Clone)]
struct Broker(BrokerUrl);

impl<'de> Deserialize<'de> for Broker {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        BrokerUrl::parse(&text).map(Broker).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PubSubSection {
    slow_consumer: Option<SlowConsumerPolicy>,
    echo: Option<bool>,
    history_size: Option<usize>,
    history_ttl: Option<Seconds>,
    history_topics: Option<usize>,
    positions: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    jwt_secret_file: Option<PathBuf>,
    jwt_public_keys: Option<Vec<PathBuf>>,
    jwt_jwks: Option<PathBuf>,
    jwt_issuers: Option<Vec<String>>,
    jwt_audiences: Option<Vec<String>>,
    jwt_claim: Option<String>,
    echo: Option<AuthMode>,
    pubsub: Option<AuthMode>,
    proxy: Option<AuthMode>,
    refused_publish: Option<RefusedPublish>,
    upstream_subject_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressionSection {
    mode: Option<CompressionMode>,
    level: Option<u32>,
    min_size: Option<Size>,
    window_bits: Option<u8>,
    upstream: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesSection {
    echo: Option<Path>,
    pubsub: Option<Path>,
    publish: Option<Path>,
    metrics: Option<Path>,
    healthz: Option<Path>,
}

/// A size: `"16MiB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy)]
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(deserializer)? {
            NumberOrText::Number(n) => usize::try_from(n).map(Size).map_err(serde::de::Error::custom),
            NumberOrText::Text(text) => parse_size(&text).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration: `"10s"`, `"500ms"` or a plain number of seconds.
#[derive(Debug, Clone, Copy)]
struct Seconds(Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(deserializer)? {
            NumberOrText::Number(n) => {
                u64::try_from(n).map(|s| Seconds(Duration::from_secs(s))).map_err(serde::de::Error::custom)
            }
            NumberOrText::Text(text) => parse_duration(&text).map(Seconds).map_err(serde::de::Error::custom),
        }
    }
}

/// A route path, or `"off"`.
#[derive(Debug, Clone)]
struct Path(RoutePath);

impl<'de> Deserialize<'de> for Path {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_route_path(&text).map(Path).map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(i64),
    Text(String),
}

impl FileConfig {
    /// Parses the file's text; errors name the key and the line.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        let file: FileConfig = toml::from_str(text).map_err(|error| error.to_string())?;
        for listener in file.listener.iter().flatten() {
            if listener.tls_cert.len() != listener.tls_key.len() {
                return Err(format!(
                    "[[listener]] {}: tls_cert and tls_key come in pairs ({} certificates, {} keys)",
                    listener.address,
                    listener.tls_cert.len(),
                    listener.tls_key.len()
                ));
            }
        }
        if file.listener.is_some() && file.server.listen.is_some() {
            return Err(
                "give the listening addresses either as [server] listen or as [[listener]] tables".into()
            );
        }
        Ok(file)
    }

    /// Copies every value the file sets into `config`, except those whose flag was given on the
    /// command line (`from_command_line` says which, by clap argument id).
    pub fn apply(self, config: &mut Config, from_command_line: impl Fn(&str) -> bool) {
        let FileConfig {
            server,
            limits,
            rate_limits,
            websocket,
            pubsub,
            routes,
            compression,
            auth,
            http,
            tls,
            listener,
            broker,
            proxy,
        } = self;
        macro_rules! take {
            ($id:literal, $value:expr, $field:expr) => {
                if let Some(value) = $value
                    && !from_command_line($id)
                {
                    $field = value;
                }
            };
        }
        take!("listen", server.listen, config.listen);
        take!("tls_certs", tls.cert, config.tls_certs);
        take!("tls_keys", tls.key, config.tls_keys);
        take!("upstream_cas", tls.upstream_ca, config.upstream_cas);
        if let Some(listeners) = listener
            && !from_command_line("listen")
        {
            config.listen = listeners.iter().map(|l| l.address).collect();
            config.listener_tls = Some(
                listeners
                    .into_iter()
                    .map(|l| {
                        l.tls_cert
                            .into_iter()
                            .zip(l.tls_key)
                            .map(|(cert, key)| CertKeyPaths { cert, key })
                            .collect()
                    })
                    .collect(),
            );
        }
        take!("workers", server.workers.map(Some), config.workers);
        take!("io", server.io, config.io);
        take!("coalesce_wait", server.coalesce_wait.map(|d| d.0), config.coalesce_wait);
        take!("backlog", server.backlog, config.backlog);
        take!("max_conns", server.max_conns, config.max_conns);
        take!("drain_timeout", server.drain_timeout.map(|d| d.0), config.drain_timeout);
        take!("log_level", server.log_level, config.log_level);
        take!("max_message_size", limits.max_message_size.map(|s| s.0), config.max_message_size);
        take!("max_frame_size", limits.max_frame_size.map(|s| Some(s.0)), config.max_frame_size);
        take!("max_backpressure", limits.max_backpressure.map(|s| s.0), config.max_backpressure);
        take!("handshake_timeout", limits.handshake_timeout.map(|d| d.0), config.handshake_timeout);
        take!("idle_timeout", limits.idle_timeout.map(|d| d.0), config.idle_timeout);
        take!("upstream_timeout", limits.upstream_timeout.map(|d| d.0), config.upstream_timeout);
        take!("max_message_rate", rate_limits.max_message_rate, config.max_message_rate);
        take!("max_byte_rate", rate_limits.max_byte_rate.map(|s| s.0), config.max_byte_rate);
        take!("rate_limit_action", rate_limits.action, config.rate_limit_action);
        take!("max_conns_per_ip", rate_limits.max_conns_per_ip, config.max_conns_per_ip);
        take!("max_conn_rate_per_ip", rate_limits.max_conn_rate_per_ip, config.max_conn_rate_per_ip);
        take!("allowed_origins", websocket.allowed_origins, config.allowed_origins);
        take!("publish_key_file", http.publish_key_file.map(Some), config.publish_key_file);
        take!("slow_consumer", pubsub.slow_consumer, config.slow_consumer);
        take!("pubsub_echo", pubsub.echo, config.pubsub_echo);
        take!("history_size", pubsub.history_size, config.history_size);
        take!("history_ttl", pubsub.history_ttl.map(|d| d.0), config.history_ttl);
        take!("history_topics", pubsub.history_topics, config.history_topics);
        take!("positions", pubsub.positions, config.positions);
        take!("broker", broker.url.map(|b| Some(b.0)), config.broker);
        take!("broker_optional", broker.optional, config.broker_optional);
        take!("broker_ca", broker.ca.map(Some), config.broker_ca);
        take!("compression", compression.mode, config.compression);
        take!("compression_level", compression.level, config.compression_level);
        take!("compression_min_size", compression.min_size.map(|s| s.0), config.compression_min_size);
        take!("compression_window_bits", compression.window_bits, config.compression_window_bits);
        take!("upstream_compression", compression.upstream, config.upstream_compression);
        take!("jwt_secret_file", auth.jwt_secret_file.map(Some), config.jwt_secret_file);
        take!("jwt_public_keys", auth.jwt_public_keys, config.jwt_public_keys);
        take!("jwt_jwks", auth.jwt_jwks.map(Some), config.jwt_jwks);
        take!("jwt_issuers", auth.jwt_issuers, config.jwt_issuers);
        take!("jwt_audiences", auth.jwt_audiences, config.jwt_audiences);
        take!("jwt_claim", auth.jwt_claim, config.jwt_claim);
        take!("echo_auth", auth.echo.map(Some), config.echo_auth);
        take!("pubsub_auth", auth.pubsub.map(Some), config.pubsub_auth);
        take!("proxy_auth", auth.proxy.map(Some), config.proxy_auth);
        take!("refused_publish", auth.refused_publish, config.refused_publish);
        take!("upstream_subject_header", auth.upstream_subject_header, config.upstream_subject_header);
        take!("echo_path", routes.echo.map(|p| p.0), config.echo_path);
        take!("pubsub_path", routes.pubsub.map(|p| p.0), config.pubsub_path);
        take!("publish_path", routes.publish.map(|p| p.0), config.publish_path);
        take!("metrics_path", routes.metrics.map(|p| p.0), config.metrics_path);
        take!("healthz_path", routes.healthz.map(|p| p.0), config.healthz_path);
        let proxy = proxy.map(|sections| {
            sections
                .into_iter()
                .map(|s| ProxyRouteSpec {
                    auth: s.auth,
                    prefix: s.prefix.0,
                    upstreams: s.upstreams.into_iter().map(|u| u.0).collect(),
                })
                .collect()
        });
        take!("proxy_routes", proxy, config.proxy_routes);
    }
}
