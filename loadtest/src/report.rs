//! The final report: one [`Summary`] built from the merged statistics, printed for people and
//! written as JSON for machines (the CI test asserts on these keys, so they are a contract).
//! The text leads with what readers compare (throughput, latency percentiles, client CPU per
//! message) and whether the client kept its schedule and up, so a run that measured the client
//! says so before any figure is quoted; it also decides the exit status ([`Verdict`]).
//!
//! Must never: print a number that is not in the JSON or vice versa, round a latency down
//! (percentiles are HdrHistogram's highest equivalent values, so they never understate), or
//! divide by time that was not measured (an interrupted run's window ends at the interruption).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::{Mode, Plan};
use crate::cpu::CpuTime;
use crate::schedule::Phases;
use crate::stats::{ErrorKind, ThreadLoad, ThreadStats, Volume};
use crate::tls::Trust;

/// Percentiles of one histogram, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// The largest value.
    pub max: u64,
    /// The mean.
    pub mean: f64,
    /// How many values.
    pub count: u64,
}

impl Percentiles {
    /// Reads the percentiles of `histogram` (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles { p50: 0, p90: 0, p99: 0, p999: 0, p9999: 0, max: 0, mean: 0.0, count: 0 };
        }
        let q = |quantile| histogram.value_at_quantile(quantile);
        Percentiles {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: histogram.max(),
            mean: histogram.mean(),
            count: histogram.len(),
        }
    }
}

/// How the run was set up, echoed in the JSON so a result file explains itself.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    /// `echo` or `connect`.
    pub mode: &'static str,
    /// The target URL's host and path.
    pub url: String,
    /// Connections asked for.
    pub conns: u32,
    /// Connections started per second.
    pub connect_rate: f64,
    /// Messages per second per connection; 0 for closed loop.
    pub rate: f64,
    /// `open`, `closed`, or `none` (connect mode).
    pub loop_kind: &'static str,
    /// Closed loop: messages kept in flight per connection (`--pipeline`); 1 otherwise.
    pub pipeline: u32,
    /// Payload bytes.
    pub size: usize,
    /// Measured seconds.
    pub duration_secs: f64,
    /// Unrecorded seconds after the ramp-up.
    pub warmup_secs: f64,
    /// Client threads.
    pub threads: usize,
    /// Source addresses used.
    pub source_ips: usize,
    /// Open-loop wakeup coalescing window, microseconds.
    pub timer_slack_us: f64,
    /// Whether permessage-deflate was offered (`--deflate`).
    pub deflate: bool,
}

/// Everything the run found. Field names are the JSON keys.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// How the run was set up.
    pub config: RunConfig,
    /// Whether the run was cut short by Ctrl-C (SIGINT) or SIGTERM: every figure covers the
    /// measured window up to the interruption only.
    pub interrupted: bool,
    /// Seconds of the measured window that were run: `config.duration_secs`, less when the run was
    /// interrupted (0 when that came before the window began). Echo throughput is over these.
    pub measured_secs: f64,
    /// Connections whose TCP connect was started.
    pub connections_attempted: u64,
    /// Connections that completed the handshake.
    pub connections_established: u64,
    /// Connections that did not.
    pub connections_failed: u64,
    /// Failed connections by reason (`refused`, `timed_out`, `http_503`, ...).
    pub connections_failed_by_reason: BTreeMap<String, u64>,
    /// Established connections per second, from the first to the last establishment.
    pub connect_rate_per_sec: f64,
    /// Messages sent whose intended send time is in the measured window.
    pub messages_sent: u64,
    /// Verified echoes of those messages.
    pub messages_received: u64,
    /// Measured messages sent more than 1 ms after their intended time.
    pub late_sends: u64,
    /// Errors on established connections, all kinds.
    pub errors: u64,
    /// Errors by kind (pubsub mode adds `closed_{code}`, e.g. `closed_1008` for a subscriber
    /// closed as a slow consumer).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Verified echoes (pubsub: deliveries) per second over the measured window.
    pub throughput_msgs_per_sec: f64,
    /// Pubsub: measured messages published times the subscribers established on their topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_expected: Option<u64>,
    /// Pubsub: measured deliveries that never arrived (sequence gaps, and what was missing after
    /// the grace period).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_lost: Option<u64>,
    /// Pubsub: publishing connections asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishers: Option<u32>,
    /// Pubsub: subscribing connections asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<u32>,
    /// Pubsub: topics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics: Option<u32>,
    /// Pubsub: seconds of the measured window in which publishers were publishing (shorter than
    /// the duration when subscribers took longer than the ramp-up and warmup to connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_window_secs: Option<f64>,
    /// Message latency (from the intended send time in open loop), microseconds.
    pub latency_us: Percentiles,
    /// TCP connect start to 101 response, microseconds (TLS handshake included, for `wss://`).
    pub handshake_latency_us: Percentiles,
    /// Actual minus intended send time (open loop): how late the tool itself sent, microseconds.
    pub send_lag_us: Percentiles,
    /// What this run cost the load generator itself.
    pub client_cpu: ClientCpu,
    /// `late_sends` as a percentage of `messages_sent` (0 when nothing was sent).
    pub late_sends_percent: f64,
    /// Open loop (echo and pubsub): whether the client kept its schedule, that is under
    /// [`KEPT_SCHEDULE_LATE_PERCENT`]% of measured sends late and no client thread saturated; when
    /// false, latency includes the client's own lateness. `null` in closed loop (the server's
    /// replies pace it: it has no schedule), in connect mode, and when nothing was sent.
    pub client_kept_schedule: Option<bool>,
    /// Each client thread's CPU over the measured window; empty when it was not measured.
    pub client_threads: Vec<ClientThread>,
    /// Whether any client thread was saturated (at least 90% CPU over the measured window): the
    /// figures then describe the client rather than the server.
    pub client_saturated: bool,
    /// `--deflate`: how many connections agreed permessage-deflate, and payload bytes against
    /// wire bytes each way. Absent without `--deflate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deflate: Option<DeflateSummary>,
    /// `wss://`: the TLS handshakes, what they agreed, and why some failed. Absent for `ws://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSummary>,
    /// Pubsub over several URLs (gateway nodes): cross-node against same-node deliveries, losses
    /// and latency, and every pair of nodes. Absent with one URL (every delivery is same-node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodesSummary>,
}

