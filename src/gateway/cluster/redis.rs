//! The Redis engine (`--broker redis://HOST:PORT`): topic `T` is the Redis channel `ringgate:T`.
//!
//! Why redis-rs, async, on the broker thread's current-thread tokio runtime (and not fred, nor the
//! synchronous client): one RESP3 `MultiplexedConnection` carries SUBSCRIBE, UNSUBSCRIBE and
//! PUBLISH together (RESP3 lets a subscribed connection issue commands), and its pushes reach us
//! through a push sender that redis-rs calls synchronously from its reader: we decode the envelope
//! and hand the frame to the workers right there, so a message from another node waits in no queue
//! of ours and the only bound that matters is the hub's hand-off (bounded, counted). The thread
//! waits on the socket and on the workers' publish queue at once, without polling. The synchronous
//! `PubSub` needs `&mut` for both reading and subscribing, so it would either poll with a read
//! timeout (latency or idle wake-ups) or need a second thread and connection for commands. fred
//! does the same job with a larger surface (its own reconnect policy and buffering we would have
//! to bound again). redis-rs's `aio::PubSub` is not used either: it forwards messages through an
//! unbounded channel.
//!
//! Publishes are taken from the queue in batches (up to [`BATCH`]) and sent as one pipeline,
//! awaited before the next: order is kept, and a burst costs one round trip per batch, not per
//! message. SUBSCRIBE and UNSUBSCRIBE go one channel per command (pipelined): with several
//! channels a command gets several replies, which a multiplexed connection would take for the
//! replies of the next commands.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::Notify;

use super::{Backoff, Node, Outbound, Outgoing, Subscribed};
use crate::metrics::{BrokerDrop, add};

/// Prefix of the Redis channel of each topic.
const CHANNEL_PREFIX: &str = "ringgate:";
/// Publishes sent in one pipeline, at most.
const BATCH: usize = 256;
/// Channels subscribed or unsubscribed in one pipeline, at most.
const SUBSCRIBE_BATCH: usize = 512;
/// Time a connection attempt gets (below the start-up wait).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time Redis gets to answer a command before the connection is taken for lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a `redis://` URL as redis-rs reads it.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    if url.contains("protocol=") {
        return Err(format!(
            "broker URL '{url}': ringgate chooses the protocol (RESP3) itself; drop protocol="
        ));
    }
    redis::Client::open(resp3(url)).map(drop).map_err(|error| format!("broker URL '{url}': {error}"))
}

/// The URL asking for RESP3, which lets one connection subscribe and publish.
fn resp3(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}protocol=resp3")
}

fn channel(topic: &str) -> String {
    format!("{CHANNEL_PREFIX}{topic}")
}

