//! Where the state that outlives a connection lives.
//!
//! The broker calls one interface, [`Store`], with two implementations:
//! - [`Store::Memory`]: the pod is alone and keeps everything in its own
//!   memory ([`crate::local::Local`]: sessions, the router, retained
//!   messages; will and expiry timers in [`crate::broker`]).
//! - [`Store::Redis`]: the pod is one of many. [`redis::RedisStore`] keeps
//!   sessions, subscriptions, in-flight and queued messages and retained
//!   messages in Redis, and carries publishes between pods over Redis
//!   Streams (see `docs/architecture.md`).
//!
//! What comes from other pods reaches the broker through the
//! [`crate::local::Local`] handle the Redis store is given at
//! construction: the store holds no reference to the broker, and the
//! broker holds the store.
//!
//! ## Layout of the Redis store (`store/redis/`)
//! - `mod.rs`: the store, its settings and errors, start and stop.
//! - `client.rs`: one Redis or a Redis Cluster; pipelines split by slot.
//! - `keys.rs`, `scripts.rs`, `commands.rs`: what is written where, the Lua
//!   scripts (each on one slot), command builders.
//! - `replies.rs`: reading replies of either protocol version, never
//!   panicking.
//! - `writer.rs`: the writer task; every reply of a pipeline is checked
//!   against the publishes that needed it.
//! - `subscriptions.rs`, `routes.rs`: routes announced to the other pods,
//!   persistent subscriptions, the replicated route table.
//! - `events.rs`: the snapshot and the events stream every pod follows.
//! - `inbox.rs`: messages, wake-ups and kicks from other pods.
//! - `sessions.rs`: claim and release, and the puller that feeds an online
//!   persistent session from its stream.
//! - `shared.rs`: shared subscriptions through consumer groups.
//! - `liveness.rs`: heartbeats by Redis time, dead pods, delayed wills,
//!   expiries, resync after an outage.
//! - `wire.rs`: how messages, wills and subscriptions are encoded.

pub mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cirrus_codec::{ByteString, PacketId, SubscriptionOptions};

use self::redis::{Pending, RedisStore, StoreError};
use crate::message::{Message, StoreAck};
use crate::session::Session;

/// Where the state that outlives a connection is kept. The broker and its
/// connections call only these operations; each store answers them in its
/// own way.
pub enum Store {
    /// This pod alone: what outlives a connection stays in
    /// [`crate::local::Local`] (sessions, subscriptions, retained
    /// messages, will and expiry timers in [`crate::broker`]); there is
    /// nothing to write elsewhere and nobody else to tell.
    Memory,
    /// Redis, shared by every pod (claims and releases of sessions are
    /// [`RedisStore::claim`] and [`RedisStore::release`], called by the
    /// broker's connect and disconnect).
    Redis(Arc<RedisStore>),
}

impl Store {
    /// Whether sessions outlive this pod (they live in Redis).
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Redis(_))
    }

    /// Whether the store can take new work (always, for memory).
    pub fn is_ready(&self) -> bool {
        match self {
            Store::Memory => true,
            Store::Redis(r) => r.is_ready(),
        }
    }

    /// The rest of a publish once the subscribers here have it: a retained
    /// message kept here (`retained`) is kept in Redis too, and the message
    /// goes to the other pods, shared groups and persistent sessions that
    /// want it. Returns their number and what a QoS 1/2 acknowledgement
    /// waits for.
    pub fn publish_elsewhere(
        &self,
        msg: &Arc<Message>,
        retained: bool,
    ) -> (usize, Option<Pending>) {
        match self {
            Store::Memory => (0, None),
            Store::Redis(r) => {
                if retained {
                    r.retain(msg);
                }
                r.forward(msg)
            }
        }
    }

    /// The client has a message of a stream (its session's, or a shared
    /// group's), or a counted rule dropped it: let go of the entry.
    pub fn ack(&self, client_id: &ByteString, ack: Option<Box<StoreAck>>) {
        if let (Some(ack), Store::Redis(r)) = (ack, self) {
            r.ack(client_id, *ack);
        }
    }

    /// Whether an outgoing QoS 2 message's PUBREC must be recorded in the
    /// store before PUBREL: one of the session's stream
    /// ([`Store::delivered_qos2`]).
    pub fn records_qos2(&self, ack: Option<&StoreAck>) -> bool {
        self.is_shared() && ack.and_then(StoreAck::session_id).is_some()
    }

    /// PUBREC of a message of the session's stream: what PUBREL waits for
    /// (none when there is nothing to record).
    pub fn delivered_qos2(
        &self,
        client_id: &ByteString,
        ack: &StoreAck,
        pid: PacketId,
        epoch: u64,
    ) -> Option<Pending> {
        match (self, ack) {
            (Store::Redis(r), StoreAck::Session(entry)) => {
                Some(r.delivered_qos2(client_id, entry, pid, epoch))
            }
            _ => None,
        }
    }

    /// PUBCOMP of a message of the session's stream.
    pub fn completed_qos2(&self, session: &Session, pid: PacketId) {
        if let (Store::Redis(r), true) = (self, session.is_stream_fed()) {
            r.completed_qos2(&session.client_id, pid);
        }
    }

    /// A subscription was added here (`announce`: by the client, so a
    /// persistent session's copy in the store changes too). Returns when
    /// the store has it.
    pub async fn subscribed(
        &self,
        session: &Session,
        full: &ByteString,
        o: SubscriptionOptions,
        sub_id: Option<u32>,
        existed: bool,
        announce: bool,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory => Ok(()),
            Store::Redis(r) => {
                r.subscribed(session, full, o, sub_id, existed, announce)
                    .await
            }
        }
    }

    /// The client removed a subscription.
    pub async fn unsubscribed(&self, session: &Session, full: &ByteString) {
        if let Store::Redis(r) = self {
            r.unsubscribed(session, full).await;
        }
    }

    /// A session ended or left this pod with these subscriptions.
    pub fn session_left(&self, client_id: &ByteString, filters: &[ByteString]) {
        if let Store::Redis(r) = self {
            r.stop_puller(client_id);
            r.dropped_local(filters);
        }
    }

    /// Run work that must land before shutdown ends (under the store's
    /// tasks; for memory, a plain task).
    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self {
            Store::Memory => {
                tokio::spawn(f);
            }
            Store::Redis(r) => r.spawn(f),
        }
    }

    /// After the connections have drained: land what is queued and stop
    /// (at most `deadline`).
    pub async fn stop(&self, deadline: Duration) {
        if let Store::Redis(r) = self {
            r.stop(deadline).await;
        }
    }
}