/// Pubsub over several gateway nodes: where deliveries went and what crossed between nodes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodesSummary {
    /// The nodes' URLs, node 0 first: publisher i is on node i % N, subscriber j on node
    /// (j / topics) % N (each topic's subscribers round-robin over the nodes).
    pub urls: Vec<String>,
    /// Deliveries whose publisher and subscriber were on different nodes (through the broker).
    pub cross_node: NodeFlow,
    /// Deliveries whose publisher and subscriber were on the same node.
    pub same_node: NodeFlow,
    /// Every (publisher node, subscriber node) pair, publisher's node first.
    pub pairs: Vec<NodePair>,
}

/// Measured deliveries of one kind (cross-node or same-node). With no loss and no error,
/// `deliveries + deliveries_lost == deliveries_expected`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct NodeFlow {
    /// Measured messages published times the subscribers established on their topic, counted
    /// over the pairs of this kind.
    pub deliveries_expected: u64,
    /// Deliveries received.
    pub deliveries: u64,
    /// Deliveries lost.
    pub deliveries_lost: u64,
    /// Their delivery latency (coordinated-omission corrected, as `latency_us`), microseconds.
    pub latency_us: Percentiles,
}

/// What one pair of nodes carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NodePair {
    /// The publishers' node (index into `urls`).
    pub publisher_node: u32,
    /// The subscribers' node.
    pub subscriber_node: u32,
    /// See [`NodeFlow::deliveries_expected`].
    pub deliveries_expected: u64,
    /// Deliveries received.
    pub deliveries: u64,
    /// Deliveries lost.
    pub deliveries_lost: u64,
}

/// What the TLS handshakes of a `wss://` run came to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TlsSummary {
    /// `ca` (`--ca`: the server's certificate was verified) or `insecure` (any certificate).
    pub trust: &'static str,
    /// Completed TLS handshakes (every one a full handshake: the client resumes no session).
    pub handshakes: u64,
    /// Completed handshakes by what they agreed, most used first.
    pub sessions: Vec<TlsSessionCount>,
    /// Failed TLS handshakes (each is also a failed connection, `tls_<reason>`).
    pub handshake_failures: u64,
    /// Failed TLS handshakes by reason (`unknown_issuer`, `name_mismatch`, `alert_*`,
    /// `timed_out`, ...).
    pub handshake_failures_by_reason: BTreeMap<String, u64>,
    /// TCP connect start to the end of the TLS handshake, microseconds (the WebSocket upgrade
    /// follows; `handshake_latency_us` runs to the 101).
    pub tls_handshake_latency_us: Percentiles,
}

/// How many TLS handshakes agreed on one version and cipher suite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsSessionCount {
    /// `1.3` or `1.2`.
    pub version: &'static str,
    /// The suite's IANA name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: &'static str,
    /// Handshakes.
    pub count: u64,
}

/// What permessage-deflate did over the whole run (warmup and drain included).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DeflateSummary {
    /// Connections whose server agreed it (out of `connections_established`); 0 when the server
    /// declined everywhere, which is not an error.
    pub connections_agreed: u64,
    /// Data messages received: payload bytes after inflating, and as they were on the wire.
    pub received: Flow,
    /// Data messages sent: payload bytes, and as they went on the wire.
    pub sent: Flow,
}

/// Payload bytes of one direction's data messages, inflated and on the wire (frame headers not
/// counted).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Flow {
    /// Payload bytes as the application sees them.
    pub payload_bytes: u64,
    /// The same payloads' bytes on the wire (compressed where they were).
    pub wire_bytes: u64,
    /// `wire_bytes / payload_bytes`: under 1 when compression saved bytes; `null` when nothing
    /// was carried.
    pub ratio: Option<f64>,
}

impl Flow {
    fn of(volume: Volume) -> Flow {
        Flow {
            payload_bytes: volume.payload,
            wire_bytes: volume.wire,
            ratio: (volume.payload > 0).then(|| volume.wire as f64 / volume.payload as f64),
        }
    }

    /// `1.00 GB payload as 0.21 GB on the wire (0.21)`, or `nothing` when nothing was carried.
    fn text(&self) -> String {
        match self.ratio {
            None => "nothing".to_string(),
            Some(ratio) => format!(
                "{} payload as {} on the wire ({ratio:.2})",
                bytes(self.payload_bytes),
                bytes(self.wire_bytes)
            ),
        }
    }
}

