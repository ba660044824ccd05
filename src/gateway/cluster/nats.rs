//! The NATS engine (`--broker nats://HOST:PORT`): NATS core pub/sub (no JetStream: no history,
//! like Redis). Topic `T` is the subject `ringgate.T`, with every byte of `T` outside
//! `[A-Za-z0-9_-]` written `%XX` (so `.`, `*` and `>` never become subject tokens or wildcards).
//!
//! async-nats runs on the broker thread's current-thread runtime, like the Redis engine. It keeps
//! the connection itself: after the first connection it reconnects with our back-off and sends
//! the node's subscriptions again on its own; its events tell us when the connection is lost and
//! back (`/healthz`, `ringgate_broker_connected`, reconnects). Each topic's subscription is read by
//! a small task that hands every message to the workers at once (bounded, counted); dropping the
//! task unsubscribes. The client's queues are bounded: [`SUBSCRIPTION_CAPACITY`] messages per
//! subscription (past it the client drops and reports a slow consumer: counted as `queue_full`)
//! and [`CLIENT_CAPACITY`] commands towards the server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Backoff, Node, Outbound, Outgoing, Subscribed};
use crate::metrics::{BrokerDrop, add};

/// Prefix of each topic's subject.
const SUBJECT_PREFIX: &str = "ringgate.";
/// Messages waiting in one subscription's queue in the client, at most.
const SUBSCRIPTION_CAPACITY: usize = 4096;
/// Commands (publishes, subscriptions) waiting for the client's connection task, at most.
const CLIENT_CAPACITY: usize = 1024;
/// Publishes taken from the queue at once.
const BATCH: usize = 256;
/// Time a connection attempt gets (below the start-up wait).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Checks a `nats://HOST:PORT` URL.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    use async_nats::ServerAddr;
    url.parse::<ServerAddr>().map(drop).map_err(|error| format!("broker URL '{url}': {error}"))
}

/// The subject of `topic`.
fn subject(topic: &str) -> String {
    let mut subject = String::with_capacity(SUBJECT_PREFIX.len() + topic.len());
    subject.push_str(SUBJECT_PREFIX);
    for byte in topic.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            subject.push(char::from(byte));
        } else {
            let _ = write!(subject, "%{byte:02X}");
        }
    }
    subject
}

/// Connects (retrying with back-off until it works), then serves for the life of the process;
/// the client reconnects by itself. The first attempt's outcome goes to `first`.
pub(super) async fn run(
    url: String,
    node: Node,
    mut outgoing: Outgoing,
    first: mpsc::Sender<Result<(), String>>,
) {
    let shown = super::BrokerUrl::Nats(url.clone()).to_string();
    let lost = Arc::new(Notify::new());
    let back = Arc::new(Notify::new());
    let mut first = Some(first);
    let mut backoff = Backoff::new(node.link.node);
    let client = loop {
        match connect(&url, &node, &lost, &back).await {
            Ok(client) => break client,
            Err(error) => match first.take() {
                Some(first) => {
                    let _ = first.send(Err(error.to_string()));
                }
                None => tracing::debug!(broker = %shown, %error, "broker still unreachable"),
            },
        }
        tokio::time::sleep(backoff.next_wait()).await;
    };
    serve(client, &node, &mut outgoing, &lost, &back, &mut first, &shown).await;
}

