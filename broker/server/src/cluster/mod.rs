//! The Redis store: what makes pods stateless.
//!
//! Every pod keeps in memory only the connections it serves and caches of
//! shared state; the truth lives in Redis (see `docs/architecture.md`,
//! "Redis store", for the key layout and the invariants):
//!
//! - **Routes** — which pods have subscribers for which filters
//!   (`routes:{node}` sets), persistent sessions' subscriptions (`psubs`),
//!   shared groups — are replicated into every pod's [`RemoteRoutes`] from a
//!   snapshot plus the `events` stream. A publish is matched locally and
//!   costs Redis work only for the pods and sessions that want it.
//! - **Transient path**: a message for subscribers on pod P is appended to
//!   P's inbox stream; one stream entry carries a batch, and one pipeline
//!   carries every target of every message the writer has at hand.
//! - **Persistent path**: a QoS 1/2 message for a persistent session is
//!   appended to the session's own stream, which holds exactly the messages
//!   its client has not acknowledged; the pod serving the client reads it
//!   and deletes entries as PUBACK/PUBREC arrive. Whoever serves the session
//!   next resumes from what is left.
//! - **Sessions**: a hash per client id with its owner pod and connection
//!   epoch; takeover is a compare-and-set in Lua, and the old owner is told
//!   through its inbox to drop the connection (0x8E).
//! - **Nodes**: heartbeats in a sorted set; a pod whose heartbeat is older
//!   than the node timeout is dead, and a survivor (holding a lock) publishes
//!   its clients' wills, releases its sessions and drops its routes.
//! - **Shared subscriptions**: a stream per `$share/{group}/{filter}` read
//!   through a consumer group, so each message reaches one member across all
//!   pods; entries a dead pod read but never acknowledged are claimed.
//!
//! Keys carry hash tags: the per-client keys share their client id's slot,
//! and the cluster-wide ones share `{g}`.

pub mod routes;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cirrus_codec::{ByteString, LastWill, QoS, SubscriptionOptions};
use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::{Broker, Stored};
use crate::message::{Delivery, Message, StoreAck};
use crate::session::Session;
use crate::stats::{DropReason, Stats};
pub use routes::{RemoteRoutes, SessionSub, Targets};

/// Cluster-wide keys.
mod keys {
    pub const NODES: &str = "cirrus:{g}:nodes";
    pub const EVENTS: &str = "cirrus:{g}:events";
    pub const PSUBS: &str = "cirrus:{g}:psubs";
    pub const RETAINED: &str = "cirrus:{g}:retained";
    pub const EXPIRY: &str = "cirrus:{g}:expiry";
    /// Client id → when its delayed will is due (Redis time, ms).
    pub const WILLS: &str = "cirrus:{g}:wills";
    /// Pod → since when its heartbeats are steady (Redis time, ms).
    pub const STEADY: &str = "cirrus:{g}:steady";
    pub const GROUP: &str = "cirrus";

    pub fn routes(node: &str) -> String {
        format!("cirrus:{{g}}:routes:{node}")
    }
    pub fn node_sessions(node: &str) -> String {
        format!("cirrus:{{g}}:nsess:{node}")
    }
    pub fn lock(node: &str) -> String {
        format!("cirrus:{{g}}:lock:{node}")
    }
    pub fn inbox(node: &str) -> String {
        format!("cirrus:inbox:{{{node}}}")
    }
    pub fn session(cid: &str) -> String {
        format!("cirrus:s:{{{cid}}}")
    }
    pub fn queue(cid: &str) -> String {
        format!("cirrus:q:{{{cid}}}")
    }
    /// Shared groups are few: their streams live beside the other
    /// cluster-wide keys, so one read covers them all.
    pub fn share(full: &str) -> String {
        format!("cirrus:{{g}}:share:{full}")
    }
}

/// Events kept in the change stream; a pod further behind than this
/// reloads the snapshot.
const EVENTS_MAXLEN: usize = 100_000;
/// Operations waiting for the writer; a full queue slows publishers down.
const OPS_QUEUE: usize = 16_384;
/// Operations per pipeline.
const BATCH_MAX: usize = 2048;
/// Inbox entries (each a batch of records) kept for a pod that does not
/// read them: a pod stalled that long loses the oldest transient messages
/// (QoS 0, and QoS 1/2 for sessions that end with their connection);
/// persistent sessions and shared groups have streams of their own.
const INBOX_MAXLEN: usize = 100_000;
/// Entries kept in a shared group's stream: the group's backlog when all
/// its members are away. Past it the oldest are dropped.
const SHARE_MAXLEN: usize = 1_000_000;
/// The clean-up lock on a dead pod, renewed after each step.
const LOCK_MS: u64 = 30_000;
/// Sessions of a dead pod released per pipelined step.
const CLEANUP_STEP: usize = 200;
/// Expiries and wills handled per pipelined step.
const SWEEP_BATCH: usize = 500;
/// A shared-group consumer idle this long with nothing pending is removed.
const CONSUMER_IDLE_MS: i64 = 60_000;
/// Entries per stream read.
const READ_COUNT: usize = 512;

/// Append to a session's stream. Returns `{code, owner}`: code -1 when the
/// session is gone, 0 when its stream is full (a counted drop), 1 when
/// appended; `owner` is the pod serving the session now, to be woken.
const LUA_ENQUEUE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {-1, ''} end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then return {0, owner} end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
return {1, owner}";

/// Scripts that need the time read it from Redis (`TIME`): every pod
/// agrees on it, whatever its own clock says.
macro_rules! lua_timed {
    ($body:literal) => {
        concat!(
            "local function now_ms()\n",
            "  local t = redis.call('TIME')\n",
            "  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            "end\n",
            $body
        )
    };
}

/// Take a session over (a takeover always wins, as MQTT says): returns the
/// previous owner and its epoch, so that the kick names that connection.
/// ARGV: node, epoch, clean start, expiry, will, will delay.
const LUA_CLAIM: &str = r"
local prev = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
local present = redis.call('EXISTS', KEYS[1])
local old = {}
if ARGV[3] == '1' then
  if present == 1 then old = redis.call('HKEYS', KEYS[1]) end
  redis.call('DEL', KEYS[1], KEYS[2])
  present = 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expiry', ARGV[4])
redis.call('HDEL', KEYS[1], 'expires_at', 'will_at')
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'will', ARGV[5], 'wdelay', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
end
return {prev[1] or '', prev[2] or '', present, old}";

/// Let go of a session, only if `owner`/`epoch` still hold it (epoch `*`:
/// any, for a dead pod's sessions). ARGV: node, epoch, persistent, expiry
/// seconds, PUBREL ids, keep will (1: a will with a delay is scheduled in
/// Redis; 0: the caller publishes or drops it). Returns `{code, expires_at,
/// will to publish now, will due at}`; code 0: not ours, 1: offline, 2:
/// ended. The will is taken out atomically: published once.
const LUA_RELEASE: &str = lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'will', 'wdelay')
if o[1] ~= ARGV[1] or (ARGV[2] ~= '*' and o[2] ~= ARGV[2]) then return {0, 0, '', 0} end
local will = o[3] or ''
local wdelay = tonumber(o[4] or '0') or 0
if ARGV[3] == '1' then
  local now = now_ms()
  local exp = tonumber(ARGV[4])
  local at = 0
  if exp < 4294967295 then at = now + exp * 1000 end
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_at', at, 'rel', ARGV[5])
  if will ~= '' and ARGV[6] == '1' and wdelay > 0 then
    local due = now + math.min(wdelay, exp) * 1000
    redis.call('HSET', KEYS[1], 'will_at', due)
    return {1, at, '', due}
  end
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
  return {1, at, will, 0}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {2, 0, will, 0}"
);

/// A delayed will whose time came: taken out (once) if the client is
/// still away; dropped if it came back.
const LUA_FIRE_WILL: &str = lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'will', 'will_at')
if not o[3] then return '' end
if o[1] and o[1] ~= '' then
  redis.call('HDEL', KEYS[1], 'will_at')
  return ''
end
if tonumber(o[3]) > now_ms() then return '' end
redis.call('HDEL', KEYS[1], 'will', 'wdelay', 'will_at')
return o[2] or ''"
);

/// An outgoing QoS 2 message was received (PUBREC): its entry goes, and
/// its packet id is recorded as awaiting PUBCOMP (`r:{id}`), in one step —
/// only while this connection still holds the session, so a pod that takes
/// it over either finds the id recorded or the message still there.
/// KEYS: session, stream; ARGV: entry id, packet id, node, epoch.
const LUA_DELIVERED: &str = r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if o[1] ~= ARGV[3] or o[2] ~= ARGV[4] then return redis.error_reply('NOTOWNER taken over') end
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'r:' .. ARGV[2], 1)
return 1";

/// Re-take a session after Redis lost it or this pod was declared dead.
const LUA_RECLAIM: &str = r"
local o = redis.call('HGET', KEYS[1], 'owner')
if o and o ~= '' and o ~= ARGV[1] then return 0 end
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expiry', ARGV[3])
redis.call('HDEL', KEYS[1], 'expires_at', 'will_at')
return 1 + existed";

/// End an offline session whose expiry passed: `{1, fields, will}`.
const LUA_EXPIRE: &str = lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'expires_at', 'will')
if o[1] and o[1] ~= '' then return {0} end
local at = tonumber(o[2] or '')
if at and (at == 0 or at > now_ms()) then return {0} end
local f = redis.call('HKEYS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return {1, f, o[3] or ''}"
);

/// Heartbeat by Redis's clock: `-1` when this pod was not registered
/// (Redis lost it, or it was declared dead), else the milliseconds since
/// its previous heartbeat, by the same clock. A gap over half the node
/// timeout (Redis or this pod was paused) marks the pod unsteady from now
/// (`steady` hash): it declares nobody dead for a node timeout, so that
/// every live pod has had its turn to beat. KEYS: nodes, steady; ARGV:
/// node, node timeout (ms).
const LUA_HEARTBEAT: &str = lua_timed!(
    r"
local now = now_ms()
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
if not prev then
  redis.call('HSET', KEYS[2], ARGV[1], now)
  return -1
end
local gap = now - tonumber(prev)
if gap > tonumber(ARGV[2]) / 2 then redis.call('HSET', KEYS[2], ARGV[1], now) end
return gap"
);

