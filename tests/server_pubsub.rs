//! Pub/sub against the real binary: fan-out to subscribers on both workers from WebSocket and HTTP
//! publishers, in order and with the right opcode; publishers not receiving their own messages
//! (unless `--pubsub-echo`); topics kept apart; subscriber counts in the publish API; and slow
//! consumers, closed with 1008 or missing messages (`--slow-consumer drop`) while the others keep
//! receiving everything.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::prom;
use common::server::Server;
use common::wire::{self, BINARY, CLOSE, Client, HttpConn, TEXT};

/// The `n`th message of a sequence tagged `tag`: every third one binary (and not UTF-8), the rest
/// text; each carries its sequence number.
fn message(tag: &str, seq: usize) -> (u8, Vec<u8>) {
    if seq % 3 == 0 {
        let mut payload = vec![0xFF, 0xFE];
        payload.extend_from_slice(&(seq as u32).to_be_bytes());
        payload.extend_from_slice(tag.as_bytes());
        (BINARY, payload)
    } else {
        (TEXT, format!("{tag} #{seq} ü").into_bytes())
    }
}

/// The Content-Type an HTTP publisher gives a message of `opcode`.
fn content_type(opcode: u8) -> &'static str {
    if opcode == TEXT { "text/plain; charset=utf-8" } else { "application/octet-stream" }
}

fn kind_name(opcode: u8) -> &'static str {
    if opcode == TEXT { "text" } else { "binary" }
}

fn subscribe(addr: SocketAddr, topic: &str) -> Client {
    Client::connect(addr, &format!("/pubsub/{topic}"))
}

/// Reads the next frame that is not a warm-up message.
fn read_skipping_warmups(client: &mut Client) -> wire::Frame {
    loop {
        let frame = client.read_frame();
        if frame.payload != b"warm-up" {
            return frame;
        }
    }
}

/// Publishes warm-up messages over HTTP until one reaches `expected` subscribers (the
/// subscriptions of clients that just connected may take a moment to be seen on every worker).
fn wait_for_subscribers(http: &mut HttpConn, topic: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = http.publish(&format!("/publish/{topic}"), Some("text/plain"), b"warm-up");
        if reply.subscribers == expected {
            return;
        }
        assert!(reply.subscribers < expected, "more subscribers than connected: {reply:?}");
        assert!(Instant::now() < deadline, "subscribers never reached {expected}: {reply:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_subscriber_on_both_workers_receives_every_message_in_order() {
    const SUBSCRIBERS: usize = 10;
    const MESSAGES: usize = 200;
    let server = Server::start(&[]);
    // With SO_REUSEPORT the kernel spreads these over both workers (all on one: p = 2^-9, in which
    // case more connect until both workers hold some).
    let mut subscribers: Vec<Client> = (0..SUBSCRIBERS).map(|_| subscribe(server.addr(), "fanout")).collect();
    let mut http = HttpConn::connect(server.addr());
    loop {
        let exposition = prom::scrape(&mut http, "/metrics");
        let per_worker: Vec<f64> =
            exposition.samples("ringgate_pubsub_subscribers").map(|sample| sample.value).collect();
        assert_eq!(per_worker.len(), 2, "one subscriber gauge per worker");
        assert_eq!(per_worker.iter().sum::<f64>(), subscribers.len() as f64, "{per_worker:?}");
        if per_worker.iter().all(|&n| n > 0.0) {
            break;
        }
        assert!(subscribers.len() < 40, "every subscriber lands on one worker: {per_worker:?}");
        subscribers.push(subscribe(server.addr(), "fanout"));
    }
    let subscriber_count = subscribers.len() as i64;
    wait_for_subscribers(&mut http, "fanout", subscriber_count);

    // From the HTTP API, all on one keep-alive connection.
    for seq in 0..MESSAGES {
        let (opcode, payload) = message("http", seq);
        let reply = http.publish("/publish/fanout", Some(content_type(opcode)), &payload);
        assert_eq!(reply.topic, "fanout");
        assert_eq!(reply.kind, kind_name(opcode), "message {seq}");
        assert_eq!(reply.subscribers, subscriber_count, "message {seq}");
    }
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        for seq in 0..MESSAGES {
            let (opcode, payload) = message("http", seq);
            let frame = if seq == 0 { read_skipping_warmups(subscriber) } else { subscriber.read_frame() };
            assert_eq!(
                (frame.fin, frame.rsv, frame.opcode, &frame.payload),
                (true, 0, opcode, &payload),
                "subscriber {i}, HTTP message {seq}: {}",
                wire::summary(&frame)
            );
        }
    }

    // From a WebSocket publisher, which is itself subscribed to the topic, all in one write.
    let mut publisher = subscribe(server.addr(), "fanout");
    let mut burst = Vec::new();
    for seq in 0..MESSAGES {
        let (opcode, payload) = message("ws", seq);
        burst.extend_from_slice(&wire::masked(opcode, &payload));
    }
    publisher.send_raw(&burst);
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        for seq in 0..MESSAGES {
            let (opcode, payload) = message("ws", seq);
            let frame = subscriber.read_frame();
            assert_eq!(
                (frame.fin, frame.rsv, frame.opcode, &frame.payload),
                (true, 0, opcode, &payload),
                "subscriber {i}, WebSocket message {seq}: {}",
                wire::summary(&frame)
            );
        }
    }
    // Every subscriber has everything the publisher sent; a marker published now is the first thing
    // the publisher receives: none of its own messages came back.
    let reply = http.publish("/publish/fanout", Some("text/plain"), b"marker");
    assert_eq!(reply.subscribers, subscriber_count + 1, "the publisher is a subscriber too");
    publisher.expect_frame(TEXT, b"marker");
    for subscriber in &mut subscribers {
        subscriber.expect_frame(TEXT, b"marker");
    }
}