async fn connect(url: &str, node: &Node, lost: &Arc<Notify>, back: &Arc<Notify>) -> Result<Client, String> {
    // A disconnection before the first connection completes is the connect's error, not a loss.
    let ready = Arc::new(AtomicBool::new(false));
    let (events_ready, lost, back) = (Arc::clone(&ready), Arc::clone(lost), Arc::clone(back));
    let slow = node.clone();
    let seed = node.link.node;
    let client = ConnectOptions::new()
        .name("ringgate")
        .connection_timeout(CONNECT_TIMEOUT)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .client_capacity(CLIENT_CAPACITY)
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            let mut backoff = Backoff::new(seed ^ attempts as u64);
            (0..attempts.min(8)).map(|_| backoff.next_wait()).last().unwrap_or_default()
        })
        .event_callback(move |event| {
            let (ready, lost, back, slow) =
                (Arc::clone(&events_ready), Arc::clone(&lost), Arc::clone(&back), slow.clone());
            async move {
                match event {
                    Event::Disconnected if ready.load(Ordering::Acquire) => lost.notify_one(),
                    Event::Connected => back.notify_one(),
                    Event::SlowConsumer(_) => slow.link.stats.dropped(BrokerDrop::QueueFull, 1),
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .map_err(|error| error.to_string())?;
    ready.store(true, Ordering::Release);
    Ok(client)
}

/// The node's subscriptions: each topic's reading task.
#[derive(Default)]
struct Readers(HashMap<Arc<str>, JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Follows presence changes and sends local publishes; tracks the connection's losses and returns.
async fn serve(
    client: Client,
    node: &Node,
    outgoing: &mut Outgoing,
    lost: &Notify,
    back: &Notify,
    first: &mut Option<mpsc::Sender<Result<(), String>>>,
    shown: &str,
) {
    let mut readers = Readers::default();
    reconcile(&client, node, &mut readers, true).await;
    node.connected(first, shown);
    let mut batch: Vec<Outbound> = Vec::with_capacity(BATCH);
    let mut envelope = Vec::new();
    loop {
        if node.link.has_changes() {
            reconcile(&client, node, &mut readers, false).await;
        }
        tokio::select! {
            biased;
            () = lost.notified() => {
                node.disconnected(outgoing);
                tracing::warn!(broker = %shown, "lost the broker: delivering locally only, reconnecting");
            }
            () = back.notified() => {
                // The client tells of its first connection too (late): only a connection after a
                // loss is a reconnect. The client has sent our subscriptions again by now.
                let up = client.connection_state() == async_nats::connection::State::Connected;
                if up && !node.link.stats.is_connected() {
                    node.link.stats.set_subscribed_topics(readers.0.len());
                    node.connected(first, shown);
                }
            }
            () = node.link.wake.notified() => {}
            received = outgoing.publishes.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return;
                }
                publish(&client, node, &mut batch, &mut envelope).await;
            }
        }
    }
}

/// Hands a batch of local publishes to the client, in order; while disconnected they are dropped
/// and counted instead (the client would hold them until it reconnects).
async fn publish(client: &Client, node: &Node, batch: &mut Vec<Outbound>, envelope: &mut Vec<u8>) {
    let stats = &node.link.stats;
    for outbound in batch.drain(..) {
        node.link.dequeued(&outbound);
        if !stats.is_connected() {
            stats.dropped(BrokerDrop::Disconnected, 1);
            continue;
        }
        envelope.clear();
        node.link.envelope(&outbound, envelope);
        let payload = bytes::Bytes::copy_from_slice(envelope);
        match client.publish(subject(&outbound.topic), payload).await {
            Ok(()) => add(&stats.published, 1),
            Err(_) => stats.dropped(BrokerDrop::Disconnected, 1),
        }
    }
}

/// Subscribes to the topics that appeared and drops the subscriptions of those that left.
async fn reconcile(client: &Client, node: &Node, readers: &mut Readers, everything: bool) {
    let subscribed = Subscribed(readers.0.keys().cloned().collect());
    let plan = node.plan(&subscribed, everything);
    for topic in plan.unsubscribe {
        if let Some(task) = readers.0.remove(&topic) {
            task.abort(); // Dropping the subscriber unsubscribes.
        }
    }
    for topic in plan.subscribe {
        match client.subscribe(subject(&topic)).await {
            Ok(mut subscriber) => {
                let reader = node.clone();
                let name = Arc::clone(&topic);
                let task = tokio::spawn(async move {
                    while let Some(message) = subscriber.next().await {
                        reader.receive(&name, &message.payload);
                    }
                });
                readers.0.insert(topic, task);
            }
            Err(error) => {
                // Only when the client is closing; the next change or reconnect tries again.
                tracing::warn!(%error, topic = %topic, "cannot subscribe at the broker");
                node.link.presence_changed(&topic);
            }
        }
    }
    node.link.stats.set_subscribed_topics(readers.0.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_never_carry_separators_or_wildcards_of_the_topic() {
        assert_eq!(subject("news"), "ringgate.news");
        assert_eq!(subject("a.b*c>d e"), "ringgate.a%2Eb%2Ac%3Ed%20e");
        assert_eq!(
            subject("%"),
            "ringgate.%25",
            "the escape itself is escaped: no two topics share a subject"
        );
        assert_eq!(subject("caf\u{e9}"), "ringgate.caf%C3%A9");
    }
}
