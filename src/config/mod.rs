//! The gateway's configuration: command-line flags and an optional TOML file (`file`), merged and
//! validated once at start with errors that tell the operator what to change. Every default is
//! something an operator could deploy as is.
//!
//! Must never: let an inconsistent configuration reach the workers (a zero timeout, a frame limit
//! above the message limit, no listen address).

mod file;

pub use file::FileConfig;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use crate::gateway::address_limits::AddressLimitSettings;
use crate::gateway::auth::{AuthMode, AuthSettings, RefusedPublish};
use crate::gateway::cluster::BrokerUrl;
use crate::gateway::compression::{CompressionMode, CompressionSettings};
use crate::gateway::proxy::{ProxyRouteSpec, UpstreamUrl};
use crate::gateway::publish_key::PublishKey;
use crate::gateway::pubsub::SlowConsumerPolicy;
use crate::gateway::rate_limit::{MessageRates, RateLimitAction};
use crate::gateway::router::Router;
use crate::tls::certs::CertKeyPaths;

/// ringgate: an io_uring WebSocket gateway.
///
/// Starts one worker per core, each with its own io_uring and SO_REUSEPORT listener. Routes:
/// `/echo` echoes every message; `/pubsub/{topic}` subscribes to a topic and publishes what the
/// client sends; `POST /publish/{topic}` publishes the body; `/metrics` (Prometheus) and `/healthz`;
/// `--route PREFIX=ws://…` relays WebSocket clients to upstream servers. SIGTERM or SIGINT drains
/// gracefully (close 1001 to every connection, up to --drain-timeout); a second signal exits at once.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(name = "ringgate", version, about, long_about)]
pub struct Config {
    /// TOML configuration file with any of these settings (see deploy/ringgate.toml); flags given on
    /// the command line override it.
    #[arg(long = "config", value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,

    /// Validate the configuration (flags and file), print it, and exit: 0 if valid, 2 if not.
    #[arg(long)]
    pub check_config: bool,

    /// Address to listen on; repeat for several. Port 0 picks a free port (printed at start).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: Vec<SocketAddr>,

    /// PEM certificate chain, leaf first (repeatable, paired in order with --tls-key): makes every
    /// --listen address TLS (wss://, https://). With several, the client's SNI picks the first
    /// that covers the name it asks for; the first is the default. Reloaded on SIGHUP.
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub tls_certs: Vec<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the --tls-cert at the same position.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub tls_keys: Vec<PathBuf>,

    /// Per listener, from the file's `[[listener]]` tables: its own certificates (none: plain).
    /// `None` when the listeners are the --listen addresses, all sharing --tls-cert.
    #[arg(skip)]
    pub listener_tls: Option<Vec<Vec<CertKeyPaths>>>,

    /// Worker threads, each with its own io_uring and listener [default: number of cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// I/O backend: `uring` (io_uring: multishot receives into a provided-buffer ring), `epoll`
    /// (readiness; for hosts where io_uring is blocked, such as Docker's default seccomp profile),
    /// or `auto`: io_uring when it works here, else epoll, with one log line saying why.
    #[arg(long, value_enum, value_name = "BACKEND", default_value = "auto", env = "RINGGATE_IO")]
    pub io: IoChoice,

    /// io_uring only: once a worker has nothing to do, let it sleep up to this long for a batch of
    /// completions before it wakes for the first one (0 = wake for the first). Under many
    /// connections with sparse traffic this trades that much added latency for fewer wake-ups and
    /// less CPU per message; under dense traffic the batch fills at once. Needs Linux 6.12.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub coalesce_wait: Duration,

    /// Listen backlog per worker socket (the kernel caps it at net.core.somaxconn).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub backlog: u32,

    /// Most connections open at once, all workers together; excess ones get a fast 503.
    /// Also capped by the open-file limit (RLIMIT_NOFILE), which is raised to its hard limit at start.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_conns: usize,

    /// Largest message accepted (all fragments together); larger ones close with 1009.
    /// Accepts B, KiB, MiB, GiB suffixes.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Largest single frame accepted; larger ones close with 1009 [default: --max-message-size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_frame_size: Option<usize>,

    /// Bytes that may wait to be sent to one client; while over it, that client is not read from.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_backpressure: usize,

    /// Time a client has to complete its upgrade request before the connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection with no traffic for this long is closed (1001); a ping goes out at half of it.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, time connections get to finish their closing handshakes before exit.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Origin allowed to call the gateway from a browser (repeatable), e.g. `https://app.example`:
    /// on every endpoint (WebSocket upgrades, /publish, /metrics, /healthz) a request whose Origin
    /// is not listed gets 403, and pages on a listed origin get CORS on /publish (preflights
    /// answered, Access-Control-Allow-Origin naming that origin, never `*`). None listed: every
    /// origin may send and no CORS header is sent, so no page can read a publish answer or send a
    /// publish key. Requests without Origin (non-browser clients) are always allowed.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,

    /// File holding the key `POST /publish` requires as `Authorization: Bearer KEY` (the file's
    /// content; a trailing line break is ignored). Without the key: 401; a wrong key: 401
    /// `invalid_token`. An empty or unreadable file stops the start. Unset: publishing is open.
    #[arg(long, value_name = "FILE")]
    pub publish_key_file: Option<std::path::PathBuf>,

