//! History and recovery with the history in Redis (`--broker redis://` with `--history-size` and
//! `--positions`), against a real `redis-server` and two real gateway processes: a subscriber
//! that reconnects, to either node, with its last position gets exactly the 100 messages it
//! missed, in order, then the live ones; `too_old` and `epoch_changed` (a position the history no
//! longer holds, another epoch, a history expired by its TTL) in the documented first message;
//! both nodes deliver the same message at the same offset, every message once per subscriber,
//! in each publisher's order, a publisher never getting its own; a subscriber that keeps
//! reconnecting while messages flow sees every offset exactly once (this one fails if the worker
//! does not skip the live frames at or below the replay's end); with Redis killed, local
//! delivery goes on at offset 0 and `?since=` is `unavailable`; Redis restarted empty, a new epoch.
//! In a three-master Redis Cluster: recovery per shard, topics on every master.
//!
//! The Redis server comes from `scripts/install-brokers.sh` (see `tests/common/broker.rs`);
//! `RINGGATE_SKIP_BROKER_TESTS=1` skips these tests.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::broker::{self, Broker, Kind};
use common::prom;
use common::recovery::{Position, nowhere, read_text, subscribe_since};
use common::server::Server;
use common::wire::{Client, HttpConn, TEXT};

fn publish(http: &mut HttpConn, topic: &str, text: &str) {
    http.publish(&format!("/publish/{topic}"), Some("text/plain"), text.as_bytes());
}

fn scrape(server: &Server) -> prom::Exposition {
    prom::scrape(&mut HttpConn::connect(server.addr()), "/metrics")
}

/// Waits until `server` is subscribed to one topic at Redis.
fn wait_subscribed(server: &Server) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while scrape(server).sum("ringgate_broker_subscribed_topics") != 1.0 {
        assert!(std::time::Instant::now() < deadline, "{} never subscribed", server.addr());
        thread::sleep(Duration::from_millis(20));
    }
}

/// Two nodes on one Redis, keeping the history there.
fn two_nodes(broker: &Broker, extra: &[&str]) -> (Server, Server) {
    let url = broker.url();
    let mut flags = vec!["--broker", url.as_str(), "--positions"];
    flags.extend_from_slice(extra);
    (Server::start(&flags), Server::start(&flags))
}

fn recovery_outcomes(server: &Server, outcome: &str) -> f64 {
    scrape(server).sum_where("ringgate_history_recoveries_total", "outcome", outcome)
}

#[test]
fn a_subscriber_that_reconnects_to_either_node_gets_exactly_the_100_it_missed_then_the_live_ones() {
    if broker::skipped() {
        return;
    }
    let broker = Broker::start(Kind::Redis);
    let (a, b) = two_nodes(&broker, &["--history-size", "1000"]);
    let mut http = HttpConn::connect(a.addr());
    // The first connect (on B) learns the topic's epoch; once its recovery message is there, B is
    // subscribed to the topic's channel.
    let (mut client, first) = subscribe_since(b.addr(), "news", &nowhere());
    assert_eq!((first.recovered, first.reason.as_str(), first.replayed), (false, "epoch_changed", 0));
    assert_eq!((first.at.epoch.len(), first.at.offset), (16, 0), "{first:?}");
    publish(&mut http, "news", "warm-up");
    let (last, text) = read_text(&mut client);
    assert_eq!(
        (last.clone(), text.as_str()),
        (Position { epoch: first.at.epoch.clone(), offset: 1 }, "warm-up")
    );
    drop(client);

    // A `202` says node A took a message, not that Redis has it yet: a watcher on B sees when all
    // 100 went through Redis, so the replay's count is known.
    let mut watcher = Client::connect(b.addr(), "/pubsub/news");
    wait_subscribed(&b);
    for i in 0..100 {
        publish(&mut http, "news", &format!("missed {i}"));
    }
    for i in 0..100 {
        let (position, text) = read_text(&mut watcher);
        assert_eq!(text, format!("missed {i}"), "the watcher, at {position:?}");
    }
    // B first, then A: A's replay also holds the live message B's round published.
    let mut expected: Vec<String> = (0..100).map(|i| format!("missed {i}")).collect();
    for (name, server) in [("B", &b), ("A", &a)] {
        let (mut client, recovery) = subscribe_since(server.addr(), "news", &last);
        let top = Position { epoch: last.epoch.clone(), offset: last.offset + expected.len() as u64 };
        assert!(recovery.recovered, "on {name}: {recovery:?}");
        assert_eq!(recovery.reason, "recovered", "on {name}");
        assert_eq!((recovery.replayed, recovery.at), (expected.len() as u64, top), "on {name}");
        for (i, missed) in expected.iter().enumerate() {
            let (position, text) = read_text(&mut client);
            assert_eq!(position.offset, last.offset + 1 + i as u64, "on {name}");
            assert_eq!(&text, missed, "on {name}");
        }
        let live = format!("live after the replay on {name}");
        publish(&mut http, "news", &live);
        let (position, text) = read_text(&mut client);
        assert_eq!((position.offset, &text), (last.offset + expected.len() as u64 + 1, &live), "on {name}");
        expected.push(live);
    }
    assert_eq!(recovery_outcomes(&a, "recovered"), 1.0);
    assert_eq!(recovery_outcomes(&b, "recovered"), 1.0);
    assert_eq!(recovery_outcomes(&b, "epoch_changed"), 1.0);
    assert_eq!(scrape(&b).sum("ringgate_history_replayed_total"), 100.0);
}