/// A byte count for people, in decimal units.
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.2} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// Under this percentage of late sends (and with no thread saturated) an open-loop client kept its
/// schedule: its own lateness is then noise in the latency, not part of it.
pub const KEPT_SCHEDULE_LATE_PERCENT: f64 = 0.1;

/// One client thread's load over the measured window, for telling a saturated client apart.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ClientThread {
    /// CPU time (user and system) as a percentage of the wall time.
    pub cpu_percent: f64,
    /// The wall time it was measured over, seconds.
    pub wall_secs: f64,
}

/// What pubsub mode adds to a summary, from the state its connections shared.
#[derive(Clone, Debug)]
pub struct PubSubTotals {
    /// See [`Summary::deliveries_expected`].
    pub deliveries_expected: u64,
    /// The same by pair of nodes, indexed `publisher_node * nodes + subscriber_node`.
    pub pairs_expected: Vec<u64>,
    /// When publishing started (run clock), if it did.
    pub publish_start: Option<u64>,
}

/// The load generator's own CPU time over the whole run (ramp-up, warmup and drain included).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ClientCpu {
    /// User-space seconds, all threads.
    pub user_secs: f64,
    /// Kernel seconds, all threads.
    pub sys_secs: f64,
    /// (user + sys) / every echo received (warmup included); 0 when none.
    pub us_per_message: f64,
    /// Connect mode: (user + sys) / connections established; 0 when none or in the other modes.
    /// Nearly all of a connect run's CPU is its handshakes: with `wss://` a full TLS handshake
    /// costs the client more than the server (it verifies the server's signature, and with `--ca`
    /// the certificate's, where the server signs once), so compare this with the server's.
    pub us_per_handshake: f64,
}

/// What the run's end looked like: whether it was interrupted, and when (run clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// When Ctrl-C or SIGTERM came, if it did (see [`crate::interrupt::requested`]).
    pub interrupted_at: Option<u64>,
}

impl Summary {
    /// Builds the summary from the merged statistics.
    pub fn new(
        plan: &Plan,
        phases: &Phases,
        stats: &ThreadStats,
        cpu: CpuTime,
        pubsub: Option<&PubSubTotals>,
        ending: Ending,
    ) -> Summary {
        let counters = &stats.counters;
        let measured_secs = phases.measured_secs_until(ending.interrupted_at);
        let window = match pubsub.map(|p| p.publish_start) {
            Some(start) => publish_window_secs(phases, start, ending.interrupted_at),
            None => measured_secs,
        };
        let throughput = match plan.mode {
            Mode::Echo | Mode::Pubsub if window > 0.0 => counters.messages_received as f64 / window,
            _ => 0.0,
        };
        let config = run_config(plan);
        let client_threads: Vec<ClientThread> = stats.loads.iter().map(client_thread).collect();
        let client_saturated = stats.loads.iter().any(ThreadLoad::saturated);
        let late_sends_percent = match counters.messages_sent {
            0 => 0.0,
            sent => counters.late_sends as f64 * 100.0 / sent as f64,
        };
        let client_kept_schedule = (config.loop_kind == "open" && counters.messages_sent > 0)
            .then_some(late_sends_percent < KEPT_SCHEDULE_LATE_PERCENT && !client_saturated);
        let layout = plan.pubsub.as_ref();
        Summary {
            config,
            interrupted: ending.interrupted_at.is_some(),
            measured_secs,
            connections_attempted: counters.attempted,
            connections_established: counters.established,
            connections_failed: stats.connections_failed(),
            connections_failed_by_reason: stats.connect_failures.clone(),
            connect_rate_per_sec: connect_rate_per_sec(stats),
            messages_sent: counters.messages_sent,
            messages_received: counters.messages_received,
            late_sends: counters.late_sends,
            errors: counters.errors,
            errors_by_kind: errors_by_kind(stats),
            throughput_msgs_per_sec: throughput,
            deliveries_expected: pubsub.map(|p| p.deliveries_expected),
            deliveries_lost: pubsub.map(|_| counters.deliveries_lost),
            publishers: layout.map(|l| l.publishers),
            subscribers: layout.map(|l| l.subscribers),
            topics: layout.map(|l| l.topics),
            publish_window_secs: pubsub.map(|_| window),
            latency_us: Percentiles::of(&stats.latency),
            handshake_latency_us: Percentiles::of(&stats.handshake),
            send_lag_us: Percentiles::of(&stats.send_lag),
            client_cpu: ClientCpu {
                user_secs: cpu.user.as_secs_f64(),
                sys_secs: cpu.sys.as_secs_f64(),
                us_per_message: match counters.total_received {
                    0 => 0.0,
                    n => cpu.total().as_secs_f64() * 1e6 / n as f64,
                },
                us_per_handshake: match (plan.mode, counters.established) {
                    (Mode::Connect, n) if n > 0 => cpu.total().as_secs_f64() * 1e6 / n as f64,
                    _ => 0.0,
                },
            },
            late_sends_percent,
            client_kept_schedule,
            client_threads,
            client_saturated,
            deflate: plan.deflate.then(|| DeflateSummary {
                connections_agreed: counters.deflate_agreed,
                received: Flow::of(counters.received_bytes),
                sent: Flow::of(counters.sent_bytes),
            }),
            tls: plan.trust.as_ref().map(|trust| tls_summary(trust, stats)),
            nodes: pubsub.filter(|_| plan.targets.len() > 1).map(|p| nodes_summary(plan, stats, p)),
        }
    }

