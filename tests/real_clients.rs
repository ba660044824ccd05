//! Independent client implementations against the real binary: Python `websockets` and Node `ws`,
//! each with its default permessage-deflate offer (`client_max_window_bits`, as browsers send) and
//! without it. `scripts/install-clients.sh` installs both outside the repository on first use.
//!
//! What it proves: the gateway's compression interoperates with the two most used client
//! libraries, directly and through a proxy route; text and binary up to 1 MiB survive; a pub/sub
//! fan-out reaches compressing and plain subscribers alike, compressed once per worker; and the
//! `ringgate_compression_*` counters say what happened.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::prom::scrape;
use common::server::Server;
use common::wire::HttpConn;
use tungstenite::Message;

/// The CA the TLS test's clients trust (given to every client as RINGGATE_TEST_CA once set; the
/// plain tests' clients ignore it).
static TEST_CA: OnceLock<PathBuf> = OnceLock::new();

/// Where `scripts/install-clients.sh` put the interpreters' packages.
struct Clients {
    python: String,
    node_path: String,
}

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let script = repo().join("scripts/install-clients.sh");
        let output = Command::new(&script).output().expect("run scripts/install-clients.sh");
        assert!(
            output.status.success(),
            "scripts/install-clients.sh failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        let value = |key: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .unwrap_or_else(|| panic!("{key} missing from: {stdout}"))
                .to_string()
        };
        Clients { python: value("PYTHON="), node_path: value("NODE_PATH=") }
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Which client library.
#[derive(Clone, Copy, Debug)]
enum Library {
    Python,
    Node,
}

impl Library {
    fn command(self, args: &[&str]) -> Command {
        let clients = clients();
        let mut command = match self {
            Library::Python => {
                let mut c = Command::new(&clients.python);
                c.arg(repo().join("tests/clients/py_client.py"));
                c
            }
            Library::Node => {
                let mut c = Command::new("node");
                c.arg(repo().join("tests/clients/node_client.js")).env("NODE_PATH", &clients.node_path);
                c
            }
        };
        command.args(args);
        if let Some(ca) = TEST_CA.get() {
            command.env("RINGGATE_TEST_CA", ca);
        }
        command
    }

    /// The name its `extensions:` line gives permessage-deflate.
    fn deflate_name(self) -> &'static str {
        match self {
            Library::Python => "PerMessageDeflate",
            Library::Node => "permessage-deflate",
        }
    }
}

