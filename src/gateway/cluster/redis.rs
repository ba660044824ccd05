//! The Redis engine (`--broker redis://HOST:PORT`): topic `T` is the Redis channel `ringgate:T`;
//! with `--broker redis+cluster://HOST:PORT[,HOST:PORT...]`, a Redis Cluster with sharded
//! pub/sub, the shard channel `ringgate:{T}` (see "Redis Cluster" below).
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
//!
//! History (`--history-size N`, `--positions`): topic `T` (written between the braces as [`tag`]
//! encodes it) has a hash `ringgate:{T}:meta` (`epoch`,
//! 16 hex digits; `top`, the last offset) and a stream `ringgate:{T}:log` whose entry ids are
//! `0-OFFSET`, each holding the version-2 envelope as published. The `{T}` hash tag puts both
//! keys of a topic in one Redis Cluster slot, so each script touches one slot. A publish is one
//! script ([`PUBLISH_SCRIPT`], run with EVALSHA after SCRIPT LOAD on every connection, so a
//! restarted Redis gets it again): it makes the epoch if the topic has none (the caller's random
//! one; the stream of a previous epoch is deleted), increments `top`, completes the envelope with
//! epoch and offset, XADDs it with an exact `MAXLEN N` (exact, not `~`: `--history-size` means
//! the same as in process, at the cost of trimming work Redis could batch), PEXPIREs both keys
//! by `--history-ttl` (the whole history expires that long after its last message, as
//! Centrifugo's history TTL does; the next message then starts a new epoch), and PUBLISHes it:
//! atomically, so the order on the channel is the order of the offsets. Without `--history-size`
//! (`--positions` alone) nothing is XADDed: offsets only.
//!
//! A recovery is read by [`READ_SCRIPT`] (epoch, `top`, and the stream from the asked offset on,
//! in one step) only once the node's SUBSCRIBE to the topic's channel has been answered, on the
//! same connection. Redis runs commands one at a time and writes replies and channel messages to
//! a connection in the order they happen, so every message at or below the `top` read reaches
//! us before the read's reply, and every message above it after: together they are the whole
//! topic, each once. The worker holds the live frames for the recovering subscriber until the
//! answer comes, then skips those at or below `top` (they are in the replay) and queues the rest
//! after the replay. The holding is needed, not only the skipping: redis-rs's reader may hand
//! the workers messages that came after the reply before this task, woken by the reply, hands
//! the answer over (seen in tests under load). No gap, no duplicate, and no wait on a worker.
//!
//! Redis Cluster: a plain PUBLISH in a cluster is copied to every node over the cluster bus;
//! sharded pub/sub (Redis 7: SSUBSCRIBE, SPUBLISH) sends a message only to the shard owning the
//! channel's slot. The engine is the same code with a [`Mode`] for what differs (channel name and
//! commands) and a [`Connection`] that is either redis-rs's `MultiplexedConnection` or its
//! cluster-async `ClusterConnection` (RESP3, the same push sender: one connection per master
//! carries SSUBSCRIBE and commands together, as with one server). Topic `T`'s shard channel is
//! `ringgate:{T}`: the `{T}` hash tag is the one of the history's keys, so the channel is in
//! their slot, which a script must keep to (the history script's SPUBLISH fails otherwise), and
//! the recovery's ordering argument above holds: the read goes to the slot's master on the
//! connection that carries the topic's SSUBSCRIBE. (A topic starting with `}` has an empty hash
//! tag: its channel and keys then hash whole, apart; not handled.) A pipeline may not cross
//! slots: [`query`] sends one pipeline per topic, all in flight at once, each topic's commands in
//! order, which keeps per-publisher order. The mode is asked for by the URL, never detected:
//! channel names must agree between nodes. redis-rs's cluster client restores SSUBSCRIBEs itself
//! after a reconnect or a topology refresh; the engine does not rely on it: any master's
//! connection closing (a `Disconnection` push) counts as the whole connection lost, and the next
//! connection subscribes every present topic again, as with one server. Three things the tests
//! with a master killed taught: redis-rs retries a command after a connection error, and a
//! publish Redis had already delivered came twice, so the cluster client has no retries (a
//! failure is handled as with one server: counted, reconnect); while a master is down its own
//! resubscription can keep this thread busy, so the push marks the node degraded itself rather
//! than wait for this task; and redis-rs connects to the masters it can and sends a missing
//! one's commands elsewhere, so a connection counts as made only once every master answers a
//! PING on its own connection ([`every_master_answers`]). A slot moved to another master (a
//! resharding) makes the old one unsubscribe its shard channels (a `SUnsubscribe` push that is
//! not ours: the topic is still present): taken as a lost connection too, so that the topic is
//! subscribed on its new master (redis-rs did not do it by itself in the test).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;