#[test]
fn positions_the_history_no_longer_holds_or_another_epoch_are_told_so_then_the_live_stream() {
    if broker::skipped() {
        return;
    }
    let broker = Broker::start(Kind::Redis);
    let (a, b) = two_nodes(&broker, &["--history-size", "5", "--history-ttl", "2s"]);
    let mut http = HttpConn::connect(a.addr());
    let (mut keeper, first) = subscribe_since(b.addr(), "gone", &nowhere());
    for i in 1..=10 {
        publish(&mut http, "gone", &format!("m{i}"));
    }
    for i in 1..=10 {
        assert_eq!(read_text(&mut keeper).1, format!("m{i}"), "through Redis");
    }
    let epoch = first.at.epoch.clone();
    let at = |offset| Position { epoch: epoch.clone(), offset };
    let top = at(10);

    let (_, r) = subscribe_since(b.addr(), "gone", &at(4));
    assert_eq!(
        (r.recovered, r.reason.as_str(), r.replayed, r.at.clone()),
        (false, "too_old", 0, top.clone())
    );
    let (mut client, r) = subscribe_since(a.addr(), "gone", &at(5));
    assert_eq!((r.recovered, r.reason.as_str(), r.replayed), (true, "recovered", 5), "6..10 are held");
    for offset in 6..=10 {
        assert_eq!(read_text(&mut client), (at(offset), format!("m{offset}")));
    }
    let (_, r) = subscribe_since(a.addr(), "gone", &at(11));
    assert_eq!((r.reason.as_str(), r.at.clone()), ("too_old", top.clone()), "ahead of the topic");
    let other =
        Position { epoch: format!("{:016x}", u64::from_str_radix(&epoch, 16).expect("hex") ^ 1), offset: 3 };
    let (mut other_client, r) = subscribe_since(b.addr(), "gone", &other);
    assert_eq!((r.recovered, r.reason.as_str(), r.at.clone()), (false, "epoch_changed", top.clone()));
    // Told so, it gets the live stream.
    publish(&mut http, "gone", "m11");
    assert_eq!(read_text(&mut other_client), (at(11), "m11".to_string()));
    assert_eq!(read_text(&mut client), (at(11), "m11".to_string()));

    // Quiet for the TTL: the history is gone in Redis, and the next one has a new epoch.
    thread::sleep(Duration::from_millis(2500));
    let (_, r) = subscribe_since(a.addr(), "gone", &at(11));
    assert_eq!((r.recovered, r.reason.as_str(), r.at.offset), (false, "epoch_changed", 0));
    assert_ne!(r.at.epoch, epoch);
    assert_eq!(recovery_outcomes(&a, "too_old") + recovery_outcomes(&b, "too_old"), 2.0);
}

