//! Real brokers for the cluster tests: a `redis-server` (or `nats-server`) of the test's own, on a
//! free loopback port, in a temporary directory, with no persistence; killed (SIGKILL) and its
//! directory removed when the guard drops.
//!
//! The binaries come from `scripts/install-brokers.sh`, which installs Debian's packages when they
//! are missing. When that fails the test fails, saying why; it is skipped only when the environment
//! says so explicitly (`RINGGATE_SKIP_BROKER_TESTS=1`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// How long a broker gets to answer after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    /// The `--broker` URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }

    fn name(self) -> &'static str {
        self.scheme()
    }
}

/// Whether broker tests are to be skipped (`RINGGATE_SKIP_BROKER_TESTS=1`); says so on stderr.
pub fn skipped() -> bool {
    let skip = std::env::var("RINGGATE_SKIP_BROKER_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("RINGGATE_SKIP_BROKER_TESTS=1: broker test skipped");
    }
    skip
}

/// The binary of `tool`, installed by `scripts/install-brokers.sh` if missing (once per test
/// process).
fn binary(tool: Tool) -> PathBuf {
    static PATHS: OnceLock<Result<(PathBuf, PathBuf, PathBuf), String>> = OnceLock::new();
    let paths = PATHS.get_or_init(|| {
        // The repository's root: this crate's directory, or its parent for loadtest, whose tests
        // include this file too.
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|dir| dir.join("scripts/install-brokers.sh"))
            .find(|script| script.is_file())
            .unwrap_or_else(|| panic!("no scripts/install-brokers.sh above {}", env!("CARGO_MANIFEST_DIR")));
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): {}{}\n(set RINGGATE_SKIP_BROKER_TESTS=1 to skip the broker tests)",
                script.display(),
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let find = |key: &str| {
            // Exact keys: REDIS= is not REDIS_CLI=.
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .map(PathBuf::from)
                .ok_or_else(|| format!("{} printed no {key} line: {stdout}", script.display()))
        };
        Ok((find("REDIS=")?, find("NATS=")?, find("REDIS_CLI=")?))
    });
    match (paths, tool) {
        (Ok((redis, _, _)), Tool::Server(Kind::Redis)) => redis.clone(),
        (Ok((_, nats, _)), Tool::Server(Kind::Nats)) => nats.clone(),
        (Ok((_, _, cli)), Tool::RedisCli) => cli.clone(),
        (Err(error), _) => panic!("no {tool:?} for the broker tests: {error}"),
    }
}

/// A program the broker tests run.
#[derive(Clone, Copy, Debug)]
enum Tool {
    Server(Kind),
    /// `redis-cli`, which creates a Redis Cluster.
    RedisCli,
}

/// A free loopback port (bound and released: a small race, acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A free loopback port whose cluster bus port (the port + 10000, which Redis Cluster takes too)
/// exists and is free as well.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A running broker, killed when dropped.
pub struct Broker {
    kind: Kind,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Redis only: a TLS port besides the plain one, and its certificate files.
    tls: Option<TlsPort>,
    /// Redis only: started as a node of a Redis Cluster (see [`RedisCluster`]).
    cluster: bool,
}

/// A TLS listener of a Redis server: its port and the files it serves.
struct TlsPort {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Broker {
    /// Starts a broker of `kind` on a free loopback port and waits until it answers.
    /// A port found free may be taken before the server binds it (by another test's server): then
    /// the server exits, and another port is tried.
    pub fn start(kind: Kind) -> Broker {
        Broker::start_fresh(kind, false)
    }

    /// [`Broker::start`], as a node of a Redis Cluster when `cluster` (on a port whose bus port is
    /// free too).
    fn start_fresh(kind: Kind, cluster: bool) -> Broker {
        let mut tries = 0;
        loop {
            let mut broker = Broker::new(kind, if cluster { free_cluster_port() } else { free_port() });
            broker.cluster = cluster;
            match broker.try_restart() {
                Ok(()) => return broker,
                Err(error) if tries < 5 => {
                    tries += 1;
                    eprintln!("{error}; trying another port");
                }
                Err(error) => panic!("{error}"),
            }
        }
    }

    /// Starts a broker of `kind` on `port` and waits until it answers.
    pub fn start_on(kind: Kind, port: u16) -> Broker {
        let mut broker = Broker::new(kind, port);
        broker.restart();
        broker
    }

    fn new(kind: Kind, port: u16) -> Broker {
        static DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ringgate-{}-{}-{n}", kind.name(), std::process::id()));
        std::fs::create_dir_all(&dir).expect("broker temp dir");
        Broker { kind, port, dir, child: None, tls: None, cluster: false }
    }

    /// Starts a Redis server that also listens on TLS, with `cert` and `key` (PEM) for clients
    /// that trust `ca`, on a free port besides its plain one (which the readiness check uses).
    pub fn start_redis_tls(cert: &Path, key: &Path, ca: &Path) -> Broker {
        let mut broker = Broker::new(Kind::Redis, free_port());
        let files =
            |port| TlsPort { port, cert: cert.to_path_buf(), key: key.to_path_buf(), ca: ca.to_path_buf() };
        broker.tls = Some(files(free_port()));
        broker.restart();
        broker
    }