    /// The key read from `--publish-key-file` by [`Config::load`] (never printed).
    #[arg(skip)]
    pub publish_key: Option<PublishKey>,

    /// What to do with a pub/sub subscriber whose queue passes --max-backpressure: `close` it with
    /// 1008 "slow consumer", or `drop` the messages it has no room for (counted in /metrics).
    #[arg(long, value_enum, value_name = "POLICY", default_value = "close")]
    pub slow_consumer: SlowConsumerPolicy,

    /// Deliver a pub/sub client's own messages back to it too (by default a publisher is excluded).
    #[arg(long)]
    pub pubsub_echo: bool,

    /// Messages kept per topic, so that a subscriber reconnecting with `?since=EPOCH:OFFSET` gets
    /// what it missed before the live stream (see the README, "History and recovery"). 0: no
    /// history (`?since=` is answered "unavailable"). With `--broker redis://` the history is kept in
    /// Redis (a stream per topic, shared by the nodes); NATS keeps none.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub history_size: usize,

    /// How long a kept message stays in the history; 0s: until --history-size newer ones push it
    /// out. A topic whose messages all expired is dropped (its next message starts a new epoch).
    /// In Redis, a topic's whole history expires this long after its last message.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// Topics with a history at once, at most: a new topic past it pushes out the history of the
    /// topic published to least recently (its next message starts a new epoch). With
    /// --history-size, bounds what the history holds: topics x size messages. In process only
    /// (Redis holds as many topics as its memory policy lets it).
    #[arg(long, value_name = "N", default_value_t = crate::gateway::history::DEFAULT_HISTORY_TOPICS)]
    pub history_topics: usize,

    /// Send every pub/sub message with its position (epoch and offset), so that a client knows
    /// what to ask for with `?since=`: text messages as `{"epoch":"…","offset":N,"data":"…"}`,
    /// binary ones with 16 bytes in front (epoch, offset: big-endian u64). Off: messages as sent.
    #[arg(long)]
    pub positions: bool,

    /// Path of the echo route (WebSocket); `off` disables it.
    #[arg(long, value_name = "PATH", default_value = "/echo", value_parser = parse_route_path)]
    pub echo_path: RoutePath,

    /// Prefix of the pub/sub routes (WebSocket, `PREFIX/{topic}`); `off` disables them.
    #[arg(long, value_name = "PREFIX", default_value = "/pubsub", value_parser = parse_route_path)]
    pub pubsub_path: RoutePath,

    /// Prefix of the HTTP publish API (`POST PREFIX/{topic}`); `off` disables it.
    #[arg(long, value_name = "PREFIX", default_value = "/publish", value_parser = parse_route_path)]
    pub publish_path: RoutePath,

    /// Path of the Prometheus metrics endpoint (`GET`); `off` disables it.
    #[arg(long, value_name = "PATH", default_value = "/metrics", value_parser = parse_route_path)]
    pub metrics_path: RoutePath,

    /// Path of the health endpoint (`GET`: 200 `ok` while serving, 200 `degraded` while the --broker
    /// is unreachable, 503 while draining); `off` disables it.
    #[arg(long, value_name = "PATH", default_value = "/healthz", value_parser = parse_route_path)]
    pub healthz_path: RoutePath,

    /// Proxy route (repeatable): WebSocket clients whose path starts with PREFIX (at a segment
    /// boundary) are relayed to one of the ws:// or wss:// upstreams, round-robin over the healthy ones; the
    /// rest of the path and the query go upstream. Built-in routes win over proxy routes; the
    /// longest matching prefix wins. Example: `--route /app=ws://10.0.0.5:9000,ws://10.0.0.6:9000`.
    #[arg(long = "route", value_name = "PREFIX=URL[,URL...]", value_parser = parse_proxy_route)]
    pub proxy_routes: Vec<ProxyRouteSpec>,

    /// Time an upstream gets to accept the connection and to answer the upgrade (else 504).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// PEM file of CA certificates trusted for wss:// upstreams, besides the system's roots
    /// (repeatable). A wss:// upstream's certificate must cover the URL's host (sent as SNI).
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_cas: Vec<PathBuf>,

    /// permessage-deflate (RFC 7692): `shared` agrees it with clients that offer it (every browser
    /// does) using one compressor per worker, reset after each message, so a connection holds no
    /// compression state and a pub/sub message is compressed once per worker; `dedicated` gives
    /// each connection its own compressor that keeps context between messages (better ratios,
    /// about 310 KiB per connection that is sent compressed messages); `off` declines.
    #[arg(long, value_enum, value_name = "MODE", default_value = "shared")]
    pub compression: CompressionMode,

    /// zlib compression level, 0-9: 1 is fastest (the default; most of the saving on JSON for a
    /// third of level 6's CPU), 9 smallest.
    #[arg(long, value_name = "LEVEL", default_value_t = 1)]
    pub compression_level: u32,

    /// Messages shorter than this are sent uncompressed: below it, deflate rarely saves a byte.
    #[arg(long, value_name = "SIZE", default_value = "128B", value_parser = parse_size)]
    pub compression_min_size: usize,