use super::{Backoff, Node, Outbound, Outgoing, RecoveryRequest, Subscribed, envelope};
use crate::gateway::history::{HistorySettings, Outcome, Position, new_epoch};
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
/// Recoveries read in one pipeline, at most.
const RECOVERY_BATCH: usize = 64;

/// Assigns a topic's next offset, keeps the message and publishes it, atomically (see the module
/// docs). KEYS: meta, log. ARGV: channel, epoch for a new history (16 hex digits), the envelope's
/// 20-byte head, payload, size, TTL in milliseconds (0: none), `PUBLISH` or `SPUBLISH` (a Redis
/// Cluster: the channel is in the keys' slot, which a script may only touch). Returns the offset.
pub const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
local bytes = {}
for i = 1, 16, 2 do
  bytes[#bytes + 1] = string.char(tonumber(string.sub(epoch, i, i + 1), 16))
end
local low = {}
local n = offset
for i = 8, 1, -1 do
  low[i] = string.char(n % 256)
  n = math.floor(n / 256)
end
local message = ARGV[3] .. table.concat(bytes) .. table.concat(low) .. ARGV[4]
local size = tonumber(ARGV[5])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, '0-' .. string.format('%d', offset), 'e', message)
end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if size > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
redis.call(ARGV[7], ARGV[1], message)
return offset
"#;

/// Reads what a subscriber that last saw `EPOCH:OFFSET` missed (see the module docs). KEYS: meta,
/// log. ARGV: epoch for a new history, TTL in milliseconds, asked epoch (16 hex digits), asked
/// offset. Returns `{epoch, top, reason, {envelope, ...}}`, reason as in `Outcome::label`.
pub const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  top = tonumber(redis.call('HGET', KEYS[1], 'top'))
end
if epoch ~= ARGV[3] then
  return {epoch, top, 'epoch_changed', {}}
end
local since = tonumber(ARGV[4])
if since > top then
  return {epoch, top, 'too_old', {}}
end
if since == top then
  return {epoch, top, 'recovered', {}}
end
local first = '0-' .. string.format('%d', since + 1)
local entries = redis.call('XRANGE', KEYS[2], first, '+')
if #entries == 0 or entries[1][1] ~= first then
  return {epoch, top, 'too_old', {}}
end
local replay = {}
for i, entry in ipairs(entries) do
  replay[i] = entry[2][2]
end
return {epoch, top, 'recovered', replay}
"#;

/// The SHA1s of the two scripts, as SCRIPT LOAD answered on this connection.
struct Scripts {
    publish: String,
    read: String,
}

/// The keys of `topic`'s history: its meta hash and its stream.
fn history_keys(topic: &str) -> [String; 2] {
    let tag = tag(topic);
    [format!("{CHANNEL_PREFIX}{{{tag}}}:meta"), format!("{CHANNEL_PREFIX}{{{tag}}}:log")]
}

/// `topic` as it goes between a key's (or shard channel's) braces: `%`, `{` and `}`
/// percent-encoded. Redis Cluster hashes what lies between a key's first `{` and the next `}`, and
/// the whole key when that is empty: a raw topic starting with `}` would put its keys and its
/// channel in different slots (and a script may only touch one), and one holding a `}` would be
/// hashed by a part of its name. Encoded, the tag is always the whole topic; `%` is encoded too so
/// that no two topics share a tag.
fn tag(topic: &str) -> Cow<'_, str> {
    if !topic.contains(['%', '{', '}']) {
        return Cow::Borrowed(topic);
    }
    let mut tag = String::with_capacity(topic.len() + 8);
    for c in topic.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    Cow::Owned(tag)
}

/// The topic a [`tag`] was made from; `None` if it is not one (a `%` not followed by one of the
/// three escapes, or a raw brace).
fn untag(tag: &str) -> Option<Cow<'_, str>> {
    if tag.contains(['{', '}']) {
        return None;
    }
    if !tag.contains('%') {
        return Some(Cow::Borrowed(tag));
    }
    let mut topic = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(at) = rest.find('%') {
        topic.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3)?;
        topic.push(match escape {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    topic.push_str(rest);
    Some(Cow::Owned(topic))
}

/// A TTL in milliseconds for PEXPIRE (0: none).
fn ttl_ms(settings: &HistorySettings) -> u64 {
    u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX).max(u64::from(!settings.ttl.is_zero()))
}

/// The scheme of a Redis Cluster's seed list (`redis+cluster://HOST:PORT[,HOST:PORT...]`).
pub(super) const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where the engine's commands go: one Redis server, or a Redis Cluster spoken to with sharded
/// pub/sub. The few things that differ are here; everything else is one code path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One server: channel `ringgate:T`, SUBSCRIBE and PUBLISH, one pipeline per batch.
    Server,
    /// A Redis Cluster: shard channel `ringgate:{T}` (in the slot of the history's keys, which a
    /// script may only touch), SSUBSCRIBE and SPUBLISH, one pipeline per topic.
    Cluster,
}