    /// The human-readable report: a title, the interruption if there was one, the header with the
    /// figures readers compare (throughput, latency, client CPU, whether the client kept its
    /// schedule and up), then the details.
    pub fn text(&self) -> String {
        let mut s = String::new();
        self.write_title(&mut s);
        self.write_interruption(&mut s);
        self.write_headline(&mut s);
        self.write_client(&mut s);
        self.write_details(&mut s);
        s
    }

    /// What was run, in one line.
    fn write_title(&self, s: &mut String) {
        let c = &self.config;
        let what = match (c.mode, c.loop_kind) {
            ("connect", _) => format!("held idle for {}s", c.duration_secs),
            ("pubsub", _) => format!(
                "{} publishers at {} msg/s each, {} subscribers, {} topics, {} B payload, {}s measured \
                 (+{}s warmup)",
                self.publishers.unwrap_or(0),
                c.rate,
                self.subscribers.unwrap_or(0),
                self.topics.unwrap_or(0),
                c.size,
                c.duration_secs,
                c.warmup_secs
            ),
            (_, "open") => format!(
                "open loop at {} msg/s per connection, {} B payload, {}s measured (+{}s warmup)",
                c.rate, c.size, c.duration_secs, c.warmup_secs
            ),
            _ => format!(
                "closed loop{}, {} B payload, {}s measured (+{}s warmup)",
                in_flight(c.pipeline),
                c.size,
                c.duration_secs,
                c.warmup_secs
            ),
        };
        let url = match &self.nodes {
            Some(nodes) => format!("{} and {} more node(s)", c.url, nodes.urls.len() - 1),
            None => c.url.clone(),
        };
        let _ = writeln!(s, "\n{} {url} — {} connections, {what}, {} threads", c.mode, c.conns, c.threads);
    }

    /// A run cut short says so before any figure.
    fn write_interruption(&self, s: &mut String) {
        if !self.interrupted {
            return;
        }
        let _ = write!(
            s,
            "interrupted after {:.1}s of the {:.1}s measured window",
            self.measured_secs, self.config.duration_secs
        );
        if self.measured_secs > 0.0 {
            let _ = writeln!(s, ": every figure covers that part only");
        } else {
            let _ = writeln!(s, " (before it began): nothing was measured, throughput is 0");
        }
    }

    /// The figures readers compare: throughput and latency (connect mode: handshakes).
    fn write_headline(&self, s: &mut String) {
        let l = &self.latency_us;
        match self.config.mode {
            "connect" => {
                let h = &self.handshake_latency_us;
                let _ = writeln!(
                    s,
                    "handshakes:  {} established of {}, {:.0}/s; latency p50 {} us, p99 {} us, p99.9 {} us",
                    self.connections_established,
                    self.config.conns,
                    self.connect_rate_per_sec,
                    h.p50,
                    h.p99,
                    h.p999
                );
            }
            "pubsub" => {
                let _ = writeln!(
                    s,
                    "throughput:  {:.0} deliveries/s over {:.2}s of publishing; delivery latency p50 {} us, \
                     p99 {} us, p99.9 {} us",
                    self.throughput_msgs_per_sec,
                    self.publish_window_secs.unwrap_or(0.0),
                    l.p50,
                    l.p99,
                    l.p999
                );
                if let Some(nodes) = &self.nodes {
                    for (name, flow) in [("cross-node:", &nodes.cross_node), ("same-node:", &nodes.same_node)]
                    {
                        let p = &flow.latency_us;
                        let latency = match p.count {
                            0 => "no latency (nothing delivered)".to_string(),
                            _ => format!("latency p50 {} us, p99 {} us, p99.9 {} us", p.p50, p.p99, p.p999),
                        };
                        let _ = writeln!(
                            s,
                            "{name:<12} {} of {} deliveries made, {} lost; {latency}",
                            flow.deliveries, flow.deliveries_expected, flow.deliveries_lost
                        );
                    }
                }
            }
            _ => {
                let _ = writeln!(
                    s,
                    "throughput:  {:.0} msg/s; latency p50 {} us, p99 {} us, p99.9 {} us",
                    self.throughput_msgs_per_sec, l.p50, l.p99, l.p999
                );
            }
        }
    }

    /// What the run cost the client, whether it kept its schedule, and whether it was saturated.
    fn write_client(&self, s: &mut String) {
        let c = &self.config;
        let cpu = &self.client_cpu;
        let _ = write!(s, "client cpu:  ");
        if cpu.us_per_message > 0.0 {
            let what = if c.mode == "pubsub" { "delivery" } else { "echoed message" };
            let _ = write!(s, "{:.2} us per {what}, ", cpu.us_per_message);
        }
        if cpu.us_per_handshake > 0.0 {
            let _ = write!(s, "{:.2} us per established connection, ", cpu.us_per_handshake);
        }
        let _ = writeln!(s, "{:.2}s user + {:.2}s sys over the whole run", cpu.user_secs, cpu.sys_secs);
        if c.mode != "connect" {
            let _ = writeln!(s, "schedule:    {}", self.schedule_verdict());
        }
        let _ = writeln!(s, "{}", self.saturation_verdict());
    }