#[test]
fn a_subscription_counts_as_soon_as_its_handshake_completes_and_not_after_it_closes() {
    let server = Server::start(&[]);
    let mut http = HttpConn::connect(server.addr());
    assert_eq!(http.publish("/publish/count", Some("text/plain"), b"nobody").subscribers, 0);
    let mut subscribers = Vec::new();
    for n in 1..=12 {
        subscribers.push(subscribe(server.addr(), "count"));
        // No waiting: the 101 is sent once the subscription is registered on every worker.
        let reply = http.publish("/publish/count", Some("text/plain"), format!("n={n}").as_bytes());
        assert_eq!(reply.subscribers, n, "right after the handshake of subscriber {n}");
    }
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        for n in i + 1..=12 {
            subscriber.expect_frame(TEXT, format!("n={n}").as_bytes());
        }
    }
    // Closing ends the subscription (give the server a moment to finish the connection).
    for mut subscriber in subscribers.drain(..6) {
        subscriber.send(CLOSE, &wire::close_body(1000, b""));
        subscriber.expect_close(1000);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = http.publish("/publish/count", Some("text/plain"), b"after");
        if reply.subscribers == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "closed subscribers still counted: {reply:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn topics_do_not_leak_into_each_other() {
    let server = Server::start(&[]);
    let mut on_a: Vec<Client> = (0..3).map(|_| subscribe(server.addr(), "alpha")).collect();
    let mut on_b: Vec<Client> = (0..3).map(|_| subscribe(server.addr(), "beta")).collect();
    let mut publisher_a = subscribe(server.addr(), "alpha");
    let mut http = HttpConn::connect(server.addr());
    // A topic whose name is a prefix of another is a different topic.
    let mut on_alp = subscribe(server.addr(), "alp");

    for seq in 0..50 {
        let (opcode, payload) = message("alpha", seq);
        publisher_a.send(opcode, &payload);
        let (opcode, payload) = message("beta", seq);
        let reply = http.publish("/publish/beta", Some(content_type(opcode)), &payload);
        assert_eq!(reply.subscribers, 3, "{reply:?}");
    }
    for (tag, subscribers) in [("alpha", &mut on_a), ("beta", &mut on_b)] {
        for subscriber in subscribers.iter_mut() {
            for seq in 0..50 {
                let (opcode, payload) = message(tag, seq);
                subscriber.expect_frame(opcode, &payload);
            }
        }
    }
    // End markers: each must be the next thing on its topic's subscribers, and the only thing the
    // publisher and the `alp` subscriber ever receive.
    assert_eq!(http.publish("/publish/alpha", Some("text/plain"), b"end alpha").subscribers, 4);
    assert_eq!(http.publish("/publish/beta", Some("text/plain"), b"end beta").subscribers, 3);
    assert_eq!(http.publish("/publish/alp", Some("text/plain"), b"end alp").subscribers, 1);
    for subscriber in on_a.iter_mut().chain([&mut publisher_a]) {
        subscriber.expect_frame(TEXT, b"end alpha");
    }
    for subscriber in &mut on_b {
        subscriber.expect_frame(TEXT, b"end beta");
    }
    on_alp.expect_frame(TEXT, b"end alp");
}

