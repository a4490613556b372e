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
use std::sync::Arc;
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

use crate::local::{Local, Stored};
use crate::message::{Delivery, Message, StoreAck};
use crate::session::Session;
use crate::stats::{DropReason, Stats};
pub use routes::{RemoteRoutes, SessionSub, Targets};

mod client;
mod commands;
mod events;
mod inbox;
mod keys;
mod liveness;
mod replies;
mod scripts;
mod sessions;
mod shared;
mod subscriptions;
mod writer;

use client::*;
use commands::*;
use events::Event;
pub use liveness::PodRevision;
use replies::*;
use scripts::*;
pub use writer::{Op, Pending};

/// Events kept in the change stream; a pod further behind than this
/// reloads the snapshot.
const EVENTS_MAXLEN: usize = 100_000;

/// Operations waiting for the writer; a full queue slows publishers down.
const OPS_QUEUE: usize = 16_384;

/// Operations per pipeline.
const BATCH_MAX: usize = 2048;

/// Inbox entries (each a batch of records) kept for a pod that does not
/// read them: a pod stalled that long loses the oldest transient messages
/// (QoS 0, and QoS 1/2 for sessions that end with their connection),
/// counted (`inbox_cut`); persistent sessions and shared groups have
/// streams of their own. The default of `redis.inbox_max_entries`.
pub const INBOX_MAXLEN: u64 = 100_000;

/// At most this often the inbox reader compares what it read with what was
/// added (one `XINFO STREAM`), unless a read came back full.
const INBOX_CHECK_EVERY: Duration = Duration::from_secs(1);

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

/// Sessions whose serving pod a writer remembers (see `owner_hints`).
const OWNER_HINTS_MAX: usize = 100_000;
/// Longest the inbox reader waits for a backlogged local subscriber.
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(50);
/// Entries per stream read.
const READ_COUNT: usize = 512;

/// Redis store settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
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
    /// Writes someone waits for count only once replicas hold them.
    pub replicated: Option<Replicated>,
    /// Cap of this pod's inbox stream (see [`INBOX_MAXLEN`]).
    pub inbox_max: u64,
}