    /// Whether the client sent when it meant to (open loop), or why that is not judged.
    fn schedule_verdict(&self) -> String {
        if self.config.loop_kind != "open" {
            return "closed loop: no schedule of its own (each send waits for the server's reply), \
                    so only saturation is judged"
                .to_string();
        }
        let late = format!(
            "{} of {} measured sends late (>1 ms behind), {:.2}%",
            self.late_sends, self.messages_sent, self.late_sends_percent
        );
        match self.client_kept_schedule {
            None => "no measured sends: nothing to judge the schedule by".to_string(),
            Some(true) => format!("{late}: kept its schedule"),
            Some(false) => format!(
                "{late}: FELL BEHIND its schedule: latency includes the client's own lateness (see the \
                 send lag row)"
            ),
        }
    }

    /// Whether a client thread was saturated over the measured window.
    fn saturation_verdict(&self) -> String {
        let busiest = self
            .client_threads
            .iter()
            .map(|t| t.cpu_percent)
            .fold(None, |max: Option<f64>, p| Some(max.map_or(p, |m| m.max(p))));
        let Some(busiest) = busiest else {
            return "client threads: not measured (no thread reported its CPU over the measured window)"
                .to_string();
        };
        let verdict = if self.client_saturated {
            "SATURATED, these figures describe the client, not the server"
        } else {
            "the client kept up"
        };
        format!(
            "client threads: {}, busiest {busiest:.0}% CPU over the measured window: {verdict}",
            self.client_threads.len()
        )
    }

    /// Everything else: connections, counts, the latency table, errors.
    fn write_details(&self, s: &mut String) {
        let c = &self.config;
        let _ = writeln!(
            s,
            "connections: {} attempted, {} established, {} failed{}; {:.0} established/s",
            self.connections_attempted,
            self.connections_established,
            self.connections_failed,
            by_kind(&self.connections_failed_by_reason),
            self.connect_rate_per_sec
        );
        if c.mode == "echo" {
            let _ = writeln!(
                s,
                "messages:    {} sent, {} received, {} sent late (>1 ms behind schedule)",
                self.messages_sent, self.messages_received, self.late_sends
            );
        }
        if c.mode == "pubsub" {
            let _ = writeln!(
                s,
                "published:   {} messages, {} sent late (>1 ms behind schedule)",
                self.messages_sent, self.late_sends
            );
            let _ = writeln!(
                s,
                "deliveries:  {} expected, {} delivered, {} lost",
                self.deliveries_expected.unwrap_or(0),
                self.messages_received,
                self.deliveries_lost.unwrap_or(0)
            );
        }
        self.write_nodes(s);
        self.write_deflate(s);
        self.write_tls(s);
        self.write_latency_table(s);
        let _ = writeln!(s, "errors:      {}{}", self.errors, by_kind(&self.errors_by_kind));
    }

    /// Pubsub over several nodes: the URLs, and each pair of nodes that had deliveries to make.
    fn write_nodes(&self, s: &mut String) {
        /// More pairs than this are left to the JSON.
        const MAX_PAIRS_SHOWN: usize = 16;
        let Some(nodes) = &self.nodes else { return };
        let _ = writeln!(
            s,
            "nodes:       {} (publisher i on node i % {n}, each topic's subscribers round-robin): {}",
            nodes.urls.len(),
            nodes.urls.iter().enumerate().map(|(i, url)| format!("{i} {url}")).collect::<Vec<_>>().join(", "),
            n = nodes.urls.len()
        );
        let busy: Vec<&NodePair> = nodes
            .pairs
            .iter()
            .filter(|p| p.deliveries_expected + p.deliveries + p.deliveries_lost > 0)
            .collect();
        if busy.len() > MAX_PAIRS_SHOWN {
            let _ =
                writeln!(s, "node pairs:  {} pairs with deliveries: see `nodes.pairs` in --json", busy.len());
            return;
        }
        let shown: Vec<String> = busy
            .iter()
            .map(|p| {
                format!(
                    "{}->{} {}/{} delivered, {} lost",
                    p.publisher_node,
                    p.subscriber_node,
                    p.deliveries,
                    p.deliveries_expected,
                    p.deliveries_lost
                )
            })
            .collect();
        let _ = writeln!(s, "node pairs:  publisher's node->subscriber's: {}", shown.join("; "));
    }

    /// `--deflate`: how many connections agreed, and the ratio of wire bytes to payload each way.
    fn write_deflate(&self, s: &mut String) {
        let Some(d) = &self.deflate else { return };
        if d.connections_agreed == 0 && self.connections_established > 0 {
            let _ = writeln!(
                s,
                "deflate:     offered, but the server declined it on every connection (0/{}): every \
                 message went plain",
                self.connections_established
            );
            return;
        }
        let _ = writeln!(
            s,
            "deflate:     {}/{} connections agreed; received {}; sent {}",
            d.connections_agreed,
            self.connections_established,
            d.received.text(),
            d.sent.text()
        );
    }

    /// `wss://`: handshakes by version and suite, and the failures by reason.
    fn write_tls(&self, s: &mut String) {
        let Some(t) = &self.tls else { return };
        let agreed: Vec<String> = t
            .sessions
            .iter()
            .map(|session| format!("TLS {} {} {}", session.version, session.cipher_suite, session.count))
            .collect();
        let _ = writeln!(
            s,
            "tls:         {} handshakes{} ({}), {} failed{}",
            t.handshakes,
            if agreed.is_empty() { String::new() } else { format!(": {}", agreed.join(", ")) },
            if t.trust == "ca" { "certificate verified with --ca" } else { "--insecure: any certificate" },
            t.handshake_failures,
            by_kind(&t.handshake_failures_by_reason)
        );
    }

