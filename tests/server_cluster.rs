//! Pub/sub across gateway nodes (`--broker`), against real brokers and real gateway processes:
//! two `ringgate` nodes share a `redis-server` (and a `nats-server`) of the test's own on a free
//! loopback port. Subscribers and publishers on both nodes: every message reaches every subscriber
//! exactly once, in each publisher's order. The broker killed mid-run: local delivery goes on, and
//! `/healthz` and `/metrics` say the node is degraded; restarted on the same port: cross-node
//! delivery comes back without restarting the gateways. Unreachable at start: a clear error,
//! unless `--broker-optional`. A three-master Redis Cluster (`--broker redis+cluster://`, sharded
//! pub/sub): the same exactly-once and order across nodes with each topic's subscription on its
//! slot's master only; a master killed and back; a slot moved to another master; no seed
//! answering at start.
//!
//! The servers come from `scripts/install-brokers.sh` (Debian's packages, installed when missing);
//! a machine that cannot have them fails these tests, saying why, unless
//! `RINGGATE_SKIP_BROKER_TESTS=1` says to skip them.

mod common;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::thread;
use std::time::{Duration, Instant};

use common::broker::{self, Broker, Kind};
use common::prom::{self, Exposition};
use common::server::{Server, run_to_exit};
use common::wire::{Client, HttpConn, TEXT};

/// How long a node gets to notice the broker is gone or back (back-off tops out at ~6 s).
const SETTLE: Duration = Duration::from_secs(15);
/// Messages each WebSocket publisher sends in the exactly-once test.
const MESSAGES: usize = 300;
/// Messages published over HTTP in the exactly-once test.
const HTTP_MESSAGES: usize = 50;

/// A gateway node on `broker`, with `extra` flags.
fn node(broker_url: &str, extra: &[&str]) -> Server {
    let mut flags = vec!["--broker", broker_url];
    flags.extend_from_slice(extra);
    Server::start(&flags)
}

fn scrape(server: &Server) -> Exposition {
    prom::scrape(&mut HttpConn::connect(server.addr()), "/metrics")
}

/// The sum of a metric's samples.
fn metric(server: &Server, name: &str) -> f64 {
    let exposition = scrape(server);
    assert!(exposition.has(name), "{name} missing from /metrics");
    exposition.sum(name)
}

fn drops(server: &Server, reason: &str) -> f64 {
    scrape(server).sum_where("ringgate_broker_drops_total", "reason", reason)
}

/// The `/healthz` answer: status and body.
fn health(server: &Server) -> (u16, String) {
    let response = HttpConn::connect(server.addr()).request("GET", "/healthz", &[], b"");
    (response.status, String::from_utf8_lossy(&response.body).into_owned())
}

/// Waits until `done` holds, failing with `what` after [`SETTLE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {SETTLE:?}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until `server` is connected and subscribed to `topics` topics at the broker.
fn wait_subscribed(server: &Server, topics: f64) {
    wait_until(&format!("node {} subscribed to {topics} topic(s)", server.addr()), || {
        let exposition = scrape(server);
        exposition.sum("ringgate_broker_connected") == 1.0
            && exposition.sum("ringgate_broker_subscribed_topics") == topics
    });
}

fn publish(http: &mut HttpConn, topic: &str, body: &str) {
    http.publish(&format!("/publish/{topic}"), Some("text/plain"), body.as_bytes());
}

/// The next text message on `client`.
fn next_text(client: &mut Client) -> String {
    let frame = client.read_frame();
    assert_eq!(frame.opcode, TEXT, "{frame:?}");
    String::from_utf8(frame.payload).expect("UTF-8 text")
}

