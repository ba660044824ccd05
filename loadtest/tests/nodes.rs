//! `--mode pubsub` over several gateway URLs against real `ringgate` processes: subscribers and
//! publishers spread over the nodes, and every delivery attributed to its pair of nodes.
//!
//! Without a broker two gateways are two separate worlds: a message published on one node reaches
//! only that node's subscribers. So every cross-node delivery must be counted lost and every
//! same-node one delivered, which checks the attribution itself (a client that connected
//! everything to one node, or counted the pairs wrong, fails it). Through a real `redis-server`
//! (`RINGGATE_SKIP_BROKER_TESTS=1` skips that test) every cross-node delivery arrives.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::gateway::Gateway;
use support::redis::{self, Redis};
use support::tls::{self_signed, temp_dir};
use support::{Run, assert_percentiles, run_loadtest};

const LIMIT: Duration = Duration::from_secs(30);

/// `nodes.pairs` as (publisher node, subscriber node, expected, delivered, lost).
fn pairs(run: &Run) -> Vec<(u64, u64, u64, u64, u64)> {
    let json = run.json();
    let pairs = json.pointer("/nodes/pairs").and_then(Value::as_array);
    let pairs = pairs.unwrap_or_else(|| panic!("no nodes.pairs in {json:#}"));
    let field = |pair: &Value, key: &str| pair[key].as_u64().unwrap_or_else(|| panic!("{key} in {pair}"));
    pairs
        .iter()
        .map(|p| {
            let f = |key| field(p, key);
            (
                f("publisher_node"),
                f("subscriber_node"),
                f("deliveries_expected"),
                f("deliveries"),
                f("deliveries_lost"),
            )
        })
        .collect()
}

