//! # cirrus-e2e
//!
//! Helpers for tests that run real processes: [`BrokerProcess`] starts the
//! `cirrus-broker` binary on a free loopback port, [`Client`] is a small MQTT
//! client on the project's codec, and [`tool`] finds the Debian clients
//! (`mosquitto_pub`, `mosquitto_sub`, Python with paho) the suite also uses.
//! [`k8s`] gives the operator tests a real Kubernetes API server, [`node`] a
//! one-node cluster where brokers run as real pods.
//!
//! Tests talk to the broker's address only, never to its internals, so the
//! same tests run against any store the broker is started with: with
//! `CIRRUS_TEST_STORE=redis` every [`BrokerProcess`] gets its own real
//! `redis-server` ([`RedisServer`]) and runs on the Redis store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod client;
pub mod fleet;
pub mod k8s;
pub mod load;
pub mod node;
pub mod otlp;
pub mod process;
pub mod redis;

pub use client::{Client, Next, Opts};
pub use process::{broker_bin, run_python, tool, BrokerProcess};
pub use redis::{redis_store_wanted, RedisCluster, RedisServer};

/// How long any single wait in a test may take.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