/// Reads `count` messages on `client`: per publisher (the text's prefix up to ':') the numbers
/// are 0, 1, 2, ...; offsets follow each other with no gap. Returns (offset, text) in order.
fn read_in_order(client: &mut Client, count: usize, who: &str) -> Vec<(u64, String)> {
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    let mut got: Vec<(u64, String)> = Vec::with_capacity(count);
    for _ in 0..count {
        let (position, text) = read_text(client);
        let (publisher, n) = text.split_once(':').unwrap_or_else(|| panic!("{who}: odd message {text:?}"));
        let n: usize = n.parse().unwrap_or_else(|_| panic!("{who}: odd message {text:?}"));
        let expected = next.entry(publisher.to_string()).or_insert(0);
        assert_eq!(n, *expected, "{who}: from {publisher}, got {n} where {expected} was next");
        *expected += 1;
        if let Some((previous, _)) = got.last() {
            assert!(position.offset > *previous, "{who}: offsets go up");
        }
        got.push((position.offset, text));
    }
    got
}

#[test]
fn both_nodes_deliver_every_message_once_at_the_same_offset_and_publishers_do_not_get_their_own() {
    if broker::skipped() {
        return;
    }
    const MESSAGES: usize = 200;
    let broker = Broker::start(Kind::Redis);
    let (a, b) = two_nodes(&broker, &[]);
    // `?since=` confirms each node's channel subscription before the test publishes.
    let mut subscribers: Vec<(String, Client)> = Vec::new();
    for (name, server) in [("A", &a), ("B", &b)] {
        for i in 0..2 {
            let (client, _) = subscribe_since(server.addr(), "everyone", &nowhere());
            subscribers.push((format!("subscriber {i} on {name}"), client));
        }
    }
    let (mut publisher_a, _) = subscribe_since(a.addr(), "everyone", &nowhere());
    let (mut publisher_b, _) = subscribe_since(b.addr(), "everyone", &nowhere());
    let mut http = HttpConn::connect(b.addr());
    for i in 0..MESSAGES {
        publisher_a.send(TEXT, format!("a:{i}").as_bytes());
        publisher_b.send(TEXT, format!("b:{i}").as_bytes());
        if i % 4 == 0 {
            publish(&mut http, "everyone", &format!("h:{}", i / 4));
        }
    }
    let total = 2 * MESSAGES + MESSAGES / 4;
    let mut seen: Option<Vec<(u64, String)>> = None;
    for (who, client) in &mut subscribers {
        let got = read_in_order(client, total, who);
        assert_eq!(got.last().map(|(offset, _)| *offset), Some(total as u64), "{who}: no gap from 1");
        match &seen {
            None => seen = Some(got),
            Some(first) => assert_eq!(&got, first, "{who}: the same message at the same offset"),
        }
    }
    // A publisher gets the others' messages, never its own.
    for (who, client, own) in
        [("publisher A", &mut publisher_a, "a:"), ("publisher B", &mut publisher_b, "b:")]
    {
        let got = read_in_order(client, total - MESSAGES, who);
        assert!(got.iter().all(|(_, text)| !text.starts_with(own)), "{who} got its own message");
    }
}