/// Runs a client to its end (bounded) and returns its stdout, failing the test on a non-zero exit.
fn run(library: Library, args: &[&str]) -> String {
    let mut child =
        library.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let output = child.wait_with_output().expect("output");
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(
                status.success(),
                "{library:?} {args:?} failed ({status}):\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            return stdout;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{library:?} {args:?} did not finish in 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Both libraries, with and without their compression offer, echo everything back intact; the
/// extension is agreed exactly when offered (and compression is on).
fn echo_with_every_client(url: &str, compression_on: bool) {
    for library in [Library::Python, Library::Node] {
        let out = run(library, &["echo", url]);
        let expected = if compression_on { library.deflate_name() } else { "none" };
        assert!(out.contains(&format!("extensions: {expected}\n")), "{library:?}: {out}");
        assert!(out.contains("echo ok"), "{library:?}: {out}");
        let out = run(library, &["echo", url, "--no-compression"]);
        assert!(out.contains("extensions: none\n") && out.contains("echo ok"), "{library:?}: {out}");
    }
}

/// Both libraries over TLS (Python's `ssl`, Node's `tls`), trusting the test's CA and checking
/// the host name: echo up to 1 MiB with and without compression, and a TLS handshake each.
#[test]
fn python_and_node_echo_over_tls() {
    let dir = common::tls::temp_dir("real-clients-tls");
    let ca = common::tls::TestCa::new("ringgate real clients CA");
    let leaf = ca.leaf(&dir, "localhost", &["localhost"]);
    let ca_file = ca.write_pem(&dir);
    let server = Server::start(&[
        "--tls-cert",
        leaf.cert_path.to_str().expect("path"),
        "--tls-key",
        leaf.key_path.to_str().expect("path"),
    ]);
    let _ = TEST_CA.set(ca_file);
    let url = format!("wss://localhost:{}/echo", server.addr().port());
    echo_with_every_client(&url, true);
}

#[test]
fn python_and_node_echo_with_their_default_compression() {
    let server = Server::start(&[]);
    echo_with_every_client(&format!("ws://{}/echo", server.addr()), true);
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    let sum = |direction: &str, stage: &str| {
        metrics
            .samples("ringgate_compression_payload_bytes_total")
            .filter(|s| s.label("direction") == Some(direction) && s.label("stage") == Some(stage))
            .map(|s| s.value)
            .sum::<f64>()
    };
    assert!(metrics.sum_where("ringgate_compressed_messages_total", "direction", "in") > 0.0);
    assert!(metrics.sum_where("ringgate_compressed_messages_total", "direction", "out") > 0.0);
    assert!(sum("out", "compressed") < sum("out", "uncompressed") / 2.0, "JSON compresses well");
    assert_eq!(metrics.sum("ringgate_compression_connections"), 0.0, "every client has gone");
    assert_eq!(metrics.sum("ringgate_compression_inflaters"), 0.0, "both libraries agree no context");
}

#[test]
fn compression_through_a_proxy_route_is_agreed_with_the_client_alone() {
    let backend = Server::start(&["--compression", "off"]);
    let route = format!("/app=ws://{}/echo", backend.addr());
    let proxy = Server::start(&["--route", &route]);
    echo_with_every_client(&format!("ws://{}/app", proxy.addr()), true);
    let proxy_metrics = scrape(&mut HttpConn::connect(proxy.addr()), "/metrics");
    assert!(proxy_metrics.sum_where("ringgate_compressed_messages_total", "direction", "out") > 0.0);
    let backend_metrics = scrape(&mut HttpConn::connect(backend.addr()), "/metrics");
    assert_eq!(backend_metrics.sum("ringgate_compressed_messages_total"), 0.0, "the upstream hop is plain");
}

#[test]
fn with_upstream_compression_each_hop_is_compressed_on_its_own_terms() {
    let backend = Server::start(&["--compression", "dedicated"]);
    let route = format!("/app=ws://{}/echo", backend.addr());
    let proxy = Server::start(&["--route", &route, "--upstream-compression"]);
    echo_with_every_client(&format!("ws://{}/app", proxy.addr()), true);
    let backend_metrics = scrape(&mut HttpConn::connect(backend.addr()), "/metrics");
    // Every echo of 128 bytes and more crossed the upstream hop compressed, both ways.
    assert!(backend_metrics.sum_where("ringgate_compressed_messages_total", "direction", "in") >= 16.0);
    assert!(backend_metrics.sum_where("ringgate_compressed_messages_total", "direction", "out") >= 16.0);
    let proxy_metrics = scrape(&mut HttpConn::connect(proxy.addr()), "/metrics");
    assert_eq!(proxy_metrics.sum("ringgate_compression_connections"), 0.0, "both hops counted out");
    // The backend kept its context (dedicated mode), so the relay held a decompressor per relay
    // while it ran, and gave each back.
    assert_eq!(proxy_metrics.sum("ringgate_compression_inflaters"), 0.0);
    assert_eq!(proxy_metrics.sum("ringgate_compression_deflaters"), 0.0);
}

#[test]
fn with_compression_off_every_offer_is_declined() {
    let server = Server::start(&["--compression", "off"]);
    echo_with_every_client(&format!("ws://{}/echo", server.addr()), false);
}

/// A subscriber process: its stdout lines, read on a thread.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl Subscriber {
    fn start(library: Library, url: &str, count: usize, compress: bool) -> Subscriber {
        let count = count.to_string();
        let mut args = vec!["subscribe", url, count.as_str()];
        if !compress {
            args.push("--no-compression");
        }
        let mut child =
            library.command(&args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let name = format!("{library:?} (compression {})", if compress { "offered" } else { "not offered" });
        let subscriber = Subscriber { child, lines, name };
        let extensions = subscriber.line();
        let expected = if compress { library.deflate_name() } else { "none" };
        assert_eq!(extensions, format!("extensions: {expected}"), "{}", subscriber.name);
        assert_eq!(subscriber.line(), "ready", "{}", subscriber.name);
        subscriber
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{}: no line within 30 s", self.name))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(size: usize, seq: usize) -> String {
    let item = format!(r#"{{"seq":{seq},"topic":"news","headline":"markets open higher"}},"#);
    item.repeat(size / item.len() + 1)[..size].to_string()
}

#[test]
fn a_fanout_reaches_compressing_and_plain_subscribers_alike_compressed_once_per_worker() {
    let server = Server::start(&[]);
    let url = format!("ws://{}/pubsub/news", server.addr());
    // Text of every size class (below the 128-byte threshold, one frame header length, the next,
    // and large), then binary noise (sent plain even to compressing subscribers) over WebSocket.
    let texts: Vec<String> =
        [10, 200, 5_000, 70_000, 300_000].iter().enumerate().map(|(i, &n)| json(n, i)).collect();
    let noise = common::wire::Rng::new(7).bytes(4096);
    let count = texts.len() + 1;
    let subscribers: Vec<Subscriber> = [
        (Library::Python, true),
        (Library::Python, true),
        (Library::Node, true),
        (Library::Node, true),
        (Library::Python, false),
        (Library::Node, false),
    ]
    .iter()
    .map(|&(library, compress)| Subscriber::start(library, &url, count, compress))
    .collect();

    let mut http = HttpConn::connect(server.addr());
    for text in &texts {
        let reply = http.publish("/publish/news", Some("text/plain; charset=utf-8"), text.as_bytes());
        assert_eq!(reply.subscribers, 6);
    }
    let mut publisher = server.ws_client("/pubsub/news");
    publisher.send(Message::Binary(noise.clone().into())).expect("publish binary");

    let mut expected: Vec<String> = texts.iter().map(|t| format!("T:{t}")).collect();
    expected.push(format!("B:{}", noise.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    for subscriber in &subscribers {
        let got: Vec<String> = (0..count).map(|_| subscriber.line()).collect();
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert!(
                got == want,
                "{}: message {i} differs ({} vs {} bytes)",
                subscriber.name,
                got.len(),
                want.len()
            );
        }
    }

    let metrics = scrape(&mut http, "/metrics");
    let compressible = 4.0; // the texts of 128 bytes and more
    let deliveries = metrics.sum_where("ringgate_compressed_messages_total", "direction", "out");
    assert_eq!(
        deliveries,
        compressible * 4.0,
        "every compressing subscriber got every compressible text compressed"
    );
    let runs = metrics.sum("ringgate_compression_runs_total");
    // Once per worker that has compressing subscribers, plus one try on the noise per worker.
    assert!(runs <= (compressible + 1.0) * 2.0, "{runs} compressor runs for {deliveries} deliveries");
}

#[test]
fn dedicated_mode_gives_a_connection_its_own_compressor_and_returns_it() {
    let server = Server::start(&["--compression", "dedicated", "--workers", "1"]);
    let url = format!("ws://{}/pubsub/t", server.addr());
    // It waits for a third message, so that it is still connected when the gauges are read.
    let subscriber = Subscriber::start(Library::Python, &url, 3, true);
    let mut http = HttpConn::connect(server.addr());
    let metrics = scrape(&mut http, "/metrics");
    assert_eq!(metrics.sum("ringgate_compression_deflaters"), 0.0, "nothing until it is sent something");
    for seq in 0..2 {
        let reply = http.publish("/publish/t", Some("text/plain"), json(2000, seq).as_bytes());
        assert_eq!(reply.subscribers, 1);
    }
    for seq in 0..2 {
        assert_eq!(subscriber.line(), format!("T:{}", json(2000, seq)));
    }
    let metrics = scrape(&mut http, "/metrics");
    assert_eq!(metrics.sum("ringgate_compression_deflaters"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_compressed_messages_total", "direction", "out"), 2.0);
    let bytes = |stage| {
        metrics
            .samples("ringgate_compression_payload_bytes_total")
            .find(|s| s.label("direction") == Some("out") && s.label("stage") == Some(stage))
            .map_or(0.0, |s| s.value)
    };
    assert_eq!(bytes("uncompressed"), 4000.0);
    assert!(bytes("compressed") < 400.0, "the second copy refers back to the first: {}", bytes("compressed"));
    assert_eq!(metrics.sum("ringgate_compression_connections"), 1.0);
    http.publish("/publish/t", Some("text/plain"), b"bye");
    assert_eq!(subscriber.line(), "T:bye");
    echo_with_every_client(&format!("ws://{}/echo", server.addr()), true);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let gauge = scrape(&mut http, "/metrics").sum("ringgate_compression_deflaters");
        if gauge == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{gauge} compressors still held after every client left"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