impl Mode {
    /// The channel of `topic`.
    fn channel(self, topic: &str) -> String {
        match self {
            Mode::Server => format!("{CHANNEL_PREFIX}{topic}"),
            Mode::Cluster => format!("{CHANNEL_PREFIX}{{{}}}", tag(topic)),
        }
    }

    /// The topic of a channel this mode names, if it is one (and UTF-8, as every topic is).
    fn topic(self, channel: &[u8]) -> Option<Cow<'_, str>> {
        let rest = std::str::from_utf8(channel.strip_prefix(CHANNEL_PREFIX.as_bytes())?).ok()?;
        match self {
            Mode::Server => Some(Cow::Borrowed(rest)),
            Mode::Cluster => untag(rest.strip_prefix('{')?.strip_suffix('}')?),
        }
    }

    /// The command that subscribes (`true`) or unsubscribes a channel.
    fn subscribe_command(self, subscribe: bool) -> &'static str {
        match (self, subscribe) {
            (Mode::Server, true) => "SUBSCRIBE",
            (Mode::Server, false) => "UNSUBSCRIBE",
            (Mode::Cluster, true) => "SSUBSCRIBE",
            (Mode::Cluster, false) => "SUNSUBSCRIBE",
        }
    }

    /// The command that publishes on a channel.
    fn publish_command(self) -> &'static str {
        match self {
            Mode::Server => "PUBLISH",
            Mode::Cluster => "SPUBLISH",
        }
    }
}

