//! Where the state that outlives a connection lives.
//!
//! With no Redis configured, a pod is alone and keeps everything in its own
//! memory: sessions, the router and retained messages in [`crate::broker`].
//! With a Redis URL, the pod is one of many: [`redis::RedisStore`] keeps
//! sessions, subscriptions, in-flight and queued messages and retained
//! messages in Redis, and carries publishes between pods over Redis
//! Streams (see `docs/architecture.md`).
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
