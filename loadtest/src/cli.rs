//! The command line: what the operator asked for, parsed with clap and validated once into a
//! [`Plan`] that the rest of the program trusts.
//!
//! Must never: touch the network or the filesystem (except resolving the target's host name), or
//! accept a value that would make a run meaningless (zero connections, a payload too small to
//! carry its timestamp) — those are errors here, before any socket is opened.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use ringgate::config::IoChoice;

use crate::payload::HEADER_LEN;
use crate::target::Target;
use crate::tls::Trust;

/// Command-line arguments, exactly as typed. Converted into a [`Plan`] by [`Args::into_plan`].
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "WebSocket load generator on io_uring with coordinated-omission-corrected HDR latency",
    long_about = "WebSocket load generator on io_uring.\n\n\
        Open loop (--rate > 0): every connection sends on a fixed schedule and latency is measured \
        from each message's intended send time (as wrk2 does), so a stalled server shows up as \
        latency instead of being hidden. Closed loop (--rate 0): each connection sends the next \
        message when the previous echo returns (or, with --pipeline N, keeps N messages in flight); \
        latency is measured from the actual send time.\n\n\
        Every echo is verified byte for byte; a mismatch is counted as an error.\n\n\
        wss:// URLs speak TLS 1.3 or 1.2 (rustls on aws-lc-rs, the gateway's provider) and need \
        --ca FILE or --insecure: there is no system trust store. Every connection makes a full \
        handshake (no session resumption); the handshake latency runs from the TCP connect to the \
        101 response, TLS included, and the summary counts the versions and suites agreed and the \
        TLS handshakes that failed."
)]
pub struct Args {
    /// WebSocket URL of an echo endpoint: ws://host[:port]/path, or wss:// for TLS (port 443 by
    /// default; the certificate must be valid for the URL's host, which is sent as SNI unless it
    /// is an IP address). In pubsub mode its path is the topic prefix (see --topic-prefix), and
    /// several URLs may be given, one per gateway node, all with the same scheme and path:
    /// publisher i connects to URL i % N, and each topic's subscribers are dealt round-robin over
    /// the URLs (subscriber j to URL (j / --topics) % N); the report separates cross-node
    /// deliveries (publisher and subscriber on different URLs) from same-node ones.
    #[arg(value_name = "URL", default_value = "ws://127.0.0.1:8080/echo")]
    pub urls: Vec<String>,

    /// wss://: trust the CA certificates in this PEM file (and nothing else: there is no system
    /// trust store). The server's certificate must chain to one and be valid for the URL's host.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,

    /// wss://: accept any server certificate, for any name, as for a self-signed test
    /// certificate. The handshake's signatures are still verified, so the server does the work a
    /// real client makes it do. Never for a server you do not control.
    #[arg(long)]
    pub insecure: bool,

    /// Number of connections to open and hold [default: 100]. Not used in pubsub mode, where the
    /// connections are --publishers + --subscribers.
    #[arg(long)]
    pub conns: Option<u32>,

    /// New connections started per second while ramping up.
    #[arg(long, default_value_t = 5000.0)]
    pub connect_rate: f64,

    /// Messages per second per connection (open loop); 0 = closed loop (next message when the
    /// echo returns). In pubsub mode: messages per second per publisher (open loop only).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,

    /// Closed loop: messages kept in flight per connection; each echo triggers the next send at
    /// once. 1 is ping-pong. Only with --rate 0 in echo mode.
    #[arg(long, default_value_t = 1)]
    pub pipeline: u32,

    /// Payload bytes per message (at least 16: intended send time and sequence number).
    #[arg(long, default_value_t = 32)]
    pub size: usize,

    /// Offer permessage-deflate (RFC 7692) on every connection, as browsers do. Where the server
    /// agrees, what it compresses is inflated before it is verified, and what the client sends is
    /// compressed too (level 1); the report says how many agreed and the ratio of wire bytes to
    /// payload bytes each way. The filler repeats every 256 bytes: it compresses well from
    /// --size 1024 up, hardly under 300.
    #[arg(long)]
    pub deflate: bool,