/// A connection to one server or to a cluster: one type, so that serving, publishing and
/// recovering are written once. Both kinds are cheap handles (cloned per concurrent pipeline).
#[derive(Clone)]
enum Connection {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    fn mode(&self) -> Mode {
        match self {
            Connection::Server(_) => Mode::Server,
            Connection::Cluster(_) => Mode::Cluster,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Connection::Server(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Server(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Server(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// What the engine connects to, made once from the URL.
enum Target {
    Server(redis::Client),
    Cluster(ClusterClient),
}

/// The seed nodes of a `redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]` URL, each as
/// a `redis://` URL with the credentials; `None` for another scheme.
fn cluster_seeds(url: &str) -> Option<Result<Vec<String>, String>> {
    let rest = url.strip_prefix(CLUSTER_SCHEME)?;
    if rest.contains(['/', '?']) {
        return Some(Err(format!(
            "broker URL '{url}': a cluster's URL lists seed nodes only \
             (redis+cluster://HOST:PORT[,HOST:PORT...]; no database, no options)"
        )));
    }
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let seeds: Vec<String> = hosts.split(',').map(|host| format!("redis://{credentials}{host}")).collect();
    if let Some(host) = hosts.split(',').find(|host| host.is_empty() || host.starts_with(':')) {
        return Some(Err(format!("broker URL '{url}': a seed node without a host ('{host}')")));
    }
    Some(Ok(seeds))
}

/// Checks a `redis://` or `redis+cluster://` URL as redis-rs reads it.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    if url.contains("protocol=") {
        return Err(format!(
            "broker URL '{url}': ringgate chooses the protocol (RESP3) itself; drop protocol="
        ));
    }
    target(url, None).map(drop).map_err(|error| format!("broker URL '{url}': {error}"))
}

/// The URL asking for RESP3, which lets one connection subscribe and publish.
fn resp3(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}protocol=resp3")
}

/// The client for `url`: with `ca` (PEM, `--broker-ca`), a `rediss://` server's certificate
/// must chain to those certificates only; without, to the system's roots. A cluster's client
/// asks RESP3 (sharded pub/sub on the connections that also carry the commands) and is told of
/// every seed: one that is down does not stop the start.
fn target(url: &str, ca: Option<&[u8]>) -> Result<Target, String> {
    if let Some(seeds) = cluster_seeds(url) {
        // No retries: redis-rs would send a publish again after a connection error, when Redis
        // may have delivered it already (seen in tests: a message twice). A failure is the
        // engine's to handle, as with one server: counted, and the connection made again.
        let client = ClusterClientBuilder::new(seeds?)
            .use_protocol(ProtocolVersion::RESP3)
            .retries(0)
            .build()
            .map_err(|error| error.to_string())?;
        return Ok(Target::Cluster(client));
    }
    let client = match ca {
        Some(ca) => redis::Client::build_with_tls(
            resp3(url),
            redis::TlsCertificates { client_tls: None, root_cert: Some(ca.to_vec()) },
        ),
        None => redis::Client::open(resp3(url)),
    };
    client.map(Target::Server).map_err(|error| error.to_string())
}

/// Connects, serves until the connection is lost, and reconnects with back-off, forever. The first
/// attempt's outcome goes to `first` (start-up waits for it).
pub(super) async fn run(
    url: String,
    node: Node,
    mut outgoing: Outgoing,
    first: mpsc::Sender<Result<(), String>>,
) {
    let target = match target(&url, node.link.ca()) {
        Ok(target) => target,
        Err(error) => {
            let _ = first.send(Err(error));
            return;
        }
    };
    let shown = super::BrokerUrl::Redis(url).to_string();
    let mut first = Some(first);
    let mut backoff = Backoff::new(node.link.node);
    loop {
        let watch = Arc::new(Watch::default());
        match connect(&target, &node, &watch).await {
            Ok(connection) => {
                backoff.reset();
                let why = serve(connection, &node, &mut outgoing, &watch, &mut first, &shown).await;
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

/// Connects to the server, or to every master of the cluster (through the first seed that
/// answers), with pushes going to [`on_push`]. In a cluster, any node's connection closing counts
/// as the whole connection lost: the engine starts over and subscribes every topic again, as
/// with one server, rather than trust what the library restores behind its back.
async fn connect(target: &Target, node: &Node, watch: &Arc<Watch>) -> redis::RedisResult<Connection> {
    let pushes = node.clone();
    let watch = Arc::clone(watch);
    let mode = match target {
        Target::Server(_) => Mode::Server,
        Target::Cluster(_) => Mode::Cluster,
    };
    let sender = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
        on_push(&pushes, &watch, mode, push);
        Ok(())
    };
    let mut connection = match target {
        Target::Server(client) => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_push_sender(sender);
            Connection::Server(client.get_multiplexed_async_connection_with_config(&config).await?)
        }
        Target::Cluster(client) => {
            let config = ClusterConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT)
                .set_push_sender(sender);
            let mut connection = client.get_async_connection_with_config(config).await?;
            every_master_answers(&mut connection).await?;
            Connection::Cluster(connection)
        }
    };
    // The handshake may not touch the server (RESP3's HELLO does, but be sure it answers; in a
    // cluster, every master does).
    redis::cmd("PING").exec_async(&mut connection).await?;
    Ok(connection)
}

/// Checks that every master of the cluster answers a PING on its own connection. redis-rs
/// connects to the masters it can and sends a missing one's commands to another master (to be
/// redirected back): a connection made while a master is down would look fine and its topics
/// would never be subscribed. Failing here keeps the node degraded, retrying, until it is back.
async fn every_master_answers(connection: &mut ClusterConnection) -> redis::RedisResult<()> {
    let slots = redis::cmd("CLUSTER").arg("SLOTS").query_async::<Value>(connection).await?;
    let Value::Array(ranges) = slots else {
        return Err((redis::ErrorKind::Client, "CLUSTER SLOTS: not an array").into());
    };
    let mut masters: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        // [first slot, last slot, [host, port, id, ...], replicas...]
        let master = match &range {
            Value::Array(parts) => match parts.get(2) {
                Some(Value::Array(master)) => match &master[..] {
                    [Value::BulkString(host), Value::Int(port), ..] => u16::try_from(*port)
                        .ok()
                        .map(|port| (String::from_utf8_lossy(host).into_owned(), port)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let Some(master) = master else {
            return Err((redis::ErrorKind::Client, "CLUSTER SLOTS: an unexpected entry").into());
        };
        if !masters.contains(&master) {
            masters.push(master);
        }
    }
    for (host, port) in masters {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        connection.route_command(redis::cmd("PING"), routing).await?;
    }
    Ok(())
}

/// What the pushes of one connection share with the task serving it.
#[derive(Default)]
struct Watch {
    /// Notified when the connection is lost, or must be made again.
    lost: Notify,
    /// Topics whose SUNSUBSCRIBE the engine sent and whose confirmation (a push like Redis's own
    /// unsubscription of a moved slot) has not come yet, with how many.
    unsubscribing: Mutex<HashMap<Arc<str>, usize>>,
}

impl Watch {
    /// The engine is about to send SUNSUBSCRIBE for `topic`.
    fn expect_unsubscribe(&self, topic: &Arc<str>) {
        if let Ok(mut unsubscribing) = self.unsubscribing.lock() {
            *unsubscribing.entry(Arc::clone(topic)).or_insert(0) += 1;
        }
    }

    /// Whether an SUNSUBSCRIBE push for `topic` confirms one the engine sent (taken off the list).
    fn confirms_ours(&self, topic: &str) -> bool {
        let Ok(mut unsubscribing) = self.unsubscribing.lock() else { return false };
        match unsubscribing.get_mut(topic) {
            Some(count) if *count > 1 => {
                *count -= 1;
                true
            }
            Some(_) => {
                unsubscribing.remove(topic);
                true
            }
            None => false,
        }
    }
}

/// A push from Redis: a message on a subscribed channel, or the library telling us the connection
/// is gone. Runs inside redis-rs's reader: must not block (it hands off or drops, never waits).
fn on_push(node: &Node, watch: &Watch, mode: Mode, push: PushInfo) {
    match push.kind {
        PushKind::Message | PushKind::SMessage => match &push.data[..] {
            [Value::BulkString(channel), Value::BulkString(message)] => match mode.topic(channel) {
                Some(topic) => node.receive(&topic, message),
                None => node.link.stats.dropped(BrokerDrop::Malformed, 1),
            },
            _ => node.link.stats.dropped(BrokerDrop::Malformed, 1),
        },
        PushKind::Disconnection => {
            // Degraded at once, whether or not the engine's task runs soon: in a cluster,
            // redis-rs's own resubscription to a dead master can keep the thread busy until the
            // master is back.
            node.link.stats.set_connected(false);
            watch.lost.notify_one();
        }
        // A cluster master unsubscribes a slot's shard channels when the slot moves away from
        // it: an SUNSUBSCRIBE push the engine did not ask for (and of a topic still present)
        // means the slot moved, and starting over subscribes the topic on its new master.
        PushKind::SUnsubscribe => {
            let topic = match push.data.first() {
                Some(Value::BulkString(channel)) => mode.topic(channel),
                _ => None,
            };
            if let Some(topic) = topic.as_deref()
                && !watch.confirms_ours(topic)
                && node.hub.is_present(topic)
            {
                tracing::info!(topic, "a shard channel was unsubscribed by Redis (its slot moved?)");
                node.link.stats.set_connected(false);
                watch.lost.notify_one();
            }
        }
        _ => {}
    }
}

/// Subscribes every present topic (then the node counts as connected), then follows presence
/// changes and sends local publishes until the connection fails; returns why.
async fn serve(
    mut connection: Connection,
    node: &Node,
    outgoing: &mut Outgoing,
    watch: &Watch,
    first: &mut Option<mpsc::Sender<Result<(), String>>>,
    shown: &str,
) -> String {
    let mut subscribed = Subscribed::default();
    if let Err(error) = reconcile(&mut connection, node, watch, &mut subscribed, true).await {
        return error.to_string();
    }
    let scripts = match load_scripts(&mut connection, node).await {
        Ok(scripts) => scripts,
        Err(error) => return error.to_string(),
    };
    node.connected(first, shown);
    let mut batch: Vec<Outbound> = Vec::with_capacity(BATCH);
    let mut requests: Vec<RecoveryRequest> = Vec::with_capacity(RECOVERY_BATCH);
    let mut envelope = Vec::new();
    loop {
        if node.link.has_changes()
            && let Err(error) = reconcile(&mut connection, node, watch, &mut subscribed, false).await
        {
            return error.to_string();
        }
        tokio::select! {
            biased;
            () = watch.lost.notified() => return "the connection closed".into(),
            () = node.link.wake.notified() => {}
            // Before the publishes: under a steady stream of publishes their queue is never
            // empty, and a biased select would never get to a waiting recovery.
            received = outgoing.recoveries.recv_many(&mut requests, RECOVERY_BATCH) => {
                if received == 0 {
                    return "the recovery queue closed".into();
                }
                // The recovering subscribers' topics must be subscribed (and answered) first.
                let result = if node.link.has_changes() {
                    reconcile(&mut connection, node, watch, &mut subscribed, false).await
                } else {
                    Ok(())
                };
                let result = match (result, scripts.as_ref()) {
                    (Ok(()), Some(scripts)) => {
                        recover(&mut connection, node, scripts, &subscribed, &mut requests).await
                    }
                    (result, _) => result,
                };
                for request in requests.drain(..) {
                    node.unavailable(request);
                }
                if let Err(error) = result {
                    return error.to_string();
                }
            }
            received = outgoing.publishes.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return "the publish queue closed".into();
                }
                let scripts = scripts.as_ref();
                if let Err(error) = publish(&mut connection, node, scripts, &mut batch, &mut envelope).await {
                    return error.to_string();
                }
            }
        }
    }
}

/// Loads the history scripts when the node keeps its history in Redis (one command each: in a
/// cluster, SCRIPT LOAD goes to every node, which a pipeline would not).
async fn load_scripts(connection: &mut Connection, node: &Node) -> redis::RedisResult<Option<Scripts>> {
    if node.link.history().is_none() {
        return Ok(None);
    }
    let load = |script: &'static str| {
        let mut connection = connection.clone();
        async move { redis::cmd("SCRIPT").arg("LOAD").arg(script).query_async::<String>(&mut connection).await }
    };
    let publish = load(PUBLISH_SCRIPT).await?;
    let read = load(READ_SCRIPT).await?;
    Ok(Some(Scripts { publish, read }))
}

/// Sends `commands`, each with the topic whose slot its keys and channel are in, pipelined, and
/// returns one reply each, in order (a command Redis refused: a `ServerError` in its place). On
/// one server, one pipeline. In a cluster a pipeline must stay in one slot: one pipeline per
/// topic, all in flight at once; a topic's commands keep their order, which is all that
/// per-publisher order needs (a publisher's messages to one topic).
async fn query(
    connection: &mut Connection,
    commands: Vec<(Arc<str>, redis::Cmd)>,
) -> redis::RedisResult<Vec<Value>> {
    let mut groups: Vec<(Arc<str>, redis::Pipeline, Vec<usize>)> = Vec::new();
    let mut by_topic: HashMap<Arc<str>, usize> = HashMap::new();
    for (index, (topic, command)) in commands.into_iter().enumerate() {
        let group = match connection.mode() {
            Mode::Server => 0,
            Mode::Cluster => *by_topic.entry(Arc::clone(&topic)).or_insert(groups.len()),
        };
        if group == groups.len() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            groups.push((topic, pipe, Vec::new()));
        }
        groups[group].1.add_command(command);
        groups[group].2.push(index);
    }
    let count = groups.iter().map(|(_, _, indexes)| indexes.len()).sum();
    let sent = groups.iter().map(|(_, pipe, _)| {
        let mut connection = connection.clone();
        async move { pipe.query_async::<Vec<Value>>(&mut connection).await }
    });
    let answers = futures_util::future::try_join_all(sent).await?;
    let mut replies = vec![Value::Nil; count];
    for ((_, _, indexes), answer) in groups.iter().zip(answers) {
        for (index, reply) in indexes.iter().zip(answer) {
            replies[*index] = reply;
        }
    }
    Ok(replies)
}

/// Sends a batch of local publishes (see [`query`]): a PUBLISH (SPUBLISH) each, or with the
/// history in Redis, the history script. A connection failure drops the batch (counted) and
/// returns the error; a command Redis refused drops that message (counted) and the connection
/// stays, except when the scripts are gone from Redis (reconnecting loads them again).
async fn publish(
    connection: &mut Connection,
    node: &Node,
    scripts: Option<&Scripts>,
    batch: &mut Vec<Outbound>,
    envelope: &mut Vec<u8>,
) -> redis::RedisResult<()> {
    let mode = connection.mode();
    let history = node.link.history();
    let mut commands = Vec::with_capacity(batch.len());
    for outbound in batch.iter() {
        envelope.clear();
        let mut command;
        match (outbound.origin, scripts, &history) {
            (Some(origin), Some(scripts), Some(settings)) => {
                let (kind, payload) = crate::gateway::pubsub::split_frame(&outbound.frame);
                envelope::head(node.link.node, origin, kind, envelope);
                let [meta, log] = history_keys(&outbound.topic);
                command = redis::cmd("EVALSHA");
                command
                    .arg(&scripts.publish)
                    .arg(2)
                    .arg(meta)
                    .arg(log)
                    .arg(mode.channel(&outbound.topic))
                    .arg(format!("{:016x}", new_epoch()))
                    .arg(&envelope[..])
                    .arg(payload)
                    .arg(settings.size)
                    .arg(ttl_ms(settings))
                    .arg(mode.publish_command());
            }
            _ => {
                node.link.envelope(outbound, envelope);
                command = redis::cmd(mode.publish_command());
                command.arg(mode.channel(&outbound.topic)).arg(&envelope[..]);
            }
        }
        commands.push((Arc::clone(&outbound.topic), command));
    }
    // Each reply is looked at: a script can fail for one topic (a key of another type in its
    // place) while the connection is fine.
    let result = query(connection, commands).await;
    let sent = batch.len() as u64;
    // The bytes bound covers the batch until Redis has it.
    for outbound in batch.drain(..) {
        node.link.dequeued(&outbound);
    }
    let replies = match result {
        Ok(replies) => replies,
        Err(error) => {
            node.link.stats.dropped(BrokerDrop::Disconnected, sent);
            return Err(error);
        }
    };
    let mut failed = 0;
    let mut lost_scripts = false;
    for reply in &replies {
        if let Value::ServerError(error) = reply {
            failed += 1;
            lost_scripts |= error.code() == "NOSCRIPT";
            tracing::debug!(error = ?error, "a publish failed in Redis");
        }
    }
    add(&node.link.stats.published, sent - failed);
    // Not confirmed: counted as for a connection lost before Redis confirmed them.
    node.link.stats.dropped(BrokerDrop::Disconnected, failed);
    if lost_scripts {
        // SCRIPT FLUSH (or a failover to a server without them): reconnecting loads them again.
        return Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoScript),
            "the history scripts are gone",
        )));
    }
    if failed > 0 {
        tracing::warn!(failed, "publishes failed in Redis (a ringgate:{{topic}} key of another type?)");
    }
    Ok(())
}

