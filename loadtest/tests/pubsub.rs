//! Pubsub mode end to end against a tungstenite pub/sub server: every delivery counted, losses
//! counted exactly, and the JSON keys the figures are read from.

mod support;

use std::time::Duration;

use support::pubsub::PubSubServer;
use support::{assert_percentiles, run_loadtest};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn every_message_reaches_every_subscriber_once() {
    let server = PubSubServer::start(None);
    let run = run_loadtest(
        "pubsub-all",
        &[
            &server.url,
            "--mode",
            "pubsub",
            "--publishers",
            "2",
            "--subscribers",
            "3",
            "--rate",
            "50",
            "--duration",
            "2s",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    let json = run.json();
    for key in [
        "messages_sent",
        "messages_received",
        "latency_us",
        "throughput_msgs_per_sec",
        "deliveries_expected",
        "deliveries_lost",
        "publishers",
        "subscribers",
        "topics",
        "errors_by_kind",
    ] {
        assert!(json.get(key).is_some(), "key {key} missing from {json:#}");
    }
    assert_eq!((run.num("/publishers"), run.num("/subscribers"), run.num("/topics")), (2.0, 3.0, 1.0));
    assert_eq!(run.num("/connections_established"), 5.0);
    let published = run.num("/messages_sent");
    // 2 publishers x 50/s x 2 s.
    assert!((195.0..=205.0).contains(&published), "{published} published, expected about 200");
    assert_eq!(run.num("/deliveries_expected"), published * 3.0, "{json:#}");
    assert_eq!(run.num("/messages_received"), published * 3.0, "{json:#}");
    assert_eq!(run.num("/deliveries_lost"), 0.0, "{json:#}");
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    assert_eq!(run.num("/latency_us/count"), published * 3.0);
    assert!(run.num("/throughput_msgs_per_sec") > 250.0, "{json:#}");
    assert_percentiles(&run, "latency_us");
    assert!(run.stdout().contains("deliveries:"), "summary:\n{}", run.stdout());
}

#[test]
fn topics_partition_publishers_and_subscribers() {
    let server = PubSubServer::start(None);
    // 3 publishers over 2 topics: t0 has publishers 0 and 2, t1 has publisher 1; 4 subscribers,
    // two on each topic. Every message reaches exactly the 2 subscribers of its topic.
    let run = run_loadtest(
        "pubsub-topics",
        &[
            &format!("{}/", server.url),
            "--mode",
            "pubsub",
            "--publishers",
            "3",
            "--subscribers",
            "4",
            "--topics",
            "2",
            "--rate",
            "40",
            "--duration",
            "1s",
            "--warmup",
            "500ms",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    let published = run.num("/messages_sent");
    assert!((115.0..=125.0).contains(&published), "{published} measured messages, expected about 120");
    assert_eq!(run.num("/messages_received"), published * 2.0, "{:#}", run.json());
    assert_eq!(run.num("/deliveries_expected"), published * 2.0);
    assert_eq!(run.num("/deliveries_lost"), 0.0);
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
}

#[test]
fn dropped_messages_are_counted_as_lost_exactly() {
    let server = PubSubServer::start(Some(10));
    let run = run_loadtest(
        "pubsub-drop",
        &[
            &server.url,
            "--mode",
            "pubsub",
            "--publishers",
            "1",
            "--subscribers",
            "3",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    let json = run.json();
    let published = run.num("/messages_sent");
    assert!((195.0..=205.0).contains(&published), "{published} published, expected about 200");
    // Messages 10, 20, ... of the publisher (sequence numbers 9, 19, ...) reach nobody; the last
    // one may be the tail, which only the grace period's accounting finds.
    let lost = (published / 10.0).floor() * 3.0;
    assert_eq!(run.num("/deliveries_lost"), lost, "{json:#}");
    assert_eq!(run.num("/deliveries_lost"), server.dropped.load(std::sync::atomic::Ordering::Relaxed) as f64);
    assert_eq!(run.num("/deliveries_expected"), published * 3.0);
    assert_eq!(run.num("/messages_received") + lost, published * 3.0, "{json:#}");
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
}
