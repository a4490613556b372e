//! What this pod holds in memory: the sessions with a connection here (on
//! the memory store, every session), the subscription router and the
//! retained messages.
//!
//! [`Local`] is also the handle through which the Redis store hands the
//! broker what comes from other pods (messages, stream entries, kicks,
//! retained changes, wills): it is given to the store at construction and
//! knows nothing of the store, so the two hold no reference to each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cirrus_codec::topic::{parse_filter, FilterRef};
use cirrus_codec::{ByteString, Bytes, Properties, QoS, RetainHandling, SubscriptionOptions};
use parking_lot::Mutex;

use crate::config::Config;
use crate::message::{Delivery, Message, StoreAck};
use crate::retained::{RetainedStore, SetOutcome};
use crate::router::{Match, Router, Subscriber};
use crate::session::{Enqueued, QueueLimits, Session, Signal, SubscriptionEntry};
use crate::stats::Stats;

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

/// The local half of a publish.
pub struct Here {
    /// Sessions on this pod the message was queued for.
    pub delivered: usize,
    /// The retained store was full, so the message was not retained.
    pub retain_refused: bool,
    /// A session whose queue is past half full (see
    /// [`crate::broker::PublishOutcome::backlogged`]).
    pub backlogged: Option<Arc<Session>>,
}

pub struct Local {
    pub config: Arc<Config>,
    pub stats: Stats,
    pub(crate) router: Router,
    retained: RetainedStore,
    /// Client id → session. Taken on connect and disconnect only, never on
    /// the publish path.
    pub(crate) sessions: Mutex<HashMap<ByteString, Arc<Session>>>,
    next_id: AtomicU64,
    started: Instant,
    id_salt: u64,
    /// Sessions live in Redis: shared groups and the QoS 1/2 messages of
    /// persistent sessions travel through their streams, not through the
    /// local router.
    shared_store: bool,
    /// Redis store: kicks that arrived before their connection attached
    /// (client id → epoch, when).
    kicked: Mutex<HashMap<ByteString, (u64, Instant)>>,
}

/// Kicks remembered for connections not attached yet, and for how long.
const MAX_EARLY_KICKS: usize = 10_000;
const EARLY_KICK_TTL: Duration = Duration::from_secs(10);

impl Local {
    /// `shared_store`: the pod is one of many on the Redis store.
    pub fn new(config: Arc<Config>, shared_store: bool) -> Arc<Local> {
        let salt = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Local {
            config,
            stats: Stats::default(),
            router: Router::new(),
            retained: RetainedStore::new(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            id_salt: salt,
            shared_store,
            kicked: Mutex::new(HashMap::new()),
        })
    }

    /// Keep a retained message (unless the retained store is full) and
    /// queue the message for the subscribers on this pod.
    pub fn publish_here(&self, msg: &Arc<Message>, scratch: &mut Vec<Match>) -> Here {
        let mut retain_refused = false;
        if msg.retain && self.config.mqtt.retain_available {
            retain_refused = self
                .retained
                .set(msg.clone(), self.config.mqtt.max_retained_messages)
                == SetOutcome::Full;
        }
        let (delivered, backlogged) = self.route_local(msg, scratch);
        Here {
            delivered,
            retain_refused,
            backlogged,
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
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
        let clustered = self.shared_store;
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

    /// The signals of the connections attached now (a paced drain rings
    /// them a few at a time).
    pub fn attached_signals(&self) -> Vec<Arc<Signal>> {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        sessions
            .iter()
            .filter_map(|s| s.state.lock().attached.as_ref().map(|a| a.signal.clone()))
            .collect()
    }

    /// Signals of connections attached for at least `min_age` (those a
    /// rebalance may move), the longest attached first.
    pub fn settled_signals(&self, min_age: std::time::Duration) -> Vec<Arc<Signal>> {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let mut settled: Vec<(std::time::Instant, Arc<Signal>)> = sessions
            .iter()
            .filter_map(|s| {
                let st = s.state.lock();
                let a = st.attached.as_ref()?;
                (a.since.elapsed() >= min_age).then(|| (a.since, a.signal.clone()))
            })
            .collect();
        settled.sort_by_key(|(since, _)| *since);
        settled.into_iter().map(|(_, s)| s).collect()
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
    pub(crate) fn kicked_early(&self, client_id: &ByteString, epoch: u64) -> bool {
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