/// Pods whose heartbeat is older than the node timeout — asked by a pod
/// whose own heartbeats are fresh and have been steady for a node timeout,
/// all by Redis's clock (a sweep sent before an outage and run after it
/// finds nobody). KEYS: nodes, steady; ARGV: node timeout (ms), limit, node.
const LUA_DEAD: &str = lua_timed!(
    r"
local now = now_ms()
local t = tonumber(ARGV[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not mine or now - tonumber(mine) > t / 2 then return {} end
local since = redis.call('HGET', KEYS[2], ARGV[3])
if not since or now - tonumber(since) < t then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - t, 'LIMIT', 0, tonumber(ARGV[2]))"
);

/// Members of a time-scored set that are due (score <= now), at most
/// ARGV[1].
const LUA_DUE: &str = lua_timed!(
    r"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))"
);

/// Create a shared group's stream and group; one that exists is fine.
const LUA_GROUP_CREATE: &str = r"
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then
  return redis.error_reply(r.err)
end
return 1";

/// Release a dead pod's session (any epoch): [`LUA_RELEASE`] with the
/// session's own expiry, a delayed will scheduled. ARGV[1]: the dead pod.
const LUA_RELEASE_DEAD: &str = lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'expiry', 'will', 'wdelay')
if o[1] ~= ARGV[1] then return {0, 0, '', 0} end
local exp = tonumber(o[2] or '0') or 0
local will = o[3] or ''
local wdelay = tonumber(o[4] or '0') or 0
if exp > 0 then
  local now = now_ms()
  local at = 0
  if exp < 4294967295 then at = now + exp * 1000 end
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_at', at)
  if will ~= '' and wdelay > 0 then
    local due = now + math.min(wdelay, exp) * 1000
    redis.call('HSET', KEYS[1], 'will_at', due)
    return {1, at, '', due}
  end
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
  return {1, at, will, 0}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {2, 0, will, 0}"
);

/// Extend a lock only while this pod holds it.
const LUA_RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// The reply of [`LUA_RELEASE`].
struct Released {
    /// 0: not this owner's any more; 1: offline; 2: ended.
    code: i64,
    /// When the offline session expires (Redis time, ms; 0: never).
    expires_at: i64,
    /// A will to publish now (taken out of Redis).
    will: Option<Bytes>,
    /// When the delayed will is due (Redis time, ms; 0: none).
    will_due: i64,
}

impl Released {
    fn from_reply(v: Option<&Value>) -> Released {
        let a = v.and_then(as_array).unwrap_or_default();
        let int = |i: usize| a.get(i).and_then(as_int).unwrap_or(0);
        Released {
            code: int(0),
            expires_at: int(1),
            will: val_bytes(a.get(2)).filter(|b| !b.is_empty()),
            will_due: int(3),
        }
    }
}

/// How this pod reaches Redis: one server, or a Redis Cluster.
// One per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// The shared, multiplexed connection for commands and pipelines.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection of its own, for blocking stream reads.
enum ReadConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ReadConn {
    async fn run(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            ReadConn::Single(c) => cmd.query_async(c).await,
            ReadConn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// The key a command works on: what Redis Cluster routes it by.
fn cmd_key(c: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = c
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let i = match args.first()?.to_ascii_uppercase().as_slice() {
        b"EVAL" | b"EVALSHA" => 3,
        b"XGROUP" | b"XINFO" => 2,
        _ => 1,
    };
    args.get(i).map(|k| k.to_vec())
}

/// The Redis Cluster slot of a key: CRC16 of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), mod 16384.
fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// Redis store settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL; for a Redis Cluster, its seed nodes'
    /// URLs separated by commas.
    pub url: String,
    /// The URL names a Redis Cluster (implied by several URLs).
    pub cluster: bool,
    /// PEM file of the CA that signed the Redis server's certificate
    /// (`rediss://` with a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a pod may miss heartbeats before it is declared dead.
    pub node_timeout: Duration,
    /// This pod's id (unique per process).
    pub node_id: String,
}

/// What a connect found in Redis.
#[derive(Debug, Default)]
pub struct Claim {
    pub present: bool,
    /// Subscriptions of the resumed session.
    pub subs: Vec<(ByteString, SubscriptionOptions, Option<u32>)>,
    /// Packet ids whose PUBREL was pending when the session was released.
    pub rel: Vec<u16>,
    /// Highest stream id ever sent to the client: entries up to it are
    /// redeliveries (DUP).
    pub hw: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Malformed(#[from] wire::Malformed),
    #[error("unexpected reply from redis: {0}")]
    Reply(&'static str),
    #[error("the store is not ready")]
    NotReady,
    #[error("redis refused a command: {0}")]
    Server(String),
}

/// Why the store did not take a message: the publisher hears it as a
/// reason code, never as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFail {
    /// Redis unreachable, or it refused the write (READONLY after a
    /// failover, CROSSSLOT, a script error...): 0x80.
    Unavailable,
    /// Redis is out of memory (`maxmemory` with `noeviction`): 0x97.
    Full,
}

impl StoreFail {
    pub fn reason_code(self) -> u8 {
        match self {
            StoreFail::Unavailable => cirrus_codec::reason::UNSPECIFIED_ERROR,
            StoreFail::Full => cirrus_codec::reason::QUOTA_EXCEEDED,
        }
    }

    fn of(e: &redis::ServerError) -> StoreFail {
        if e.code() == "OOM" {
            StoreFail::Full
        } else {
            StoreFail::Unavailable
        }
    }
}

/// Told when the writer's pipeline that carried an operation is done.
type Done = oneshot::Sender<Result<(), StoreFail>>;

/// Work for the writer task, which turns everything at hand into one
/// pipeline.
pub enum Op {
    Forward {
        msg: Arc<Message>,
        targets: Targets,
        done: Option<Done>,
    },
    Ack {
        client_id: ByteString,
        ack: StoreAck,
    },
    /// Tell the pod `node` that the connection of `client_id` with that
    /// pod's `epoch` was taken over.
    Kick {
        node: Arc<str>,
        client_id: ByteString,
        epoch: u64,
    },
    /// Tell the pod `node` that the stream of `client_id` has news.
    Wake {
        node: Arc<str>,
        client_id: ByteString,
    },
    Cmds {
        cmds: Vec<Cmd>,
        done: Option<Done>,
    },
}

/// A publish still on its way to Redis. Await [`Pending::finish`] before
/// acknowledging a QoS 1/2 message.
pub struct Pending {
    send: Option<(mpsc::Sender<Op>, Op)>,
    done: Option<oneshot::Receiver<Result<(), StoreFail>>>,
}

impl Pending {
    /// Whether the operation still has to be queued (the queue was full).
    pub fn must_wait(&self) -> bool {
        self.send.is_some() || self.done.is_some()
    }

    /// `Ok` once every Redis reply of the pipeline that carried the message
    /// said it was stored (or there was nothing to wait for).
    pub async fn finish(self) -> Result<(), StoreFail> {
        if let Some((tx, op)) = self.send {
            if tx.send(op).await.is_err() {
                return Err(StoreFail::Unavailable);
            }
        }
        match self.done {
            Some(rx) => rx.await.unwrap_or(Err(StoreFail::Unavailable)),
            None => Ok(()),
        }
    }
}

/// A pipeline being built, with the operation each command belongs to:
/// an error reply fails exactly the operations that needed that command.
struct Batch {
    pipe: redis::Pipeline,
    owner: Vec<Option<usize>>,
}

impl Batch {
    fn new() -> Batch {
        let mut pipe = redis::pipe();
        // Server errors come back as values, one per command: each is
        // looked at.
        pipe.ignore_errors();
        Batch {
            pipe,
            owner: Vec::new(),
        }
    }

    fn add(&mut self, c: Cmd, op: Option<usize>) -> usize {
        self.pipe.add_command(c);
        self.owner.push(op);
        self.owner.len() - 1
    }
}

struct Puller {
    wake: Notify,
    cancel: CancellationToken,
}

pub struct Cluster {
    pub node: Arc<str>,
    client: Client,
    cmd: Conn,
    ops: mpsc::Sender<Op>,
    routes: RwLock<RemoteRoutes>,
    /// Full filter → local subscribers, to announce a route once per pod.
    local_routes: Mutex<HashMap<ByteString, usize>>,
    /// Share streams this pod reads.
    shares: Mutex<HashSet<ByteString>>,
    pullers: Mutex<HashMap<ByteString, Arc<Puller>>>,
    healthy: AtomicBool,
    reader_ok: AtomicBool,
    broker: OnceLock<Weak<Broker>>,
    node_timeout: Duration,
    max_queued: usize,
    pub redis_errors: AtomicU64,
    pub redis_commands: AtomicU64,
    /// Round trips of pipelines.
    pub roundtrip: crate::stats::Histogram,
    /// Entries not yet read from this pod's streams (last observed).
    pub stream_lag: AtomicU64,
    /// Second (unix) the last refused write was logged.
    write_error_logged: AtomicU64,
    /// Shared-group entries delivered to a member here and not yet
    /// acknowledged by its client: not claimed again while held.
    share_held: Mutex<HashSet<(ByteString, ByteString)>>,
    shutdown: CancellationToken,
    /// Every task the store starts: shutdown waits for them.
    tasks: TaskTracker,
    /// Since when this pod's heartbeats have been steady (see
    /// `supervisor`): it declares no pod dead before a node timeout of them.
    steady_since: Mutex<Instant>,
}

fn event(fields: &[(&str, &[u8])]) -> Cmd {
    let mut c = redis::cmd("XADD");
    c.arg(keys::EVENTS)
        .arg("MAXLEN")
        .arg("~")
        .arg(EVENTS_MAXLEN)
        .arg("*");
    for (k, v) in fields {
        c.arg(*k).arg(*v);
    }
    c
}

/// Create a shared group's stream and group (made if missing, an existing
/// one kept).
fn group_create(full: &str) -> Cmd {
    eval(LUA_GROUP_CREATE, &[&keys::share(full)])
        .arg(keys::GROUP)
        .clone()
}

/// A command on one key with one more argument (`SADD key member`, ...).
fn on_key(name: &str, key: &str, arg: &[u8]) -> Cmd {
    redis::cmd(name).arg(key).arg(arg).clone()
}

/// The event announcing a route of pod `node` (`t`: `r+` or `r-`).
fn route_event(t: &[u8], node: &str, full: &str) -> Cmd {
    event(&[("t", t), ("n", node.as_bytes()), ("f", full.as_bytes())])
}

/// Drop a stream's entries older than `id` (never `id` itself).
fn trim_before(key: &str, id: &str) -> Cmd {
    redis::cmd("XTRIM").arg(key).arg("MINID").arg(id).clone()
}

/// A session script: KEYS[1] the session hash, KEYS[2] its stream (one
/// slot: they share the client id's hash tag).
fn session_eval(script: &str, client_id: &str) -> Cmd {
    eval(
        script,
        &[&keys::session(client_id), &keys::queue(client_id)],
    )
}

fn eval(script: &str, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::Okay => Some(b"OK"),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// The strings of an array reply (members, keys, ids); others are skipped.
fn str_list(v: Option<&Value>) -> Vec<&str> {
    v.and_then(as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(as_str)
        .collect()
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_str(other).and_then(|s| s.parse().ok()),
    }
}

fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// Field/value pairs of a hash or a stream entry, in either RESP shape.
fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        other => as_array(other)
            .map(|a| a.chunks_exact(2).map(|c| (&c[0], &c[1])).collect())
            .unwrap_or_default(),
    }
}

/// One stream entry: id and fields.
struct Entry<'a> {
    id: &'a str,
    fields: Vec<(&'a Value, &'a Value)>,
}

