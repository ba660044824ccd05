//! Topic history and recovery against the real binary (`--history-size`, `--history-ttl`,
//! `--positions`, `?since=EPOCH:OFFSET`): a subscriber that reconnects with its last position gets
//! exactly what it missed, then the live stream; a changed epoch or a position the history no
//! longer holds is told so in the documented first message, then the live stream; the positions
//! envelope; publishers on both workers while a subscriber keeps reconnecting (no gap, no
//! duplicate); TTL expiry; the size bound and the `ringgate_history_*` metrics. Runs on whichever
//! backend `RINGGATE_IO` picks.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::broker::{self, Broker, Kind};
use common::prom;
use common::recovery::{Position, nowhere, read_text, subscribe_since};
use common::server::Server;
use common::wire::{self, BINARY, Client, HttpConn, TEXT};

fn publish(http: &mut HttpConn, topic: &str, text: &str) -> i64 {
    http.publish(&format!("/publish/{topic}"), Some("text/plain"), text.as_bytes()).subscribers
}

/// Publishes until the subscriber counts reach `expected` (a new subscription may take a moment to
/// be seen on the other worker); returns how many were published.
fn publish_until_reached(http: &mut HttpConn, topic: &str, text: &str, expected: i64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut sent = 0;
    loop {
        sent += 1;
        if publish(http, topic, text) == expected {
            return sent;
        }
        assert!(Instant::now() < deadline, "never reached {expected} subscribers");
        thread::sleep(Duration::from_millis(10));
    }
}

fn scrape(server: &Server) -> prom::Exposition {
    prom::scrape(&mut HttpConn::connect(server.addr()), "/metrics")
}