/// Reads `count` messages and checks that, per publisher (the message's prefix up to ':'), the
/// sequence numbers are exactly 0, 1, 2, ... (no loss, no duplicate, no reordering).
fn expect_in_order(client: &mut Client, count: usize, who: &str) -> BTreeMap<String, usize> {
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..count {
        let text = next_text(client);
        let (publisher, n) = text.split_once(':').unwrap_or_else(|| panic!("{who}: odd message {text:?}"));
        let n: usize = n.parse().unwrap_or_else(|_| panic!("{who}: odd message {text:?}"));
        let expected = next.entry(publisher.to_string()).or_insert(0);
        assert_eq!(n, *expected, "{who}: from {publisher}, got {n} where {expected} was next");
        *expected += 1;
    }
    next
}

/// Nothing more arrives on `client` within a short while.
fn expect_silence(client: &mut Client, who: &str) {
    client.stream.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    match client.try_read_frame() {
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{who}: expected nothing more, got {other:?}"),
    }
    client.stream.set_read_timeout(Some(common::wire::IO_TIMEOUT)).expect("timeout");
}

fn every_message_reaches_every_subscriber_once_in_publisher_order(kind: Kind) {
    if broker::skipped() {
        return;
    }
    let broker = Broker::start(kind);
    let (a, b) = (node(&broker.url(), &[]), node(&broker.url(), &[]));
    let mut subscribers: Vec<(String, Client)> = Vec::new();
    for (name, server) in [("A", &a), ("B", &b)] {
        for i in 0..3 {
            subscribers
                .push((format!("subscriber {i} on {name}"), Client::connect(server.addr(), "/pubsub/t")));
        }
    }
    // Publishers are subscribers too (a pub/sub route is both); they do not get their own messages.
    let mut publisher_a = Client::connect(a.addr(), "/pubsub/t");
    let mut publisher_b = Client::connect(b.addr(), "/pubsub/t");
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);

    let mut http = HttpConn::connect(a.addr());
    for i in 0..MESSAGES {
        publisher_a.send(TEXT, format!("a:{i}").as_bytes());
        publisher_b.send(TEXT, format!("b:{i}").as_bytes());
        if i < HTTP_MESSAGES {
            publish(&mut http, "t", &format!("h:{i}"));
        }
    }
    let all = 2 * MESSAGES + HTTP_MESSAGES;
    for (who, client) in &mut subscribers {
        let counts = expect_in_order(client, all, who);
        let expected =
            BTreeMap::from([("a".into(), MESSAGES), ("b".into(), MESSAGES), ("h".into(), HTTP_MESSAGES)]);
        assert_eq!(counts, expected, "{who}");
    }
    let counts = expect_in_order(&mut publisher_a, MESSAGES + HTTP_MESSAGES, "publisher on A");
    assert_eq!(counts.get("a"), None, "a publisher does not get its own messages");
    let counts = expect_in_order(&mut publisher_b, MESSAGES + HTTP_MESSAGES, "publisher on B");
    assert_eq!(counts.get("b"), None);
    for (who, client) in &mut subscribers {
        expect_silence(client, who);
    }

    // Each message went to the broker once, from the node it was published on, and came back to
    // the other node once; nothing was dropped.
    let (published_a, published_b) = ((MESSAGES + HTTP_MESSAGES) as f64, MESSAGES as f64);
    assert_eq!(metric(&a, "ringgate_broker_published_total"), published_a);
    assert_eq!(metric(&b, "ringgate_broker_published_total"), published_b);
    assert_eq!(metric(&a, "ringgate_broker_received_total"), published_b);
    assert_eq!(metric(&b, "ringgate_broker_received_total"), published_a);
    for server in [&a, &b] {
        assert_eq!(metric(server, "ringgate_broker_drops_total"), 0.0);
        assert_eq!(metric(server, "ringgate_broker_reconnects_total"), 0.0);
        assert_eq!(health(server), (200, "ok\n".into()));
    }

    // Something that is not a ringgate envelope on a topic's channel is counted, not delivered.
    broker.publish_foreign("t", b"hello from another program");
    for server in [&a, &b] {
        wait_until("the foreign message is counted", || drops(server, "malformed") == 1.0);
    }
    for (who, client) in &mut subscribers {
        expect_silence(client, who);
    }

    // The last subscriber leaving a topic unsubscribes the node at the broker.
    drop(subscribers);
    drop((publisher_a, publisher_b));
    wait_subscribed(&a, 0.0);
    wait_subscribed(&b, 0.0);
}