    /// Measured run time after the ramp-up and warmup, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Time after the ramp-up during which messages are sent but not recorded.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Client threads, one io_uring runtime each [default: the cores loadtest may run on, its CPU
    /// affinity: 1 under `taskset -c 1`].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Source addresses to connect from, to go past one address's ephemeral ports: a list
    /// and/or ranges, e.g. 127.0.0.1,127.0.0.2 or 127.0.0.1-127.0.0.8 or 127.0.0.1-8.
    #[arg(long, value_parser = parse_source_ips)]
    pub source_ips: Option<SourceIps>,

    /// Open loop: sends due within the same window of this length share one wakeup of the client
    /// thread. Larger saves client CPU at high rates; the lateness it adds is reported as send lag
    /// and counted in the latency, never hidden.
    #[arg(long, default_value = "50us", value_parser = parse_duration)]
    pub timer_slack: Duration,

    /// The io backend: io_uring (ringgate's driver: multishot receive into a provided-buffer
    /// ring) where it can be set up, else epoll (`auto`); or either one only.
    #[arg(long, value_enum, default_value_t = IoChoice::Auto, env = "LOADTEST_IO")]
    pub io: IoChoice,

    /// io_uring on Linux 6.12 or later: once a completion is in, a sleeping thread waits up to
    /// this long for more (never past its next due send) rather than waking for each: fewer
    /// wake-ups, which are most of the client's CPU on a VM. Latency is unaffected: every receive
    /// carries the kernel's arrival time (SO_TIMESTAMPNS). [default: 1ms in open loop and pubsub,
    /// 0 in closed loop, where the next send waits for the echo, and in connect mode]
    #[arg(long, value_parser = parse_duration)]
    pub coalesce_wait: Option<Duration>,

    /// What each connection does.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,

    /// Pubsub mode: publishing connections; publisher i publishes to topic i % --topics.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,

    /// Pubsub mode: subscribing connections; subscriber j listens on topic j % --topics.
    #[arg(long, default_value_t = 100)]
    pub subscribers: u32,

    /// Pubsub mode: topics, named t0, t1, ... under the topic prefix.
    #[arg(long, default_value_t = 1)]
    pub topics: u32,

    /// Pubsub mode: path prefix of the topics (topic k is PREFIX/tk) [default: the URL's path,
    /// or /pubsub when the URL's path is / or /echo].
    #[arg(long, value_name = "PREFIX")]
    pub topic_prefix: Option<String>,

    /// Write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the message latency distribution to FILE in HdrHistogram's percentile-distribution
    /// text format (values in milliseconds).
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,

    /// Draw the latency percentile curve to FILE as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// No progress lines while running; the final summary is still printed.
    #[arg(long)]
    pub quiet: bool,

    /// Exit with status 0 even when connections failed or errors occurred (they are still
    /// reported), as long as at least one connection was established. Without it such a run
    /// exits with status 1.
    #[arg(long)]
    pub allow_errors: bool,
}

/// `--coalesce-wait` in open loop and pubsub: completions are handled within a millisecond, a
/// sixtieth of a 3 msg/s connection's period, and each sleep gathers a few dozen of them.
pub const DEFAULT_COALESCE_WAIT: Duration = Duration::from_millis(1);

/// What every connection does once it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Send messages and verify their echoes, measuring latency.
    Echo,
    /// Open and hold idle connections, sending nothing: measures connection rate and handshake
    /// latency, and lets the server's memory per idle connection be read.
    Connect,
    /// Publishers send on a schedule to topics; subscribers receive, and every delivery's latency
    /// (from the publisher's intended send time), loss and order are checked.
    Pubsub,
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Connect => "connect",
            Mode::Pubsub => "pubsub",
        }
    }
}

/// A parsed `--source-ips` value: a non-empty list of local IPv4 addresses, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceIps(pub Vec<Ipv4Addr>);