#[test]
fn without_a_broker_every_cross_node_delivery_is_lost_and_every_same_node_one_arrives() {
    let (a, b) = (Gateway::start(&[]), Gateway::start(&[]));
    let (url_a, url_b) = (format!("{}/pubsub", a.base), format!("{}/pubsub", b.base));
    // Publisher 0 on node 0, publisher 1 on node 1; subscribers 0 and 2 on node 0, 1 and 3 on
    // node 1: each message has two same-node subscribers and two on the other node.
    let run = run_loadtest(
        "nodes-separate",
        &[
            &url_a,
            &url_b,
            "--mode",
            "pubsub",
            "--publishers",
            "2",
            "--subscribers",
            "4",
            "--rate",
            "50",
            "--duration",
            "1s",
            // Every publisher has started (after every subscriber settled) before the window opens.
            "--warmup",
            "500ms",
            "--quiet",
        ],
        LIMIT,
    );
    // Losses are reported, not an exit status.
    assert!(run.output.status.success(), "stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    let json = run.json();
    assert_eq!(run.num("/connections_established"), 6.0, "{json:#}");
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    let published = run.num("/messages_sent");
    assert!((90.0..=110.0).contains(&published), "{published} published, expected about 100");
    let half = published * 2.0;
    assert_eq!(json["nodes"]["urls"].as_array().map(Vec::len), Some(2), "{json:#}");
    assert_eq!(run.num("/nodes/same_node/deliveries_expected"), half, "{json:#}");
    assert_eq!(run.num("/nodes/same_node/deliveries"), half, "{json:#}");
    assert_eq!(run.num("/nodes/same_node/deliveries_lost"), 0.0, "{json:#}");
    assert_eq!(run.num("/nodes/cross_node/deliveries_expected"), half, "{json:#}");
    assert_eq!(run.num("/nodes/cross_node/deliveries"), 0.0, "{json:#}");
    assert_eq!(run.num("/nodes/cross_node/deliveries_lost"), half, "{json:#}");
    assert_eq!(run.num("/nodes/cross_node/latency_us/count"), 0.0);
    assert_eq!(run.num("/nodes/same_node/latency_us/count"), half);
    assert_percentiles(&run, "nodes/same_node/latency_us");
    // The totals are the sums.
    assert_eq!(run.num("/deliveries_expected"), published * 4.0);
    assert_eq!(run.num("/messages_received"), half);
    assert_eq!(run.num("/deliveries_lost"), half);
    for (from, to, expected, delivered, lost) in pairs(&run) {
        assert!(expected > 0, "pair {from}->{to} expected nothing: {json:#}");
        match from == to {
            true => assert_eq!((delivered, lost), (expected, 0), "pair {from}->{to}: {json:#}"),
            false => assert_eq!((delivered, lost), (0, expected), "pair {from}->{to}: {json:#}"),
        }
    }
    let text = run.stdout();
    assert!(
        text.contains(&format!("cross-node:  0 of {half} deliveries made, {half} lost; no latency")),
        "{text}"
    );
    assert!(
        text.contains(&format!("same-node:   {half} of {half} deliveries made, 0 lost; latency p50")),
        "{text}"
    );
    assert!(text.contains("node pairs:  publisher's node->subscriber's: 0->0 "), "{text}");
}

#[test]
fn through_redis_every_cross_node_delivery_arrives() {
    if redis::skipped() {
        return;
    }
    let redis = Redis::start();
    let broker = ["--broker", redis.url.as_str()];
    let (a, b) = (Gateway::start(&broker), Gateway::start(&broker));
    let (url_a, url_b) = (format!("{}/pubsub", a.base), format!("{}/pubsub", b.base));
    // Two topics: each topic's four subscribers alternate between the nodes, so each message has
    // two same-node and two cross-node subscribers. The warmup lets each node's SUBSCRIBE at
    // Redis settle before the measured window (it is not confirmed before the 101).
    let run = run_loadtest(
        "nodes-redis",
        &[
            &url_a,
            &url_b,
            "--mode",
            "pubsub",
            "--publishers",
            "2",
            "--subscribers",
            "8",
            "--topics",
            "2",
            "--rate",
            "50",
            "--warmup",
            "500ms",
            "--duration",
            "1s",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    let json = run.json();
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    let published = run.num("/messages_sent");
    assert!((90.0..=110.0).contains(&published), "{published} published, expected about 100");
    let half = published * 2.0;
    for kind in ["cross_node", "same_node"] {
        assert_eq!(run.num(&format!("/nodes/{kind}/deliveries_expected")), half, "{kind}: {json:#}");
        assert_eq!(run.num(&format!("/nodes/{kind}/deliveries")), half, "{kind}: {json:#}");
        assert_eq!(run.num(&format!("/nodes/{kind}/deliveries_lost")), 0.0, "{kind}: {json:#}");
        assert_eq!(run.num(&format!("/nodes/{kind}/latency_us/count")), half, "{kind}: {json:#}");
        assert_percentiles(&run, &format!("nodes/{kind}/latency_us"));
    }
    assert_eq!(run.num("/deliveries_lost"), 0.0, "{json:#}");
    assert_eq!(run.num("/messages_received"), published * 4.0, "{json:#}");
    for (from, to, expected, delivered, lost) in pairs(&run) {
        assert!(expected > 0 && delivered == expected && lost == 0, "pair {from}->{to}: {json:#}");
    }
}

#[test]
fn each_wss_node_gets_its_own_tls_handshakes() {
    let dir = temp_dir("nodes-wss");
    let leaf = self_signed(&dir, "node", &["127.0.0.1"]);
    let (cert, key) = (leaf.cert.to_str().expect("UTF-8"), leaf.key.to_str().expect("UTF-8"));
    let tls = ["--tls-cert", cert, "--tls-key", key];
    let (a, b) = (Gateway::start(&tls), Gateway::start(&tls));
    let url = |gateway: &Gateway| format!("{}/pubsub", gateway.base.replacen("ws://", "wss://", 1));
    let (url_a, url_b) = (url(&a), url(&b));
    let run = run_loadtest(
        "nodes-wss",
        &[
            &url_a,
            &url_b,
            "--insecure",
            "--mode",
            "pubsub",
            "--publishers",
            "1",
            "--subscribers",
            "2",
            "--rate",
            "50",
            "--duration",
            "1s",
            // The publisher starts once every subscriber's TLS handshake is done, which a debug
            // build on a busy machine (CI) has taken more than the whole 500 ms window for.
            "--warmup",
            "1s",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    let json = run.json();
    assert_eq!(run.num("/connections_established"), 3.0, "{json:#}");
    assert_eq!(run.num("/tls/handshakes"), 3.0, "{json:#}");
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    // The publisher and subscriber 0 are on node 0, subscriber 1 on node 1 (no broker between).
    let published = run.num("/messages_sent");
    assert!(published > 0.0, "{json:#}");
    assert_eq!(run.num("/nodes/same_node/deliveries"), published, "{json:#}");
    assert_eq!(run.num("/nodes/cross_node/deliveries_lost"), published, "{json:#}");
    let urls = json["nodes"]["urls"].as_array().expect("nodes.urls");
    assert!(urls.iter().all(|u| u.as_str().is_some_and(|u| u.starts_with("wss://"))), "{json:#}");
}
