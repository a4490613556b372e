//! # cirrus-config
//!
//! The two files through which the operator and the broker meet, defined
//! once so they cannot drift:
//! - [`broker`]: the broker configuration (YAML), which the operator writes
//!   into a ConfigMap and the broker reads with `--config`.
//! - [`auth`]: the auth file (users with password hashes and ACL rules),
//!   which the operator writes into the broker's auth Secret.
//!
//! Serde types only: no I/O beyond reading a file, no async.

pub mod auth;
pub mod broker;

pub use broker::{Config, ConfigError, Drain, DrainReason, Rebalance};