/// Everything a run needs, validated. Built once; read by every thread.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where to connect and what to put in the request line and `Host` header: one target per
    /// URL, never empty; more than one only in pubsub mode (the gateway nodes, see
    /// [`Plan::node_of`]).
    pub targets: Vec<Target>,
    /// `wss://`: what to trust (`--ca` or `--insecure`); `None` for `ws://`.
    pub trust: Option<Trust>,
    /// Connections to open.
    pub conns: u32,
    /// Connections started per second.
    pub connect_rate: f64,
    /// Messages per second per connection; `None` for closed loop.
    pub rate: Option<f64>,
    /// Closed loop: messages in flight per connection (1 = ping-pong; always 1 otherwise).
    pub pipeline: u32,
    /// Payload bytes per message.
    pub size: usize,
    /// Measured run time.
    pub duration: Duration,
    /// Unrecorded time between the end of the ramp-up and the measured run.
    pub warmup: Duration,
    /// Client threads.
    pub threads: usize,
    /// Source addresses, used round-robin; empty means "let the kernel choose".
    pub source_ips: Vec<Ipv4Addr>,
    /// Open-loop wakeup coalescing window.
    pub timer_slack: Duration,
    /// The io backend asked for.
    pub io: IoChoice,
    /// How long completions may wait for a sleeping thread (0: it wakes for each).
    pub coalesce_wait: Duration,
    /// Offer permessage-deflate.
    pub deflate: bool,
    /// What connections do.
    pub mode: Mode,
    /// Output files.
    pub json: Option<PathBuf>,
    /// HdrHistogram percentile-distribution output.
    pub hgrm: Option<PathBuf>,
    /// SVG plot output.
    pub plot: Option<PathBuf>,
    /// Suppress progress lines.
    pub quiet: bool,
    /// Failed connections and errors do not make the exit status non-zero.
    pub allow_errors: bool,
    /// Pubsub mode's layout; `None` in the other modes.
    pub pubsub: Option<PubSubPlan>,
}

/// Who publishes and subscribes where, in pubsub mode. Connections `0..subscribers` are the
/// subscribers (they connect first), the rest the publishers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubSubPlan {
    /// Publishing connections.
    pub publishers: u32,
    /// Subscribing connections.
    pub subscribers: u32,
    /// Topics; publisher i and subscriber j use topics i % topics and j % topics.
    pub topics: u32,
    /// Path prefix: topic k is `{prefix}/t{k}`.
    pub prefix: String,
    /// Gateway nodes (one per URL): see [`PubSubPlan::subscriber_node`] and
    /// [`PubSubPlan::publisher_node`].
    pub nodes: u32,
}

impl PubSubPlan {
    /// The node of subscriber `j`: each topic's subscribers are dealt round-robin over the nodes
    /// (`(j / topics) % nodes`; with one topic, `j % nodes`). Not `j % nodes` with several topics:
    /// with as many topics as nodes that would put all of a topic's subscribers on one node.
    pub fn subscriber_node(&self, j: u32) -> u32 {
        (j / self.topics) % self.nodes
    }

    /// The node of publisher `id`: `id % nodes` (with one publisher, node 0).
    pub fn publisher_node(&self, id: u32) -> u32 {
        id % self.nodes
    }
}

/// The most gateway URLs one run may spread its pubsub connections over (the report keeps a
/// count per pair of nodes).
pub const MAX_NODES: usize = 64;

/// Publisher ids share the payload's sequence word with the sequence number: the id in the top
/// bits, the sequence number in the low [`SEQ_BITS`].
pub const SEQ_BITS: u32 = 40;

/// The most publishers a run can have (ids must fit above [`SEQ_BITS`]).
pub const MAX_PUBLISHERS: u32 = 1 << (64 - SEQ_BITS);

impl Plan {
    /// The first (in echo and connect mode, the only) target: the one the report names.
    pub fn target(&self) -> &Target {
        &self.targets[0]
    }