impl<'a> Entry<'a> {
    fn field(&self, name: &str) -> Option<&'a Value> {
        self.fields
            .iter()
            .find(|(k, _)| as_bytes(k) == Some(name.as_bytes()))
            .map(|(_, v)| *v)
    }
}

fn entries(v: &Value) -> Vec<Entry<'_>> {
    as_array(v)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let a = as_array(e)?;
            Some(Entry {
                id: as_str(a.first()?)?,
                fields: pairs(a.get(1)?),
            })
        })
        .collect()
}

/// XREAD/XREADGROUP reply → (stream key, entries).
fn streams(v: &Value) -> Vec<(&str, Vec<Entry<'_>>)> {
    match v {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((as_str(k)?, entries(v))))
            .collect(),
        other => as_array(other)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let a = as_array(s)?;
                Some((as_str(a.first()?)?, entries(a.get(1)?)))
            })
            .collect(),
    }
}

fn val_bytes(v: Option<&Value>) -> Option<Bytes> {
    v.and_then(as_bytes).map(Bytes::copy_from_slice)
}

impl Cluster {
    /// Connect, register this pod and start its tasks. Fails when Redis
    /// cannot be reached at start: a pod that never had a store is not
    /// useful; one that loses it later stays up and reports not ready.
    pub async fn start(
        cfg: ClusterConfig,
        broker: &Arc<Broker>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Cluster>> {
        let (client, cmd) = tokio::time::timeout(Duration::from_secs(10), connect(&cfg))
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer within 10 s"))??;
        let (tx, rx) = mpsc::channel(OPS_QUEUE);
        let c = Arc::new(Cluster {
            node: Arc::from(cfg.node_id.as_str()),
            client,
            cmd,
            ops: tx,
            routes: RwLock::new(RemoteRoutes::default()),
            local_routes: Mutex::new(HashMap::new()),
            shares: Mutex::new(HashSet::new()),
            pullers: Mutex::new(HashMap::new()),
            healthy: AtomicBool::new(false),
            reader_ok: AtomicBool::new(false),
            broker: OnceLock::new(),
            node_timeout: cfg.node_timeout,
            max_queued: broker.config.limits.max_queued_messages,
            redis_errors: AtomicU64::new(0),
            redis_commands: AtomicU64::new(0),
            roundtrip: Default::default(),
            stream_lag: AtomicU64::new(0),
            write_error_logged: AtomicU64::new(0),
            share_held: Mutex::new(HashSet::new()),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            steady_since: Mutex::new(Instant::now()),
        });
        let _ = c.broker.set(Arc::downgrade(broker));
        c.heartbeat().await?;
        c.resync().await?;
        c.healthy.store(true, Ordering::Relaxed);
        c.tasks.spawn(c.clone().writer(rx));
        c.tasks.spawn(c.clone().events_reader());
        c.tasks.spawn(c.clone().inbox_reader());
        c.tasks.spawn(c.clone().share_reader());
        c.tasks.spawn(c.clone().supervisor());
        c.tasks.spawn(c.clone().sweeper());
        // The first snapshot is loaded by the reader; wait for it briefly
        // so that the pod starts with the cluster's routes.
        let t0 = Instant::now();
        while !c.reader_ok.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        info!(node = %c.node, "joined the cluster through Redis");
        Ok(c)
    }

    /// Run a task of the store: shutdown waits for it.
    pub fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(f);
    }

