//! The broker's shared state and the operations a connection performs on it.
//!
//! This is the boundary between the protocol (`connection`) and where state
//! lives: a connection only calls [`Broker::connect`], [`Broker::publish`],
//! [`Broker::subscribe`], [`Broker::unsubscribe`] and [`Broker::disconnect`],
//! so a store other than memory changes what is behind these calls, not the
//! connection code.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cirrus_codec::topic::{parse_filter, FilterRef};
use cirrus_codec::{
    reason, ByteString, Bytes, LastWill, PacketId, Properties, Protocol, QoS, RetainHandling,
    SubscriptionOptions,
};
use parking_lot::Mutex;
use tracing::debug;

use crate::config::Config;
use crate::message::{Delivery, Message, StoreAck};
use crate::retained::{RetainedStore, SetOutcome};
use crate::router::{Match, Router, Subscriber};
use crate::session::{
    Attachment, Enqueued, Inflight, OutState, PendingWill, QueueLimits, Session, Signal,
    SubscriptionEntry,
};
use crate::stats::Stats;
use crate::store::redis::{Pending, RedisStore};

/// What a connection asks for when its CONNECT is accepted.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: ByteString,
    pub clean_start: bool,
    pub expiry_interval: u32,
    pub protocol: Protocol,
}

/// What the connection gets back: its session and how it is told to leave.
pub struct Grant {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub epoch: u64,
    pub signal: Arc<Signal>,
}

/// Result of routing one publish.
pub struct PublishOutcome {
    /// Sessions the message was queued for.
    pub delivered: usize,
    /// The retained store was full, so the message was not retained.
    pub retain_refused: bool,
    /// A session whose queue is past half full: the publisher should wait
    /// for it briefly (backpressure), see [`Session::wait_for_space`].
    pub backlogged: Option<Arc<Session>>,
    /// Redis store: the message on its way to other pods and persistent
    /// sessions; a QoS 1/2 message is acknowledged once this finishes.
    pub remote: Option<Pending>,
}

impl PublishOutcome {
    /// For publishes nobody acknowledges (wills): make sure the remote
    /// part is still sent, under the store's tasks.
    fn detach(self, cluster: Option<&Arc<RedisStore>>) {
        if let (Some(p), Some(c)) = (self.remote, cluster) {
            if p.must_wait() {
                c.spawn(async move {
                    if p.finish().await.is_err() {
                        debug!("a will or store message could not be written to Redis");
                    }
                });
            }
        }
    }
}

/// What became of a message read from a Redis stream for a session here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Queued; its entry goes when the client acknowledges it.
    Queued,
    /// Not for this session (no matching subscription any more, or QoS 0):
    /// the entry can go now.
    NotWanted,
    /// The session ended here (or has no online member): leave the entry
    /// for whoever serves it next.
    Gone,
    /// The session's queue is full: read it again later.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("the session has too many subscriptions")]
    TooMany,
    #[error("the session has ended")]
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Will,
    Expiry,
}

struct Timer {
    session: Arc<Session>,
    epoch: u64,
    kind: TimerKind,
}

pub struct Broker {
    pub config: Arc<Config>,
    pub stats: Stats,
    pub auth: crate::auth::Auth,
    router: Router,
    retained: RetainedStore,
    /// Client id → session. Taken on connect and disconnect only, never on
    /// the publish path.
    sessions: Mutex<HashMap<ByteString, Arc<Session>>>,
    next_id: AtomicU64,
    /// Will delays and session expiries, in due order.
    timers: Mutex<BTreeMap<(Instant, u64), Timer>>,
    started: Instant,
    id_salt: u64,
    /// The Redis store, when configured.
    redis: OnceLock<Arc<RedisStore>>,
    /// Redis store: client ids with a connect in progress on this pod.
    claiming: Mutex<std::collections::HashSet<ByteString>>,
    /// Redis store: sessions whose release is being written.
    releasing: Mutex<HashMap<ByteString, tokio::sync::watch::Receiver<bool>>>,
    /// Redis store: kicks that arrived before their connection attached
    /// (client id → epoch, when).
    kicked: Mutex<HashMap<ByteString, (u64, Instant)>>,
}