/// `redis.durability: replicated`: after each pipeline that carries a
/// write someone waits for, `WAIT replicas timeout` on every primary it
/// went to.
#[derive(Debug, Clone, Copy)]
pub struct Replicated {
    pub replicas: u32,
    pub timeout: Duration,
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

struct Puller {
    wake: Notify,
    cancel: CancellationToken,
}

pub struct RedisStore {
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
    /// The pod's memory: where what comes from other pods goes.
    local: Arc<Local>,
    node_timeout: Duration,
    replicated: Option<Replicated>,
    max_queued: usize,
    inbox_max: u64,
    pub redis_errors: AtomicU64,
    /// Commands whose writes the replicas did not confirm in time.
    pub unreplicated: AtomicU64,
    pub redis_commands: AtomicU64,
    /// Round trips of pipelines.
    pub roundtrip: crate::stats::Histogram,
    /// Entries not yet read from this pod's streams (last observed).
    pub stream_lag: AtomicU64,
    /// Inbox entries this pod read.
    pub(super) inbox_read: AtomicU64,
    /// Inbox entries the cap removed before this pod read them (each
    /// carried one or more messages).
    pub inbox_cut: AtomicU64,
    /// Second (unix) the last refused write was logged.
    write_error_logged: AtomicU64,
    /// Shared-group entries delivered to a member here and not yet
    /// acknowledged by its client: not claimed again while held.
    share_held: Mutex<HashSet<(ByteString, ByteString)>>,
    shutdown: CancellationToken,
    /// Pod last seen serving a persistent session (from enqueue replies):
    /// a guess for waking it in the same pipeline, on one Redis only.
    owner_hints: Mutex<HashMap<ByteString, Arc<str>>>,
    /// Every task the store starts: shutdown waits for them.
    tasks: TaskTracker,
    /// Since when this pod's heartbeats have been steady (see
    /// `supervisor`): it declares no pod dead before a node timeout of them.
    steady_since: Mutex<Instant>,
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

/// How long a starting pod waits for Redis (a managed Redis starts beside
/// the brokers): under the liveness probe's 30 s, so that the kubelet sees
/// an exit with a reason rather than killing a silent process.
pub const STARTUP_WAIT: Duration = Duration::from_secs(20);

impl RedisStore {
    /// Connect, register this pod and start its tasks. Fails when Redis
    /// cannot be reached within [`STARTUP_WAIT`] (a pod that never had a
    /// store is not useful; one that loses it later stays up and reports
    /// not ready).
    pub async fn start(
        cfg: RedisConfig,
        local: Arc<Local>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<RedisStore>> {
        let (client, cmd) = tokio::select! {
            r = connect(&cfg, STARTUP_WAIT) => r?,
            _ = shutdown.cancelled() => anyhow::bail!("stopped while connecting to Redis"),
        };
        let (tx, rx) = mpsc::channel(OPS_QUEUE);
        let c = Arc::new(RedisStore {
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
            local: local.clone(),
            node_timeout: cfg.node_timeout,
            replicated: cfg.replicated,
            max_queued: local.config.limits.max_queued_messages,
            inbox_max: cfg.inbox_max,
            redis_errors: AtomicU64::new(0),
            unreplicated: AtomicU64::new(0),
            redis_commands: AtomicU64::new(0),
            roundtrip: Default::default(),
            stream_lag: AtomicU64::new(0),
            inbox_read: AtomicU64::new(0),
            inbox_cut: AtomicU64::new(0),
            write_error_logged: AtomicU64::new(0),
            share_held: Mutex::new(HashSet::new()),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            owner_hints: Mutex::new(HashMap::new()),
            steady_since: Mutex::new(Instant::now()),
        });
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

    /// A will taken out of Redis (a dead pod's client's, or a delayed
    /// one now due): to the subscribers here and everywhere else, like a
    /// will published on this pod.
    pub(super) fn publish_will(&self, msg: Arc<Message>) {
        let mut scratch = Vec::new();
        let here = self.local.publish_here(&msg, &mut scratch);
        let keep = msg.retain && self.local.config.mqtt.retain_available && !here.retain_refused;
        if keep {
            self.retain(&msg);
        }
        if let (_, Some(p)) = self.forward(&msg) {
            if p.must_wait() {
                self.spawn(async move {
                    if p.finish().await.is_err() {
                        debug!("a will could not be written to Redis");
                    }
                });
            }
        }
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
            cmd_key(&eval(&LUA_RENEW, &["k1", "k2"])).as_deref(),
            Some(&b"k1"[..])
        );
        assert_eq!(
            cmd_key(redis::cmd("XGROUP").arg("CREATE").arg("s")).as_deref(),
            Some(&b"s"[..])
        );
    }

    #[test]
    fn a_script_redis_lost_is_sent_again_whole() {
        let sha = session_eval(&LUA_ENQUEUE, "c").arg(5).clone();
        let args = |c: &Cmd| -> Vec<Vec<u8>> {
            c.args_iter()
                .filter_map(|a| match a {
                    redis::Arg::Simple(b) => Some(b.to_vec()),
                    _ => None,
                })
                .collect()
        };
        let a = args(&sha);
        assert_eq!(a[0], b"EVALSHA");
        assert_eq!(a[1], LUA_ENQUEUE.hash().as_bytes());
        let e = args(&as_eval(&sha).expect("an EVAL"));
        assert_eq!(e[0], b"EVAL");
        assert_eq!(e[1], LUA_ENQUEUE.body.as_bytes());
        assert_eq!(e[2..], a[2..]);
        assert!(as_eval(&redis::cmd("GET").arg("k").clone()).is_none());
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