    /// Dedicated mode: the largest window (9-15, 2^bits bytes) the server compresses with; smaller
    /// windows hold less memory per connection and compress less.
    #[arg(long, value_name = "BITS", default_value_t = 15)]
    pub compression_window_bits: u8,

    /// Offer permessage-deflate to proxy upstreams too (unless --compression off); the relay then
    /// inflates and compresses again on that hop. Off by default: upstreams are usually a LAN
    /// away, where compressing costs CPU at both ends and saves nothing that matters.
    #[arg(long)]
    pub upstream_compression: bool,

    /// JWT on connect: a file holding the HS256/384/512 secret (at least 32 bytes).
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<std::path::PathBuf>,

    /// JWT on connect: a PEM public key (RSA, EC P-256/P-384 or Ed25519) tokens may be signed
    /// for (repeatable).
    #[arg(long = "jwt-public-key", value_name = "FILE")]
    pub jwt_public_keys: Vec<std::path::PathBuf>,

    /// JWT on connect: a JWKS file of public keys (read again on SIGHUP; a bad file keeps the keys
    /// in force and logs why).
    #[arg(long, value_name = "FILE")]
    pub jwt_jwks: Option<std::path::PathBuf>,

    /// Accepted `iss` of tokens (repeatable); none: not checked.
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    pub jwt_issuers: Vec<String>,

    /// Accepted `aud` of tokens (repeatable); none: not checked (a token carrying one is refused).
    #[arg(long = "jwt-audience", value_name = "AUD")]
    pub jwt_audiences: Vec<String>,

    /// The claim holding a token's topic permissions: `{"subscribe": [GLOB...], "publish": [GLOB...]}`.
    #[arg(long, value_name = "NAME", default_value = "ringgate")]
    pub jwt_claim: String,

    /// Whether the echo route needs a token: `required` (401 without a valid one), `optional` (a
    /// token given must be valid), `off` [default: required once a JWT key is configured, else off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub echo_auth: Option<AuthMode>,

    /// The same for the pub/sub routes; a token must also grant the topic (else 403).
    #[arg(long, value_enum, value_name = "MODE")]
    pub pubsub_auth: Option<AuthMode>,

    /// The same for proxy routes (a `[[proxy]]` table's `auth` overrides it for its route); the
    /// token's `sub` goes upstream in --upstream-subject-header.
    #[arg(long, value_enum, value_name = "MODE")]
    pub proxy_auth: Option<AuthMode>,

    /// What a pub/sub connection whose token does not grant publishing to its topic gets when it
    /// sends a message: `close` (1008) or `drop` (the message is discarded and counted).
    #[arg(long, value_enum, value_name = "POLICY", default_value = "close")]
    pub refused_publish: RefusedPublish,

    /// The header that carries a verified token's `sub` to proxy upstreams (a client's own copy is
    /// never forwarded).
    #[arg(long, value_name = "NAME", default_value = "X-Ringgate-Sub")]
    pub upstream_subject_header: String,

    /// Messages per second one client may send (Pings and Pongs included), as a bucket of one
    /// second's worth: a client at or under the rate never trips it; one over it gets
    /// --rate-limit-action once the second's allowance is spent. 0: unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_message_rate: u32,

    /// Payload bytes per second one client may send (after decompression), as a bucket of one
    /// second's worth; a larger message passes on a full bucket and leaves it in debt. Accepts B,
    /// KiB, MiB, GiB suffixes; 0: unlimited.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub max_byte_rate: usize,

    /// What a client over --max-message-rate or --max-byte-rate gets: `close` (1008 "rate limit
    /// exceeded") or `drop` (each message over the rate is discarded, counted in /metrics).
    #[arg(long, value_enum, value_name = "ACTION", default_value = "close")]
    pub rate_limit_action: RateLimitAction,

    /// Connections one address (IPv4, or IPv6 /64) may hold open at once, all workers together;
    /// excess ones get 429. 0: unlimited. Behind a load balancer every client shares its address:
    /// leave it off there.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conns_per_ip: u32,

    /// New connections one address may open per second (a bucket of one second's worth); excess
    /// ones get 429. 0: unlimited.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_conn_rate_per_ip: u32,

    /// Cross-node pub/sub: `redis://HOST:PORT`, `redis+cluster://HOST:PORT[,HOST:PORT...]` (a Redis
    /// Cluster with sharded pub/sub: a message goes only to the shard owning its topic's slot; any
    /// seed that answers will do) or `nats://HOST:PORT`. A node subscribes to a topic at
    /// the broker while it has a subscriber on it; every publish goes to the broker once and reaches
    /// the subscribers on every node (exactly once each, in each publisher's order). Local
    /// delivery never waits for the broker and goes on without it. Unset: this process is the
    /// whole broker.
    #[arg(long, value_name = "URL", value_parser = BrokerUrl::parse)]
    pub broker: Option<BrokerUrl>,

    /// Start even if the --broker is unreachable (local delivery only, /healthz "degraded", and
    /// reconnecting in the background); without it, an unreachable broker stops the start.
    #[arg(long)]
    pub broker_optional: bool,