/// Kicks remembered for connections not attached yet, and for how long.
const MAX_EARLY_KICKS: usize = 10_000;
const EARLY_KICK_TTL: Duration = Duration::from_secs(10);

impl Broker {
    pub fn new(config: Arc<Config>, auth: crate::auth::Auth) -> Arc<Broker> {
        let salt = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Broker {
            config,
            stats: Stats::default(),
            auth,
            router: Router::new(),
            retained: RetainedStore::new(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            timers: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            id_salt: salt,
            redis: OnceLock::new(),
            claiming: Mutex::new(std::collections::HashSet::new()),
            releasing: Mutex::new(HashMap::new()),
            kicked: Mutex::new(HashMap::new()),
        })
    }

    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        self.redis.get()
    }

    pub fn set_redis(&self, c: Arc<RedisStore>) {
        let _ = self.redis.set(c);
    }

    /// Whether the store can take new work (always, for memory).
    pub fn store_ready(&self) -> bool {
        self.redis().is_none_or(|c| c.is_ready())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_queued: self.config.limits.max_queued_messages,
        }
    }

    /// A client id for a client that sent none (MQTT 5 Assigned Client
    /// Identifier, or 3.1.1 with Clean Session).
    pub fn assign_client_id(&self) -> ByteString {
        ByteString::from(format!(
            "cirrus-{:x}-{:x}",
            self.id_salt & 0xFFFF_FFFF,
            self.next_id()
        ))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Sessions on this pod, messages queued for them and in flight.
    pub fn session_depths(&self) -> (u64, u64, u64) {
        let all: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let (mut queued, mut inflight) = (0, 0);
        for s in &all {
            let st = s.state.lock();
            queued += st.queue.len() as u64;
            inflight += st.inflight.len() as u64;
        }
        (all.len() as u64, queued, inflight)
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Attach a new connection to the client's session, creating or
    /// replacing it as Clean Start says, and kick any connection that held
    /// it ([MQTT-3.1.4-3]) — on this pod or, with the Redis store, on
    /// another. `Err` is the CONNACK reason code (the store is unavailable).
    pub async fn connect(&self, req: ConnectRequest, will: Option<&LastWill>) -> Result<Grant, u8> {
        let epoch = self.next_id();
        let Some(cluster) = self.redis() else {
            return Ok(self.attach(req, epoch).0);
        };
        // While this claim runs, a local connection of the same client that
        // ends hands its session over here instead of releasing it.
        // The set is held while looking for a release in progress, so that
        // a connection ending now either hands over or is waited for.
        let releasing = {
            let mut claiming = self.claiming.lock();
            claiming.insert(req.client_id.clone());
            self.releasing.lock().get(&req.client_id).cloned()
        };
        self.connect_clustered(cluster, req, will, epoch, releasing)
            .await
    }

    async fn connect_clustered(
        &self,
        cluster: &Arc<RedisStore>,
        req: ConnectRequest,
        will: Option<&LastWill>,
        epoch: u64,
        releasing: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Grant, u8> {
        let cid = req.client_id.clone();
        let done = |r: Result<Grant, u8>| {
            self.claiming.lock().remove(&cid);
            if r.is_err() {
                // A local session left detached for this claim is let go.
                let s = self.sessions.lock().get(&cid).cloned();
                if let Some(s) = s {
                    if s.state.lock().attached.is_none() {
                        self.end_session(&s, false);
                    }
                }
            }
            r
        };
        if let Some(mut r) = releasing {
            let _ = tokio::time::timeout(Duration::from_secs(2), r.wait_for(|done| *done)).await;
        }
        let claim = cluster
            .claim(
                &req.client_id,
                req.clean_start,
                req.expiry_interval,
                will,
                epoch,
            )
            .await
            .map_err(|e| {
                tracing::debug!(error = %e, "session claim failed");
                reason::SERVER_UNAVAILABLE
            });
        let claim = match claim {
            Ok(c) => c,
            Err(code) => return done(Err(code)),
        };
        let persistent = req.expiry_interval > 0;
        let (mut grant, local_present) = self.attach(req, epoch);
        let session = grant.session.clone();
        session.set_stream_fed(persistent);
        if claim.present && !local_present {
            for (full, o, id) in &claim.subs {
                let Ok(fr) = parse_filter(full) else { continue };
                if let Ok(existed) = self.subscribe(&session, full, fr, *o, *id, false) {
                    if cluster
                        .subscribed(&session, full, *o, *id, existed, false)
                        .await
                        .is_err()
                    {
                        return done(Err(reason::SERVER_UNAVAILABLE));
                    }
                }
            }
            let mut st = session.state.lock();
            for pid in claim.rel.iter().filter_map(|&p| PacketId::new(p)) {
                if st.find_inflight(pid).is_none() {
                    st.inflight.push_back(Inflight {
                        packet_id: pid,
                        state: OutState::AwaitComp,
                        delivery: Delivery {
                            msg: Arc::new(Message::from_wire(
                                ByteString::new(),
                                Bytes::new(),
                                QoS::ExactlyOnce,
                                false,
                                Properties::default(),
                                None,
                            )),
                            qos: QoS::ExactlyOnce,
                            retain: false,
                            sub_ids: Vec::new(),
                            ack: None,
                            dup: false,
                        },
                    });
                }
            }
        }
        grant.session_present = claim.present || local_present;
        if self.kicked_early(&cid, epoch) {
            // Another pod took the client over while this connect ran.
            grant.signal.kick();
        }
        if persistent {
            // A session kept on this pod already holds what the previous
            // connection read from its stream: continue after it.
            let start = if local_present {
                let st = session.state.lock();
                st.inflight
                    .iter()
                    .map(|i| &i.delivery)
                    .chain(st.queue.iter())
                    .filter_map(|d| d.ack.as_deref().and_then(StoreAck::session_id))
                    .fold(None::<&str>, |m, id| match m {
                        Some(m) if crate::store::redis::stream_id_le(id, m) => Some(m),
                        _ => Some(id),
                    })
                    .map(str::to_string)
            } else {
                None
            };
            cluster.start_puller(session, epoch, claim.hw, start);
        }
        done(Ok(grant))
    }

    /// The local half of a connect; returns whether the local session was
    /// there already.
    fn attach(&self, req: ConnectRequest, epoch: u64) -> (Grant, bool) {
        let signal = Arc::new(Signal::default());
        let mut ended = None;
        let (session, session_present) = {
            let mut sessions = self.sessions.lock();
            let existing = sessions.get(&req.client_id).cloned();
            let (session, present) = match existing {
                Some(s) if !req.clean_start => (s, true),
                other => {
                    if let Some(old) = other {
                        ended = Some(old);
                    }
                    let s = Session::new(self.next_id(), req.client_id.clone(), req.protocol);
                    sessions.insert(req.client_id.clone(), s.clone());
                    (s, false)
                }
            };
            let mut st = session.state.lock();
            if let Some(a) = st.attached.take() {
                a.signal.kick();
            }
            st.attached = Some(Attachment {
                epoch,
                signal: signal.clone(),
            });
            st.epoch = epoch;
            st.protocol = req.protocol;
            st.expiry_interval = req.expiry_interval;
            st.disconnected_at = None;
            // A will still waiting for its delay is not sent when the client
            // is back in time ([MQTT-3.1.3-9]).
            st.pending_will = None;
            drop(st);
            session.set_online(true);
            (session, present)
        };
        if let Some(old) = ended {
            self.end_session(&old, true);
        }
        (
            Grant {
                session,
                session_present,
                epoch,
                signal,
            },
            session_present,
        )
    }

    /// A connection ended. `will` is the will to publish (it already knows
    /// whether the close was normal); `new_expiry` comes from DISCONNECT.
    pub fn disconnect(
        &self,
        session: &Arc<Session>,
        epoch: u64,
        will: Option<LastWill>,
        new_expiry: Option<u32>,
    ) {
        let now = Instant::now();
        let mut end_now = false;
        let mut publish_now = None;
        {
            let mut st = session.state.lock();
            if st.ended || st.epoch != epoch {
                // Taken over or discarded: the will goes out now unless the
                // session lives on and the will has a delay.
                drop(st);
                if let Some(w) = will {
                    let delayed = w.properties.will_delay_interval.unwrap_or(0) > 0;
                    if !delayed || session.state.lock().ended {
                        self.publish_will(w, &session.client_id);
                    }
                }
                return;
            }
            st.attached = None;
            session.set_online(false);
            st.disconnected_at = Some(now);
            if let Some(e) = new_expiry {
                st.expiry_interval = e;
            }
            let expiry = st.expiry_interval;
            if let Some(cluster) = self.redis() {
                // Held until this pod has decided between handing the
                // session over and releasing it (see `connect`).
                let claiming = self.claiming.lock();
                if claiming.contains(&session.client_id) {
                    // A new connection of this client is being set up here:
                    // it takes this session over locally (in-flight state
                    // and all).
                    drop(claiming);
                    drop(st);
                    if let Some(w) = will {
                        if w.properties.will_delay_interval.unwrap_or(0) == 0 {
                            self.publish_will(w, &session.client_id);
                        }
                    }
                    return;
                }
                // The pod forgets the session; Redis keeps what outlives
                // the connection, and whoever serves the client next
                // resumes from there.
                let rel: Vec<u16> = st
                    .inflight
                    .iter()
                    // Those of the session's stream are recorded in Redis
                    // (`r:{id}`) as their PUBREC arrives.
                    .filter(|i| i.state == OutState::AwaitComp && i.delivery.ack.is_none())
                    .map(|i| i.packet_id.get())
                    .collect();
                let c = cluster.clone();
                let cid = session.client_id.clone();
                // A will with a delay is kept in Redis and published by
                // whichever pod sees it due, unless the client is back.
                let has_will = will.is_some();
                let will_now =
                    will.filter(|w| w.properties.will_delay_interval.unwrap_or(0).min(expiry) == 0);
                let delayed_will = has_will && will_now.is_none();
                // A reconnect to this pod waits for the release, so that it
                // finds what the release wrote (PUBREL state).
                let (done, wait) = tokio::sync::watch::channel(false);
                self.releasing.lock().insert(cid.clone(), wait);
                drop(claiming);
                drop(st);
                self.end_session(session, false);
                let task = c.clone();
                task.spawn(async move {
                    c.release(&cid, epoch, expiry, &rel, delayed_will).await;
                    let _ = done.send(true);
                    if let Some(b) = c.broker() {
                        let mut r = b.releasing.lock();
                        if r.get(&cid).is_some_and(|w| *w.borrow()) {
                            r.remove(&cid);
                        }
                    }
                });
                if let Some(w) = will_now {
                    self.publish_will(w, &session.client_id);
                }
                return;
            }
            if expiry == 0 {
                end_now = true;
                publish_now = will;
            } else {
                if let Some(w) = will {
                    let delay = w.properties.will_delay_interval.unwrap_or(0).min(expiry);
                    if delay == 0 {
                        publish_now = Some(w);
                    } else {
                        let due = now + Duration::from_secs(u64::from(delay));
                        st.pending_will = Some(Box::new(PendingWill { will: w, due }));
                        self.add_timer(due, session, epoch, TimerKind::Will);
                    }
                }
                if expiry != u32::MAX {
                    let due = now + Duration::from_secs(u64::from(expiry));
                    self.add_timer(due, session, epoch, TimerKind::Expiry);
                }
            }
        }
        if let Some(w) = publish_now {
            self.publish_will(w, &session.client_id);
        }
        if end_now {
            self.end_session(session, false);
        }
    }

    fn add_timer(&self, due: Instant, session: &Arc<Session>, epoch: u64, kind: TimerKind) {
        let seq = self.next_id();
        self.timers.lock().insert(
            (due, seq),
            Timer {
                session: session.clone(),
                epoch,
                kind,
            },
        );
    }

    /// Discard a session: out of the registry and the router, its
    /// connection kicked, its pending will published.
    fn end_session(&self, session: &Arc<Session>, kick: bool) {
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| s.id == session.id)
            {
                sessions.remove(&session.client_id);
            }
        }
        let (subs, will) = {
            let mut st = session.state.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            if kick {
                if let Some(a) = st.attached.take() {
                    a.signal.kick();
                }
            }
            st.queue.clear();
            st.inflight.clear();
            (
                std::mem::take(&mut st.subscriptions),
                st.pending_will.take(),
            )
        };
        session.set_online(false);
        if let Some(c) = self.redis() {
            c.stop_puller(&session.client_id);
            let filters: Vec<ByteString> = subs.keys().cloned().collect();
            c.dropped_local(&filters);
        }
        for filter in subs.keys() {
            if let Ok(fr) = cirrus_codec::topic::parse_filter(filter) {
                if self
                    .router
                    .unsubscribe(fr.share_group, fr.filter, session.id)
                {
                    self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(w) = will {
            self.publish_will(w.will, &session.client_id);
        }
    }

    /// Fire due timers; returns when the next one is due.
    pub fn run_timers(&self, now: Instant) -> Option<Instant> {
        loop {
            let timer = {
                let mut timers = self.timers.lock();
                match timers.first_key_value() {
                    Some((&(due, _), _)) if due <= now => timers.pop_first().map(|(_, t)| t),
                    Some((&(due, _), _)) => return Some(due),
                    None => return None,
                }
            };
            let t = timer?;
            let mut st = t.session.state.lock();
            if st.ended || st.epoch != t.epoch || st.attached.is_some() {
                continue;
            }
            match t.kind {
                TimerKind::Will => {
                    let will = st.pending_will.take_if(|w| w.due <= now);
                    drop(st);
                    if let Some(w) = will {
                        self.publish_will(w.will, &t.session.client_id);
                    }
                }
                TimerKind::Expiry => {
                    drop(st);
                    self.end_session(&t.session, false);
                }
            }
        }
    }

    pub fn publish_will(&self, will: LastWill, client_id: &ByteString) {
        let mut properties = will.properties;
        properties.will_delay_interval = None;
        let publisher = Some(client_id.clone());
        let msg = Arc::new(Message::from_wire(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            properties,
            publisher,
        ));
        self.publish_message(msg);
    }

    /// Publish a message nobody waits for (wills).
    pub fn publish_message(&self, msg: Arc<Message>) {
        let mut scratch = Vec::new();
        self.publish(msg, &mut scratch).detach(self.redis());
    }

    /// Route a message to every matching session. `scratch` is the caller's
    /// reusable buffer, so routing allocates nothing per message.
    pub fn publish(&self, msg: Arc<Message>, scratch: &mut Vec<Match>) -> PublishOutcome {
        let mut retain_refused = false;
        if msg.retain && self.config.mqtt.retain_available {
            retain_refused = self
                .retained
                .set(msg.clone(), self.config.mqtt.max_retained_messages)
                == SetOutcome::Full;
            if let (false, Some(c)) = (retain_refused, self.redis()) {
                c.retain(&msg);
            }
        }
        let (mut delivered, backlogged) = self.route_local(&msg, scratch);
        let mut remote = None;
        if let Some(c) = self.redis() {
            let (n, pending) = c.forward(&msg);
            delivered += n;
            remote = pending;
        }
        PublishOutcome {
            delivered,
            retain_refused,
            backlogged,
            remote,
        }
    }

    /// A message from another pod's publish: local subscribers only.
    /// Returns a subscriber whose queue is past half full, for the reader
    /// to wait on as a local publisher would — briefly, and never again for
    /// a subscriber that made no progress in a whole wait (it is stalled:
    /// its own queue bounds it, the other subscribers go on).
    pub fn deliver_remote(&self, msg: Arc<Message>) -> Option<Arc<Session>> {
        let mut scratch = Vec::new();
        self.route_local(&msg, &mut scratch).1
    }

    /// Deliver to the subscribers on this pod. With the Redis store, shared
    /// groups and the QoS 1/2 messages of persistent sessions are not served
    /// here: they travel through their Redis streams.
    fn route_local(
        &self,
        msg: &Arc<Message>,
        scratch: &mut Vec<Match>,
    ) -> (usize, Option<Arc<Session>>) {
        let clustered = self.redis().is_some();
        scratch.clear();
        self.router.matches(&msg.topic, scratch);
        // Overlapping subscriptions of one session become one delivery with
        // the highest QoS and every subscription identifier ([MQTT-3.3.4-2]).
        if scratch.len() > 1 {
            scratch.sort_unstable_by_key(|m| (m.session.id, m.shared));
        }
        let limits = self.queue_limits();
        let mut delivered = 0;
        let mut backlogged = None;
        let mut i = 0;
        while i < scratch.len() {
            let first = &scratch[i];
            let mut j = i + 1;
            if clustered && first.shared {
                i = j;
                continue;
            }
            if !first.shared {
                while j < scratch.len()
                    && !scratch[j].shared
                    && scratch[j].session.id == first.session.id
                {
                    j += 1;
                }
            }
            let mut qos = None::<QoS>;
            let mut retain = false;
            let mut sub_ids = Vec::new();
            for m in &scratch[i..j] {
                if m.options.no_local && msg.publisher.as_ref() == Some(&m.session.client_id) {
                    continue;
                }
                qos = Some(qos.map_or(m.options.qos, |q| q.max(m.options.qos)));
                retain |= m.options.retain_as_published && msg.retain;
                if let Some(id) = m.sub_id {
                    sub_ids.push(id);
                }
            }
            if let Some(q) = qos {
                let q = q.min(msg.qos);
                if clustered && q != QoS::AtMostOnce && first.session.is_stream_fed() {
                    i = j;
                    continue;
                }
                let d = Delivery {
                    msg: msg.clone(),
                    qos: q,
                    retain,
                    sub_ids,
                    ack: None,
                    dup: false,
                };
                match first.session.enqueue(d, limits, &self.stats) {
                    Enqueued::Queued => delivered += 1,
                    Enqueued::Backlogged => {
                        delivered += 1;
                        if backlogged.is_none() {
                            backlogged = Some(first.session.clone());
                        }
                    }
                    Enqueued::Dropped => {}
                }
            }
            i = j;
        }
        scratch.clear();
        (delivered, backlogged)
    }

    /// Redis store: whether a member of this `$share/{group}/{filter}` is
    /// online here (only then does the pod read the group's stream).
    pub fn serves_share(&self, full: &str) -> bool {
        match parse_filter(full) {
            Ok(FilterRef {
                share_group: Some(g),
                filter,
            }) => self.router.has_online_shared(g, filter),
            _ => false,
        }
    }

    /// Redis store: a message of a shared group's stream (entry `id`), for
    /// one online member on this pod. QoS 1/2 deliveries carry the entry,
    /// acknowledged in the group only once the member's client has it.
    pub fn deliver_shared(&self, full: &ByteString, msg: Arc<Message>, id: &ByteString) -> Stored {
        let Ok(fr) = parse_filter(full) else {
            return Stored::NotWanted;
        };
        let Some(group) = fr.share_group else {
            return Stored::NotWanted;
        };
        let Some(m) = self
            .router
            .pick_shared(group, fr.filter)
            .filter(|m| m.session.is_online())
        else {
            // Left in the group for a member on another pod (claimed
            // there once idle) or for one that comes back here.
            return Stored::Gone;
        };
        let qos = m.options.qos.min(msg.qos);
        let ack = (qos != QoS::AtMostOnce).then(|| {
            Box::new(StoreAck::Share {
                filter: full.clone(),
                id: id.clone(),
            })
        });
        let held = ack.is_some();
        let d = Delivery {
            qos,
            msg,
            retain: false,
            sub_ids: m.sub_id.into_iter().collect(),
            ack,
            dup: false,
        };
        match m.session.enqueue(d, self.queue_limits(), &self.stats) {
            Enqueued::Dropped => Stored::Full,
            _ if held => Stored::Queued,
            _ => Stored::NotWanted,
        }
    }

    /// Redis store: a message read from a persistent session's stream.
    /// Says what the reader does with the entry: only [`Stored::NotWanted`]
    /// lets it go at once; a queued one goes when the client acknowledges
    /// it; a session that ended or is full leaves it in the stream for
    /// whoever serves the session next.
    pub fn deliver_stored(
        &self,
        session: &Arc<Session>,
        msg: Arc<Message>,
        id: ByteString,
        dup: bool,
    ) -> Stored {
        let d = {
            let st = session.state.lock();
            if st.ended {
                return Stored::Gone;
            }
            if st.queue.len() >= self.config.limits.max_queued_messages {
                return Stored::Full;
            }
            crate::store::redis::delivery_for(&st.subscriptions, msg)
        };
        let Some(mut d) = d else {
            return Stored::NotWanted;
        };
        if d.qos == QoS::AtMostOnce {
            session.enqueue(d, self.queue_limits(), &self.stats);
            return Stored::NotWanted;
        }
        d.ack = Some(Box::new(StoreAck::Session(id)));
        d.dup = dup;
        match session.enqueue(d, self.queue_limits(), &self.stats) {
            Enqueued::Dropped if session.state.lock().ended => Stored::Gone,
            Enqueued::Dropped => Stored::Full,
            _ => Stored::Queued,
        }
    }

    /// Ring every attached connection's signal (shutdown, auth reload):
    /// connections keep no per-connection future for such rare events.
    pub fn signal_all(&self, ring: fn(&Signal)) {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        for s in sessions {
            if let Some(a) = &s.state.lock().attached {
                ring(&a.signal);
            }
        }
    }

    /// Redis store: another pod took this client over. `epoch` names the
    /// connection it took over from (`None`: whatever is attached): a
    /// newer connection here is left alone, and a connection whose attach
    /// has not happened yet is kicked as it attaches.
    pub fn kick_local(&self, client_id: &str, epoch: Option<u64>) {
        let s = self.sessions.lock().get(client_id).cloned();
        if let Some(s) = &s {
            let st = s.state.lock();
            if let Some(a) = &st.attached {
                if epoch.is_none_or(|e| e == a.epoch) {
                    a.signal.kick();
                    return;
                }
            }
        }
        let Some(e) = epoch else { return };
        // Not attached yet (the claim's reply and this kick raced): the
        // attach looks here. Bounded: old entries go first.
        let mut k = self.kicked.lock();
        let now = Instant::now();
        if k.len() >= MAX_EARLY_KICKS {
            k.retain(|_, (_, at)| now.duration_since(*at) < EARLY_KICK_TTL);
            if k.len() >= MAX_EARLY_KICKS {
                k.clear();
            }
        }
        k.insert(ByteString::from(client_id), (e, now));
    }

    /// Whether a kick for this connection arrived before it attached.
    fn kicked_early(&self, client_id: &ByteString, epoch: u64) -> bool {
        let mut k = self.kicked.lock();
        match k.get(client_id) {
            Some((e, _)) if *e == epoch => {
                k.remove(client_id);
                true
            }
            _ => false,
        }
    }

    /// Redis store: a retained message set on another pod.
    pub fn mirror_retained(&self, msg: Arc<Message>) {
        self.retained
            .set(msg, self.config.mqtt.max_retained_messages);
    }

    pub fn replace_retained(&self, msgs: Vec<Arc<Message>>) {
        self.retained
            .replace(msgs, self.config.mqtt.max_retained_messages);
    }

    /// Sessions with a connection on this pod: (session, epoch, expiry).
    pub fn local_sessions(&self) -> Vec<(Arc<Session>, u64, u32)> {
        let all: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        all.into_iter()
            .filter_map(|s| {
                let (online, epoch, expiry) = {
                    let st = s.state.lock();
                    (st.attached.is_some(), st.epoch, st.expiry_interval)
                };
                online.then_some((s, epoch, expiry))
            })
            .collect()
    }

    /// Add or replace a subscription and, when `send_retained` (a client's
    /// SUBSCRIBE, not a restored session), queue the retained messages it
    /// asks for. Returns whether it replaced an existing one.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        full_filter: &ByteString,
        filter: FilterRef<'_>,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
        send_retained: bool,
    ) -> Result<bool, SubscribeError> {
        let existed = {
            let mut st = session.state.lock();
            if st.ended {
                return Err(SubscribeError::Ended);
            }
            let entry = SubscriptionEntry { options, sub_id };
            let existed = st.subscriptions.contains_key(full_filter);
            if !existed
                && st.subscriptions.len() >= self.config.limits.max_subscriptions_per_session
            {
                return Err(SubscribeError::TooMany);
            }
            st.subscriptions.insert(full_filter.clone(), entry);
            existed
        };
        self.router.subscribe(
            filter.share_group,
            filter.filter,
            Subscriber {
                session: session.clone(),
                options,
                sub_id,
            },
        );
        if !existed {
            self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        // Retained messages are not sent to shared subscriptions.
        let wants_retained = send_retained
            && match options.retain_handling {
                RetainHandling::SendAlways => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
        if filter.share_group.is_none() && wants_retained && self.config.mqtt.retain_available {
            let mut msgs = Vec::new();
            self.retained.matching(filter.filter, &mut msgs);
            let now = Instant::now();
            let limits = self.queue_limits();
            for m in msgs {
                if m.is_expired(now) {
                    continue;
                }
                let d = Delivery {
                    qos: m.qos.min(options.qos),
                    msg: m,
                    retain: true,
                    sub_ids: sub_id.into_iter().collect(),
                    ack: None,
                    dup: false,
                };
                session.enqueue(d, limits, &self.stats);
            }
        }
        Ok(existed)
    }

    /// Remove a subscription; returns whether it existed.
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        full_filter: &ByteString,
        filter: FilterRef<'_>,
    ) -> bool {
        let existed = session
            .state
            .lock()
            .subscriptions
            .remove(full_filter)
            .is_some();
        if existed
            && self
                .router
                .unsubscribe(filter.share_group, filter.filter, session.id)
        {
            self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        existed
    }

    /// Publish the `$SYS/broker/...` tree as retained messages.
    pub fn publish_sys(&self) {
        let s = &self.stats;
        let connected = s.connections_current.load(Ordering::Relaxed);
        let entries: [(&str, String); 15] = [
            ("version", format!("cirrus {}", env!("CARGO_PKG_VERSION"))),
            (
                "uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            ("clients/connected", connected.to_string()),
            ("clients/total", self.session_count().to_string()),
            (
                "clients/disconnected",
                self.session_count().saturating_sub(connected).to_string(),
            ),
            (
                "messages/received",
                Stats::get(&s.messages_received).to_string(),
            ),
            ("messages/sent", Stats::get(&s.messages_sent).to_string()),
            (
                "publish/messages/received",
                Stats::get(&s.publish_received).to_string(),
            ),
            (
                "publish/messages/sent",
                Stats::get(&s.publish_sent).to_string(),
            ),
            ("publish/messages/dropped", s.dropped_total().to_string()),
            ("bytes/received", Stats::get(&s.bytes_received).to_string()),
            ("bytes/sent", Stats::get(&s.bytes_sent).to_string()),
            (
                "subscriptions/count",
                s.subscriptions.load(Ordering::Relaxed).to_string(),
            ),
            ("retained messages/count", self.retained_count().to_string()),
            (
                "clients/refused",
                Stats::get(&s.connections_refused).to_string(),
            ),
        ];
        let mut scratch = Vec::new();
        for (topic, value) in entries {
            let msg = Arc::new(Message {
                topic: ByteString::from(format!("$SYS/broker/{topic}")),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                publisher: None,
                received: Instant::now(),
            });
            // Per pod: never shared through the Redis store.
            self.retained
                .set(msg.clone(), self.config.mqtt.max_retained_messages);
            self.route_local(&msg, &mut scratch);
        }
    }
}