    /// Every latency histogram's percentiles, one row each.
    fn write_latency_table(&self, s: &mut String) {
        let c = &self.config;
        let _ = writeln!(
            s,
            "latency (us)  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "p50", "p90", "p99", "p99.9", "p99.99", "max", "count"
        );
        let mut row = |name: &str, p: &Percentiles| {
            let _ = writeln!(
                s,
                "  {name:<11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
                p.p50, p.p90, p.p99, p.p999, p.p9999, p.max, p.count
            );
        };
        if c.mode == "echo" {
            row("messages", &self.latency_us);
        }
        if c.mode == "pubsub" {
            row("delivery", &self.latency_us);
        }
        if let Some(nodes) = &self.nodes {
            row("cross-node", &nodes.cross_node.latency_us);
            row("same-node", &nodes.same_node.latency_us);
        }
        if let Some(t) = &self.tls {
            row("tls", &t.tls_handshake_latency_us);
        }
        row("handshake", &self.handshake_latency_us);
        if c.loop_kind == "open" && c.mode != "connect" {
            row("send lag", &self.send_lag_us);
        }
    }

    /// The exit status this run ends with, and why when it is not 0 (see [`Verdict`]).
    pub fn verdict(&self, allow_errors: bool) -> Verdict {
        judge(
            self.interrupted,
            self.connections_established,
            self.connections_failed,
            self.errors,
            allow_errors,
        )
    }

    /// Writes the JSON report to `path`.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// How a run ends for the shell: 0 when it completed without failed connections or errors, 1 when
/// it had some (0 with `--allow-errors`, unless no connection was established at all), 130 when it
/// was interrupted. Scripts and CI read this, so a run with problems never passes unnoticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The exit status.
    pub status: u8,
    /// For status 1: one line for stderr saying why.
    pub reason: Option<String>,
}

