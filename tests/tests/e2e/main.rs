//! End-to-end tests: each starts a real `cirrus-broker` process on a free
//! loopback port and speaks to it over TCP with real clients.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod auth;
mod connect;
mod edges;
mod interop;
mod limits;
mod metrics;
mod qos;
mod retain;
mod session;
mod shutdown;
mod tls;
mod v5;
mod websocket;