    /// After the connections have drained: stop the readers, let the
    /// writer land what is queued, leave the cluster; wait for all of it
    /// (at most `deadline`).
    pub async fn stop(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(?deadline, "the Redis store's tasks did not end in time");
        }
    }

    pub(crate) fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Redis reachable and this pod's view of the cluster loaded.
    pub fn is_ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.reader_ok.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::Relaxed) {
            warn!(error = %e, what, "Redis unavailable: refusing new connections until it returns");
        }
    }

    async fn query(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        let t0 = Instant::now();
        let r = match &self.cmd {
            Conn::Single(c) => pipe.query_async::<Vec<Value>>(&mut c.clone()).await,
            Conn::Cluster(c) => query_sharded(c, pipe).await,
        };
        self.redis_commands
            .fetch_add(pipe.len() as u64, Ordering::Relaxed);
        self.roundtrip.observe(t0.elapsed());
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                self.failed("command", &e);
                Err(e.into())
            }
        }
    }

    async fn query_cmds(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        let mut pipe = redis::pipe();
        // Server errors come back as values; only a lost connection fails.
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c);
        }
        self.query(&pipe).await
    }

    /// Queue commands for the writer and wait until Redis ran them.
    async fn run_ordered(&self, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Cmds {
                cmds,
                done: Some(tx),
            })
            .await
            .map_err(|_| StoreError::NotReady)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(StoreError::NotReady),
        }
    }

    /// Queue commands for the writer without waiting.
    fn run_later(&self, cmds: Vec<Cmd>) {
        if cmds.is_empty() {
            return;
        }
        self.send_op(Op::Cmds { cmds, done: None });
    }

    // ---- publish path ------------------------------------------------

    /// Send a message to the other pods, shared groups and persistent
    /// sessions that want it. Returns the number of targets and what to
    /// wait for before acknowledging it.
    pub fn forward(&self, msg: &Arc<Message>) -> (usize, Option<Pending>) {
        let mut targets = Targets::default();
        self.routes.read().matches(
            &msg.topic,
            msg.publisher.as_deref(),
            &self.node,
            &mut targets,
        );
        if targets.is_empty() {
            return (0, None);
        }
        let n = targets.len();
        let (done_tx, done_rx) = if msg.qos != QoS::AtMostOnce {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let op = Op::Forward {
            msg: msg.clone(),
            targets,
            done: done_tx,
        };
        let send = match self.ops.try_send(op) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(op)) => Some((self.ops.clone(), op)),
            // Shutting down: a QoS 1/2 publisher hears that it failed (its
            // sender is gone with the operation).
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        };
        (
            n,
            Some(Pending {
                send,
                done: done_rx,
            }),
        )
    }

    /// A retained message was set or cleared on this pod.
    pub fn retain(&self, msg: &Message) {
        let mut cmds = Vec::with_capacity(2);
        if msg.payload.is_empty() {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(keys::RETAINED)
                    .arg(&*msg.topic)
                    .clone(),
            );
            cmds.push(event(&[
                ("t", b"rd"),
                ("n", self.node.as_bytes()),
                ("k", msg.topic.as_bytes()),
            ]));
        } else {
            let b = wire::message_bytes(msg);
            cmds.push(
                redis::cmd("HSET")
                    .arg(keys::RETAINED)
                    .arg(&*msg.topic)
                    .arg(&b[..])
                    .clone(),
            );
            cmds.push(event(&[
                ("t", b"rs"),
                ("n", self.node.as_bytes()),
                ("m", &b[..]),
            ]));
        }
        self.run_later(cmds);
    }

    /// The client acknowledged a message of a stream (its session's or a
    /// shared group's), or a counted rule dropped it: let go of the entry.
    pub fn ack(&self, client_id: &ByteString, ack: StoreAck) {
        if let StoreAck::Share { filter, id } = &ack {
            self.share_held.lock().remove(&(filter.clone(), id.clone()));
        }
        self.send_op(Op::Ack {
            client_id: client_id.clone(),
            ack,
        });
    }

    /// The client received an outgoing QoS 2 message of its stream (PUBREC):
    /// done once Redis let go of the entry and recorded the packet id as
    /// awaiting PUBCOMP; only then is PUBREL sent.
    pub fn delivered_qos2(
        &self,
        client_id: &ByteString,
        entry: &str,
        pid: cirrus_codec::PacketId,
        epoch: u64,
    ) -> Pending {
        let cmd = session_eval(LUA_DELIVERED, client_id)
            .arg(entry)
            .arg(pid.get())
            .arg(&*self.node)
            .arg(epoch)
            .clone();
        let (tx, rx) = oneshot::channel();
        let op = Op::Cmds {
            cmds: vec![cmd],
            done: Some(tx),
        };
        let send = match self.ops.try_send(op) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(op)) => Some((self.ops.clone(), op)),
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        };
        Pending {
            send,
            done: Some(rx),
        }
    }

    /// PUBCOMP: the packet id of an outgoing QoS 2 message is free again.
    pub fn completed_qos2(&self, client_id: &ByteString, pid: cirrus_codec::PacketId) {
        self.run_later(vec![redis::cmd("HDEL")
            .arg(keys::session(client_id))
            .arg(format!("r:{}", pid.get()))
            .clone()]);
    }

    /// Queue an operation that nobody waits for, never dropping it: when
    /// the queue is full a task waits for room.
    fn send_op(&self, op: Op) {
        if let Err(mpsc::error::TrySendError::Full(op)) = self.ops.try_send(op) {
            let tx = self.ops.clone();
            self.tasks.spawn(async move {
                let _ = tx.send(op).await;
            });
        }
    }

    async fn writer(self: Arc<Self>, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            batch.clear();
            let first = tokio::select! {
                op = rx.recv() => op,
                _ = self.shutdown.cancelled() => {
                    // Drain what is queued so that acknowledged work lands.
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = first else { return };
            batch.push(first);
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let broker = self.broker();
            self.write_batch(&mut batch, broker.as_ref().map(|b| &b.stats))
                .await;
        }
    }

    async fn write_batch(&self, batch: &mut Vec<Op>, stats: Option<&Stats>) {
        let mut b = Batch::new();
        // Per waiting operation: who to tell, and how it went.
        let mut dones: Vec<(Done, Result<(), StoreFail>)> = Vec::new();
        // Pod → inbox entry being built, and the operations it carries.
        let mut inbox: HashMap<Arc<str>, (BytesMut, Vec<usize>)> = HashMap::new();
        // Session enqueues: pipeline slot, client id.
        let mut enqueues: Vec<(usize, ByteString)> = Vec::new();
        let mut acks: HashMap<ByteString, Vec<ByteString>> = HashMap::new();
        let mut share_acks: HashMap<ByteString, Vec<ByteString>> = HashMap::new();
        // Spans of traced messages: they end when the pipeline is done.
        let mut spans = Vec::new();
        {
            for op in batch.drain(..) {
                match op {
                    Op::Forward { msg, targets, done } => {
                        let slot = done.map(|d| {
                            dones.push((d, Ok(())));
                            dones.len() - 1
                        });
                        if crate::trace::enabled() {
                            spans.extend(crate::trace::redis_append(&msg, targets.len()));
                        }
                        let bytes = wire::message_bytes(&msg);
                        for node in &targets.nodes {
                            let (buf, ops) = inbox.entry(node.clone()).or_default();
                            wire::put_record(buf, wire::REC_MESSAGE, &bytes);
                            ops.extend(slot);
                        }
                        for full in &targets.shares {
                            let c = redis::cmd("XADD")
                                .arg(keys::share(full))
                                .arg("MAXLEN")
                                .arg("~")
                                .arg(SHARE_MAXLEN)
                                .arg("*")
                                .arg("m")
                                .arg(&bytes[..])
                                .clone();
                            b.add(c, slot);
                        }
                        for (cid, qos) in &targets.sessions {
                            if (*qos).min(msg.qos) == QoS::AtMostOnce {
                                continue;
                            }
                            let c = session_eval(LUA_ENQUEUE, cid)
                                .arg(self.max_queued)
                                .arg(&bytes[..])
                                .clone();
                            let i = b.add(c, slot);
                            enqueues.push((i, cid.clone()));
                        }
                    }
                    Op::Ack { client_id, ack } => match ack {
                        StoreAck::Session(id) => acks.entry(client_id).or_default().push(id),
                        StoreAck::Share { filter, id } => {
                            share_acks.entry(filter).or_default().push(id)
                        }
                    },
                    Op::Kick {
                        node,
                        client_id,
                        epoch,
                    } => {
                        let (buf, _) = inbox.entry(node).or_default();
                        wire::put_record(buf, wire::REC_KICK, &wire::kick_body(&client_id, epoch));
                    }
                    Op::Wake { node, client_id } => {
                        let (buf, _) = inbox.entry(node).or_default();
                        wire::put_record(buf, wire::REC_WAKE, client_id.as_bytes());
                    }
                    Op::Cmds { cmds, done } => {
                        let slot = done.map(|d| {
                            dones.push((d, Ok(())));
                            dones.len() - 1
                        });
                        for c in cmds {
                            b.add(c, slot);
                        }
                    }
                }
            }
        }
        for (cid, ids) in acks {
            let mut c = redis::cmd("XDEL");
            c.arg(keys::queue(&cid));
            for id in ids {
                c.arg(&*id);
            }
            b.add(c, None);
        }
        for (full, ids) in share_acks {
            let mut c = redis::cmd("XACK");
            c.arg(keys::share(&full)).arg(keys::GROUP);
            for id in ids {
                c.arg(&*id);
            }
            b.add(c, None);
        }
        // Inbox entries: one per pod; every operation in it depends on it.
        let mut inbox_slots = Vec::with_capacity(inbox.len());
        for (node, (buf, ops)) in inbox {
            // Capped (a pod that stopped reading cannot grow Redis without
            // bound); the owner trims what it has read.
            let c = redis::cmd("XADD")
                .arg(keys::inbox(&node))
                .arg("MAXLEN")
                .arg("~")
                .arg(INBOX_MAXLEN)
                .arg("*")
                .arg("b")
                .arg(&buf[..])
                .clone();
            inbox_slots.push((b.add(c, None), ops));
        }
        if b.owner.is_empty() {
            for (d, r) in dones {
                let _ = d.send(r);
            }
            return;
        }
        let results = self.query(&b.pipe).await;
        let mut wakes = Vec::new();
        match results {
            Ok(results) => {
                let mut fail = |op: Option<usize>, f: StoreFail| {
                    if let Some(slot) = op.and_then(|o| dones.get_mut(o)) {
                        if slot.1.is_ok() {
                            slot.1 = Err(f);
                        }
                    }
                };
                let mut errors = 0u64;
                for (i, v) in results.iter().enumerate() {
                    if let Value::ServerError(e) = v {
                        errors += 1;
                        let f = StoreFail::of(e);
                        fail(b.owner.get(i).copied().flatten(), f);
                        for (slot, ops) in &inbox_slots {
                            if *slot == i {
                                for &o in ops {
                                    fail(Some(o), f);
                                }
                            }
                        }
                        self.log_write_error(e);
                    }
                }
                if results.len() < b.owner.len() {
                    // A reply went missing: nothing of it is known stored.
                    for op in b.owner.iter().skip(results.len()) {
                        fail(*op, StoreFail::Unavailable);
                    }
                }
                for (i, cid) in enqueues {
                    let Some(r) = results.get(i).and_then(as_array) else {
                        continue;
                    };
                    let owner = r.get(1).and_then(as_str).unwrap_or_default();
                    match r.first().and_then(as_int) {
                        Some(1) => {}
                        Some(0) => {
                            if let Some(s) = stats {
                                s.dropped(DropReason::QueueFull);
                            }
                        }
                        // The session ended meanwhile: nothing to deliver.
                        Some(-1) => {}
                        _ => {
                            errors += 1;
                            fail(b.owner.get(i).copied().flatten(), StoreFail::Unavailable);
                        }
                    }
                    // The pod serving the session, as Redis knows it, is
                    // woken once the entry is there: never before it (on a
                    // Redis Cluster the parts of a pipeline run in parallel),
                    // and never a stale owner. No pod polls an idle session.
                    if !owner.is_empty() && r.first().and_then(as_int) == Some(1) {
                        wakes.push(Op::Wake {
                            node: Arc::from(owner),
                            client_id: cid,
                        });
                    }
                }
                if errors > 0 {
                    self.redis_errors.fetch_add(errors, Ordering::Relaxed);
                }
            }
            Err(_) => {
                for d in &mut dones {
                    d.1 = Err(StoreFail::Unavailable);
                }
            }
        }
        for (d, r) in dones {
            let _ = d.send(r);
        }
        drop(spans);
        for w in wakes {
            self.send_op(w);
        }
    }

    /// A write Redis refused: logged at most every 10 s (a full Redis
    /// refuses every write).
    fn log_write_error(&self, e: &redis::ServerError) {
        let now = wire::unix_ms() / 1000;
        let last = self.write_error_logged.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .write_error_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                code = e.code(),
                "Redis refused a write: publishers get an error code"
            );
        }
    }

    // ---- routes and subscriptions --------------------------------------

    fn route_add_cmds(&self, full: &ByteString, cmds: &mut Vec<Cmd>) {
        let mut n = self.local_routes.lock();
        let c = n.entry(full.clone()).or_insert(0);
        *c += 1;
        if *c > 1 {
            return;
        }
        drop(n);
        self.routes.write().add_node_route(&self.node, full);
        cmds.push(on_key("SADD", &keys::routes(&self.node), full.as_bytes()));
        cmds.push(route_event(b"r+", &self.node, full));
        if full.starts_with("$share/") {
            cmds.push(group_create(full));
            self.shares.lock().insert(full.clone());
        }
    }

    fn route_remove_cmds(&self, full: &ByteString, cmds: &mut Vec<Cmd>) {
        let mut n = self.local_routes.lock();
        match n.get_mut(full) {
            Some(c) if *c > 1 => {
                *c -= 1;
                return;
            }
            Some(_) => {
                n.remove(full);
            }
            None => return,
        }
        drop(n);
        self.routes.write().remove_node_route(&self.node, full);
        cmds.push(on_key("SREM", &keys::routes(&self.node), full.as_bytes()));
        cmds.push(route_event(b"r-", &self.node, full));
        if full.starts_with("$share/") {
            self.shares.lock().remove(full);
            // Entries this pod still holds stay pending (claimed by a
            // member elsewhere once idle); only an empty consumer goes.
            cmds.push(del_consumer(full, &self.node));
        }
    }

    fn psub_add_cmds(
        &self,
        client_id: &ByteString,
        full: &ByteString,
        o: SubscriptionOptions,
        sub_id: Option<u32>,
        cmds: &mut Vec<Cmd>,
    ) {
        let field = format!("{client_id}\n{full}");
        let enc = wire::encode_sub(o, sub_id);
        cmds.push(
            redis::cmd("HSET")
                .arg(keys::session(client_id))
                .arg(format!("sub:{full}"))
                .arg(&enc)
                .clone(),
        );
        if full.starts_with("$share/") {
            return;
        }
        self.routes.write().add_session(
            client_id,
            full,
            SessionSub {
                qos: o.qos,
                no_local: o.no_local,
            },
        );
        cmds.push(
            redis::cmd("HSET")
                .arg(keys::PSUBS)
                .arg(&field)
                .arg(&enc)
                .clone(),
        );
        cmds.push(event(&[
            ("t", b"p+"),
            ("n", self.node.as_bytes()),
            ("c", client_id.as_bytes()),
            ("f", full.as_bytes()),
            ("o", enc.as_bytes()),
        ]));
    }

    fn psub_remove_cmds(&self, client_id: &str, full: &str, cmds: &mut Vec<Cmd>) {
        self.routes.write().remove_session(client_id, full);
        cmds.push(
            redis::cmd("HDEL")
                .arg(keys::PSUBS)
                .arg(format!("{client_id}\n{full}"))
                .clone(),
        );
        cmds.push(event(&[
            ("t", b"p-"),
            ("n", self.node.as_bytes()),
            ("c", client_id.as_bytes()),
            ("f", full.as_bytes()),
        ]));
    }

    /// A local subscription was added: announce the route (once per pod)
    /// and, for a persistent session, store it. Returns when Redis has it.
    pub async fn subscribed(
        &self,
        session: &Session,
        full: &ByteString,
        o: SubscriptionOptions,
        sub_id: Option<u32>,
        existed: bool,
        store: bool,
    ) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        if !existed {
            self.route_add_cmds(full, &mut cmds);
        }
        if store && session.is_stream_fed() {
            self.psub_add_cmds(&session.client_id, full, o, sub_id, &mut cmds);
        }
        self.run_ordered(cmds).await
    }

    pub async fn unsubscribed(&self, session: &Session, full: &ByteString) {
        let mut cmds = Vec::new();
        self.route_remove_cmds(full, &mut cmds);
        if session.is_stream_fed() {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(keys::session(&session.client_id))
                    .arg(format!("sub:{full}"))
                    .clone(),
            );
            self.psub_remove_cmds(&session.client_id, full, &mut cmds);
        }
        let _ = self.run_ordered(cmds).await;
    }

    /// A local session let go of its subscriptions (ended or moved): the
    /// pod's routes shrink; persistent subscriptions stay in Redis.
    pub fn dropped_local(&self, filters: &[ByteString]) {
        let mut cmds = Vec::new();
        for f in filters {
            self.route_remove_cmds(f, &mut cmds);
        }
        self.run_later(cmds);
    }

    // ---- sessions ----------------------------------------------------

    /// Take ownership of a client's session (creating or resetting it) and
    /// tell a previous owner on another pod to let its connection go.
    pub async fn claim(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        will: Option<&LastWill>,
        epoch: u64,
    ) -> Result<Claim, StoreError> {
        if !self.is_ready() {
            return Err(StoreError::NotReady);
        }
        let will_delay = will.map_or(0, |w| w.properties.will_delay_interval.unwrap_or(0));
        let will = will.map(|w| wire::encode_will(w, client_id));
        let skey = keys::session(client_id);
        let reply = self
            .query_cmds(vec![session_eval(LUA_CLAIM, client_id)
                .arg(&*self.node)
                .arg(epoch)
                .arg(u8::from(clean_start))
                .arg(expiry)
                .arg(will.as_deref().unwrap_or_default())
                .arg(will_delay)
                .clone()])
            .await?;
        let r = reply
            .first()
            .and_then(as_array)
            .ok_or(StoreError::Reply("claim"))?;
        let prev_owner = r.first().and_then(as_str).unwrap_or_default();
        let present = r.get(2).and_then(as_int) == Some(1);
        let mut cmds = Vec::new();
        // A reset session's persistent subscriptions leave the table.
        if let Some(old) = r.get(3).and_then(as_array) {
            for f in old.iter().filter_map(as_str) {
                if let Some(filter) = f.strip_prefix("sub:") {
                    self.psub_remove_cmds(client_id, filter, &mut cmds);
                }
            }
        }
        cmds.push(
            redis::cmd("ZREM")
                .arg(keys::EXPIRY)
                .arg(&**client_id)
                .clone(),
        );
        cmds.push(
            redis::cmd("SADD")
                .arg(keys::node_sessions(&self.node))
                .arg(&**client_id)
                .clone(),
        );
        let prev_epoch = r.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
        if !prev_owner.is_empty() && prev_owner != &*self.node {
            debug!(client_id = %client_id, old = prev_owner, "taking the session over from another pod");
            // Never dropped, and aimed at that one connection: a kick that
            // arrives late cannot close a newer connection of the client.
            self.send_op(Op::Kick {
                node: Arc::from(prev_owner),
                client_id: client_id.clone(),
                epoch: prev_epoch,
            });
        }
        let mut claim = Claim {
            present,
            ..Claim::default()
        };
        if present {
            cmds.push(redis::cmd("HGETALL").arg(&skey).clone());
        }
        let n = cmds.len();
        let replies = self.query_cmds(cmds).await?;
        if present {
            let all = replies.get(n - 1).ok_or(StoreError::Reply("session"))?;
            for (k, v) in pairs(all) {
                let (Some(k), Some(v)) = (as_str(k), as_str(v)) else {
                    continue;
                };
                if let Some(filter) = k.strip_prefix("sub:") {
                    let (o, id) = wire::decode_sub(v)?;
                    claim.subs.push((ByteString::from(filter), o, id));
                } else if k == "rel" {
                    claim
                        .rel
                        .extend(v.split(',').filter_map(|p| p.parse::<u16>().ok()));
                } else if let Some(pid) = k.strip_prefix("r:").and_then(|p| p.parse().ok()) {
                    claim.rel.push(pid);
                } else if k == "hw" && !v.is_empty() {
                    claim.hw = Some(v.to_string());
                }
            }
        }
        debug!(client_id = %client_id, present = claim.present, rel = ?claim.rel, hw = ?claim.hw, "claimed");
        Ok(claim)
    }

    /// The connection of a session ended on this pod. `delayed_will`: the
    /// connection left a will with a delay, which Redis now keeps and a pod
    /// publishes when it is due (unless the client is back by then).
    pub async fn release(
        &self,
        client_id: &ByteString,
        epoch: u64,
        expiry: u32,
        rel: &[u16],
        delayed_will: bool,
    ) {
        self.stop_puller(client_id);
        let persistent = expiry > 0;
        let rel: Vec<String> = rel.iter().map(u16::to_string).collect();
        let reply = self
            .query_cmds(vec![session_eval(LUA_RELEASE, client_id)
                .arg(&*self.node)
                .arg(epoch)
                .arg(u8::from(persistent))
                .arg(expiry)
                .arg(rel.join(","))
                .arg(u8::from(delayed_will))
                .clone()])
            .await;
        let Ok(reply) = reply else { return };
        let r = Released::from_reply(reply.first());
        debug!(client_id = %client_id, code = r.code, "released");
        let mut cmds = vec![redis::cmd("SREM")
            .arg(keys::node_sessions(&self.node))
            .arg(&**client_id)
            .clone()];
        if r.code == 1 {
            self.went_offline_cmds(client_id, &r, &mut cmds);
        }
        self.run_later(cmds);
    }

    /// A session went offline: into the expiry
    /// (and delayed-will) schedules.
    fn went_offline_cmds(&self, client_id: &str, r: &Released, cmds: &mut Vec<Cmd>) {
        if r.expires_at > 0 {
            cmds.push(
                redis::cmd("ZADD")
                    .arg(keys::EXPIRY)
                    .arg(r.expires_at)
                    .arg(client_id)
                    .clone(),
            );
        }
        if r.will_due > 0 {
            cmds.push(
                redis::cmd("ZADD")
                    .arg(keys::WILLS)
                    .arg(r.will_due)
                    .arg(client_id)
                    .clone(),
            );
        }
    }

    /// Offline persistent sessions with an expiry, cluster-wide.
    pub async fn offline_sessions(&self) -> u64 {
        match self
            .query_cmds(vec![redis::cmd("ZCARD").arg(keys::EXPIRY).clone()])
            .await
        {
            Ok(r) => r.first().and_then(as_int).unwrap_or(0).max(0) as u64,
            Err(_) => 0,
        }
    }

    // ---- persistent session streams ------------------------------------

    /// Feed an online persistent session from its stream until it leaves.
    /// `start`: the last entry already read (entries after it are new).
    pub fn start_puller(
        self: &Arc<Self>,
        session: Arc<Session>,
        epoch: u64,
        hw: Option<String>,
        start: Option<String>,
    ) {
        let p = Arc::new(Puller {
            wake: Notify::new(),
            cancel: CancellationToken::new(),
        });
        if let Some(old) = self
            .pullers
            .lock()
            .insert(session.client_id.clone(), p.clone())
        {
            old.cancel.cancel();
        }
        self.tasks
            .spawn(self.clone().pull(session, epoch, p, hw, start));
    }

    pub fn stop_puller(&self, client_id: &ByteString) {
        if let Some(p) = self.pullers.lock().remove(client_id) {
            p.cancel.cancel();
        }
    }

    fn wake(&self, client_id: &str) {
        if let Some(p) = self.pullers.lock().get(client_id) {
            p.wake.notify_one();
        }
    }

    async fn pull(
        self: Arc<Self>,
        session: Arc<Session>,
        epoch: u64,
        p: Arc<Puller>,
        hw: Option<String>,
        start: Option<String>,
    ) {
        let Some(broker) = self.broker() else { return };
        let qkey = keys::queue(&session.client_id);
        let mut last: Option<String> = start;
        loop {
            let room = {
                let st = session.state.lock();
                if st.ended || st.epoch != epoch {
                    return;
                }
                self.max_queued
                    .saturating_sub(st.queue.len() + st.inflight.len())
            };
            let mut got = 0;
            let mut full = false;
            if room > 0 {
                let from = match &last {
                    Some(id) => format!("({id}"),
                    None => "-".to_string(),
                };
                let reply = self
                    .query_cmds(vec![redis::cmd("XRANGE")
                        .arg(&qkey)
                        .arg(from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(room.min(READ_COUNT))
                        .clone()])
                    .await;
                let Ok(reply) = reply else {
                    // Redis unreachable: try again (the supervisor tells
                    // when it is back; this read does not wait for that).
                    tokio::select! {
                        _ = p.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                };
                {
                    let list = reply.first().map(entries).unwrap_or_default();
                    if let Some(e) = list.last() {
                        // Entries read may have been sent: a later
                        // connection marks them DUP.
                        self.run_later(vec![redis::cmd("HSET")
                            .arg(keys::session(&session.client_id))
                            .arg("hw")
                            .arg(e.id)
                            .clone()]);
                    }
                    for e in list {
                        let id = ByteString::from(e.id);
                        let dup = hw.as_deref().is_some_and(|h| stream_id_le(&id, h));
                        let Some(b) = val_bytes(e.field("m")) else {
                            self.ack(&session.client_id, StoreAck::Session(id));
                            last = Some(e.id.to_string());
                            continue;
                        };
                        let stored = match wire::decode_message(b) {
                            Ok((m, _)) => {
                                let (m, span) = crate::trace::remote(m, "session");
                                span.in_scope(|| {
                                    broker.deliver_stored(&session, Arc::new(m), id.clone(), dup)
                                })
                            }
                            Err(err) => {
                                warn!(client_id = %session.client_id, error = %err, "dropping an unreadable stored message");
                                Stored::NotWanted
                            }
                        };
                        match stored {
                            Stored::Queued => {}
                            Stored::NotWanted => {
                                self.ack(&session.client_id, StoreAck::Session(id));
                            }
                            // The session ended here: what was read and not
                            // queued stays in the stream for the next owner.
                            Stored::Gone => return,
                            // Read it again once there is room.
                            Stored::Full => {
                                full = true;
                                break;
                            }
                        }
                        got += 1;
                        last = Some(e.id.to_string());
                    }
                }
            }
            if !full && got >= room.min(READ_COUNT) && got > 0 {
                continue;
            }
            // Publishers wake the owner of the session (Redis tells them
            // who it is): an idle session costs Redis nothing. A full queue
            // is looked at again shortly, as the client drains it.
            if room == 0 || full {
                tokio::select! {
                    _ = p.cancel.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                    _ = p.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            } else {
                tokio::select! {
                    _ = p.cancel.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                    _ = p.wake.notified() => {}
                }
            }
        }
    }

    // ---- readers ---------------------------------------------------------

    async fn blocking_conn(&self) -> Option<ReadConn> {
        match &self.client {
            Client::Single(c) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)));
                c.get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .ok()
                    .map(ReadConn::Single)
            }
            Client::Cluster(c) => c.get_async_connection().await.ok().map(ReadConn::Cluster),
        }
    }

    /// Load routes, owners and retained messages; returns the events id to
    /// follow from.
    async fn load_snapshot(&self) -> Result<String, StoreError> {
        let head = self
            .query_cmds(vec![
                redis::cmd("XREVRANGE")
                    .arg(keys::EVENTS)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .clone(),
                redis::cmd("ZRANGE").arg(keys::NODES).arg(0).arg(-1).clone(),
                redis::cmd("HGETALL").arg(keys::PSUBS).clone(),
                redis::cmd("HGETALL").arg(keys::RETAINED).clone(),
            ])
            .await?;
        let [ev, nodes, psubs, retained] = &head[..] else {
            return Err(StoreError::Reply("snapshot"));
        };
        let last = entries(ev)
            .first()
            .map_or_else(|| "0-0".to_string(), |e| e.id.to_string());
        let nodes: Vec<&str> = as_array(nodes)
            .unwrap_or_default()
            .iter()
            .filter_map(as_str)
            .collect();
        let route_sets = self
            .query_cmds(
                nodes
                    .iter()
                    .map(|n| redis::cmd("SMEMBERS").arg(keys::routes(n)).clone())
                    .collect(),
            )
            .await?;
        let mut table = RemoteRoutes::default();
        for (n, set) in nodes.iter().zip(&route_sets) {
            let node: Arc<str> = Arc::from(*n);
            for f in as_array(set).unwrap_or_default().iter().filter_map(as_str) {
                table.add_node_route(&node, &ByteString::from(f));
            }
        }
        for (k, v) in pairs(psubs) {
            let (Some(k), Some(v)) = (as_str(k), as_str(v)) else {
                continue;
            };
            let Some((cid, filter)) = k.split_once('\n') else {
                continue;
            };
            if let Ok((o, _)) = wire::decode_sub(v) {
                table.add_session(
                    &ByteString::from(cid),
                    filter,
                    SessionSub {
                        qos: o.qos,
                        no_local: o.no_local,
                    },
                );
            }
        }
        // This pod's own routes are re-added: after a Redis restart they
        // come back through `resync`, but matching must not miss them.
        for f in self.local_routes.lock().keys() {
            table.add_node_route(&self.node, f);
        }
        *self.routes.write() = table;
        if let Some(b) = self.broker() {
            let mut msgs = Vec::new();
            for (_, v) in pairs(retained) {
                if let Some(Ok((m, _))) = val_bytes(Some(v)).map(wire::decode_message) {
                    msgs.push(Arc::new(m));
                }
            }
            b.replace_retained(msgs);
        }
        Ok(last)
    }

    /// Follow the events stream, after loading the snapshot.
    async fn events_reader(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some(mut con) = self.blocking_conn().await else {
                self.reader_ok.store(false, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            let mut ev_id = match self.load_snapshot().await {
                Ok(id) => id,
                Err(e) => {
                    debug!(error = %e, "snapshot failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.reader_ok.store(true, Ordering::Relaxed);
            loop {
                let read = xread(keys::EVENTS, &ev_id);
                let reply = tokio::select! {
                    r = con.run(&read) => r,
                    _ = self.shutdown.cancelled() => return,
                };
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed("events read", &e);
                        self.reader_ok.store(false, Ordering::Relaxed);
                        break;
                    }
                };
                for (_, list) in streams(&reply) {
                    for e in &list {
                        self.on_event(e);
                    }
                    if let Some(e) = list.last() {
                        ev_id = e.id.to_string();
                    }
                }
            }
        }
    }

    /// Follow this pod's inbox: messages from other pods, wakes, kicks.
    async fn inbox_reader(self: Arc<Self>) {
        let inbox = keys::inbox(&self.node);
        // Kept across reconnects, so a Redis blip redelivers nothing.
        let mut in_id = "0-0".to_string();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some(mut con) = self.blocking_conn().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let read = xread(&inbox, &in_id);
                let reply = tokio::select! {
                    r = con.run(&read) => r,
                    _ = self.shutdown.cancelled() => return,
                };
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed("inbox read", &e);
                        break;
                    }
                };
                let mut trim = None;
                for (_, list) in streams(&reply) {
                    for e in &list {
                        // Never waits for a subscriber: one that falls
                        // behind fills its own bounded queue (counted
                        // drops), and the others on this pod go on.
                        self.on_inbox(e);
                    }
                    if let Some(e) = list.last() {
                        in_id = e.id.to_string();
                        trim = Some(in_id.clone());
                    }
                }
                if let Some(id) = trim {
                    // Everything before what was just read is delivered.
                    self.run_later(vec![trim_before(&inbox, &id)]);
                }
            }
        }
    }

    fn on_inbox(&self, e: &Entry<'_>) {
        let Some(broker) = self.broker() else { return };
        let Some(batch) = val_bytes(e.field("b")) else {
            return;
        };
        for rec in wire::records(batch) {
            match rec {
                Ok((wire::REC_MESSAGE, b)) => match wire::decode_message(b) {
                    Ok((m, _)) => {
                        let (m, span) = crate::trace::remote(m, "inbox");
                        span.in_scope(|| broker.deliver_remote(Arc::new(m)));
                    }
                    Err(err) => warn!(error = %err, "unreadable message in the inbox"),
                },
                Ok((wire::REC_WAKE, b)) => {
                    if let Ok(cid) = std::str::from_utf8(&b) {
                        self.wake(cid);
                    }
                }
                Ok((wire::REC_KICK, b)) => match wire::parse_kick(b) {
                    Ok((cid, epoch)) => broker.kick_local(&cid, Some(epoch)),
                    Err(err) => warn!(error = %err, "unreadable kick in the inbox"),
                },
                Ok(_) => {}
                Err(err) => {
                    warn!(error = %err, "unreadable inbox entry");
                    break;
                }
            }
        }
    }

    fn on_event(&self, e: &Entry<'_>) {
        let s = |k: &str| e.field(k).and_then(as_str);
        let Some(t) = s("t") else { return };
        match t {
            "r+" | "r-" => {
                let (Some(n), Some(f)) = (s("n"), s("f")) else {
                    return;
                };
                let mut r = self.routes.write();
                if t == "r+" {
                    r.add_node_route(&Arc::from(n), &ByteString::from(f));
                } else if n != &*self.node || !self.local_routes.lock().contains_key(f) {
                    r.remove_node_route(n, f);
                }
            }
            "p+" => {
                let (Some(c), Some(f), Some(o)) = (s("c"), s("f"), s("o")) else {
                    return;
                };
                if let Ok((o, _)) = wire::decode_sub(o) {
                    self.routes.write().add_session(
                        &ByteString::from(c),
                        f,
                        SessionSub {
                            qos: o.qos,
                            no_local: o.no_local,
                        },
                    );
                }
            }
            "p-" => {
                if let (Some(c), Some(f)) = (s("c"), s("f")) {
                    self.routes.write().remove_session(c, f);
                }
            }
            "rs" => {
                if s("n") == Some(&*self.node) {
                    return;
                }
                if let (Some(b), Some(broker)) = (val_bytes(e.field("m")), self.broker()) {
                    if let Ok((m, _)) = wire::decode_message(b) {
                        broker.mirror_retained(Arc::new(m));
                    }
                }
            }
            "rd" => {
                if s("n") == Some(&*self.node) {
                    return;
                }
                if let (Some(k), Some(broker)) = (s("k"), self.broker()) {
                    broker.mirror_retained(Arc::new(Message::from_wire(
                        ByteString::from(k),
                        Bytes::new(),
                        QoS::AtMostOnce,
                        true,
                        Default::default(),
                        None,
                    )));
                }
            }
            "dead" | "hello" => {
                if let Some(n) = s("n") {
                    if n != &*self.node {
                        self.routes.write().drop_node(n);
                    }
                }
            }
            _ => {}
        }
    }

    /// Read the shared-subscription streams this pod has members for.
    async fn share_reader(self: Arc<Self>) {
        let mut con = None;
        let mut last_claim = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            // Only groups with a member online here: the others' entries
            // stay unread for the pods that can deliver them.
            let keys_now: Vec<ByteString> = match self.broker() {
                Some(b) => self
                    .shares
                    .lock()
                    .iter()
                    .filter(|f| b.serves_share(f))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            if keys_now.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                continue;
            }
            if con.is_none() {
                con = self.blocking_conn().await;
                if con.is_none() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            let Some(c) = con.as_mut() else { continue };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(keys::GROUP)
                .arg(&*self.node)
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS");
            for k in &keys_now {
                cmd.arg(keys::share(k));
            }
            for _ in &keys_now {
                cmd.arg(">");
            }
            let reply = tokio::select! {
                r = c.run(&cmd) => r,
                _ = self.shutdown.cancelled() => return,
            };
            match reply {
                Ok(v) => self.on_shared(&keys_now, &v).await,
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // Redis lost the group (restart): make it again.
                        self.ensure_groups(&keys_now).await;
                    } else {
                        self.failed("shared read", &e);
                        con = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            if last_claim.elapsed() > Duration::from_secs(2) {
                last_claim = Instant::now();
                self.claim_abandoned(&keys_now).await;
            }
        }
    }

    async fn ensure_groups(&self, fulls: &[ByteString]) {
        for f in fulls {
            let _ = self.query_cmds(vec![group_create(f)]).await;
        }
    }

    async fn on_shared(&self, fulls: &[ByteString], reply: &Value) {
        let mut acks = Vec::new();
        for (key, list) in streams(reply) {
            let Some(full) = fulls.iter().find(|f| keys::share(f) == key) else {
                continue;
            };
            for e in list {
                if self.deliver_share_entry(full, &e) {
                    acks.push(xack(key, e.id));
                }
            }
        }
        self.run_later(acks);
    }

    /// Hand one entry of a shared group's stream to a member here. True
    /// when the entry can be acknowledged in the group now (QoS 0, or
    /// unreadable); a queued QoS 1/2 entry is acknowledged when the
    /// member's client has it, and one that found no member stays pending
    /// (claimed again once idle, here or on another pod).
    fn deliver_share_entry(&self, full: &ByteString, e: &Entry<'_>) -> bool {
        let Some(broker) = self.broker() else {
            return false;
        };
        let id = ByteString::from(e.id);
        let Some(Ok((m, _))) = val_bytes(e.field("m")).map(wire::decode_message) else {
            warn!(filter = %full, "dropping an unreadable shared-group entry");
            return true;
        };
        let (m, span) = crate::trace::remote(m, "share");
        // Marked held first: the member's client may acknowledge it at once.
        let key = (full.clone(), id.clone());
        self.share_held.lock().insert(key.clone());
        let stored = span.in_scope(|| broker.deliver_shared(full, Arc::new(m), &id));
        if stored != Stored::Queued {
            self.share_held.lock().remove(&key);
        }
        stored == Stored::NotWanted
    }

    /// Entries of a shared group read by a pod that died (or by a member
    /// here that left) before its client acknowledged them go to a member
    /// here, once idle for the node timeout. Entries a client here still
    /// holds are left alone.
    async fn claim_abandoned(&self, fulls: &[ByteString]) {
        let idle_ms = self.node_timeout.as_millis() as u64;
        let cmds = fulls
            .iter()
            .map(|f| {
                redis::cmd("XAUTOCLAIM")
                    .arg(keys::share(f))
                    .arg(keys::GROUP)
                    .arg(&*self.node)
                    .arg(idle_ms)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .clone()
            })
            .collect();
        let Ok(replies) = self.query_cmds(cmds).await else {
            return;
        };
        let mut acks = Vec::new();
        let mut trims = Vec::new();
        for (full, r) in fulls.iter().zip(&replies) {
            let key = keys::share(full);
            let Some(list) = as_array(r).and_then(|a| a.get(1)) else {
                continue;
            };
            for e in entries(list) {
                let held = self
                    .share_held
                    .lock()
                    .contains(&(full.clone(), ByteString::from(e.id)));
                if !held && self.deliver_share_entry(full, &e) {
                    acks.push(xack(&key, e.id));
                }
            }
            trims.push(key);
        }
        self.run_later(acks);
        self.trim_shares(trims).await;
    }

    /// Trim a share stream to what its group has not yet read or
    /// acknowledged; never past a pending entry.
    async fn trim_shares(&self, keys_: Vec<String>) {
        for key in keys_ {
            let Ok(r) = self
                .query_cmds(vec![
                    redis::cmd("XINFO").arg("GROUPS").arg(&key).clone(),
                    redis::cmd("XPENDING").arg(&key).arg(keys::GROUP).clone(),
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(&key)
                        .arg(keys::GROUP)
                        .clone(),
                ])
                .await
            else {
                continue;
            };
            let [groups, pending, consumers] = &r[..] else {
                continue;
            };
            // Consumers of pods long gone (or idle) that hold nothing are
            // removed, so the group does not grow with every pod ever
            // started; a live pod's consumer comes back with its next read.
            let mut gone = Vec::new();
            for c in as_array(consumers).unwrap_or_default() {
                let p = pairs(c);
                let get = |name: &str| {
                    p.iter()
                        .find(|(k, _)| as_str(k) == Some(name))
                        .map(|(_, v)| *v)
                };
                let name = get("name").and_then(as_str).unwrap_or_default();
                let pending = get("pending").and_then(as_int).unwrap_or(1);
                let idle = get("idle").and_then(as_int).unwrap_or(0);
                if pending == 0 && idle > CONSUMER_IDLE_MS && name != &*self.node {
                    if let Some(full) = key.strip_prefix(keys::share("").as_str()) {
                        gone.push(del_consumer(full, name));
                    }
                }
            }
            self.run_later(gone);
            let mut min_id: Option<String> = None;
            for g in as_array(groups).unwrap_or_default() {
                let p = pairs(g);
                let get = |name: &str| {
                    p.iter()
                        .find(|(k, _)| as_str(k) == Some(name))
                        .and_then(|(_, v)| as_str(v))
                };
                if let Some(id) = get("last-delivered-id") {
                    if min_id.as_deref().is_none_or(|m| stream_id_le(id, m)) {
                        min_id = Some(id.to_string());
                    }
                }
            }
            // XPENDING summary: [count, smallest id, greatest id, consumers]
            if let Some(first) = as_array(pending).and_then(|a| a.get(1)).and_then(as_str) {
                if min_id.as_deref().is_none_or(|m| stream_id_le(first, m)) {
                    min_id = Some(first.to_string());
                }
            }
            if let Some(id) = min_id {
                self.run_later(vec![trim_before(&key, &id)]);
            }
        }
    }

    // ---- liveness ----------------------------------------------------------

    /// One heartbeat, by Redis's clock. `Ok(None)`: this pod was not
    /// registered (Redis lost it, or the others declared it dead);
    /// `Ok(Some(gap))`: milliseconds since its previous heartbeat.
    async fn heartbeat(&self) -> Result<Option<u64>, StoreError> {
        let r = self
            .query_cmds(vec![eval(LUA_HEARTBEAT, &[keys::NODES, keys::STEADY])
                .arg(&*self.node)
                .arg(self.node_timeout.as_millis() as u64)
                .clone()])
            .await?;
        check_all(&r)?;
        let gap = r.first().and_then(as_int).unwrap_or(-1);
        Ok(u64::try_from(gap).ok())
    }

    /// How often this pod writes its heartbeat: several times per node
    /// timeout, so that one late beat never makes it look dead.
    fn beat_every(&self) -> Duration {
        (self.node_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Heartbeats and recovery after an outage. Nothing slow runs here:
    /// clean-up of dead pods and expiries is the sweeper's.
    async fn supervisor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.beat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => {
                    self.leave().await;
                    return;
                }
            }
            n += 1;
            let was_healthy = self.healthy.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let beat = self.heartbeat().await;
            let rtt = t0.elapsed();
            let gap = match beat {
                Ok(g) => g,
                Err(_) => {
                    self.unsteady();
                    continue;
                }
            };
            // Redis's clock jumped for this pod (Redis or this pod was
            // paused), or Redis answered slowly: the other pods may not
            // have had their turn to beat. Nobody is declared dead by this
            // pod until it has seen a whole node timeout of steady beats.
            let jumped = gap.is_none_or(|g| g > (self.node_timeout / 2).as_millis() as u64);
            if jumped || rtt > self.node_timeout / 4 {
                self.unsteady();
            }
            if gap.is_none() && was_healthy {
                // Declared dead while alive (a pause longer than the node
                // timeout): the others dropped this pod's routes and
                // released its sessions. Announce everything again.
                warn!("this pod was taken for dead; announcing its routes and sessions again");
                self.healthy.store(false, Ordering::Relaxed);
            }
            if !self.healthy.load(Ordering::Relaxed) {
                match self.resync().await {
                    Ok(()) => {
                        self.healthy.store(true, Ordering::Relaxed);
                        info!("Redis is back: accepting connections again");
                    }
                    Err(e) => {
                        debug!(error = %e, "resync failed");
                        continue;
                    }
                }
            }
            if n.is_multiple_of(4) {
                if let Ok(r) = self
                    .query_cmds(vec![redis::cmd("XLEN")
                        .arg(keys::inbox(&self.node))
                        .clone()])
                    .await
                {
                    let lag = r.first().and_then(as_int).unwrap_or(0).max(0) as u64;
                    self.stream_lag.store(lag, Ordering::Relaxed);
                }
            }
        }
    }

    /// Not steady: no pod is declared dead from here for a node timeout.
    fn unsteady(&self) {
        *self.steady_since.lock() = Instant::now();
    }

    /// Dead pods, due wills and expired sessions, off the heartbeat path:
    /// a slow clean-up never delays this pod's heartbeats.
    async fn sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if !self.is_ready() {
                continue;
            }
            if self.steady_since.lock().elapsed() >= self.node_timeout {
                self.sweep_dead_nodes().await;
            }
            self.fire_due_wills().await;
            self.sweep_expired().await;
        }
    }

    /// Write this pod's state again: its node entry, routes and sessions.
    /// Runs at start and after Redis was unreachable (it may have restarted
    /// empty, or declared this pod dead meanwhile).
    async fn resync(&self) -> Result<(), StoreError> {
        let routes: Vec<ByteString> = self.local_routes.lock().keys().cloned().collect();
        let mut cmds = vec![
            redis::cmd("DEL").arg(keys::routes(&self.node)).clone(),
            event(&[("t", b"hello"), ("n", self.node.as_bytes())]),
        ];
        for f in &routes {
            cmds.push(on_key("SADD", &keys::routes(&self.node), f.as_bytes()));
            cmds.push(route_event(b"r+", &self.node, f));
            if f.starts_with("$share/") {
                cmds.push(group_create(f));
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c);
        }
        self.query(&pipe).await?;
        let Some(broker) = self.broker() else {
            return Ok(());
        };
        for (session, epoch, expiry) in broker.local_sessions() {
            let cid = &session.client_id;
            let r = self
                .query_cmds(vec![session_eval(LUA_RECLAIM, cid)
                    .arg(&*self.node)
                    .arg(epoch)
                    .arg(expiry)
                    .clone()])
                .await?;
            match r.first().and_then(as_int) {
                Some(0) => broker.kick_local(cid, None),
                Some(existed) => {
                    let mut cmds = vec![redis::cmd("SADD")
                        .arg(keys::node_sessions(&self.node))
                        .arg(&**cid)
                        .clone()];
                    if session.is_stream_fed() && existed == 1 {
                        // Redis lost it: write the subscriptions back.
                        let subs: Vec<_> = session
                            .state
                            .lock()
                            .subscriptions
                            .iter()
                            .map(|(f, e)| (f.clone(), e.options, e.sub_id))
                            .collect();
                        for (f, o, id) in subs {
                            self.psub_add_cmds(cid, &f, o, id, &mut cmds);
                        }
                    }
                    self.query_cmds(cmds).await?;
                }
                None => return Err(StoreError::Reply("reclaim")),
            }
        }
        Ok(())
    }

    async fn sweep_dead_nodes(&self) {
        let timeout_ms = self.node_timeout.as_millis() as u64;
        let Ok(r) = self
            .query_cmds(vec![eval(LUA_DEAD, &[keys::NODES, keys::STEADY])
                .arg(timeout_ms)
                .arg(100)
                .arg(&*self.node)
                .clone()])
            .await
        else {
            return;
        };
        let dead: Vec<String> = str_list(r.first())
            .into_iter()
            .filter(|n| *n != &*self.node)
            .map(str::to_string)
            .collect();
        for node in dead {
            let lock = self
                .query_cmds(vec![redis::cmd("SET")
                    .arg(keys::lock(&node))
                    .arg(&*self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_MS)
                    .clone()])
                .await;
            if !matches!(lock.as_deref(), Ok([Value::Okay])) {
                continue;
            }
            if let Err(e) = self.clean_up_node(&node).await {
                warn!(node, error = %e, "cleaning up a dead pod failed; will retry");
                let _ = self
                    .query_cmds(vec![redis::cmd("DEL").arg(keys::lock(&node)).clone()])
                    .await;
            }
        }
    }

    /// A pod died: its sessions are released (persistent ones go offline,
    /// the others end), their wills published — once, and only for
    /// sessions still held by that pod — or scheduled when they have a
    /// delay, and its routes dropped. Done in pipelined steps of
    /// [`CLEANUP_STEP`] sessions, renewing the lock between steps.
    async fn clean_up_node(&self, node: &str) -> Result<(), StoreError> {
        info!(
            node,
            "a pod stopped sending heartbeats: taking over its clients' wills and sessions"
        );
        let r = self
            .query_cmds(vec![
                redis::cmd("SMEMBERS")
                    .arg(keys::node_sessions(node))
                    .clone(),
                redis::cmd("SMEMBERS").arg(keys::routes(node)).clone(),
            ])
            .await?;
        check_all(&r)?;
        let cids: Vec<String> = str_list(r.first())
            .into_iter()
            .map(str::to_string)
            .collect();
        let routes: Vec<String> = str_list(r.get(1)).into_iter().map(str::to_string).collect();
        let broker = self.broker();
        for chunk in cids.chunks(CLEANUP_STEP) {
            let cmds = chunk
                .iter()
                .map(|cid| {
                    // Persistent or not is the session's own business: the
                    // script reads its expiry.
                    eval(LUA_RELEASE_DEAD, &[&keys::session(cid), &keys::queue(cid)])
                        .arg(node)
                        .clone()
                })
                .collect();
            let replies = self.query_cmds(cmds).await?;
            check_all(&replies)?;
            let mut after = vec![eval(LUA_RENEW, &[&keys::lock(node)])
                .arg(&*self.node)
                .arg(LOCK_MS)
                .clone()];
            for (cid, reply) in chunk.iter().zip(&replies) {
                let rel = Released::from_reply(Some(reply));
                if rel.code == 1 {
                    self.went_offline_cmds(cid, &rel, &mut after);
                }
                if let (Some(w), Some(b)) = (&rel.will, &broker) {
                    if let Ok((m, _delay)) = wire::decode_message(w.clone()) {
                        b.publish_message(Arc::new(m));
                    }
                }
            }
            check_all(&self.query_cmds(after).await?)?;
        }
        // One key per DEL: the inbox lives in the pod's own slot, and a
        // multi-key DEL across slots fails on Redis Cluster (CROSSSLOT).
        let mut cmds = vec![
            redis::cmd("DEL").arg(keys::routes(node)).clone(),
            redis::cmd("DEL").arg(keys::node_sessions(node)).clone(),
            redis::cmd("DEL").arg(keys::inbox(node)).clone(),
            redis::cmd("ZREM").arg(keys::NODES).arg(node).clone(),
            redis::cmd("HDEL").arg(keys::STEADY).arg(node).clone(),
            event(&[("t", b"dead"), ("n", node.as_bytes())]),
        ];
        for f in routes.iter().filter(|f| f.starts_with("$share/")) {
            cmds.push(del_consumer(f, node));
        }
        check_all(&self.query_cmds(cmds).await?)?;
        self.routes.write().drop_node(node);
        Ok(())
    }

    /// Delayed wills whose time came (by Redis's clock), each published by
    /// exactly one pod and only if its client is still away.
    async fn fire_due_wills(&self) {
        let Ok(r) = self
            .query_cmds(vec![eval(LUA_DUE, &[keys::WILLS]).arg(SWEEP_BATCH).clone()])
            .await
        else {
            return;
        };
        let cids: Vec<String> = str_list(r.first())
            .into_iter()
            .map(str::to_string)
            .collect();
        if cids.is_empty() {
            return;
        }
        let mut cmds = Vec::with_capacity(cids.len() * 2);
        for cid in &cids {
            cmds.push(eval(LUA_FIRE_WILL, &[&keys::session(cid)]));
            cmds.push(redis::cmd("ZREM").arg(keys::WILLS).arg(cid).clone());
        }
        let Ok(replies) = self.query_cmds(cmds).await else {
            return;
        };
        let Some(broker) = self.broker() else { return };
        for r in replies.iter().step_by(2) {
            if let Some(w) = val_bytes(Some(r)).filter(|b| !b.is_empty()) {
                if let Ok((m, _)) = wire::decode_message(w) {
                    broker.publish_message(Arc::new(m));
                }
            }
        }
    }

    /// Offline sessions whose expiry passed (by Redis's clock), in
    /// pipelined batches until none is due or the step's time is spent:
    /// keeps up with thousands of expiries a second.
    async fn sweep_expired(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            let Ok(r) = self
                .query_cmds(vec![eval(LUA_DUE, &[keys::EXPIRY])
                    .arg(SWEEP_BATCH)
                    .clone()])
                .await
            else {
                return;
            };
            let cids: Vec<String> = str_list(r.first())
                .into_iter()
                .map(str::to_string)
                .collect();
            if cids.is_empty() {
                return;
            }
            let mut cmds = Vec::with_capacity(cids.len() * 2);
            for cid in &cids {
                cmds.push(session_eval(LUA_EXPIRE, cid));
                cmds.push(redis::cmd("ZREM").arg(keys::EXPIRY).arg(cid).clone());
            }
            let Ok(replies) = self.query_cmds(cmds).await else {
                return;
            };
            let broker = self.broker();
            let mut after = Vec::new();
            for (cid, r) in cids.iter().zip(replies.iter().step_by(2)) {
                let Some(a) = as_array(r) else { continue };
                if a.first().and_then(as_int) != Some(1) {
                    continue;
                }
                for f in str_list(a.get(1)) {
                    if let Some(filter) = f.strip_prefix("sub:") {
                        self.psub_remove_cmds(cid, filter, &mut after);
                    }
                }
                after.push(redis::cmd("ZREM").arg(keys::WILLS).arg(cid).clone());
                // The session ended: a will still waiting goes now.
                if let (Some(w), Some(b)) = (val_bytes(a.get(2)).filter(|b| !b.is_empty()), &broker)
                {
                    if let Ok((m, _)) = wire::decode_message(w) {
                        b.publish_message(Arc::new(m));
                    }
                }
                debug!(client_id = cid, "session expired");
            }
            self.run_later(after);
            if cids.len() < SWEEP_BATCH {
                return;
            }
        }
    }

    /// Graceful exit: routes and node entry removed so that nobody sends
    /// here any more.
    async fn leave(&self) {
        let _ = self
            .query_cmds(vec![
                redis::cmd("DEL").arg(keys::routes(&self.node)).clone(),
                redis::cmd("DEL").arg(keys::inbox(&self.node)).clone(),
                redis::cmd("ZREM").arg(keys::NODES).arg(&*self.node).clone(),
                redis::cmd("HDEL")
                    .arg(keys::STEADY)
                    .arg(&*self.node)
                    .clone(),
                event(&[("t", b"dead"), ("n", self.node.as_bytes())]),
            ])
            .await;
    }
}