fn local_delivery_survives_the_broker_and_cross_node_delivery_comes_back(kind: Kind) {
    if broker::skipped() {
        return;
    }
    let mut broker = Broker::start(kind);
    let (a, b) = (node(&broker.url(), &[]), node(&broker.url(), &[]));
    let mut on_a = Client::connect(a.addr(), "/pubsub/news");
    let mut on_b = Client::connect(b.addr(), "/pubsub/news");
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);
    let (mut http_a, mut http_b) = (HttpConn::connect(a.addr()), HttpConn::connect(b.addr()));
    publish(&mut http_a, "news", "before");
    assert_eq!(next_text(&mut on_a), "before");
    assert_eq!(next_text(&mut on_b), "before");

    broker.kill();
    for server in [&a, &b] {
        wait_until("the node reports the broker lost", || health(server) == (200, "degraded\n".into()));
        assert_eq!(metric(server, "ringgate_broker_connected"), 0.0);
    }
    // Local delivery goes on; the message stays on its node, counted. (At least once: "before" is
    // counted too if A had not read Redis's answer to it when Redis died, though B got it.)
    let dropped = drops(&a, "disconnected");
    publish(&mut http_a, "news", "during");
    assert_eq!(next_text(&mut on_a), "during");
    assert_eq!(drops(&a, "disconnected"), dropped + 1.0, "A's log:\n{}", a.stderr());

    broker.restart();
    for server in [&a, &b] {
        wait_subscribed(server, 1.0);
        assert_eq!(health(server), (200, "ok\n".into()));
        assert_eq!(metric(server, "ringgate_broker_reconnects_total"), 1.0);
    }
    publish(&mut http_a, "news", "after");
    assert_eq!(next_text(&mut on_a), "after");
    assert_eq!(next_text(&mut on_b), "after", "B never got \"during\", and gets what follows");
    publish(&mut http_b, "news", "from B");
    assert_eq!(next_text(&mut on_a), "from B");
    assert_eq!(next_text(&mut on_b), "from B");
}

/// A publisher on A sends without pause while the broker is killed and restarted: A's subscriber
/// gets every message in order; B's gets them in order too, missing only some of those sent while
/// the broker was away, and again the last ones; every message A published is accounted for as
/// sent to the broker or dropped as `disconnected`.
fn traffic_goes_on_through_a_broker_outage(kind: Kind) {
    if broker::skipped() {
        return;
    }
    let mut broker = Broker::start(kind);
    let (a, b) = (node(&broker.url(), &[]), node(&broker.url(), &[]));
    let mut on_a = Client::connect(a.addr(), "/pubsub/live");
    let mut on_b = Client::connect(b.addr(), "/pubsub/live");
    let mut publisher = Client::connect(a.addr(), "/pubsub/live");
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = std::sync::Arc::clone(&stop);
        thread::spawn(move || {
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                publisher.send(TEXT, format!("p:{sent}").as_bytes());
                sent += 1;
                thread::sleep(Duration::from_millis(2));
            }
            (sent, publisher)
        })
    };
    thread::sleep(Duration::from_millis(300));
    broker.kill();
    wait_until("A notices the broker is gone", || health(&a).1 == "degraded\n");
    thread::sleep(Duration::from_millis(200));
    broker.restart();
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, _publisher) = sender.join().expect("the publishing thread");

    let counts = expect_in_order(&mut on_a, sent, "subscriber on A");
    assert_eq!(counts.get("p"), Some(&sent), "local delivery never stopped");
    let mut last = None;
    let mut got_on_b = 0;
    while last != Some(sent - 1) {
        let text = next_text(&mut on_b);
        let n: usize = text.strip_prefix("p:").and_then(|n| n.parse().ok()).expect("a p: message");
        assert!(last.is_none_or(|last| n > last), "B: {n} after {last:?}: duplicated or reordered");
        last = Some(n);
        got_on_b += 1;
    }
    expect_silence(&mut on_b, "subscriber on B");
    let published = metric(&a, "ringgate_broker_published_total");
    let accounted = published + drops(&a, "disconnected") + drops(&a, "queue_full");
    assert_eq!(accounted, sent as f64, "every message A published is sent or counted as dropped");
    assert!(drops(&a, "disconnected") > 0.0, "some were published while the broker was away");
    assert_eq!(metric(&b, "ringgate_broker_received_total"), got_on_b as f64);
    assert!(got_on_b < sent, "B missed what was published while the broker was away");
}