    /// PEM file of the CA certificates a `rediss://` --broker's certificate must chain to, in place
    /// of the system's roots (a self-hosted Redis with a private CA). The certificate must cover
    /// the URL's host.
    #[arg(long, value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive like `ringgate=debug`.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

/// Which I/O backend runs the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring when it can be set up here, else epoll.
    Auto,
    /// io_uring only: fail to start where it is blocked.
    Uring,
    /// epoll only.
    Epoll,
}

/// A route's path, or `None` when the operator turned the route off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePath(pub Option<String>);

/// Parses a route path: `off`, or an absolute path without a trailing slash or query.
pub fn parse_route_path(text: &str) -> Result<RoutePath, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(RoutePath(None));
    }
    let valid =
        text.starts_with('/') && !text.contains(['?', '#', ' ']) && (text == "/" || !text.ends_with('/'));
    if valid {
        Ok(RoutePath(Some(text.to_string())))
    } else {
        Err(format!("'{text}' is not a path like /echo (or off)"))
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// Bad command-line usage, or `--help`/`--version` (clap prints these itself).
    Usage(clap::Error),
    /// The file or the merged values are invalid.
    Invalid(ConfigError),
}

impl From<ConfigError> for LoadError {
    fn from(error: ConfigError) -> Self {
        LoadError::Invalid(error)
    }
}