#[test]
fn a_subscriber_that_reconnects_gets_exactly_the_100_it_missed_then_the_live_ones() {
    let server = Server::start(&["--history-size", "1000", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    let (mut client, first) = subscribe_since(server.addr(), "news", &nowhere());
    assert_eq!((first.recovered, first.reason.as_str(), first.replayed), (false, "epoch_changed", 0));
    assert_eq!(first.at.epoch.len(), 16, "{first:?}");
    // Everything after the first message's position reaches it, each with its position.
    let warmups = publish_until_reached(&mut http, "news", "warm-up", 1);
    let mut last = first.at.clone();
    for _ in 0..warmups {
        let (position, _) = read_text(&mut client);
        assert_eq!(position, Position { epoch: first.at.epoch.clone(), offset: last.offset + 1 });
        last = position;
    }
    drop(client);

    for i in 0..100 {
        publish(&mut http, "news", &format!("missed {i}"));
    }
    let (mut client, recovery) = subscribe_since(server.addr(), "news", &last);
    assert!(recovery.recovered, "{recovery:?}");
    assert_eq!(recovery.reason, "recovered");
    assert_eq!(recovery.replayed, 100);
    assert_eq!(recovery.at, Position { epoch: last.epoch.clone(), offset: last.offset + 100 });
    for i in 0..100 {
        let (position, text) = read_text(&mut client);
        assert_eq!((position.offset, text), (last.offset + 1 + i, format!("missed {i}")));
    }
    for i in 0..3 {
        publish(&mut http, "news", &format!("live {i}"));
        let (position, text) = read_text(&mut client);
        assert_eq!((position.offset, text), (last.offset + 101 + i, format!("live {i}")));
    }
    let metrics = scrape(&server);
    assert_eq!(metrics.sum_where("ringgate_history_recoveries_total", "outcome", "recovered"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_history_recoveries_total", "outcome", "epoch_changed"), 1.0);
    assert_eq!(metrics.sum("ringgate_history_replayed_total"), 100.0);
}

#[test]
fn without_positions_messages_are_untouched_and_since_still_replays() {
    let server = Server::start(&["--history-size", "10"]);
    let mut http = HttpConn::connect(server.addr());
    let (client, first) = subscribe_since(server.addr(), "plain", &nowhere());
    drop(client);
    for i in 0..3 {
        publish(&mut http, "plain", &format!("m{i}"));
    }
    // The first message said where the stream stood; nothing was read since.
    let (mut client, recovery) = subscribe_since(server.addr(), "plain", &first.at);
    assert_eq!((recovery.recovered, recovery.replayed), (true, 3), "{recovery:?}");
    for i in 0..3 {
        client.expect_frame(TEXT, format!("m{i}").as_bytes());
    }
    // A subscriber without ?since= gets no recovery message.
    let mut plain = Client::connect(server.addr(), "/pubsub/plain");
    publish_until_reached(&mut http, "plain", "hello", 2);
    plain.expect_frame(TEXT, b"hello");
}

#[test]
fn a_changed_epoch_is_told_first_then_the_live_stream_follows() {
    let server = Server::start(&["--history-size", "100", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    for i in 0..5 {
        publish(&mut http, "t", &format!("before {i}"));
    }
    let stale = Position { epoch: "0123456789abcdef".into(), offset: 3 };
    let (mut client, first) = subscribe_since(server.addr(), "t", &stale);
    assert_eq!((first.recovered, first.reason.as_str(), first.replayed), (false, "epoch_changed", 0));
    assert_ne!(first.at.epoch, stale.epoch);
    assert_eq!(first.at.offset, 5, "the live stream continues after the last message");
    let sent = publish_until_reached(&mut http, "t", "live", 1);
    let (position, text) = read_text(&mut client);
    assert_eq!((position.offset, text.as_str()), (6, "live"), "sent {sent}");
}

#[test]
fn a_position_the_history_no_longer_holds_is_told_first_then_the_live_stream_follows() {
    let server = Server::start(&["--history-size", "10", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    let (client, first) = subscribe_since(server.addr(), "t", &nowhere());
    drop(client);
    for i in 0..30 {
        publish(&mut http, "t", &format!("m{i}"));
    }
    let (mut client, recovery) = subscribe_since(server.addr(), "t", &first.at);
    assert_eq!((recovery.recovered, recovery.reason.as_str()), (false, "too_old"), "{recovery:?}");
    assert_eq!(recovery.at, Position { epoch: first.at.epoch.clone(), offset: 30 });
    // Ahead of the topic: the same answer.
    let ahead = Position { epoch: first.at.epoch.clone(), offset: 99 };
    let (_ahead, answer) = subscribe_since(server.addr(), "t", &ahead);
    assert_eq!(answer.reason, "too_old");
    publish_until_reached(&mut http, "t", "live", 2);
    let (position, text) = read_text(&mut client);
    assert_eq!((position.offset, text.as_str()), (31, "live"));
    // A position that is not EPOCH:OFFSET is refused before the upgrade.
    let (response, upgraded) = wire::upgrade_with(server.addr(), "/pubsub/t?since=yesterday", "");
    assert_eq!(response.status, 400);
    assert!(upgraded.is_none());
}

#[test]
fn the_positions_envelope_wraps_text_in_json_and_prefixes_binary() {
    let server = Server::start(&["--history-size", "10", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    let (mut client, first) = subscribe_since(server.addr(), "env", &nowhere());
    publish_until_reached(&mut http, "env", "warm", 1);
    let (warm, _) = read_text(&mut client);
    let text = "quote \" backslash \\ newline \n tab \t ü {\"json\":true}";
    publish(&mut http, "env", text);
    let (position, data) = read_text(&mut client);
    assert_eq!(data, text, "the text comes back exactly");
    assert_eq!(position.offset, warm.offset + 1);
    let binary = [0u8, 0xFF, 0xFE, 7];
    http.publish("/publish/env", Some("application/octet-stream"), &binary);
    let frame = client.read_frame();
    assert_eq!(frame.opcode, BINARY);
    assert_eq!(frame.payload.len(), 16 + binary.len());
    let epoch = u64::from_str_radix(&first.at.epoch, 16).expect("hex epoch");
    assert_eq!(frame.payload[..8], epoch.to_be_bytes());
    assert_eq!(frame.payload[8..16], (warm.offset + 2).to_be_bytes());
    assert_eq!(frame.payload[16..], binary);
    // A WebSocket publisher's messages carry positions too.
    let mut publisher = Client::connect(server.addr(), "/pubsub/env");
    publisher.send(TEXT, b"from a socket");
    let (position, data) = read_text(&mut client);
    assert_eq!((position.offset, data.as_str()), (warm.offset + 3, "from a socket"));
}

#[test]
fn publishers_on_both_workers_while_a_subscriber_keeps_reconnecting_lose_and_repeat_nothing() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 1500;
    let server = Server::start(&["--history-size", "100000", "--positions"]);
    let addr = server.addr();
    let (client, first) = subscribe_since(addr, "busy", &nowhere());
    drop(client);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            thread::spawn(move || {
                // Several connections: the kernel spreads them over both workers.
                let mut http = HttpConn::connect(addr);
                for i in 0..EACH {
                    publish(&mut http, "busy", &format!("p{p} #{i}"));
                }
            })
        })
        .collect();
    let total = (PUBLISHERS * EACH) as u64;
    let mut last = first.at.clone();
    let mut per_publisher = [0usize; PUBLISHERS];
    let mut connects = 0;
    let mut recovered_while_publishing = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while last.offset < total {
        assert!(Instant::now() < deadline, "stuck at {last:?} after {connects} connects");
        let running = publishers.iter().any(|p| !p.is_finished());
        let (mut client, recovery) = subscribe_since(addr, "busy", &last);
        connects += 1;
        recovered_while_publishing += usize::from(running);
        assert!(recovery.recovered, "{recovery:?}");
        let available = recovery.replayed + 5;
        let since = last.clone();
        for read in 0..available.min(total - last.offset) {
            let (position, text) = read_text(&mut client);
            assert_eq!(
                position,
                Position { epoch: last.epoch.clone(), offset: last.offset + 1 },
                "no gap, no duplicate: message {read} after connect {connects} since {since:?}: {recovery:?}"
            );
            // Each publisher's own messages arrive in its order.
            let (p, i) = text.trim_start_matches('p').split_once(" #").expect("tagged");
            let (p, i): (usize, usize) = (p.parse().expect("p"), i.parse().expect("i"));
            assert_eq!(per_publisher[p], i, "publisher {p} out of order");
            per_publisher[p] += 1;
            last = position;
        }
    }
    for publisher in publishers {
        publisher.join().expect("publisher");
    }
    assert_eq!(per_publisher, [EACH; PUBLISHERS]);
    assert!(
        recovered_while_publishing > 1,
        "{connects} connects, {recovered_while_publishing} while publishing"
    );
}

#[test]
fn expired_messages_are_freed_and_a_topic_left_empty_gets_a_new_epoch() {
    let server = Server::start(&["--history-size", "100", "--history-ttl", "2s", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    let (client, first) = subscribe_since(server.addr(), "ttl", &nowhere());
    drop(client);
    for i in 0..5 {
        publish(&mut http, "ttl", &format!("m{i}"));
    }
    // Within the TTL: recovered.
    let (recovered_client, recovery) = subscribe_since(server.addr(), "ttl", &first.at);
    assert_eq!((recovery.recovered, recovery.replayed), (true, 5), "{recovery:?}");
    drop(recovered_client);
    let metrics = scrape(&server);
    assert_eq!(metrics.sum("ringgate_history_messages"), 5.0);
    thread::sleep(Duration::from_millis(2500));
    // The scrape frees what expired and drops the topic left with nothing.
    let metrics = scrape(&server);
    assert_eq!(metrics.sum("ringgate_history_messages"), 0.0);
    assert_eq!(metrics.sum("ringgate_history_bytes"), 0.0);
    assert_eq!(metrics.sum("ringgate_history_topics"), 0.0);
    assert_eq!(metrics.sum_where("ringgate_history_evicted_total", "reason", "ttl"), 5.0);
    let (mut client, recovery) = subscribe_since(server.addr(), "ttl", &first.at);
    assert_eq!((recovery.recovered, recovery.reason.as_str()), (false, "epoch_changed"), "{recovery:?}");
    assert_ne!(recovery.at.epoch, first.at.epoch, "a new history, a new epoch");
    assert_eq!(recovery.at.offset, 0);
    publish_until_reached(&mut http, "ttl", "again", 1);
    let (position, _) = read_text(&mut client);
    assert_eq!(position, Position { epoch: recovery.at.epoch.clone(), offset: 1 });
}

#[test]
fn the_history_holds_at_most_its_size_per_topic_and_the_metrics_say_exactly_what() {
    let server = Server::start(&["--history-size", "50"]);
    let mut http = HttpConn::connect(server.addr());
    let payload = "x".repeat(100); // a 102-byte frame: 2 header bytes
    for topic in ["a", "b"] {
        for _ in 0..200 {
            publish(&mut http, topic, &payload);
        }
    }
    let metrics = scrape(&server);
    assert_eq!(metrics.sum("ringgate_history_messages"), 100.0);
    assert_eq!(metrics.sum("ringgate_history_bytes"), 100.0 * 102.0);
    assert_eq!(metrics.sum("ringgate_history_topics"), 2.0);
    assert_eq!(metrics.sum_where("ringgate_history_evicted_total", "reason", "size"), 300.0);
    assert_eq!(metrics.sum_where("ringgate_history_evicted_total", "reason", "ttl"), 0.0);
    assert!(metrics.has("ringgate_history_recoveries_total"));
    let big = "y".repeat(10_000);
    for _ in 0..500 {
        publish(&mut http, "a", &big);
    }
    let metrics = scrape(&server);
    assert_eq!(metrics.sum("ringgate_history_messages"), 100.0);
    assert_eq!(metrics.sum("ringgate_history_bytes"), 50.0 * 102.0 + 50.0 * 10_004.0, "4 header bytes");
}

#[test]
fn without_history_since_is_answered_unavailable_then_the_live_stream() {
    let server = Server::start(&[]);
    let mut http = HttpConn::connect(server.addr());
    let (mut client, first) =
        subscribe_since(server.addr(), "t", &Position { epoch: "ab".into(), offset: 4 });
    assert_eq!((first.recovered, first.reason.as_str()), (false, "unavailable"));
    assert_eq!(first.at, Position { epoch: "0000000000000000".into(), offset: 0 });
    publish_until_reached(&mut http, "t", "live", 1);
    client.expect_frame(TEXT, b"live");
    assert!(!scrape(&server).has("ringgate_history_messages"), "no history, no history metrics");
}

/// With a --broker and no --history-size (or with NATS, which keeps no history at all): `?since=` is
/// answered `unavailable`, then the live stream, from this node and the others. The history in
/// Redis is tested in `server_cluster_history.rs`.
fn with_a_broker_since_is_answered_unavailable_then_the_live_stream(kind: Kind) {
    if broker::skipped() {
        return;
    }
    let broker = Broker::start(kind);
    let url = broker.url();
    let (a, b) = (Server::start(&["--broker", &url]), Server::start(&["--broker", &url]));
    let (mut client, first) = subscribe_since(a.addr(), "t", &Position { epoch: "ab".into(), offset: 4 });
    assert_eq!((first.recovered, first.reason.as_str(), first.replayed), (false, "unavailable", 0));
    assert_eq!(first.at, Position { epoch: "0000000000000000".into(), offset: 0 });
    // Node A subscribes at the broker in the background: publish on B until one arrives.
    let mut http = HttpConn::connect(b.addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    client.stream.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    loop {
        publish(&mut http, "t", "from B");
        if let Ok(Some(frame)) = client.try_read_frame() {
            assert_eq!((frame.opcode, frame.payload.as_slice()), (TEXT, &b"from B"[..]));
            break;
        }
        assert!(Instant::now() < deadline, "nothing from node B");
    }
}

#[test]
fn redis_since_is_answered_unavailable() {
    with_a_broker_since_is_answered_unavailable_then_the_live_stream(Kind::Redis);
}

#[test]
fn nats_since_is_answered_unavailable() {
    with_a_broker_since_is_answered_unavailable_then_the_live_stream(Kind::Nats);
}

#[test]
fn past_the_topic_bound_the_least_recently_published_topic_loses_its_history() {
    let server = Server::start(&["--history-size", "10", "--history-topics", "2", "--positions"]);
    let mut http = HttpConn::connect(server.addr());
    let (client, a) = subscribe_since(server.addr(), "a", &nowhere());
    drop(client);
    for topic in ["a", "b", "a", "c"] {
        publish(&mut http, topic, "m");
    }
    let metrics = scrape(&server);
    assert_eq!(metrics.sum("ringgate_history_topics"), 2.0);
    assert_eq!(metrics.sum("ringgate_history_messages"), 3.0, "a: 2, c: 1");
    assert_eq!(metrics.sum_where("ringgate_history_evicted_total", "reason", "topics"), 1.0, "b's one");
    let (_client, recovery) = subscribe_since(server.addr(), "a", &a.at);
    assert_eq!((recovery.recovered, recovery.replayed), (true, 2), "{recovery:?}");
}