    /// The index in [`Plan::targets`] of the node connection `conn` connects to: 0 except in
    /// pubsub mode over several URLs, where subscribers (connections `0..S`) and publishers (the
    /// rest) are each dealt round-robin over the nodes.
    pub fn node_of(&self, conn: u32) -> usize {
        match &self.pubsub {
            Some(l) if conn < l.subscribers => l.subscriber_node(conn) as usize,
            Some(l) => l.publisher_node(conn - l.subscribers) as usize,
            None => 0,
        }
    }

    /// How long the ramp-up takes: the last connection starts this long after the first.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.conns.saturating_sub(1)) / self.connect_rate)
    }
}

impl Args {
    /// Validates the arguments and resolves the target. Errors say which flag is wrong and why.
    pub fn into_plan(self) -> Result<Plan> {
        let pubsub = self.pubsub_plan()?;
        let conns = match &pubsub {
            Some(p) => p.publishers + p.subscribers,
            None => self.conns.unwrap_or(100),
        };
        if conns == 0 {
            bail!("--conns must be at least 1");
        }
        if !(self.connect_rate.is_finite() && self.connect_rate > 0.0) {
            bail!("--connect-rate must be a positive number of connections per second");
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            bail!("--rate must be 0 (closed loop) or a positive number of messages per second");
        }
        if self.size < HEADER_LEN {
            bail!(
                "--size {} is too small: every message carries its {HEADER_LEN}-byte send time and \
                 sequence number",
                self.size
            );
        }
        if self.size > MAX_SIZE {
            bail!("--size {} is over the {MAX_SIZE}-byte limit of one message", self.size);
        }
        self.check_pipeline()?;
        let coalesce_wait = match (self.coalesce_wait, self.mode, self.rate > 0.0) {
            (Some(wait), ..) => wait,
            (None, Mode::Pubsub, _) | (None, Mode::Echo, true) => DEFAULT_COALESCE_WAIT,
            (None, ..) => Duration::ZERO,
        };
        if coalesce_wait > Duration::from_millis(10) {
            bail!("--coalesce-wait {coalesce_wait:?} is over 10ms: Pings and Closes would wait that long");
        }
        if self.duration.is_zero() && self.mode != Mode::Connect {
            bail!("--duration must be more than 0");
        }
        let threads = match self.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let threads = threads.min(conns as usize);
        let mut targets = self.targets()?;
        let pubsub = pubsub.map(|mut p| {
            p.prefix = match self.topic_prefix.as_deref() {
                Some(prefix) => prefix.trim_end_matches('/').to_string(),
                None => match url_prefix(&targets[0]) {
                    "" | "/echo" => "/pubsub".to_string(),
                    path => path.to_string(),
                },
            };
            if !p.prefix.starts_with('/') {
                p.prefix.insert(0, '/');
            }
            p.nodes = targets.len() as u32;
            for target in &mut targets {
                target.path = format!("{}/t*", p.prefix);
            }
            p
        });
        let target = &targets[0];
        let trust = match (&target.tls, self.ca, self.insecure) {
            (Some(_), Some(ca), _) => Some(Trust::Ca(ca)),
            (Some(_), None, true) => Some(Trust::Insecure),
            (Some(_), None, false) => bail!(
                "{} needs to know what to trust: pass --ca FILE (the PEM certificate of the CA that \
                 signed the server's certificate) or, for a self-signed test certificate, --insecure",
                target.url()
            ),
            (None, None, false) => None,
            (None, ..) => bail!("--ca and --insecure are for wss:// URLs; {} is plain", target.url()),
        };
        let source_ips = self.source_ips.map(|s| s.0).unwrap_or_default();
        if let Some(v6) = targets.iter().find(|t| !matches!(t.addr, SocketAddr::V4(_)))
            && !source_ips.is_empty()
        {
            bail!("--source-ips are IPv4 addresses but {} is an IPv6 target", v6.addr);
        }
        Ok(Plan {
            targets,
            trust,
            conns,
            connect_rate: self.connect_rate,
            rate: (self.rate > 0.0).then_some(self.rate),
            pipeline: self.pipeline,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            threads,
            source_ips,
            timer_slack: self.timer_slack,
            io: self.io,
            coalesce_wait,
            deflate: self.deflate,
            mode: self.mode,
            json: self.json,
            hgrm: self.hgrm,
            plot: self.plot,
            quiet: self.quiet,
            allow_errors: self.allow_errors,
            pubsub,
        })
    }