/// The first error reply of a pipeline, as an error.
fn check_all(replies: &[Value]) -> Result<(), StoreError> {
    match replies.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e),
        _ => None,
    }) {
        Some(e) => Err(StoreError::Server(e.code().to_string())),
        None => Ok(()),
    }
}

fn xack(key: &str, id: &str) -> Cmd {
    redis::cmd("XACK").arg(key).arg(keys::GROUP).arg(id).clone()
}

/// Remove a consumer from a shared group only when it holds no pending
/// entry (`XGROUP DELCONSUMER` would drop them): KEYS[1] the stream,
/// ARGV[1] the group, ARGV[2] the consumer.
const LUA_DELCONSUMER: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])";

fn del_consumer(full: &str, consumer: &str) -> Cmd {
    eval(LUA_DELCONSUMER, &[&keys::share(full)])
        .arg(keys::GROUP)
        .arg(consumer)
        .clone()
}

fn xread(key: &str, after: &str) -> Cmd {
    redis::cmd("XREAD")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .clone()
}

/// Connect to one Redis or to a Redis Cluster.
async fn connect(cfg: &ClusterConfig) -> anyhow::Result<(Client, Conn)> {
    let urls: Vec<&str> = cfg
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let certs = match &cfg.ca_file {
        Some(p) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(
                std::fs::read(p)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
            ),
        }),
        None => None,
    };
    // Never echo the URL: it may hold a password.
    let bad = |e: redis::RedisError| anyhow::anyhow!("invalid Redis URL ({:?})", e.kind());
    if cfg.cluster || urls.len() > 1 {
        let mut b = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(2);
        if let Some(c) = certs {
            b = b.certs(c);
        }
        let client = b.build().map_err(bad)?;
        let con = client
            .get_async_connection()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the Redis Cluster: {}", e))?;
        return Ok((Client::Cluster(client), Conn::Cluster(con)));
    }
    let url = urls.first().copied().unwrap_or_default();
    let client = match certs {
        Some(c) => redis::Client::build_with_tls(url, c),
        None => redis::Client::open(url),
    }
    .map_err(bad)?;
    let mgr_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let con = client
        .get_connection_manager_with_config(mgr_cfg)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to Redis: {}", e))?;
    Ok((Client::Single(client), Conn::Single(con)))
}