    /// The `rediss://` URL of a server started by [`Broker::start_redis_tls`].
    pub fn tls_url(&self) -> String {
        let port = self.tls.as_ref().expect("a TLS port").port;
        format!("rediss://127.0.0.1:{port}")
    }

    /// The `--broker` URL.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.kind.scheme(), self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (SIGKILL: as abrupt as a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again (after [`Broker::kill`]) on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        if let Err(error) = self.try_restart() {
            panic!("{error}");
        }
    }

    /// [`Broker::restart`], saying why the server did not come up instead of panicking.
    fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let port = self.port.to_string();
        let mut command = Command::new(binary(Tool::Server(self.kind)));
        match self.kind {
            Kind::Redis => command.args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ]),
            Kind::Nats => command.args(["-a", "127.0.0.1", "-p", &port, "-n", &self.name()]),
        };
        if self.cluster {
            // nodes.conf lands in the node's own directory (the working directory).
            command.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
            command.args(["--cluster-node-timeout", "2000"]);
        }
        if let Some(tls) = &self.tls {
            command.arg("--tls-port").arg(tls.port.to_string());
            command.arg("--tls-cert-file").arg(&tls.cert).arg("--tls-key-file").arg(&tls.key);
            command.arg("--tls-ca-cert-file").arg(&tls.ca).args(["--tls-auth-clients", "no"]);
        }
        command.current_dir(&self.dir);
        let log = std::fs::File::create(self.dir.join("server.log")).expect("broker log");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.kind.name()));
        self.child = Some(child);
        self.wait_ready()
    }

    /// The name a NATS server is started with, which its `INFO` shows: how we know it is ours.
    fn name(&self) -> String {
        let dir = self.dir.file_name().map(|name| name.to_string_lossy().into_owned());
        format!("{}-{}", dir.unwrap_or_default(), self.port)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Whether ours exited first: another server on the port answers too, but is not ours.
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "{} on port {} exited with {status}: {}",
                    self.kind.name(),
                    self.port,
                    self.log()
                ));
            }
            if self.answers(addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not answer within {READY_TIMEOUT:?}: {}",
                    self.kind.name(),
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether our server answers on the port: Redis' `INFO server` names its process id, and
    /// NATS' greeting names the server by the name it was started with.
    fn answers(&self, addr: SocketAddr) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let Some(pid) = self.child.as_ref().map(Child::id) else { return false };
        let ours = match self.kind {
            Kind::Redis => format!("process_id:{pid}\r\n"),
            Kind::Nats => format!("\"server_name\":\"{}\"", self.name()),
        };
        if self.kind == Kind::Redis && stream.write_all(b"INFO server\r\n").is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while answer.len() < 64 * 1024 {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
            if answer.windows(ours.len()).any(|w| w == ours.as_bytes()) {
                return true;
            }
            if answer.ends_with(b"\r\n\r\n") || (self.kind == Kind::Nats && answer.ends_with(b"\r\n")) {
                return false;
            }
        }
        false
    }

    /// Publishes `payload` on the broker channel of `topic` as a foreign client would (not a
    /// ringgate envelope), with the broker's own protocol on a connection of its own.
    pub fn publish_foreign(&self, topic: &str, payload: &[u8]) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, READY_TIMEOUT).expect("connect to the broker");
        stream.set_read_timeout(Some(READY_TIMEOUT)).expect("timeout");
        let mut request = Vec::new();
        let expect: &[u8] = match self.kind {
            Kind::Redis => {
                let channel = format!("ringgate:{topic}");
                let parts: [&[u8]; 3] = [b"PUBLISH", channel.as_bytes(), payload];
                request.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
                for part in parts {
                    request.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
                    request.extend_from_slice(part);
                    request.extend_from_slice(b"\r\n");
                }
                b":"
            }
            Kind::Nats => {
                request.extend_from_slice(b"CONNECT {\"verbose\":false}\r\n");
                request.extend_from_slice(format!("PUB ringgate.{topic} {}\r\n", payload.len()).as_bytes());
                request.extend_from_slice(payload);
                request.extend_from_slice(b"\r\nPING\r\n");
                b"PONG"
            }
        };
        stream.write_all(&request).expect("publish");
        let mut answer = Vec::new();
        let mut chunk = [0u8; 512];
        while !answer.windows(expect.len()).any(|w| w == expect) {
            let n = stream.read(&mut chunk).expect("the broker's answer");
            assert!(n > 0, "the broker closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports, each a [`Broker`] of
/// its own; killed when dropped. Made as an operator would: `redis-server --cluster-enabled yes`
/// three times, then `redis-cli --cluster create`, then waiting for `cluster_state:ok` on each.
pub struct RedisCluster {
    nodes: Vec<Broker>,
}

impl RedisCluster {
    /// Starts three masters and joins them into a cluster, the 16384 slots split between them.
    pub fn start() -> RedisCluster {
        let nodes = (0..3).map(|_| Broker::start_fresh(Kind::Redis, true)).collect();
        let cluster = RedisCluster { nodes };
        let mut create = Command::new(binary(Tool::RedisCli));
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits until every master says `cluster_state:ok`.
    fn wait_ok(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in 0..self.nodes.len() {
            while !self.command(node, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(
                    Instant::now() < deadline,
                    "the cluster is not ok: {}",
                    self.command(node, &["CLUSTER", "INFO"])
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Kills master `node` (SIGKILL); with no replicas, the cluster is down until it is back.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts master `node` again on its port, from its `nodes.conf` (same id, same slots), and
    /// waits until the cluster is ok again.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].restart();
        self.wait_ok();
    }

    /// The master `node`'s port.
    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port
    }

    /// The `--broker` URL seeded with `seeds` (`host:port`, before the masters `nodes`).
    pub fn url(&self, seeds: &[&str], nodes: &[usize]) -> String {
        let masters = nodes.iter().map(|&node| format!("127.0.0.1:{}", self.port(node)));
        let all: Vec<String> = seeds.iter().map(|seed| seed.to_string()).chain(masters).collect();
        format!("redis+cluster://{}", all.join(","))
    }

    /// Runs a command on master `node` with `redis-cli` and returns what it printed.
    pub fn command(&self, node: usize, args: &[&str]) -> String {
        let output = Command::new(binary(Tool::RedisCli))
            .args(["-h", "127.0.0.1", "-p", &self.port(node).to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The master that owns `key`'s slot (by its index), as the cluster says.
    pub fn owner(&self, key: &str) -> usize {
        let slot: u16 = self.command(0, &["CLUSTER", "KEYSLOT", key]).trim().parse().expect("a slot");
        let nodes = self.command(0, &["CLUSTER", "NODES"]);
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges...>
        let port = nodes
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let owns = fields.iter().skip(8).any(|range| {
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    matches!((first.parse::<u16>(), last.parse::<u16>()), (Ok(f), Ok(l)) if f <= slot && slot <= l)
                });
                let port = fields.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse::<u16>().ok()?;
                owns.then_some(port)
            })
            .unwrap_or_else(|| panic!("no master owns slot {slot}: {nodes}"));
        self.nodes.iter().position(|node| node.port == port).expect("one of ours")
    }

    /// One topic per master: `(topic, master)`, the master owning the slot of the topic's history
    /// keys (`ringgate:{T}:meta`), which is where its shard channel must live too.
    pub fn topic_per_master(&self) -> Vec<(String, usize)> {
        self.topic_per_master_named("t")
    }

    /// [`RedisCluster::topic_per_master`] with topics named `{prefix}{i}`.
    pub fn topic_per_master_named(&self, prefix: &str) -> Vec<(String, usize)> {
        let mut topics: Vec<(String, usize)> = Vec::new();
        for i in 0.. {
            let topic = format!("{prefix}{i}");
            let owner = self.owner(&format!("ringgate:{{{}}}:meta", key_tag(&topic)));
            if topics.iter().all(|(_, master)| *master != owner) {
                topics.push((topic, owner));
            }
            if topics.len() == self.nodes.len() {
                break;
            }
        }
        topics
    }

    /// Moves the slot of `key` (holding no keys) to master `to`, as the last step of a
    /// resharding does: `CLUSTER SETSLOT slot NODE id` on the new owner, then on the others.
    pub fn move_slot(&self, key: &str, to: usize) {
        let slot = self.command(0, &["CLUSTER", "KEYSLOT", key]).trim().to_string();
        let id = self.command(to, &["CLUSTER", "MYID"]).trim().to_string();
        let order = std::iter::once(to).chain((0..self.nodes.len()).filter(|&node| node != to));
        for node in order {
            let answer = self.command(node, &["CLUSTER", "SETSLOT", &slot, "NODE", &id]);
            assert_eq!(answer.trim(), "OK", "CLUSTER SETSLOT {slot} NODE {id} on master {node}");
        }
        assert_eq!(self.owner(key), to);
    }

    /// How many subscribers the shard channel `channel` has on master `node`
    /// (`PUBSUB SHARDNUMSUB`).
    pub fn shard_subscribers(&self, node: usize, channel: &str) -> u64 {
        let answer = self.command(node, &["PUBSUB", "SHARDNUMSUB", channel]);
        let lines: Vec<&str> = answer.lines().collect();
        assert_eq!(lines.first(), Some(&channel), "PUBSUB SHARDNUMSUB: {answer}");
        lines
            .get(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("PUBSUB SHARDNUMSUB: {answer}"))
    }

    /// The plain (not sharded) channels master `node` has subscribers on (`PUBSUB CHANNELS`).
    pub fn plain_channels(&self, node: usize) -> String {
        self.command(node, &["PUBSUB", "CHANNELS"])
    }
}

/// A topic as the gateway writes it between the braces of its Redis keys and shard channel (`%`,
/// `{` and `}` percent-encoded, so that the hash tag is always the whole topic), written here
/// again from the README's description rather than taken from the gateway.
pub fn key_tag(topic: &str) -> String {
    topic.replace('%', "%25").replace('{', "%7B").replace('}', "%7D")
}
