//! The broker's shared state and the operations a connection performs on it.
//!
//! This is the boundary between the protocol (`connection`) and where state
//! lives: a connection calls [`Broker::connect`], [`Broker::publish`],
//! [`Broker::subscribe`], [`Broker::unsubscribe`] and [`Broker::disconnect`],
//! and the operations of [`Store`] for what only the store knows
//! (acknowledged stream entries, QoS 2 delivery records). The broker is
//! [`Local`] (this pod's memory, shared with the store as its handle) plus
//! the [`Store`] and what connects the two: claims and releases of
//! sessions, will and expiry timers of the memory store.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cirrus_codec::topic::parse_filter;
use cirrus_codec::{reason, ByteString, Bytes, LastWill, PacketId, Properties, Protocol, QoS};
use parking_lot::Mutex;
use tracing::debug;

pub use crate::local::{Local, Stored, SubscribeError};
use crate::message::{Delivery, Message, StoreAck};
use crate::router::Match;
use crate::session::{Attachment, Inflight, OutState, PendingWill, Session, Signal};
use crate::store::redis::{Pending, RedisStore};
use crate::store::Store;

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
    pub fn detach(self, store: &Store) {
        if let Some(p) = self.remote {
            if p.must_wait() {
                store.spawn(async move {
                    if p.finish().await.is_err() {
                        debug!("a will or store message could not be written to Redis");
                    }
                });
            }
        }
    }
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
    /// What this pod holds in memory (reached through `Deref`).
    local: Arc<Local>,
    pub auth: crate::auth::Auth,
    /// Where what outlives a connection is kept.
    pub store: Store,
    /// Will delays and session expiries, in due order (memory store).
    timers: Mutex<BTreeMap<(Instant, u64), Timer>>,
    /// Redis store: client ids with a connect in progress on this pod.
    claiming: Mutex<std::collections::HashSet<ByteString>>,
    /// Redis store: sessions whose release is being written.
    releasing: Arc<Mutex<HashMap<ByteString, tokio::sync::watch::Receiver<bool>>>>,
}

impl std::ops::Deref for Broker {
    type Target = Local;

    fn deref(&self) -> &Local {
        &self.local
    }
}

impl Broker {
    /// A broker over `local` (the pod's memory, also given to the store)
    /// and `store`.
    pub fn new(local: Arc<Local>, auth: crate::auth::Auth, store: Store) -> Arc<Broker> {
        Arc::new(Broker {
            local,
            auth,
            store,
            timers: Mutex::new(BTreeMap::new()),
            claiming: Mutex::new(std::collections::HashSet::new()),
            releasing: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The pod's memory, as given to the store.
    pub fn local(&self) -> &Arc<Local> {
        &self.local
    }

    /// Whether the store can take new work (always, for memory).
    pub fn store_ready(&self) -> bool {
        self.store.is_ready()
    }

    /// Attach a new connection to the client's session, creating or
    /// replacing it as Clean Start says, and kick any connection that held
    /// it ([MQTT-3.1.4-3]) — on this pod or, with the Redis store, on
    /// another. `Err` is the CONNACK reason code (the store is unavailable).
    pub async fn connect(&self, req: ConnectRequest, will: Option<&LastWill>) -> Result<Grant, u8> {
        let epoch = self.next_id();
        let Store::Redis(cluster) = &self.store else {
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
                since: Instant::now(),
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
            if let Store::Redis(cluster) = &self.store {
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
                let releasing = self.releasing.clone();
                self.store.spawn(async move {
                    c.release(&cid, epoch, expiry, &rel, delayed_will).await;
                    let _ = done.send(true);
                    let mut r = releasing.lock();
                    if r.get(&cid).is_some_and(|w| *w.borrow()) {
                        r.remove(&cid);
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
        if self.store.is_shared() {
            let filters: Vec<ByteString> = subs.keys().cloned().collect();
            self.store.session_left(&session.client_id, &filters);
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
        self.publish(msg, &mut scratch).detach(&self.store);
    }

    /// Route a message to every matching session. `scratch` is the caller's
    /// reusable buffer, so routing allocates nothing per message.
    pub fn publish(&self, msg: Arc<Message>, scratch: &mut Vec<Match>) -> PublishOutcome {
        let here = self.publish_here(&msg, scratch);
        let retained = msg.retain && self.config.mqtt.retain_available && !here.retain_refused;
        let (n, remote) = self.store.publish_elsewhere(&msg, retained);
        PublishOutcome {
            delivered: here.delivered + n,
            retain_refused: here.retain_refused,
            backlogged: here.backlogged,
            remote,
        }
    }
}