#[test]
fn a_subscriber_that_keeps_reconnecting_while_messages_flow_sees_every_offset_once() {
    if broker::skipped() {
        return;
    }
    const RECONNECTS: usize = 25;
    let broker = Broker::start(Kind::Redis);
    let (a, b) = two_nodes(&broker, &["--history-size", "100000"]);
    let (mut client, first) = subscribe_since(b.addr(), "flow", &nowhere());
    let mut last = first.at.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, addr) = (Arc::clone(&stop), a.addr());
        thread::spawn(move || {
            let mut publisher = Client::connect(addr, "/pubsub/flow");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 20_000 {
                publisher.send(TEXT, format!("p:{sent}").as_bytes());
                sent += 1;
                // About 2 a millisecond: enough to have some in flight at every reconnect, and
                // fewer than a worker holds for a recovery (1024) on a loaded machine.
                if sent % 2 == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        })
    };
    let mut next_text = 0u64;
    let mut replayed = 0;
    for round in 0..RECONNECTS {
        // Read a few live ones, then leave and come back with the last position.
        for _ in 0..20 {
            let (position, text) = read_text(&mut client);
            assert_eq!(position.epoch, last.epoch);
            assert_eq!(position.offset, last.offset + 1, "round {round}: no gap, no duplicate");
            assert_eq!(text, format!("p:{next_text}"), "round {round}");
            next_text += 1;
            last = position;
        }
        drop(client);
        thread::sleep(Duration::from_millis(5));
        let (again, recovery) =
            subscribe_since(if round % 2 == 0 { a.addr() } else { b.addr() }, "flow", &last);
        assert!(recovery.recovered, "round {round}: {recovery:?}");
        replayed += recovery.replayed;
        client = again;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().expect("publisher");
    // The rest, to the end: still one each, in order.
    while next_text < sent {
        let (position, text) = read_text(&mut client);
        assert_eq!(position.offset, last.offset + 1, "no gap, no duplicate at the end");
        assert_eq!(text, format!("p:{next_text}"));
        next_text += 1;
        last = position;
    }
    assert!(replayed > 0, "some reconnects had something to replay");
}

#[test]
fn with_redis_away_local_delivery_goes_on_at_offset_0_and_a_restarted_redis_starts_a_new_epoch() {
    if broker::skipped() {
        return;
    }
    let mut broker = Broker::start(Kind::Redis);
    let (a, _b) = two_nodes(&broker, &["--history-size", "100"]);
    let mut http = HttpConn::connect(a.addr());
    let (mut client, first) = subscribe_since(a.addr(), "outage", &nowhere());
    publish(&mut http, "outage", "before");
    let (before, _) = read_text(&mut client);
    assert_eq!(before, Position { epoch: first.at.epoch.clone(), offset: 1 });

    broker.kill();
    let connected = |server: &Server| scrape(server).sum("ringgate_broker_connected");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while connected(&a) != 0.0 {
        assert!(std::time::Instant::now() < deadline, "node A never saw Redis go");
        thread::sleep(Duration::from_millis(20));
    }
    // Local delivery goes on, without a position to ask for later.
    publish(&mut http, "outage", "while away");
    let (position, text) = read_text(&mut client);
    assert_eq!((position, text.as_str()), (Position { epoch: "0".repeat(16), offset: 0 }, "while away"));
    let (_, r) = subscribe_since(a.addr(), "outage", &before);
    assert_eq!((r.recovered, r.reason.as_str()), (false, "unavailable"));

    // Redis back, empty: the node reconnects, and the topic starts again in a new epoch.
    broker.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while connected(&a) != 1.0 {
        assert!(std::time::Instant::now() < deadline, "node A never reconnected");
        thread::sleep(Duration::from_millis(50));
    }
    let (mut again, r) = subscribe_since(a.addr(), "outage", &before);
    assert_eq!((r.recovered, r.reason.as_str(), r.at.offset), (false, "epoch_changed", 0));
    assert_ne!(r.at.epoch, before.epoch);
    publish(&mut http, "outage", "after");
    assert_eq!(
        read_text(&mut again),
        (Position { epoch: r.at.epoch.clone(), offset: 1 }, "after".to_string())
    );
    assert_eq!(read_text(&mut client).1, "after");
}