fn an_unreachable_broker_stops_the_start_unless_optional(kind: Kind) {
    if broker::skipped() {
        return;
    }
    let port = broker::free_port();
    let url = format!("{}://127.0.0.1:{port}", kind.scheme());
    let args = ["--listen", "127.0.0.1:0", "--workers", "1", "--broker", &url];
    let (status, stderr) = run_to_exit(&args, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the broker at {url}")) && stderr.contains("--broker-optional"),
        "{stderr}"
    );

    let a = node(&url, &["--broker-optional"]);
    assert_eq!(health(&a), (200, "degraded\n".into()));
    assert_eq!(metric(&a, "ringgate_broker_connected"), 0.0);
    let mut on_a = Client::connect(a.addr(), "/pubsub/t");
    let mut http_a = HttpConn::connect(a.addr());
    publish(&mut http_a, "t", "local only");
    assert_eq!(next_text(&mut on_a), "local only");

    let _broker = Broker::start_on(kind, port);
    wait_subscribed(&a, 1.0);
    assert_eq!(health(&a), (200, "ok\n".into()));
    assert_eq!(
        metric(&a, "ringgate_broker_reconnects_total"),
        1.0,
        "the first connection, after a failed attempt"
    );
    let b = node(&url, &[]);
    let mut on_b = Client::connect(b.addr(), "/pubsub/t");
    wait_subscribed(&b, 1.0);
    publish(&mut HttpConn::connect(b.addr()), "t", "from B");
    assert_eq!(next_text(&mut on_a), "from B");
    assert_eq!(next_text(&mut on_b), "from B");
}

#[test]
fn redis_every_message_reaches_every_subscriber_once_in_publisher_order() {
    every_message_reaches_every_subscriber_once_in_publisher_order(Kind::Redis);
}

#[test]
fn redis_local_delivery_survives_the_broker_and_cross_node_delivery_comes_back() {
    local_delivery_survives_the_broker_and_cross_node_delivery_comes_back(Kind::Redis);
}

#[test]
fn redis_traffic_goes_on_through_a_broker_outage() {
    traffic_goes_on_through_a_broker_outage(Kind::Redis);
}

#[test]
fn redis_unreachable_at_start_stops_the_start_unless_optional() {
    an_unreachable_broker_stops_the_start_unless_optional(Kind::Redis);
}