    /// Every URL parsed and resolved. Several only in pubsub mode (one per gateway node), all of
    /// one scheme (`--ca`/`--insecure` apply to every one) and, unless `--topic-prefix` names the
    /// prefix, of one path (the topic prefix every node shares: a topic is one name cluster-wide).
    fn targets(&self) -> Result<Vec<Target>> {
        if self.urls.len() > 1 && self.mode != Mode::Pubsub {
            bail!(
                "{} URLs given, but --mode {} takes one: several URLs (gateway nodes to spread \
                 subscribers and publishers over) are for --mode pubsub",
                self.urls.len(),
                self.mode.name()
            );
        }
        if self.urls.len() > MAX_NODES {
            bail!("{} URLs given; --mode pubsub spreads over at most {MAX_NODES}", self.urls.len());
        }
        let targets = self
            .urls
            .iter()
            .map(|url| Target::parse(url).with_context(|| format!("bad URL {url:?}")))
            .collect::<Result<Vec<Target>>>()?;
        let Some(first) = targets.first() else { bail!("no URL given") };
        for (url, target) in self.urls.iter().zip(&targets).skip(1) {
            if target.tls.is_some() != first.tls.is_some() {
                bail!(
                    "{url} and {} differ in scheme: the nodes of one run are all ws:// or all wss:// \
                     (--ca/--insecure apply to every one)",
                    self.urls[0]
                );
            }
            if self.topic_prefix.is_none() && url_prefix(target) != url_prefix(first) {
                bail!(
                    "{url} and {} differ in path: the path is the topic prefix, which every node \
                     shares (a topic is one name across nodes); give URLs with one path, or name the \
                     prefix with --topic-prefix",
                    self.urls[0]
                );
            }
        }
        Ok(targets)
    }

    /// `--pipeline` only means something where sends wait for echoes: echo mode's closed loop.
    /// Open loop sends on a schedule whatever the echoes do, pubsub publishers likewise, and
    /// connect mode sends nothing.
    fn check_pipeline(&self) -> Result<()> {
        if self.pipeline == 0 {
            bail!("--pipeline must be at least 1 (1 = one message in flight, ping-pong)");
        }
        if self.pipeline > MAX_PIPELINE {
            bail!("--pipeline {} is over the limit of {MAX_PIPELINE} messages in flight", self.pipeline);
        }
        if self.pipeline > 1 && self.mode != Mode::Echo {
            bail!("--pipeline is for echo mode's closed loop, not --mode {}", self.mode.name());
        }
        if self.pipeline > 1 && self.rate != 0.0 {
            bail!(
                "--pipeline needs closed loop (--rate 0): with --rate {} messages go out on a schedule, \
                 not when echoes return",
                self.rate
            );
        }
        Ok(())
    }

    /// Pubsub mode's flags, checked (the prefix is filled in once the URL is parsed).
    fn pubsub_plan(&self) -> Result<Option<PubSubPlan>> {
        if self.mode != Mode::Pubsub {
            return Ok(None);
        }
        if self.conns.is_some() {
            bail!("--conns is not used in pubsub mode: give --publishers and --subscribers");
        }
        if self.rate == 0.0 {
            bail!("--rate must be more than 0 in pubsub mode (publishers send open loop)");
        }
        if self.publishers == 0 || self.subscribers == 0 || self.topics == 0 {
            bail!("--publishers, --subscribers and --topics must each be at least 1");
        }
        if self.publishers >= MAX_PUBLISHERS {
            bail!("--publishers must be under {MAX_PUBLISHERS}");
        }
        if self.publishers.checked_add(self.subscribers).is_none() {
            bail!("--publishers + --subscribers is too large");
        }
        Ok(Some(PubSubPlan {
            publishers: self.publishers,
            subscribers: self.subscribers,
            topics: self.topics,
            prefix: String::new(),
            nodes: 1,
        }))
    }
}