/// Connects, serves until the connection is lost, and reconnects with back-off, forever. The first
/// attempt's outcome goes to `first` (start-up waits for it).
pub(super) async fn run(
    url: String,
    node: Node,
    mut outgoing: Outgoing,
    first: mpsc::Sender<Result<(), String>>,
) {
    let client = match redis::Client::open(resp3(&url)) {
        Ok(client) => client,
        Err(error) => {
            let _ = first.send(Err(error.to_string()));
            return;
        }
    };
    let shown = super::BrokerUrl::Redis(url).to_string();
    let mut first = Some(first);
    let mut backoff = Backoff::new(node.link.node);
    loop {
        let lost = Arc::new(Notify::new());
        match connect(&client, &node, &lost).await {
            Ok(connection) => {
                backoff.reset();
                let why = serve(connection, &node, &mut outgoing, &lost, &mut first, &shown).await;
                node.disconnected(&mut outgoing);
                tracing::warn!(
                    broker = %shown,
                    cause = %why,
                    "lost the broker: delivering locally only, reconnecting"
                );
            }
            Err(error) => match first.take() {
                Some(first) => {
                    let _ = first.send(Err(error.to_string()));
                }
                None => tracing::debug!(broker = %shown, %error, "broker still unreachable"),
            },
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

async fn connect(
    client: &redis::Client,
    node: &Node,
    lost: &Arc<Notify>,
) -> redis::RedisResult<MultiplexedConnection> {
    let pushes = node.clone();
    let lost = Arc::clone(lost);
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_push_sender(move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            on_push(&pushes, &lost, push);
            Ok(())
        });
    let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
    // The handshake may not touch the server (RESP3's HELLO does, but be sure it answers).
    redis::cmd("PING").exec_async(&mut connection).await?;
    Ok(connection)
}

/// A push from Redis: a message on a subscribed channel, or the library telling us the connection
/// is gone. Runs inside redis-rs's reader: must not block (it hands off or drops, never waits).
fn on_push(node: &Node, lost: &Notify, push: PushInfo) {
    match push.kind {
        PushKind::Message => match &push.data[..] {
            [Value::BulkString(channel), Value::BulkString(message)] => {
                let topic = channel.strip_prefix(CHANNEL_PREFIX.as_bytes()).map(std::str::from_utf8);
                match topic {
                    Some(Ok(topic)) => node.receive(topic, message),
                    _ => node.link.stats.dropped(BrokerDrop::Malformed, 1),
                }
            }
            _ => node.link.stats.dropped(BrokerDrop::Malformed, 1),
        },
        PushKind::Disconnection => lost.notify_one(),
        _ => {}
    }
}

/// Subscribes every present topic (then the node counts as connected), then follows presence changes and sends local publishes until
/// the connection fails; returns why.
async fn serve(
    mut connection: MultiplexedConnection,
    node: &Node,
    outgoing: &mut Outgoing,
    lost: &Notify,
    first: &mut Option<mpsc::Sender<Result<(), String>>>,
    shown: &str,
) -> String {
    let mut subscribed = Subscribed::default();
    if let Err(error) = reconcile(&mut connection, node, &mut subscribed, true).await {
        return error.to_string();
    }
    node.connected(first, shown);
    let mut batch: Vec<Outbound> = Vec::with_capacity(BATCH);
    let mut envelope = Vec::new();
    loop {
        if node.link.has_changes()
            && let Err(error) = reconcile(&mut connection, node, &mut subscribed, false).await
        {
            return error.to_string();
        }
        tokio::select! {
            biased;
            () = lost.notified() => return "the connection closed".into(),
            () = node.link.wake.notified() => {}
            received = outgoing.0.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return "the publish queue closed".into();
                }
                if let Err(error) = publish(&mut connection, node, &mut batch, &mut envelope).await {
                    return error.to_string();
                }
            }
        }
    }
}

/// Sends a batch of local publishes as one pipeline. On failure the batch is dropped and counted.
async fn publish(
    connection: &mut MultiplexedConnection,
    node: &Node,
    batch: &mut Vec<Outbound>,
    envelope: &mut Vec<u8>,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for outbound in batch.iter() {
        envelope.clear();
        node.link.envelope(outbound, envelope);
        pipe.cmd("PUBLISH").arg(channel(&outbound.topic)).arg(&envelope[..]).ignore();
    }
    let result = pipe.exec_async(connection).await;
    let sent = batch.len() as u64;
    // The bytes bound covers the batch until Redis has it.
    for outbound in batch.drain(..) {
        node.link.dequeued(&outbound);
    }
    match result {
        Ok(()) => add(&node.link.stats.published, sent),
        Err(_) => node.link.stats.dropped(BrokerDrop::Disconnected, sent),
    }
    result
}

/// Brings the connection's subscriptions in line with the hub's presence (every topic when
/// `everything`, else those that changed).
async fn reconcile(
    connection: &mut MultiplexedConnection,
    node: &Node,
    subscribed: &mut Subscribed,
    everything: bool,
) -> redis::RedisResult<()> {
    let plan = node.plan(subscribed, everything);
    for (command, topics, subscribe) in
        [("SUBSCRIBE", &plan.subscribe, true), ("UNSUBSCRIBE", &plan.unsubscribe, false)]
    {
        for chunk in topics.chunks(SUBSCRIBE_BATCH) {
            let mut pipe = redis::pipe();
            for topic in chunk {
                pipe.cmd(command).arg(channel(topic)).ignore();
            }
            pipe.exec_async(connection).await?;
            for topic in chunk {
                if subscribe {
                    subscribed.0.insert(Arc::clone(topic));
                } else {
                    subscribed.0.remove(topic);
                }
            }
        }
    }
    node.link.stats.set_subscribed_topics(subscribed.0.len());
    Ok(())
}