/// `rediss://`: the broker link over TLS, to a redis-server whose certificate comes from a private
/// CA. With `--broker-ca` naming that CA, messages cross nodes as over `redis://`; without it the
/// system's roots do not know the CA, and the start stops, saying why.
#[test]
fn a_rediss_broker_with_a_private_ca_carries_messages_across_nodes() {
    if broker::skipped() {
        return;
    }
    let dir = common::tls::temp_dir("rediss");
    let ca = common::tls::TestCa::new("ringgate test Redis CA");
    let ca_path = ca.write_pem(&dir);
    let leaf = ca.leaf(&dir, "redis", &["127.0.0.1"]);
    let broker = Broker::start_redis_tls(&leaf.cert_path, &leaf.key_path, &ca_path);
    let url = broker.tls_url();
    let ca_flag = ca_path.to_str().expect("a UTF-8 path");
    let (a, b) = (node(&url, &["--broker-ca", ca_flag]), node(&url, &["--broker-ca", ca_flag]));
    let mut on_b = Client::connect(b.addr(), "/pubsub/t");
    wait_subscribed(&b, 1.0);
    publish(&mut HttpConn::connect(a.addr()), "t", "over TLS");
    assert_eq!(next_text(&mut on_b), "over TLS");
    assert_eq!(metric(&b, "ringgate_broker_received_total"), 1.0);
    assert_eq!(health(&a), (200, "ok\n".into()));

    let args = ["--listen", "127.0.0.1:0", "--workers", "1", "--broker", &url];
    let (status, stderr) = run_to_exit(&args, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the broker at rediss://")
            && stderr.contains("UnknownIssuer")
            && stderr.contains("--broker-ca FILE"),
        "{stderr}"
    );
    let not_a_ca = dir.join("empty.pem");
    std::fs::write(&not_a_ca, "not a certificate\n").expect("write");
    let args = [&args[..], &["--broker-ca", not_a_ca.to_str().expect("UTF-8")]].concat();
    let (status, stderr) = run_to_exit(&args, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("empty.pem") && stderr.contains("--broker-ca"), "{stderr}");
}

/// Every broker counter family is checked above with its exact change (queue_full and handoff
/// drops, which need a node pushed past its bounds, in the unit tests of `gateway::cluster`).
#[test]
fn every_broker_counter_family_is_checked_here() {
    if broker::skipped() {
        return;
    }
    const CHECKED: [&str; 4] = [
        "ringgate_broker_reconnects_total",
        "ringgate_broker_published_total",
        "ringgate_broker_received_total",
        "ringgate_broker_drops_total",
    ];
    let broker = Broker::start(Kind::Redis);
    let exposition = scrape(&node(&broker.url(), &[]));
    let families: Vec<&str> = exposition
        .families
        .iter()
        .filter(|f| f.name.starts_with("ringgate_broker_"))
        .map(|f| f.name.as_str())
        .collect();
    for family in &exposition.families {
        if family.name.starts_with("ringgate_broker_") && family.kind == "counter" {
            assert!(CHECKED.contains(&family.name.as_str()), "{} is not checked here", family.name);
        }
    }
    for name in CHECKED.iter().chain(&["ringgate_broker_connected", "ringgate_broker_subscribed_topics"]) {
        assert!(families.contains(name), "{name} missing: {families:?}");
    }
    let reasons: Vec<&str> = exposition
        .samples("ringgate_broker_drops_total")
        .filter_map(|sample| sample.label("reason"))
        .collect();
    assert_eq!(reasons, ["queue_full", "disconnected", "handoff", "malformed"]);
}

#[test]
fn nats_every_message_reaches_every_subscriber_once_in_publisher_order() {
    every_message_reaches_every_subscriber_once_in_publisher_order(Kind::Nats);
}

#[test]
fn nats_local_delivery_survives_the_broker_and_cross_node_delivery_comes_back() {
    local_delivery_survives_the_broker_and_cross_node_delivery_comes_back(Kind::Nats);
}

#[test]
fn nats_traffic_goes_on_through_a_broker_outage() {
    traffic_goes_on_through_a_broker_outage(Kind::Nats);
}

#[test]
fn nats_unreachable_at_start_stops_the_start_unless_optional() {
    an_unreachable_broker_stops_the_start_unless_optional(Kind::Nats);
}

#[test]
fn a_node_without_a_broker_has_no_broker_metrics_and_is_simply_ok() {
    let server = Server::start(&[]);
    assert_eq!(health(&server), (200, "ok\n".into()));
    assert!(!scrape(&server).has("ringgate_broker_connected"));
}