/// A URL's path without its query or trailing slashes: its topic prefix in pubsub mode.
fn url_prefix(target: &Target) -> &str {
    target.path.split(['?', '#']).next().unwrap_or("/").trim_end_matches('/')
}

/// The largest payload: the protocol core's default message limit, which servers commonly share.
pub const MAX_SIZE: usize = 1 << 20;

/// The most messages a connection may keep in flight: a bound so that a slip of the keyboard cannot
/// ask every connection for gigabytes (each message in flight costs a send-time slot, and room for
/// its frame in the write buffer).
pub const MAX_PIPELINE: u32 = 65_536;

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 10s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use us, ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

/// Parses a `--source-ips` list: comma-separated addresses or ranges `a-b`, where `b` is a whole
/// address or just the last octet.
pub fn parse_source_ips(text: &str) -> Result<SourceIps, String> {
    const MAX_ADDRESSES: usize = 65_536;
    let mut ips = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (first, last) = match item.split_once('-') {
            None => {
                let ip = parse_ip(item)?;
                (ip, ip)
            }
            Some((first, last)) => {
                let first = parse_ip(first.trim())?;
                let last = last.trim();
                let last = match last.parse::<u8>() {
                    Ok(octet) => {
                        let [a, b, c, _] = first.octets();
                        Ipv4Addr::new(a, b, c, octet)
                    }
                    Err(_) => parse_ip(last)?,
                };
                (first, last)
            }
        };
        let (lo, hi) = (u32::from(first), u32::from(last));
        if hi < lo {
            return Err(format!("range {item:?} runs backwards"));
        }
        if ips.len() + (hi - lo) as usize >= MAX_ADDRESSES {
            return Err(format!("more than {MAX_ADDRESSES} source addresses"));
        }
        ips.extend((lo..=hi).map(Ipv4Addr::from));
    }
    if ips.is_empty() {
        return Err("no addresses given".into());
    }
    Ok(SourceIps(ips))
}