#[test]
fn pubsub_echo_delivers_a_publishers_own_messages_too() {
    let server = Server::start(&["--pubsub-echo"]);
    let mut publisher = subscribe(server.addr(), "mirror");
    let mut other = subscribe(server.addr(), "mirror");
    for seq in 0..30 {
        let (opcode, payload) = message("mirror", seq);
        publisher.send(opcode, &payload);
    }
    for client in [&mut publisher, &mut other] {
        for seq in 0..30 {
            let (opcode, payload) = message("mirror", seq);
            client.expect_frame(opcode, &payload);
        }
    }
    let mut http = HttpConn::connect(server.addr());
    assert_eq!(http.publish("/publish/mirror", None, b"x").subscribers, 2);
    publisher.expect_frame(BINARY, b"x");
    other.expect_frame(BINARY, b"x");
}

// ---------------------------------------------------------------------------------------------
// Slow consumers

const SLOW_PAYLOAD: usize = 1024;

/// A 1 KiB binary message carrying `seq` in its first 4 bytes.
fn numbered(seq: u32) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(SLOW_PAYLOAD, (seq % 251) as u8);
    payload
}

fn seq_of(frame: &wire::Frame) -> u32 {
    assert_eq!(
        (frame.fin, frame.opcode, frame.payload.len()),
        (true, BINARY, SLOW_PAYLOAD),
        "{}",
        wire::summary(frame)
    );
    let seq = u32::from_be_bytes(frame.payload[..4].try_into().expect("4 bytes"));
    assert_eq!(frame.payload, numbered(seq), "payload of message {seq}");
    seq
}

/// Subscribers that read everything on their own threads (warm-ups aside) until the text frame
/// `end`, and publish their progress so that the publisher never runs further ahead of them than
/// [`READERS_LAG`] messages: however loaded the machine, they are never slow consumers themselves.
struct Readers {
    threads: Vec<thread::JoinHandle<Vec<u32>>>,
    received: Vec<Arc<AtomicU32>>,
}

/// How far (in 1 KiB messages) the publisher may run ahead of the readers: well under the bound.
const READERS_LAG: u32 = 16;

impl Readers {
    fn start(addr: SocketAddr, topic: &str, count: usize) -> Readers {
        let mut readers = Readers { threads: Vec::new(), received: Vec::new() };
        for _ in 0..count {
            let mut client = subscribe(addr, topic);
            let received = Arc::new(AtomicU32::new(0));
            readers.received.push(Arc::clone(&received));
            readers.threads.push(thread::spawn(move || {
                let mut seqs = Vec::new();
                loop {
                    let frame = read_skipping_warmups(&mut client);
                    if frame.opcode == TEXT && frame.payload == b"end" {
                        return seqs;
                    }
                    seqs.push(seq_of(&frame));
                    received.fetch_add(1, Ordering::Release);
                }
            }));
        }
        readers
    }