/// A Redis Cluster (`--broker redis+cluster://`, sharded pub/sub): two nodes seeded with
/// different masters (one node's first seed is dead: the next one is used), three topics whose
/// slots are on three different masters, a subscriber and a publisher per topic on each node:
/// every message exactly once per subscriber, in each publisher's order. Each topic's
/// subscription lives on the master owning the slot of its history keys, and nowhere else (no
/// plain SUBSCRIBE anywhere): this fails if the channel were not `ringgate:{T}` in the keys'
/// slot, or if the node used SUBSCRIBE.
#[test]
fn redis_cluster_delivers_every_message_once_in_order_through_each_topics_shard() {
    if broker::skipped() {
        return;
    }
    let cluster = broker::RedisCluster::start();
    let dead = format!("127.0.0.1:{}", broker::free_port());
    let a = node(&cluster.url(&[&dead], &[0]), &[]);
    let b = node(&cluster.url(&[], &[1, 2]), &[]);
    let topics = cluster.topic_per_master();
    let mut subscribers: Vec<(String, Client)> = Vec::new();
    let mut publishers: Vec<(String, Client, Client)> = Vec::new();
    for (topic, _) in &topics {
        for (name, server) in [("A", &a), ("B", &b)] {
            let path = format!("/pubsub/{topic}");
            subscribers
                .push((format!("subscriber to {topic} on {name}"), Client::connect(server.addr(), &path)));
        }
        let path = format!("/pubsub/{topic}");
        publishers.push((topic.clone(), Client::connect(a.addr(), &path), Client::connect(b.addr(), &path)));
    }
    wait_subscribed(&a, topics.len() as f64);
    wait_subscribed(&b, topics.len() as f64);
    for (topic, master) in &topics {
        let channel = format!("ringgate:{{{topic}}}");
        for node in 0..topics.len() {
            let expected = if node == *master { 2 } else { 0 };
            assert_eq!(cluster.shard_subscribers(node, &channel), expected, "{channel} on master {node}");
            assert_eq!(cluster.plain_channels(node).trim(), "", "no plain SUBSCRIBE on master {node}");
        }
    }

    const COUNT: usize = 100;
    for i in 0..COUNT {
        for (_, on_a, on_b) in &mut publishers {
            on_a.send(TEXT, format!("a:{i}").as_bytes());
            on_b.send(TEXT, format!("b:{i}").as_bytes());
        }
    }
    for (who, client) in &mut subscribers {
        let counts = expect_in_order(client, 2 * COUNT, who);
        assert_eq!(counts, BTreeMap::from([("a".into(), COUNT), ("b".into(), COUNT)]), "{who}");
    }
    for (topic, on_a, on_b) in &mut publishers {
        assert_eq!(expect_in_order(on_a, COUNT, topic).get("b"), Some(&COUNT), "{topic}: publisher on A");
        assert_eq!(expect_in_order(on_b, COUNT, topic).get("a"), Some(&COUNT), "{topic}: publisher on B");
    }
    for (who, client) in &mut subscribers {
        expect_silence(client, who);
    }
    let sent = (COUNT * topics.len()) as f64;
    for server in [&a, &b] {
        assert_eq!(metric(server, "ringgate_broker_published_total"), sent);
        assert_eq!(metric(server, "ringgate_broker_received_total"), sent);
        assert_eq!(metric(server, "ringgate_broker_drops_total"), 0.0);
        assert_eq!(metric(server, "ringgate_broker_reconnects_total"), 0.0);
        assert_eq!(health(server), (200, "ok\n".into()));
    }

    // The last subscribers leaving unsubscribe the nodes from the shard channels.
    drop((subscribers, publishers));
    wait_subscribed(&a, 0.0);
    wait_subscribed(&b, 0.0);
    for (topic, master) in &topics {
        assert_eq!(cluster.shard_subscribers(*master, &format!("ringgate:{{{topic}}}")), 0);
    }
}