fn parse_ip(text: &str) -> Result<Ipv4Addr, String> {
    text.parse().map_err(|_| format!("{text:?} is not an IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn source_ip_lists_and_ranges() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(parse_source_ips("127.0.0.1").unwrap().0, vec![ip("127.0.0.1")]);
        assert_eq!(
            parse_source_ips("127.0.0.1-3").unwrap().0,
            vec![ip("127.0.0.1"), ip("127.0.0.2"), ip("127.0.0.3")]
        );
        assert_eq!(
            parse_source_ips("127.0.0.255-127.0.1.0, 127.0.0.9").unwrap().0,
            vec![ip("127.0.0.255"), ip("127.0.1.0"), ip("127.0.0.9")]
        );
        assert!(parse_source_ips("127.0.0.5-1").is_err());
        assert!(parse_source_ips("localhost").is_err());
        assert!(parse_source_ips("").is_err());
        assert!(parse_source_ips("10.0.0.0-10.255.255.255").is_err());
    }

    #[test]
    fn defaults_match_the_issue() {
        let plan = Args::parse_from(["loadtest"]).into_plan().unwrap();
        assert_eq!(plan.target().addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(plan.target().path, "/echo");
        assert_eq!(plan.conns, 100);
        assert_eq!(plan.connect_rate, 5000.0);
        assert_eq!(plan.size, 32);
        assert_eq!(plan.duration, Duration::from_secs(10));
        assert_eq!(plan.mode, Mode::Echo);
    }

    #[test]
    fn wss_needs_a_trust_choice_and_says_which() {
        let plan = |args: &[&str]| {
            let mut all = vec!["loadtest"];
            all.extend_from_slice(args);
            Args::parse_from(all).into_plan().map_err(|e| e.to_string())
        };
        let error = plan(&["wss://127.0.0.1:9443/echo"]).unwrap_err();
        assert!(error.contains("--ca FILE") && error.contains("--insecure"), "{error}");
        let insecure = plan(&["wss://127.0.0.1:9443/echo", "--insecure"]).unwrap();
        assert_eq!(insecure.trust, Some(Trust::Insecure));
        assert_eq!(insecure.target().addr.port(), 9443);
        let ca = plan(&["wss://localhost/echo", "--ca", "ca.pem"]).unwrap();
        assert_eq!(ca.trust, Some(Trust::Ca("ca.pem".into())));
        assert_eq!(plan(&["ws://127.0.0.1:9/"]).unwrap().trust, None);
    }

    #[test]
    fn pubsub_prefix_from_flag_url_or_default() {
        let plan = |args: &[&str]| {
            let mut all = vec!["loadtest", "--mode", "pubsub"];
            all.extend_from_slice(args);
            Args::parse_from(all).into_plan().unwrap()
        };
        let p = plan(&[]);
        let layout = p.pubsub.unwrap();
        assert_eq!(layout.prefix, "/pubsub");
        assert_eq!((layout.publishers, layout.subscribers, layout.topics), (1, 100, 1));
        assert_eq!(p.conns, 101);
        assert_eq!(plan(&["ws://127.0.0.1:9/ws/topics/"]).pubsub.unwrap().prefix, "/ws/topics");
        assert_eq!(plan(&["ws://127.0.0.1:9/"]).pubsub.unwrap().prefix, "/pubsub");
        assert_eq!(plan(&["--topic-prefix", "x"]).pubsub.unwrap().prefix, "/x");
        assert!(plan(&[]).target().path.starts_with("/pubsub/t"));
        for bad in [&["--conns", "5"][..], &["--rate", "0"], &["--topics", "0"], &["--publishers", "0"]] {
            let mut all = vec!["loadtest", "--mode", "pubsub"];
            all.extend_from_slice(bad);
            assert!(Args::parse_from(all).into_plan().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn pubsub_spreads_over_several_urls_and_other_modes_take_one() {
        let plan = |args: &[&str]| {
            let mut all = vec!["loadtest"];
            all.extend_from_slice(args);
            Args::parse_from(all).into_plan().map_err(|e| e.to_string())
        };
        let (a, b) = ("ws://127.0.0.1:9001/pubsub", "ws://127.0.0.1:9002/pubsub/");
        let two = plan(&["--mode", "pubsub", a, b, "--subscribers", "4", "--publishers", "3"]).unwrap();
        assert_eq!(two.targets.len(), 2);
        assert_eq!(two.target().addr.port(), 9001);
        assert_eq!(two.targets[1].path, "/pubsub/t*");
        let layout = two.pubsub.as_ref().unwrap();
        assert_eq!((layout.nodes, layout.prefix.as_str()), (2, "/pubsub"));
        // Subscribers 0..4 alternate; publishers (connections 4..7) too, publisher 0 on node 0.
        let nodes: Vec<usize> = (0..7).map(|conn| two.node_of(conn)).collect();
        assert_eq!(nodes, [0, 1, 0, 1, 0, 1, 0]);
        // With two topics, each topic's subscribers still alternate between the nodes.
        let topics = plan(&["--mode", "pubsub", a, b, "--subscribers", "8", "--topics", "2"]).unwrap();
        let layout = topics.pubsub.as_ref().unwrap();
        for topic in 0..2 {
            let on: Vec<u32> = (topic..8).step_by(2).map(|j| layout.subscriber_node(j)).collect();
            assert_eq!(on, [0, 1, 0, 1], "topic {topic}");
        }
        // One URL: everything on node 0, as before.
        let one = plan(&["--mode", "pubsub", a]).unwrap();
        assert!((0..one.conns).all(|conn| one.node_of(conn) == 0));

        let echo = plan(&[a, b]).unwrap_err();
        assert!(echo.contains("--mode echo takes one") && echo.contains("--mode pubsub"), "{echo}");
        let connect = plan(&["--mode", "connect", a, b]).unwrap_err();
        assert!(connect.contains("--mode connect takes one"), "{connect}");
        let paths = plan(&["--mode", "pubsub", a, "ws://127.0.0.1:9002/other"]).unwrap_err();
        assert!(paths.contains("differ in path") && paths.contains("--topic-prefix"), "{paths}");
        let named = plan(&["--mode", "pubsub", a, "ws://127.0.0.1:9002/other", "--topic-prefix", "/x"]);
        assert_eq!(named.unwrap().pubsub.unwrap().prefix, "/x");
        let schemes = plan(&["--mode", "pubsub", a, "wss://127.0.0.1:9002/pubsub", "--insecure"]);
        assert!(schemes.unwrap_err().contains("differ in scheme"));
        let tls = plan(&["--mode", "pubsub", "wss://127.0.0.1:1/p", "wss://localhost:2/p", "--insecure"]);
        assert_eq!(tls.unwrap().targets.iter().filter(|t| t.tls.is_some()).count(), 2);
        let many: Vec<String> = (0..65).map(|i| format!("ws://127.0.0.1:{}/p", 9000 + i)).collect();
        let mut args = vec!["--mode", "pubsub"];
        args.extend(many.iter().map(String::as_str));
        assert!(plan(&args).unwrap_err().contains("at most 64"));
    }

    #[test]
    fn pipeline_is_for_the_closed_loop_only() {
        let plan = |args: &[&str]| {
            let mut all = vec!["loadtest"];
            all.extend_from_slice(args);
            Args::parse_from(all).into_plan().map_err(|e| e.to_string())
        };
        assert_eq!(plan(&[]).unwrap().pipeline, 1);
        assert_eq!(plan(&["--rate", "0", "--pipeline", "16"]).unwrap().pipeline, 16);
        // 1 is what every mode does anyway.
        assert_eq!(plan(&["--rate", "5", "--pipeline", "1"]).unwrap().pipeline, 1);
        let open = plan(&["--rate", "5", "--pipeline", "2"]).unwrap_err();
        assert!(open.contains("needs closed loop (--rate 0)"), "{open}");
        let connect = plan(&["--mode", "connect", "--rate", "0", "--pipeline", "2"]).unwrap_err();
        assert!(connect.contains("not --mode connect"), "{connect}");
        let pubsub = plan(&["--mode", "pubsub", "--pipeline", "2"]).unwrap_err();
        assert!(pubsub.contains("not --mode pubsub"), "{pubsub}");
        assert!(plan(&["--rate", "0", "--pipeline", "0"]).is_err());
        assert!(plan(&["--rate", "0", "--pipeline", "65537"]).is_err());
    }

    #[test]
    fn rejects_meaningless_runs() {
        for args in [
            &["loadtest", "--conns", "0"][..],
            &["loadtest", "--size", "8"],
            &["loadtest", "--rate", "-1"],
            &["loadtest", "--connect-rate", "0"],
            &["loadtest", "--threads", "0"],
            &["loadtest", "wss://127.0.0.1/"],
            &["loadtest", "ws://127.0.0.1/", "--insecure"],
            &["loadtest", "ws://127.0.0.1/", "--ca", "ca.pem"],
            &["loadtest", "wss://127.0.0.1/", "--ca", "ca.pem", "--insecure"],
        ] {
            let parsed = Args::try_parse_from(args)
                .map_err(|e| e.to_string())
                .and_then(|a| a.into_plan().map_err(|e| e.to_string()));
            assert!(parsed.is_err(), "{args:?} was accepted");
        }
    }
}