/// Run a pipeline on a Redis Cluster: one pipeline per slot, all at once,
/// with the replies put back in the original order.
async fn query_sharded(
    con: &ClusterConnection,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    let mut groups: HashMap<u16, (Vec<usize>, redis::Pipeline)> = HashMap::new();
    let mut n = 0;
    for (i, c) in pipe.cmd_iter().enumerate() {
        n = i + 1;
        let s = cmd_key(c).map_or(0, |k| slot(&k));
        let g = groups.entry(s).or_insert_with(|| {
            let mut p = redis::pipe();
            p.ignore_errors();
            (Vec::new(), p)
        });
        g.0.push(i);
        g.1.add_command(c.clone());
    }
    let runs = groups.into_values().map(|(idx, p)| {
        let mut con = con.clone();
        async move { (idx, p.query_async::<Vec<Value>>(&mut con).await) }
    });
    let mut out = vec![Value::Nil; n];
    for (idx, r) in futures_util::future::join_all(runs).await {
        for (i, v) in idx.into_iter().zip(r?) {
            if let Some(slot) = out.get_mut(i) {
                *slot = v;
            }
        }
    }
    Ok(out)
}

/// `a <= b` for stream ids `ms-seq`.
pub fn stream_id_le(a: &str, b: &str) -> bool {
    fn parse(s: &str) -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parse(a) <= parse(b)
}