/// A Redis Cluster's master lost while running (the one owning the topic's slot): both nodes
/// report it (`/healthz` degraded, `ringgate_broker_connected` 0) and deliver locally; the master
/// back (same port, same slots), both reconnect, subscribe again, and messages cross again,
/// without restarting the gateways.
#[test]
fn redis_cluster_a_master_lost_degrades_the_nodes_and_back_they_reconnect() {
    if broker::skipped() {
        return;
    }
    let mut cluster = broker::RedisCluster::start();
    let (topic, master) = cluster.topic_per_master().swap_remove(0);
    let a = node(&cluster.url(&[], &[0, 1, 2]), &[]);
    let b = node(&cluster.url(&[], &[2, 1, 0]), &[]);
    let path = format!("/pubsub/{topic}");
    let (mut on_a, mut on_b) = (Client::connect(a.addr(), &path), Client::connect(b.addr(), &path));
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);
    let mut http = HttpConn::connect(a.addr());
    publish(&mut http, &topic, "before");
    assert_eq!((next_text(&mut on_a), next_text(&mut on_b)), ("before".into(), "before".into()));

    cluster.kill(master);
    for server in [&a, &b] {
        let deadline = Instant::now() + SETTLE;
        while health(server) != (200, "degraded\n".into()) {
            assert!(Instant::now() < deadline, "the node reports the cluster lost: {}", server.stderr());
            thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(metric(server, "ringgate_broker_connected"), 0.0);
    }
    publish(&mut http, &topic, "during");
    assert_eq!(next_text(&mut on_a), "during", "local delivery goes on");

    cluster.restart(master);
    for server in [&a, &b] {
        wait_subscribed(server, 1.0);
        assert_eq!(health(server), (200, "ok\n".into()));
        assert!(metric(server, "ringgate_broker_reconnects_total") >= 1.0);
    }
    publish(&mut http, &topic, "after");
    assert_eq!(next_text(&mut on_a), "after");
    assert_eq!(next_text(&mut on_b), "after", "B never got \"during\", and gets what follows");
}

/// A Redis Cluster slot moved while a topic in it has subscribers (the end of a resharding): the
/// old master unsubscribes the shard channel (SUNSUBSCRIBE push); the nodes take it as a lost
/// connection, subscribe again on the new master, and messages cross again. Without handling
/// that push the nodes would stay subscribed nowhere, reporting all is well.
#[test]
fn redis_cluster_a_topics_slot_moved_to_another_master_is_subscribed_there() {
    if broker::skipped() {
        return;
    }
    let cluster = broker::RedisCluster::start();
    let (topic, master) = cluster.topic_per_master().swap_remove(0);
    let a = node(&cluster.url(&[], &[0]), &[]);
    let b = node(&cluster.url(&[], &[1]), &[]);
    let path = format!("/pubsub/{topic}");
    let (mut on_a, mut on_b) = (Client::connect(a.addr(), &path), Client::connect(b.addr(), &path));
    wait_subscribed(&a, 1.0);
    wait_subscribed(&b, 1.0);
    let channel = format!("ringgate:{{{topic}}}");
    let to = (master + 1) % 3;
    cluster.move_slot(&channel, to);
    wait_until("both nodes subscribed on the slot's new master", || {
        cluster.shard_subscribers(to, &channel) == 2
    });
    for server in [&a, &b] {
        wait_subscribed(server, 1.0);
    }
    let mut http = HttpConn::connect(a.addr());
    publish(&mut http, &topic, "after the move");
    assert_eq!(next_text(&mut on_a), "after the move");
    assert_eq!(next_text(&mut on_b), "after the move");
    assert_eq!(cluster.shard_subscribers(master, &channel), 0, "nothing left on the old master");
}

/// A Redis Cluster none of whose seeds answers stops the start, saying how to go on.
#[test]
fn redis_cluster_with_no_seed_answering_stops_the_start() {
    if broker::skipped() {
        return;
    }
    let (one, two) = (broker::free_port(), broker::free_port());
    let url = format!("redis+cluster://127.0.0.1:{one},127.0.0.1:{two}");
    let args = ["--listen", "127.0.0.1:0", "--workers", "1", "--broker", &url];
    let (status, stderr) = run_to_exit(&args, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the broker at {url}")), "{stderr}");
    assert!(stderr.contains("--broker-optional"), "{stderr}");
}