/// See [`Verdict`]. An interruption decides the status (the run is incomplete whatever else
/// happened); otherwise no connection at all is a failure even with `allow_errors`.
fn judge(interrupted: bool, established: u64, failed: u64, errors: u64, allow_errors: bool) -> Verdict {
    if interrupted {
        return Verdict { status: crate::interrupt::EXIT_STATUS, reason: None };
    }
    if established == 0 {
        return Verdict { status: 1, reason: Some("no connection could be established".to_string()) };
    }
    if (errors == 0 && failed == 0) || allow_errors {
        return Verdict { status: 0, reason: None };
    }
    let mut what = Vec::new();
    if errors > 0 {
        what.push(plural(errors, "error", "errors"));
    }
    if failed > 0 {
        what.push(plural(failed, "failed connection", "failed connections"));
    }
    Verdict {
        status: 1,
        reason: Some(format!("{} (exit status 1; --allow-errors to accept them)", what.join(" and "))),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How a closed loop's text names its pipelining: nothing for plain ping-pong.
pub fn in_flight(pipeline: u32) -> String {
    if pipeline > 1 { format!(" with {pipeline} messages in flight per connection") } else { String::new() }
}

/// The run's configuration as the report echoes it.
fn run_config(plan: &Plan) -> RunConfig {
    RunConfig {
        mode: plan.mode.name(),
        url: plan.target().url(),
        conns: plan.conns,
        connect_rate: plan.connect_rate,
        rate: if plan.mode == Mode::Connect { 0.0 } else { plan.rate.unwrap_or(0.0) },
        loop_kind: match (plan.mode, plan.rate) {
            (Mode::Connect, _) => "none",
            (_, Some(_)) => "open",
            (_, None) => "closed",
        },
        pipeline: plan.pipeline,
        size: plan.size,
        duration_secs: plan.duration.as_secs_f64(),
        warmup_secs: plan.warmup.as_secs_f64(),
        threads: plan.threads,
        source_ips: plan.source_ips.len(),
        timer_slack_us: plan.timer_slack.as_secs_f64() * 1e6,
        deflate: plan.deflate,
    }
}

/// What the TLS handshakes came to (see [`TlsSummary`]).
fn tls_summary(trust: &Trust, stats: &ThreadStats) -> TlsSummary {
    let mut sessions: Vec<TlsSessionCount> = stats
        .tls_sessions
        .iter()
        .map(|(&(version, cipher_suite), &count)| TlsSessionCount { version, cipher_suite, count })
        .collect();
    sessions.sort_by_key(|session| std::cmp::Reverse(session.count));
    TlsSummary {
        trust: match trust {
            Trust::Ca(_) => "ca",
            Trust::Insecure => "insecure",
        },
        handshakes: sessions.iter().map(|session| session.count).sum(),
        sessions,
        handshake_failures: stats.tls_failures.values().sum(),
        handshake_failures_by_reason: stats.tls_failures.clone(),
        tls_handshake_latency_us: Percentiles::of(&stats.tls_handshake),
    }
}

/// Pubsub over several nodes: the pairs' counts, and cross-node against same-node (whose latency is
/// every delivery's histogram less the cross-node one).
fn nodes_summary(plan: &Plan, stats: &ThreadStats, totals: &PubSubTotals) -> NodesSummary {
    let nodes = plan.targets.len();
    let pairs: Vec<NodePair> = (0..nodes * nodes)
        .map(|index| {
            let counts = stats.node_pairs.get(index).copied().unwrap_or_default();
            NodePair {
                publisher_node: (index / nodes) as u32,
                subscriber_node: (index % nodes) as u32,
                deliveries_expected: totals.pairs_expected.get(index).copied().unwrap_or(0),
                deliveries: counts.delivered,
                deliveries_lost: counts.lost,
            }
        })
        .collect();
    let flow = |cross: bool, latency: &Histogram<u64>| {
        let of_kind = pairs.iter().filter(|p| (p.publisher_node != p.subscriber_node) == cross);
        NodeFlow {
            deliveries_expected: of_kind.clone().map(|p| p.deliveries_expected).sum(),
            deliveries: of_kind.clone().map(|p| p.deliveries).sum(),
            deliveries_lost: of_kind.map(|p| p.deliveries_lost).sum(),
            latency_us: Percentiles::of(latency),
        }
    };
    let mut same = stats.latency.clone();
    // Every cross-node latency is also in `latency` (recorded together), so this cannot fail.
    let _ = same.subtract(&stats.cross_latency);
    NodesSummary {
        urls: plan.targets.iter().map(|target| target.url()).collect(),
        cross_node: flow(true, &stats.cross_latency),
        same_node: flow(false, &same),
        pairs,
    }
}

/// Established connections per second, from the first establishment to the last.
fn connect_rate_per_sec(stats: &ThreadStats) -> f64 {
    match stats.established_span {
        Some((first, last)) if last > first => {
            (stats.counters.established - 1) as f64 / ((last - first) as f64 / 1e9)
        }
        _ => 0.0,
    }
}

/// Errors by kind, with pubsub's Close codes as kinds of their own.
fn errors_by_kind(stats: &ThreadStats) -> BTreeMap<String, u64> {
    let mut by_kind: BTreeMap<String, u64> = ErrorKind::ALL
        .iter()
        .filter(|kind| stats.errors[**kind as usize] > 0)
        .map(|kind| (kind.name().to_string(), stats.errors[*kind as usize]))
        .collect();
    for (code, count) in &stats.closes {
        let name = if *code == 0 { "closed_no_code".to_string() } else { format!("closed_{code}") };
        *by_kind.entry(name).or_default() += count;
    }
    by_kind
}

/// Pubsub: the part of the measured window (up to an interruption) in which publishers published.
fn publish_window_secs(phases: &Phases, publish_start: Option<u64>, interrupted_at: Option<u64>) -> f64 {
    match publish_start {
        Some(start) => {
            phases.measured_end(interrupted_at).saturating_sub(start.max(phases.measure_start)) as f64 / 1e9
        }
        None => 0.0,
    }
}

/// One thread's load as the report shows it.
fn client_thread(load: &ThreadLoad) -> ClientThread {
    ClientThread { cpu_percent: load.cpu_share() * 100.0, wall_secs: load.wall_ns as f64 / 1e9 }
}

fn by_kind<K: std::fmt::Display>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(" ({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    #[test]
    fn percentiles_never_decrease_and_never_understate() {
        let mut h = new_histogram();
        for v in 1..=100_000u64 {
            h.saturating_record(v);
        }
        let p = Percentiles::of(&h);
        let ordered = [p.p50, p.p90, p.p99, p.p999, p.p9999, p.max];
        assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{ordered:?}");
        assert!(p.p50 >= 50_000 && p.p50 <= 50_050, "{}", p.p50);
        assert!(p.max >= 100_000);
        assert_eq!(p.count, 100_000);
    }

    #[test]
    fn errors_and_failed_connections_fail_the_run_unless_allowed() {
        let ok = Verdict { status: 0, reason: None };
        assert_eq!(judge(false, 5, 0, 0, false), ok);
        let failed = judge(false, 5, 2, 3, false);
        assert_eq!(failed.status, 1);
        assert_eq!(
            failed.reason.as_deref(),
            Some("3 errors and 2 failed connections (exit status 1; --allow-errors to accept them)")
        );
        assert_eq!(
            judge(false, 5, 0, 1, false).reason.as_deref().map(|r| r.starts_with("1 error (")),
            Some(true)
        );
        assert_eq!(judge(false, 5, 2, 3, true), ok);
        // No connection at all is never accepted.
        assert_eq!(judge(false, 0, 5, 0, true).status, 1);
        // An interrupted run is incomplete, whatever else happened.
        assert_eq!(judge(true, 5, 0, 0, false).status, 130);
        assert_eq!(judge(true, 0, 5, 2, false).status, 130);
    }

    #[test]
    fn empty_histogram_reads_as_zeros() {
        let p = Percentiles::of(&new_histogram());
        assert_eq!((p.p50, p.max, p.count), (0, 0, 0));
    }

    /// A summary of a run with `args` whose threads counted `counters`.
    fn summary_of(args: &[&str], counters: crate::stats::Counters) -> Summary {
        use clap::Parser;
        let plan = crate::cli::Args::parse_from(args).into_plan().expect("valid flags");
        let phases = Phases::new(&plan, 0);
        let stats = ThreadStats { counters, ..ThreadStats::default() };
        let cpu = CpuTime { user: Default::default(), sys: Default::default() };
        Summary::new(&plan, &phases, &stats, cpu, None, Ending::default())
    }

    #[test]
    fn several_nodes_split_deliveries_losses_and_latency_into_cross_and_same_node() {
        use crate::stats::PairCounts;
        use clap::Parser;
        let args = ["loadtest", "--mode", "pubsub", "ws://127.0.0.1:1/pubsub", "ws://127.0.0.1:2/pubsub"];
        let plan = crate::cli::Args::parse_from(args).into_plan().expect("valid flags");
        let phases = Phases::new(&plan, 0);
        let mut stats = ThreadStats {
            node_pairs: vec![PairCounts::default(); 4],
            counters: crate::stats::Counters { established: 101, ..Default::default() },
            ..ThreadStats::default()
        };
        // Publisher on node 0: two deliveries on its own node, one to node 1 and one lost there.
        for (latency, pair, cross) in [(100, 0, false), (200, 0, false), (5_000, 1, true)] {
            stats.received(latency, true);
            stats.delivered(pair, cross, latency);
        }
        stats.lost(1, 1);
        let totals =
            PubSubTotals { deliveries_expected: 4, pairs_expected: vec![2, 2, 0, 0], publish_start: Some(0) };
        let cpu = CpuTime { user: Default::default(), sys: Default::default() };
        let summary = Summary::new(&plan, &phases, &stats, cpu, Some(&totals), Ending::default());
        let nodes = summary.nodes.as_ref().expect("a nodes summary with two URLs");
        assert_eq!(nodes.urls, ["ws://127.0.0.1:1/pubsub/t*", "ws://127.0.0.1:2/pubsub/t*"]);
        let (cross, same) = (&nodes.cross_node, &nodes.same_node);
        assert_eq!((cross.deliveries_expected, cross.deliveries, cross.deliveries_lost), (2, 1, 1));
        assert_eq!((same.deliveries_expected, same.deliveries, same.deliveries_lost), (2, 2, 0));
        assert_eq!((cross.latency_us.count, same.latency_us.count), (1, 2));
        assert!(cross.latency_us.p50 >= 5_000 && same.latency_us.max < 5_000, "{nodes:?}");
        assert_eq!(nodes.pairs.len(), 4);
        assert_eq!(
            nodes.pairs[1],
            NodePair {
                publisher_node: 0,
                subscriber_node: 1,
                deliveries_expected: 2,
                deliveries: 1,
                deliveries_lost: 1
            }
        );
        let text = summary.text();
        assert!(text.contains("cross-node:  1 of 2 deliveries made, 1 lost; latency p50 5003 us"), "{text}");
        assert!(text.contains("same-node:   2 of 2 deliveries made, 0 lost"), "{text}");
        assert!(text.contains("0->1 1/2 delivered, 1 lost"), "{text}");
        assert!(text.contains("pubsub ws://127.0.0.1:1/pubsub/t* and 1 more node(s) — "), "{text}");
        let json = serde_json::to_value(&summary).expect("serialises");
        assert_eq!(json["nodes"]["cross_node"]["deliveries_lost"], 1);
        assert_eq!(json["nodes"]["pairs"][0]["deliveries"], 2);

        // One URL: no nodes section, in the text or the JSON.
        let one = ["loadtest", "--mode", "pubsub", "ws://127.0.0.1:1/pubsub"];
        let plan = crate::cli::Args::parse_from(one).into_plan().expect("valid flags");
        let totals = PubSubTotals { pairs_expected: vec![4], ..totals };
        let summary = Summary::new(&plan, &phases, &stats, cpu, Some(&totals), Ending::default());
        assert!(summary.nodes.is_none());
        assert!(!summary.text().contains("cross-node"));
        assert!(serde_json::to_value(&summary).expect("serialises").get("nodes").is_none());
    }

    #[test]
    fn deflate_reports_agreement_and_ratios_only_when_offered() {
        let mut counters =
            crate::stats::Counters { established: 1000, deflate_agreed: 812, ..Default::default() };
        counters.received_bytes.add(1_000_000_000, 210_000_000);
        counters.sent_bytes.add(2_000, 2_000);
        let summary = summary_of(&["loadtest", "--deflate"], counters);
        let deflate = summary.deflate.expect("a deflate summary with --deflate");
        assert_eq!(deflate.connections_agreed, 812);
        assert_eq!(deflate.received.ratio, Some(0.21));
        assert_eq!(deflate.sent.ratio, Some(1.0));
        assert!(summary.text().contains(
            "deflate:     812/1000 connections agreed; received 1.00 GB payload as 210.00 MB on the wire \
             (0.21); sent 2.00 kB payload as 2.00 kB on the wire (1.00)\n"
        ));
        let json = serde_json::to_value(&summary).expect("serialises");
        assert_eq!(json["deflate"]["received"]["wire_bytes"], 210_000_000);
        assert_eq!(json["config"]["deflate"], true);

        let declined = summary_of(
            &["loadtest", "--deflate"],
            crate::stats::Counters { established: 4, ..Default::default() },
        );
        assert!(declined.text().contains("server declined it on every connection (0/4)"));
        assert_eq!(declined.deflate.map(|d| d.received.ratio), Some(None), "nothing received: no ratio");

        let off = summary_of(&["loadtest"], counters);
        assert!(off.deflate.is_none());
        assert!(!off.text().contains("deflate:"));
        assert!(serde_json::to_value(&off).expect("serialises").get("deflate").is_none());
    }
}