/// Brings the connection's subscriptions in line with the hub's presence (every topic when
/// `everything`, else those that changed). One channel per command: with several channels a
/// command gets several replies, which a multiplexed connection would take for the replies of
/// the next commands (and in a cluster, the channels of one command must share a slot).
async fn reconcile(
    connection: &mut Connection,
    node: &Node,
    watch: &Watch,
    subscribed: &mut Subscribed,
    everything: bool,
) -> redis::RedisResult<()> {
    let plan = node.plan(subscribed, everything);
    let mode = connection.mode();
    for (topics, subscribe) in [(&plan.subscribe, true), (&plan.unsubscribe, false)] {
        for chunk in topics.chunks(SUBSCRIBE_BATCH) {
            let commands = chunk.iter().map(|topic| {
                if !subscribe && mode == Mode::Cluster {
                    watch.expect_unsubscribe(topic);
                }
                let mut command = redis::cmd(mode.subscribe_command(subscribe));
                command.arg(mode.channel(topic));
                (Arc::clone(topic), command)
            });
            let replies = query(connection, commands.collect()).await?;
            if let Some(Value::ServerError(error)) =
                replies.iter().find(|r| matches!(r, Value::ServerError(_)))
            {
                return Err(error.clone().into());
            }
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

/// Reads the recoveries in `requests` (one script each, see [`query`]) and hands each answer to
/// its subscriber's worker; a request whose topic is not subscribed (its subscriber left) or
/// whose read failed is answered `unavailable` by the caller, with what is left in `requests`.
/// In a cluster the read goes to the slot's master, on the connection that carries the topic's
/// SSUBSCRIBE: the order argument of the module docs holds per node.
async fn recover(
    connection: &mut Connection,
    node: &Node,
    scripts: &Scripts,
    subscribed: &Subscribed,
    requests: &mut Vec<RecoveryRequest>,
) -> redis::RedisResult<()> {
    let Some(settings) = node.link.history() else { return Ok(()) };
    let (ready, rest): (Vec<_>, Vec<_>) =
        requests.drain(..).partition(|request| subscribed.0.contains(&request.topic));
    requests.extend(rest);
    if ready.is_empty() {
        return Ok(());
    }
    let commands = ready.iter().map(|request| {
        let [meta, log] = history_keys(&request.topic);
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(&scripts.read)
            .arg(2)
            .arg(meta)
            .arg(log)
            .arg(format!("{:016x}", new_epoch()))
            .arg(ttl_ms(&settings))
            .arg(format!("{:016x}", request.since.epoch))
            .arg(request.since.offset);
        (Arc::clone(&request.topic), command)
    });
    let answers = match query(connection, commands.collect()).await {
        Ok(answers) => answers,
        Err(error) => {
            requests.extend(ready);
            return Err(error);
        }
    };
    let mut answers = answers.into_iter();
    for request in ready {
        match answers.next().as_ref().and_then(read_answer) {
            Some((outcome, live_after, replay)) => node.answer(request, outcome, live_after, &replay),
            None => {
                tracing::debug!(topic = %request.topic, "a history read failed: recovery unavailable");
                node.unavailable(request);
            }
        }
    }
    Ok(())
}

/// Reads [`READ_SCRIPT`]'s answer: the outcome, the position the live stream continues after,
/// and the envelopes to replay. `None` for anything else (an error, a foreign shape).
fn read_answer(value: &Value) -> Option<(Outcome, Position, Vec<&[u8]>)> {
    let Value::Array(parts) = value else { return None };
    let [epoch, top, reason, replay] = &parts[..] else { return None };
    fn text(value: &Value) -> Option<&str> {
        match value {
            Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
            Value::SimpleString(text) => Some(text.as_str()),
            _ => None,
        }
    }
    let epoch = u64::from_str_radix(text(epoch)?, 16).ok()?;
    let Value::Int(top) = top else { return None };
    let outcome = match text(reason)? {
        "recovered" => Outcome::Recovered,
        "epoch_changed" => Outcome::EpochChanged,
        "too_old" => Outcome::TooOld,
        _ => return None,
    };
    let Value::Array(replay) = replay else { return None };
    let replay = replay
        .iter()
        .map(|entry| match entry {
            Value::BulkString(bytes) => Some(&bytes[..]),
            _ => None,
        })
        .collect::<Option<Vec<&[u8]>>>()?;
    Some((outcome, Position { epoch, offset: u64::try_from(*top).ok()? }, replay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keys_share_the_topics_hash_tag_and_never_collide() {
        assert_eq!(
            history_keys("news"),
            ["ringgate:{news}:meta".to_string(), "ringgate:{news}:log".to_string()]
        );
        let [meta, log] = history_keys("a}:log");
        assert_ne!(meta, history_keys("a")[1]);
        assert_ne!(log, history_keys("a")[1]);
    }

    /// A key's hash tag as Redis Cluster reads it: what decides its slot.
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(close) = key[open + 1..].find('}')
            && close > 0
        {
            return &key[open + 1..open + 1 + close];
        }
        key
    }

    #[test]
    fn a_clusters_shard_channel_is_in_the_slot_of_the_topics_keys() {
        for topic in ["news", "a}b", "a{b}c", "{x}", "é", "}x", "}", "%7D", "a%b", "%"] {
            let channel = Mode::Cluster.channel(topic);
            // The tag is the whole (encoded) topic, never empty, never a part of it.
            assert_eq!(hash_tag(&channel), tag(topic), "{topic}: {channel}");
            for key in history_keys(topic) {
                assert_eq!(hash_tag(&channel), hash_tag(&key), "{topic}: {channel} and {key}");
            }
            assert_eq!(Mode::Cluster.topic(channel.as_bytes()).as_deref(), Some(topic));
            assert_eq!(Mode::Server.topic(Mode::Server.channel(topic).as_bytes()).as_deref(), Some(topic));
        }
        assert_ne!(tag("}"), tag("%7D"), "no two topics share a tag");
        assert_eq!(untag("a%41"), None, "not an escape of ours");
        assert_eq!(untag("a%7"), None);
        assert_eq!(Mode::Server.channel("news"), "ringgate:news", "unchanged for one server");
        assert_eq!(Mode::Cluster.topic(b"ringgate:news"), None, "not a shard channel of ours");
        assert_eq!(Mode::Cluster.topic(b"other:{news}"), None);
    }

    #[test]
    fn a_clusters_url_lists_seeds_that_share_the_credentials() {
        assert_eq!(cluster_seeds("redis://h:1"), None, "one server");
        assert_eq!(
            cluster_seeds("redis+cluster://u:p@h1:7000,h2:7001"),
            Some(Ok(vec!["redis://u:p@h1:7000".to_string(), "redis://u:p@h2:7001".to_string()]))
        );
        assert_eq!(cluster_seeds("redis+cluster://h1:7000"), Some(Ok(vec!["redis://h1:7000".to_string()])));
        for bad in [
            "redis+cluster://h1:7000,",
            "redis+cluster://h1:7000,:7001",
            "redis+cluster://h:1/2",
            "redis+cluster://h:1?x=1",
        ] {
            assert!(matches!(cluster_seeds(bad), Some(Err(_))), "{bad}");
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").is_ok());
    }

    #[test]
    fn an_unsubscription_confirms_ours_once_per_sunsubscribe_sent() {
        let watch = Watch::default();
        let topic: Arc<str> = Arc::from("t");
        assert!(!watch.confirms_ours("t"), "Redis's own: a moved slot");
        watch.expect_unsubscribe(&topic);
        watch.expect_unsubscribe(&topic);
        assert!(watch.confirms_ours("t") && watch.confirms_ours("t"));
        assert!(!watch.confirms_ours("t"), "both confirmed: the next one is Redis's");
    }

    #[test]
    fn the_read_scripts_answer_is_read_and_anything_else_refused() {
        let answer = Value::Array(vec![
            Value::BulkString(b"00000000000000ab".to_vec()),
            Value::Int(9),
            Value::BulkString(b"recovered".to_vec()),
            Value::Array(vec![Value::BulkString(b"e1".to_vec()), Value::BulkString(b"e2".to_vec())]),
        ]);
        let (outcome, at, replay) = read_answer(&answer).expect("valid");
        assert_eq!((outcome, at), (Outcome::Recovered, Position { epoch: 0xab, offset: 9 }));
        assert_eq!(replay, [&b"e1"[..], &b"e2"[..]]);
        let Value::Array(mut parts) = answer else { unreachable!() };
        parts[2] = Value::BulkString(b"who knows".to_vec());
        assert!(read_answer(&Value::Array(parts)).is_none());
        assert!(read_answer(&Value::Int(1)).is_none());
    }

    #[test]
    fn a_ttl_below_a_millisecond_is_not_taken_for_none() {
        let settings = |ttl| HistorySettings { size: 1, ttl, positions: false, max_topics: 1 };
        assert_eq!(ttl_ms(&settings(Duration::ZERO)), 0);
        assert_eq!(ttl_ms(&settings(Duration::from_micros(10))), 1);
        assert_eq!(ttl_ms(&settings(Duration::from_secs(2))), 2000);
    }
}