    /// Waits until every reader has received all but [`READERS_LAG`] of `published` messages.
    fn pace(&self, published: u32) {
        let deadline = Instant::now() + wire::IO_TIMEOUT;
        while self.received.iter().any(|r| r.load(Ordering::Acquire) + READERS_LAG < published) {
            assert!(Instant::now() < deadline, "a reader stalled: {:?} of {published}", self.received);
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// Joins the readers; each must have received messages `0..published`, in order.
    fn finish(self, published: u32) {
        for (i, reader) in self.threads.into_iter().enumerate() {
            let seqs = reader.join().unwrap_or_else(|_| panic!("reader {i} failed"));
            assert_eq!(seqs.len(), published as usize, "reader {i} missed messages");
            assert!(seqs.iter().enumerate().all(|(n, &seq)| n as u32 == seq), "reader {i} out of order");
        }
    }
}

/// The slow-consumer counters, found by name in the exposition (`..._slow_consumer_..._total`).
fn slow_consumer_counter(exposition: &prom::Exposition, what: &str) -> f64 {
    let names: Vec<&str> = exposition
        .sample_names()
        .into_iter()
        .filter(|name| name.contains("slow_consumer") && name.contains(what))
        .collect();
    assert_eq!(names.len(), 1, "one slow-consumer {what} counter expected: {:?}", exposition.sample_names());
    exposition.sum(names[0])
}

#[test]
fn a_subscriber_that_does_not_read_is_closed_with_1008_and_the_others_get_everything() {
    let server = Server::start(&["--max-backpressure", "64KiB"]);
    let mut slow = wire::slow_subscriber(server.addr(), "firehose");
    let readers = Readers::start(server.addr(), "firehose", 3);
    let mut http = HttpConn::connect(server.addr());
    wait_for_subscribers(&mut http, "firehose", 4);

    // Publish until the server has dropped the slow subscriber (the count falls to 3), then a bit more.
    let started = Instant::now();
    let mut published = 0u32;
    let mut closed_after = None;
    while published < 100_000 {
        readers.pace(published);
        let reply = http.publish("/publish/firehose", Some("application/octet-stream"), &numbered(published));
        published += 1;
        match reply.subscribers {
            4 => assert!(closed_after.is_none(), "the slow subscriber came back: {reply:?}"),
            3 => {
                closed_after.get_or_insert(published);
            }
            _ => panic!("unexpected subscriber count after {published} messages: {reply:?}"),
        }
        if closed_after.is_some_and(|at| published >= at + 200) {
            break;
        }
    }
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!("the slow subscriber was never dropped in {published} messages of {SLOW_PAYLOAD} bytes")
    });
    http.publish("/publish/firehose", Some("text/plain"), b"end");
    let publish_time = started.elapsed();

    readers.finish(published);

    // Now the slow one reads: a prefix of the messages, in order, then Close 1008 "slow consumer".
    let mut received = 0u32;
    let close = loop {
        let frame = read_skipping_warmups(&mut slow);
        if frame.opcode == CLOSE {
            break frame;
        }
        assert_eq!(seq_of(&frame), received, "the slow subscriber's messages are a prefix, in order");
        received += 1;
    };
    assert_eq!(close.close_code(), Some(1008), "{}", wire::summary(&close));
    let reason = String::from_utf8_lossy(&close.payload[2..]).into_owned();
    assert!(reason.contains("slow consumer"), "close reason {reason:?}");
    assert!(received < closed_after, "received {received} messages, dropped after {closed_after}");
    slow.send(CLOSE, &wire::close_body(1008, b""));
    slow.expect_eof();

    let mut metrics = HttpConn::connect(server.addr());
    let exposition = prom::scrape(&mut metrics, "/metrics");
    assert_eq!(slow_consumer_counter(&exposition, "close"), 1.0);
    assert_eq!(exposition.sum_where("ringgate_close_frames_sent_total", "code", "1008"), 1.0);
    assert_eq!(slow_consumer_counter(&exposition, "drop"), 0.0);
    eprintln!(
        "slow consumer closed after {closed_after} of {published} messages ({publish_time:?}); it had \
         received {received} before its Close"
    );
}

