//! Every key the store writes, with its hash tag.
//!

pub const NODES: &str = "cirrus:{g}:nodes";
pub const EVENTS: &str = "cirrus:{g}:events";
pub const PSUBS: &str = "cirrus:{g}:psubs";
pub const RETAINED: &str = "cirrus:{g}:retained";
pub const EXPIRY: &str = "cirrus:{g}:expiry";
/// Client id → when its delayed will is due (Redis time, ms).
pub const WILLS: &str = "cirrus:{g}:wills";
/// Pod → its connection count (for rebalancing).
pub const LOAD: &str = "cirrus:{g}:load";
/// Pods draining now (they share the drain rate).
pub const DRAINING: &str = "cirrus:{g}:draining";
/// Pod → `"<since ms> <revision>"`: which template revision each pod runs
/// (a rollout shows as two), since when by Redis time.
pub const REVISIONS: &str = "cirrus:{g}:revisions";
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