/// Build the delivery of a stored message for a session from its current
/// subscriptions; `None` when none matches any more.
pub fn delivery_for(
    subs: &HashMap<ByteString, crate::session::SubscriptionEntry>,
    msg: Arc<Message>,
) -> Option<Delivery> {
    let mut qos = None::<QoS>;
    let mut retain = false;
    let mut sub_ids = Vec::new();
    for (f, e) in subs {
        if f.starts_with("$share/") || !cirrus_codec::topic::matches(f, &msg.topic) {
            continue;
        }
        qos = Some(qos.map_or(e.options.qos, |q| q.max(e.options.qos)));
        retain |= e.options.retain_as_published && msg.retain;
        if let Some(id) = e.sub_id {
            sub_ids.push(id);
        }
    }
    let q = qos?;
    Some(Delivery {
        qos: q.min(msg.qos),
        msg,
        retain,
        sub_ids,
        ack: None,
        dup: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification's examples.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(
            slot(&keys::session("c").into_bytes()),
            slot(&keys::queue("c").into_bytes())
        );
        assert_eq!(slot(keys::EVENTS.as_bytes()), slot(keys::PSUBS.as_bytes()));
        assert_eq!(
            cmd_key(&eval("x", &["k1", "k2"])).as_deref(),
            Some(&b"k1"[..])
        );
        assert_eq!(
            cmd_key(redis::cmd("XGROUP").arg("CREATE").arg("s")).as_deref(),
            Some(&b"s"[..])
        );
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(stream_id_le("5-1", "10-0"));
        assert!(stream_id_le("10-2", "10-10"));
        assert!(!stream_id_le("10-10", "10-2"));
        assert!(stream_id_le("7-0", "7-0"));
    }

    #[test]
    fn replies_of_any_shape_never_panic() {
        let odd = [
            Value::Nil,
            Value::Int(3),
            Value::Array(vec![Value::Nil, Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::BulkString(b"k".to_vec()),
                Value::Array(vec![Value::Array(vec![Value::Int(1)])]),
            ])]),
            Value::Map(vec![(Value::Nil, Value::Nil)]),
        ];
        for v in &odd {
            let _ = streams(v);
            let _ = entries(v);
            let _ = pairs(v);
        }
        let good = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"m".to_vec()),
                    Value::BulkString(b"x".to_vec()),
                ]),
            ])]),
        ])]);
        let s = streams(&good);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "s");
        assert_eq!(s[0].1[0].id, "1-0");
        assert_eq!(as_bytes(s[0].1[0].field("m").unwrap()), Some(&b"x"[..]));
    }
}