#[test]
fn with_the_drop_policy_a_slow_subscriber_misses_messages_but_stays_connected() {
    let server = Server::start(&["--max-backpressure", "64KiB", "--slow-consumer", "drop"]);
    let mut slow = wire::slow_subscriber(server.addr(), "firehose");
    let readers = Readers::start(server.addr(), "firehose", 3);
    let mut http = HttpConn::connect(server.addr());
    let mut metrics = HttpConn::connect(server.addr());
    wait_for_subscribers(&mut http, "firehose", 4);

    // Publish until the server reports drops, then a bit more.
    let mut published = 0u32;
    let mut dropping_after = None;
    while published < 100_000 {
        readers.pace(published);
        http.publish("/publish/firehose", Some("application/octet-stream"), &numbered(published));
        published += 1;
        if dropping_after.is_none()
            && published % 250 == 0
            && slow_consumer_counter(&prom::scrape(&mut metrics, "/metrics"), "drop") > 0.0
        {
            dropping_after = Some(published);
        }
        if dropping_after.is_some_and(|at| published >= at + 200) {
            break;
        }
    }
    assert!(dropping_after.is_some(), "no drops reported in {published} messages of {SLOW_PAYLOAD} bytes");
    let phase_one = published;

    // The slow subscriber reads what it got until nothing more comes.
    slow.stream.set_read_timeout(Some(Duration::from_millis(500))).expect("read timeout");
    let mut got = Vec::new();
    loop {
        match slow.try_read_frame() {
            Ok(Some(frame)) if frame.payload == b"warm-up" => {}
            Ok(Some(frame)) => got.push(seq_of(&frame)),
            Ok(None) => panic!("the slow subscriber was disconnected after {} messages", got.len()),
            Err(error)
                if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                break;
            }
            Err(error) => panic!("the slow subscriber's connection broke: {error}"),
        }
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order or repeated: {got:?}");
    assert!(got.len() < phase_one as usize, "the slow subscriber missed nothing");
    let missed = u64::from(phase_one) - got.len() as u64;

    // It is still subscribed, and now that it reads it misses nothing (20 KiB < the 64 KiB bound).
    slow.stream.set_read_timeout(Some(wire::IO_TIMEOUT)).expect("read timeout");
    for seq in phase_one..phase_one + 20 {
        let reply = http.publish("/publish/firehose", Some("application/octet-stream"), &numbered(seq));
        assert_eq!(reply.subscribers, 4, "{reply:?}");
    }
    published += 20;
    http.publish("/publish/firehose", Some("text/plain"), b"end");
    for seq in phase_one..published {
        assert_eq!(seq_of(&slow.read_frame()), seq);
    }
    slow.expect_frame(TEXT, b"end");

    readers.finish(published);
    let exposition = prom::scrape(&mut metrics, "/metrics");
    assert_eq!(slow_consumer_counter(&exposition, "drop") as u64, missed, "drops counted vs. missed");
    assert_eq!(slow_consumer_counter(&exposition, "close"), 0.0);
    eprintln!(
        "drops reported after {dropping_after:?} messages; the slow subscriber missed {missed} of {phase_one}"
    );
}

/// A burst of mid-sized messages (6 MB, more than the sockets buffer) queues up behind sends
/// that wait for a subscriber that reads only afterwards: the queued frames leave as vectored
/// sends of the shared buffers, and the subscriber reads every one, whole and in order, whichever
/// backend runs.
#[test]
fn a_burst_of_queued_frames_arrives_whole_and_in_order() {
    let server = Server::start(&["--workers", "1", "--max-backpressure", "64MiB"]);
    let mut subscriber = subscribe(server.addr(), "burst");
    let mut http = HttpConn::connect(server.addr());
    wait_for_subscribers(&mut http, "burst", 1);
    let mut publisher = server.ws_client("/pubsub/burst");
    let body = |seq: u32| -> Vec<u8> {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend((0..3000u32).map(|i| (i.wrapping_mul(31).wrapping_add(seq)) as u8));
        payload
    };
    for seq in 0..2000u32 {
        publisher.send(tungstenite::Message::binary(body(seq))).expect("publish");
    }
    for seq in 0..2000u32 {
        let frame = read_skipping_warmups(&mut subscriber);
        assert_eq!((frame.opcode, frame.payload.len()), (BINARY, 3004), "message {seq}");
        assert!(frame.payload == body(seq), "message {seq} arrived changed or out of order");
    }
}