/// The history in a Redis Cluster (`--broker redis+cluster://`): three topics whose slots are on
/// three different masters; each publish is the history script with SPUBLISH, on the master of
/// the topic's slot (it fails there if the shard channel is not in the slot of the topic's keys);
/// a subscriber that reconnects, to the other node, with its last position gets exactly what it
/// missed on each topic, in order, then the live stream.
#[test]
fn in_a_redis_cluster_a_subscriber_that_reconnects_gets_exactly_what_it_missed_on_each_shard() {
    if broker::skipped() {
        return;
    }
    let cluster = broker::RedisCluster::start();
    let (url_a, url_b) = (cluster.url(&[], &[0]), cluster.url(&[], &[1, 2]));
    let history = ["--positions", "--history-size", "1000"];
    let a = Server::start(&[&["--broker", url_a.as_str()][..], &history].concat());
    let b = Server::start(&[&["--broker", url_b.as_str()][..], &history].concat());
    // Topics that start with `}`: raw between the braces of a key, their hash tag would be empty
    // and their keys and channel in different slots.
    let topics = cluster.topic_per_master_named("}t");
    let mut http = HttpConn::connect(a.addr());
    const MISSED: usize = 30;

    let mut lasts = Vec::new();
    let mut watchers = Vec::new();
    for (topic, _) in &topics {
        let (mut client, first) = subscribe_since(b.addr(), topic, &nowhere());
        assert_eq!((first.recovered, first.reason.as_str()), (false, "epoch_changed"), "{topic}");
        publish(&mut http, topic, "warm-up");
        let (last, text) = read_text(&mut client);
        assert_eq!((last.offset, text.as_str()), (1, "warm-up"), "{topic}");
        assert_eq!(last.epoch, first.at.epoch, "{topic}");
        lasts.push(last);
        drop(client);
        watchers.push(Client::connect(b.addr(), &format!("/pubsub/{topic}")));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while scrape(&b).sum("ringgate_broker_subscribed_topics") != topics.len() as f64 {
        assert!(std::time::Instant::now() < deadline, "B never subscribed to every topic");
        thread::sleep(Duration::from_millis(20));
    }
    for i in 0..MISSED {
        for (topic, _) in &topics {
            publish(&mut http, topic, &format!("{topic} missed {i}"));
        }
    }
    // The watchers on B see every message go through the cluster: the replays' sizes are known.
    for ((topic, _), watcher) in topics.iter().zip(&mut watchers) {
        for i in 0..MISSED {
            let (position, text) = read_text(watcher);
            assert_eq!((position.offset, text), (2 + i as u64, format!("{topic} missed {i}")));
        }
    }
    for ((topic, master), last) in topics.iter().zip(&lasts) {
        let (mut client, recovery) = subscribe_since(a.addr(), topic, last);
        let top = Position { epoch: last.epoch.clone(), offset: 1 + MISSED as u64 };
        assert!(recovery.recovered, "{topic}: {recovery:?}");
        assert_eq!((recovery.replayed, recovery.at), (MISSED as u64, top), "{topic}");
        for i in 0..MISSED {
            let (position, text) = read_text(&mut client);
            assert_eq!((position.offset, text), (2 + i as u64, format!("{topic} missed {i}")), "{topic}");
        }
        let live = format!("{topic} live");
        publish(&mut http, topic, &live);
        assert_eq!(
            read_text(&mut client),
            (Position { epoch: last.epoch.clone(), offset: 2 + MISSED as u64 }, live)
        );
        // The topic's history is on its slot's master.
        let log = format!("ringgate:{{{}}}:log", broker::key_tag(topic));
        assert_eq!(cluster.command(*master, &["XLEN", &log]).trim(), (2 + MISSED).to_string(), "{log}");
    }
    assert_eq!(recovery_outcomes(&a, "recovered"), topics.len() as f64);
    assert_eq!(scrape(&a).sum("ringgate_history_replayed_total"), (MISSED * topics.len()) as f64);
    for server in [&a, &b] {
        assert_eq!(scrape(server).sum("ringgate_broker_drops_total"), 0.0);
        // B unsubscribed each topic while its watcher was on its way: the confirmation of that
        // SUNSUBSCRIBE is not taken for a slot moved (which would make B reconnect).
        assert_eq!(scrape(server).sum("ringgate_broker_reconnects_total"), 0.0);
    }
}