/// A configuration the gateway cannot run with, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses the command line, merges the `--config` file under it, and validates the result.
    /// Usage errors (and `--help`) come back as `clap::Error`, which prints and exits itself.
    pub fn load<I, T>(args: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Config::command().try_get_matches_from(args).map_err(LoadError::Usage)?;
        let mut config = Config::from_arg_matches(&matches).map_err(LoadError::Usage)?;
        if let Some(path) = &config.config_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let file =
                FileConfig::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            file.apply(&mut config, |id| {
                matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
            });
        }
        config.validate()?;
        if let Some(path) = &config.publish_key_file {
            config.publish_key = Some(PublishKey::from_file(path).map_err(ConfigError)?);
        }
        Ok(config)
    }

    /// The worker count after applying the default.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
    }

    /// The frame limit after applying the default.
    pub fn frame_limit(&self) -> usize {
        self.max_frame_size.unwrap_or(self.max_message_size)
    }

    /// What the workers' compression needs.
    pub fn compression_settings(&self) -> CompressionSettings {
        CompressionSettings {
            mode: self.compression,
            level: self.compression_level,
            min_size: self.compression_min_size,
            window_bits: self.compression_window_bits,
            upstream: self.upstream_compression,
        }
    }

    /// Every listener and its certificates (empty: plain), in `listen` order.
    pub fn listeners(&self) -> Vec<(SocketAddr, Vec<CertKeyPaths>)> {
        let shared: Vec<CertKeyPaths> = self
            .tls_certs
            .iter()
            .zip(&self.tls_keys)
            .map(|(cert, key)| CertKeyPaths { cert: cert.clone(), key: key.clone() })
            .collect();
        self.listen
            .iter()
            .enumerate()
            .map(|(index, &addr)| {
                let tls = match &self.listener_tls {
                    Some(per_listener) => per_listener.get(index).cloned().unwrap_or_default(),
                    None => shared.clone(),
                };
                (addr, tls)
            })
            .collect()
    }

    /// The per-connection rates every worker enforces.
    pub fn message_rates(&self) -> MessageRates {
        MessageRates {
            messages_per_second: self.max_message_rate,
            bytes_per_second: self.max_byte_rate as u64,
            action: self.rate_limit_action,
        }
    }

    /// What history the process keeps (`--history-size`, `--history-ttl`, `--positions`).
    pub fn history_settings(&self) -> crate::gateway::history::HistorySettings {
        crate::gateway::history::HistorySettings {
            size: self.history_size,
            ttl: self.history_ttl,
            positions: self.positions,
            max_topics: self.history_topics,
        }
    }

    /// The per-address limits, for the process-wide table.
    pub fn address_limit_settings(&self) -> AddressLimitSettings {
        AddressLimitSettings {
            max_conns_per_ip: self.max_conns_per_ip,
            max_conn_rate_per_ip: self.max_conn_rate_per_ip,
        }
    }

    /// What the JWT verifier needs.
    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            secret_file: self.jwt_secret_file.clone(),
            public_key_files: self.jwt_public_keys.clone(),
            jwks_file: self.jwt_jwks.clone(),
            issuers: self.jwt_issuers.clone(),
            audiences: self.jwt_audiences.clone(),
            claim: self.jwt_claim.clone(),
        }
    }

    /// A route's auth mode after the default: `required` once a key is configured, else `off`.
    pub fn auth_mode(&self, configured: Option<AuthMode>) -> AuthMode {
        configured.unwrap_or(if self.auth_settings().has_keys() { AuthMode::Required } else { AuthMode::Off })
    }

    /// The router for the configured route paths.
    pub fn router(&self) -> Router {
        Router {
            echo: self.echo_path.0.clone(),
            pubsub: self.pubsub_path.0.clone(),
            publish: self.publish_path.0.clone(),
            metrics: self.metrics_path.0.clone(),
            healthz: self.healthz_path.0.clone(),
            proxies: self.proxy_routes.iter().map(|r| r.prefix.clone()).collect(),
        }
    }

    /// Checks the relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.listen.is_empty() {
            return fail("at least one --listen address is needed".into());
        }
        if self.worker_count() == 0 || self.worker_count() > 1024 {
            return fail(format!("--workers must be 1..=1024, got {}", self.worker_count()));
        }
        if self.max_conns == 0 {
            return fail("--max-conns must be at least 1".into());
        }
        if self.tls_certs.len() != self.tls_keys.len() {
            return fail(format!(
                "--tls-cert and --tls-key come in pairs: {} certificates, {} keys",
                self.tls_certs.len(),
                self.tls_keys.len()
            ));
        }
        if self.coalesce_wait > Duration::from_millis(10) {
            return fail(format!(
                "--coalesce-wait must be at most 10ms (it is added to every message's latency when \
                 traffic is sparse), got {:?}",
                self.coalesce_wait
            ));
        }
        if self.max_message_size == 0 {
            return fail("--max-message-size must be at least 1 byte".into());
        }
        if self.frame_limit() > self.max_message_size {
            return fail(format!(
                "--max-frame-size ({}) is larger than --max-message-size ({}); a frame is part of a message",
                self.frame_limit(),
                self.max_message_size
            ));
        }
        for (name, value) in
            [("--handshake-timeout", self.handshake_timeout), ("--idle-timeout", self.idle_timeout)]
        {
            if value.is_zero() {
                return fail(format!("{name} must be more than zero"));
            }
        }
        let exact: Vec<&String> = [&self.echo_path, &self.metrics_path, &self.healthz_path]
            .iter()
            .filter_map(|p| p.0.as_ref())
            .collect();
        for (i, path) in exact.iter().enumerate() {
            if exact[i + 1..].contains(path) {
                return fail(format!("two routes share the path {path}"));
            }
        }
        for (i, route) in self.proxy_routes.iter().enumerate() {
            if self.proxy_routes[i + 1..].iter().any(|other| other.prefix == route.prefix) {
                return fail(format!("two proxy routes share the prefix {}", route.prefix));
            }
        }
        if self.upstream_timeout.is_zero() {
            return fail("--upstream-timeout must be more than zero".into());
        }
        let routes = [
            ("--echo-auth", self.echo_auth),
            ("--pubsub-auth", self.pubsub_auth),
            ("--proxy-auth", self.proxy_auth),
        ];
        let per_route = self.proxy_routes.iter().map(|r| (r.prefix.as_str(), r.auth));
        for (name, mode) in routes.into_iter().chain(per_route) {
            if matches!(mode, Some(AuthMode::Optional | AuthMode::Required))
                && !self.auth_settings().has_keys()
            {
                return fail(format!(
                    "{name} asks for tokens, but no key checks them: give --jwt-secret-file, --jwt-public-key or --jwt-jwks"
                ));
            }
        }
        if self.jwt_claim.is_empty() {
            return fail("--jwt-claim must name a claim".into());
        }
        if http_header_name_is_invalid(&self.upstream_subject_header) {
            return fail(format!(
                "--upstream-subject-header '{}' is not a header name",
                self.upstream_subject_header
            ));
        }
        if self.compression_level > 9 {
            return fail(format!("--compression-level must be 0..=9, got {}", self.compression_level));
        }
        if !(9..=15).contains(&self.compression_window_bits) {
            return fail(format!(
                "--compression-window-bits must be 9..=15 (zlib cannot compress with 8), got {}",
                self.compression_window_bits
            ));
        }
        if self.max_backpressure < 1024 {
            return fail("--max-backpressure must be at least 1KiB".into());
        }
        if self.broker_optional && self.broker.is_none() {
            return fail("--broker-optional needs a --broker URL".into());
        }
        if self.broker_ca.is_some() && !self.broker.as_ref().is_some_and(BrokerUrl::is_tls) {
            return fail("--broker-ca is for a TLS broker: give a rediss:// --broker URL".into());
        }
        if self.history_size > crate::gateway::history::MAX_HISTORY_SIZE {
            return fail(format!(
                "--history-size must be at most {}, got {}",
                crate::gateway::history::MAX_HISTORY_SIZE,
                self.history_size
            ));
        }
        if self.history_topics == 0 {
            return fail("--history-topics must be at least 1".into());
        }
        if !self.history_ttl.is_zero() && self.history_size == 0 {
            return fail("--history-ttl needs a --history-size".into());
        }
        if matches!(self.broker, Some(BrokerUrl::Nats(_))) && (self.history_size > 0 || self.positions) {
            return fail(
                "--history-size and --positions need the in-process broker or --broker redis://: NATS \
                 keeps no history (with nats://, ?since= is answered \"unavailable\")"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Whether `name` is not an HTTP field name (RFC 9110 section 5.1: a token).
fn http_header_name_is_invalid(name: &str) -> bool {
    name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a proxy route: `PREFIX=URL[,URL...]`, e.g. `/app=ws://10.0.0.5:9000,ws://10.0.0.6:9000`.
pub fn parse_proxy_route(text: &str) -> Result<ProxyRouteSpec, String> {
    let (prefix, urls) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not a proxy route like /app=ws://10.0.0.5:9000"))?;
    let prefix = parse_proxy_prefix(prefix.trim())?;
    let upstreams =
        urls.split(',').map(|url| parse_upstream_url(url.trim())).collect::<Result<Vec<_>, _>>()?;
    Ok(ProxyRouteSpec { prefix, upstreams, auth: None })
}

/// Parses a proxy route's prefix: an absolute path without a query (a trailing slash is dropped).
pub fn parse_proxy_prefix(text: &str) -> Result<String, String> {
    if !text.starts_with('/') || text.contains(['?', '#', ' ']) {
        return Err(format!("'{text}' is not a path prefix like /app"));
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() })
}

/// Parses an upstream URL, `ws://host[:port][/path]`, resolving the host once, now.
pub fn parse_upstream_url(text: &str) -> Result<UpstreamUrl, String> {
    use std::net::ToSocketAddrs;
    let shape =
        || format!("'{text}' is not an upstream URL like ws://10.0.0.5:9000 or wss://backend.internal");
    let (rest, tls, default_port) = if let Some(rest) = text.strip_prefix("wss://") {
        (rest, true, 443)
    } else if let Some(rest) = text.strip_prefix("ws://") {
        (rest, false, 80)
    } else {
        return Err(shape());
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |at| rest.split_at(at));
    if authority.is_empty() || authority.contains(['@', ' ', '?', '#']) || path.contains(['?', '#', ' ']) {
        return Err(shape());
    }
    let has_port = !authority.ends_with(']') && authority.contains(':');
    let with_port = if has_port { authority.to_string() } else { format!("{authority}:{default_port}") };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("upstream '{text}': cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream '{text}': {authority} resolves to no address"))?;
    let host =
        if has_port { authority.rsplit_once(':').map_or(authority, |(host, _)| host) } else { authority };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(UpstreamUrl {
        url: text.to_string(),
        authority: authority.to_string(),
        addr,
        base_path: path.trim_end_matches('/').to_string(),
        tls_name: tls.then(|| host.to_string()),
    })
}

/// Parses `16MiB`, `64KiB`, `1GiB`, `512B` or plain bytes (`4096`). Binary units: a KiB is 1024.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits.parse().map_err(|_| format!("'{text}' is not a size like 64KiB or 1MiB"))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("unknown size unit '{other}' (use B, KiB, MiB or GiB)")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses `10s`, `500ms`, `2m`, `1h 30m` (humantime syntax) or plain seconds (`10`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| format!("'{text}' is not a duration like 10s or 500ms: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("ringgate").chain(args.iter().copied())).expect("valid flags")
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.listen, vec!["127.0.0.1:8080".parse().expect("addr")]);
        assert_eq!(config.max_message_size, 1 << 20);
        assert_eq!(config.frame_limit(), 1 << 20);
        assert_eq!(config.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.idle_timeout, Duration::from_secs(120));
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn frame_limit_above_message_limit_is_refused() {
        let config = parse(&["--max-message-size", "1KiB", "--max-frame-size", "2KiB"]);
        assert!(config.validate().is_err());
    }

    #[test]
    fn routes_can_be_moved_or_turned_off() {
        let config = parse(&["--echo-path", "off", "--pubsub-path", "/ws/topics"]);
        let router = config.router();
        assert_eq!(router.echo, None);
        assert_eq!(router.pubsub.as_deref(), Some("/ws/topics"));
        assert!(Config::try_parse_from(["ringgate", "--metrics-path", "metrics"]).is_err());
        assert!(parse(&["--metrics-path", "/x", "--healthz-path", "/x"]).validate().is_err());
    }

    fn load(args: &[&str], file: &str) -> Result<Config, LoadError> {
        let dir = std::env::temp_dir().join(format!("ringgate-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{:x}.toml", file.len() * 31 + args.len()));
        std::fs::write(&path, file).expect("write config");
        let path = path.to_string_lossy().into_owned();
        let mut argv = vec!["ringgate", "--config", path.as_str()];
        argv.extend_from_slice(args);
        Config::load(argv)
    }

    fn invalid(result: Result<Config, LoadError>) -> String {
        match result {
            Err(LoadError::Invalid(ConfigError(message))) => message,
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn the_file_sets_values_and_flags_override_it() {
        let file = r#"
            [server]
            listen = ["127.0.0.1:9000", "127.0.0.2:9000"]
            workers = 3
            [limits]
            max_message_size = "16MiB"
            idle_timeout = 30
            [pubsub]
            slow_consumer = "drop"
            [routes]
            echo = "off"
        "#;
        let config = load(&[], file).expect("valid");
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.workers, Some(3));
        assert_eq!(config.max_message_size, 16 << 20);
        assert_eq!(config.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.slow_consumer, SlowConsumerPolicy::Drop);
        assert_eq!(config.router().echo, None);

        let config = load(&["--listen", "127.0.0.3:1", "--max-message-size", "2MiB", "--workers", "1"], file)
            .expect("valid");
        assert_eq!(config.listen, vec!["127.0.0.3:1".parse().expect("addr")]);
        assert_eq!(config.max_message_size, 2 << 20);
        assert_eq!(config.workers, Some(1));
        assert_eq!(config.slow_consumer, SlowConsumerPolicy::Drop, "not on the command line: the file's");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_line() {
        let message = invalid(load(&[], "[server]\nworkers = 2\nmax_conn = 10\n"));
        assert!(message.contains("max_conn"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        let message = invalid(load(&[], "[servr]\n"));
        assert!(message.contains("servr"), "{message}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key_and_line() {
        let message = invalid(load(&[], "[limits]\n\nmax_message_size = \"12 parsecs\"\n"));
        assert!(message.contains("max_message_size") && message.contains("line 3"), "{message}");
        let message = invalid(load(&[], "[routes]\nmetrics = \"metrics\"\n"));
        assert!(message.contains("metrics") && message.contains("line 2"), "{message}");
        let message = invalid(load(&[], "[server]\nlisten = [\"nowhere\"]\n"));
        assert!(message.contains("listen") && message.contains("line 2"), "{message}");
    }

    #[test]
    fn the_coalescing_wait_is_bounded_because_sparse_traffic_pays_it_in_latency() {
        assert_eq!(parse(&["--coalesce-wait", "250us"]).coalesce_wait, Duration::from_micros(250));
        assert_eq!(parse(&[]).coalesce_wait, Duration::ZERO, "off unless asked for");
        let message = invalid(load(&["--coalesce-wait", "20ms"], ""));
        assert!(message.contains("--coalesce-wait"), "{message}");
        let from_file = load(&[], "[server]\ncoalesce_wait = \"1ms\"\n").expect("valid");
        assert_eq!(from_file.coalesce_wait, Duration::from_millis(1));
    }

    #[test]
    fn merged_values_are_validated() {
        let message =
            invalid(load(&[], "[limits]\nmax_message_size = \"1KiB\"\nmax_frame_size = \"2KiB\"\n"));
        assert!(message.contains("--max-frame-size"), "{message}");
    }

    #[test]
    fn the_shipped_example_is_valid_and_complete() {
        let example = include_str!("../../deploy/ringgate.toml");
        let mut config = load(&[], example).expect("deploy/ringgate.toml is valid");
        config.config_file = None;
        assert_eq!(config, parse(&[]), "the example documents the defaults");
    }

    #[test]
    fn proxy_routes_parse_from_flags_and_the_file() {
        let config = parse(&[
            "--route",
            "/app=ws://127.0.0.1:9000,ws://127.0.0.1:9001/base/",
            "--route",
            "/b/=ws://127.0.0.1",
        ]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.proxy_routes.len(), 2);
        let app = &config.proxy_routes[0];
        assert_eq!(app.prefix, "/app");
        assert_eq!(app.upstreams[0].addr, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(app.upstreams[1].base_path, "/base");
        assert_eq!(app.upstreams[1].authority, "127.0.0.1:9001");
        assert_eq!(config.proxy_routes[1].prefix, "/b");
        assert_eq!(config.proxy_routes[1].upstreams[0].addr.port(), 80);
        assert_eq!(config.router().proxies, vec!["/app".to_string(), "/b".to_string()]);
        assert!(parse_proxy_route("/app").is_err());
        assert!(parse_proxy_route("app=ws://127.0.0.1:1").is_err());
        assert!(parse_proxy_route("/app=http://127.0.0.1:1").is_err());
        let wss = parse_proxy_route("/app=wss://localhost/base,wss://127.0.0.1:8443").expect("wss upstreams");
        assert_eq!(wss.upstreams[0].addr.port(), 443);
        assert_eq!(wss.upstreams[0].tls_name.as_deref(), Some("localhost"));
        assert_eq!(wss.upstreams[0].authority, "localhost");
        assert_eq!(wss.upstreams[1].tls_name.as_deref(), Some("127.0.0.1"));
        assert_eq!(parse_proxy_route("/app=ws://[::1]:9").expect("v6").upstreams[0].tls_name, None);
        assert!(
            parse(&["--route", "/a=ws://127.0.0.1:1", "--route", "/a/=ws://127.0.0.1:2"]).validate().is_err()
        );

        let file = "[limits]\nupstream_timeout = \"2s\"\n[[proxy]]\nprefix = \"/app\"\nupstreams = [\"ws://127.0.0.1:9000\"]\n";
        let config = load(&[], file).expect("valid");
        assert_eq!(config.proxy_routes.len(), 1);
        assert_eq!(config.upstream_timeout, Duration::from_secs(2));
        let config = load(&["--route", "/x=ws://127.0.0.1:1"], file).expect("valid");
        assert_eq!(config.proxy_routes[0].prefix, "/x", "the command line replaces the file's routes");

        let message = invalid(load(&[], "[[proxy]]\nprefix = \"/app\"\nupstream = [\"ws://127.0.0.1:1\"]\n"));
        assert!(message.contains("upstream") && message.contains("line 3"), "{message}");
        let message = invalid(load(&[], "[[proxy]]\nprefix = \"/app\"\n\nupstreams = [\"http://x\"]\n"));
        assert!(message.contains("upstreams") && message.contains("line 4"), "{message}");
        let message = invalid(load(&[], "[[proxy]]\nupstreams = [\"ws://127.0.0.1:1\"]\n"));
        assert!(message.contains("prefix"), "{message}");
    }

    #[test]
    fn compression_is_shared_by_default_and_its_limits_are_checked() {
        let config = parse(&[]);
        assert_eq!(config.compression_settings(), CompressionSettings::default());
        assert_eq!(config.compression, CompressionMode::Shared);
        assert!(parse(&["--compression-level", "10"]).validate().is_err());
        assert!(parse(&["--compression-window-bits", "8"]).validate().is_err());
        let file = "[compression]\nmode = \"dedicated\"\nlevel = 6\nmin_size = \"1KiB\"\nwindow_bits = 12\n";
        let config = load(&[], file).expect("valid");
        let settings = config.compression_settings();
        assert_eq!(
            (settings.mode, settings.level, settings.min_size, settings.window_bits),
            (CompressionMode::Dedicated, 6, 1024, 12)
        );
        let config = load(&["--compression", "off"], file).expect("valid");
        assert_eq!(config.compression, CompressionMode::Off);
        let message = invalid(load(&[], "[compression]\nmode = \"fast\"\n"));
        assert!(message.contains("mode") && message.contains("line 2"), "{message}");
    }

    #[test]
    fn the_publish_key_is_read_at_load_and_a_bad_file_stops_the_start() {
        let dir = std::env::temp_dir().join(format!("ringgate-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key_file = dir.join("publish.key");
        std::fs::write(&key_file, "k3y\n").expect("write key");
        let key_path = key_file.to_string_lossy().into_owned();
        let config = load(&["--publish-key-file", &key_path], "").expect("valid");
        assert_eq!(config.publish_key, PublishKey::new(b"k3y").ok());
        assert!(!format!("{config:?}").contains("k3y"), "the key is never printed");
        let from_file = load(&[], &format!("[http]\npublish_key_file = {key_path:?}\n")).expect("valid");
        assert_eq!(from_file.publish_key, PublishKey::new(b"k3y").ok());

        std::fs::write(&key_file, "\n").expect("write key");
        let message = invalid(load(&["--publish-key-file", &key_path], ""));
        assert!(message.contains("empty") && message.contains(&key_path), "{message}");
        let missing = dir.join("nope.key").to_string_lossy().into_owned();
        let message = invalid(load(&["--publish-key-file", &missing], ""));
        assert!(message.contains("cannot read") && message.contains(&missing), "{message}");
    }

    #[test]
    fn the_broker_comes_from_a_flag_or_the_file_and_is_checked() {
        assert_eq!(parse(&[]).broker, None, "in-process by default");
        let config = parse(&["--broker", "redis://127.0.0.1:6379", "--broker-optional"]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.broker.as_ref().map(BrokerUrl::engine), Some("redis"));
        assert!(Config::try_parse_from(["ringgate", "--broker", "127.0.0.1:6379"]).is_err());
        assert!(parse(&["--broker-optional"]).validate().is_err(), "optional without a broker");
        let file = "[broker]\nurl = \"redis://127.0.0.1:7000\"\noptional = true\n";
        let config = load(&[], file).expect("valid");
        assert_eq!(config.broker, BrokerUrl::parse("redis://127.0.0.1:7000").ok());
        assert!(config.broker_optional);
        let message = invalid(load(&[], "[broker]\n\nurl = \"kafka://127.0.0.1:1\"\n"));
        assert!(message.contains("url") && message.contains("line 3"), "{message}");
        let file = "[broker]\nurl = \"rediss://redis.example:6380\"\nca = \"/etc/ringgate/redis-ca.pem\"\n";
        let config = load(&[], file).expect("valid");
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.broker_ca, Some(PathBuf::from("/etc/ringgate/redis-ca.pem")));
        let plain = parse(&["--broker", "redis://127.0.0.1:6379", "--broker-ca", "ca.pem"]);
        assert!(plain.validate().is_err_and(|e| e.0.contains("rediss://")), "a CA for a plain broker");
    }

    #[test]
    fn history_comes_from_flags_or_the_file_and_is_checked() {
        let config = parse(&["--history-size", "100", "--history-ttl", "30s", "--positions"]);
        assert_eq!(config.validate(), Ok(()));
        let settings = config.history_settings();
        assert_eq!((settings.size, settings.ttl, settings.positions), (100, Duration::from_secs(30), true));
        assert!(!parse(&[]).history_settings().enabled(), "off by default");
        assert!(parse(&["--history-ttl", "5s"]).validate().is_err(), "a TTL without a size");
        assert!(parse(&["--history-size", "2000000"]).validate().is_err());
        assert!(parse(&["--history-size", "5", "--history-topics", "0"]).validate().is_err());
        assert_eq!(parse(&["--history-topics", "3"]).history_settings().max_topics, 3);
        let with_broker = parse(&["--history-size", "10", "--broker", "nats://127.0.0.1:4222"]);
        assert!(with_broker.validate().is_err(), "NATS keeps no history");
        let with_redis = parse(&["--history-size", "10", "--broker", "redis://127.0.0.1:6379"]);
        assert!(with_redis.validate().is_ok(), "Redis keeps it");
        let file = "[pubsub]\nhistory_size = 50\nhistory_ttl = \"2m\"\npositions = true\n";
        let config = load(&["--history-size", "7"], file).expect("valid");
        assert_eq!(
            (config.history_size, config.history_ttl, config.positions),
            (7, Duration::from_secs(120), true)
        );
    }

    #[test]
    fn repeated_listen_flags_are_kept() {
        let config = parse(&["--listen", "127.0.0.1:1", "--listen", "127.0.0.2:2"]);
        assert_eq!(config.listen.len(), 2);
    }
}
