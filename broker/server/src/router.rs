//! The subscription router: a topic trie from filters to sessions.
//!
//! Publishers read it on every message, subscribers change it rarely, so it
//! is a persistent (structurally shared) trie behind an `ArcSwap`: a lookup
//! loads the current root without any lock, and a change copies only the
//! path it touches and swaps the root in. Writers serialise on a mutex that
//! the publish path never takes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use cirrus_codec::{ByteString, SubscriptionOptions};
use parking_lot::Mutex;

use crate::session::Session;

#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

#[derive(Clone, Default)]
struct SharedGroup {
    members: imbl::Vector<Subscriber>,
    /// Round-robin position; shared by all snapshots of this group.
    next: Arc<AtomicUsize>,
}

#[derive(Clone, Default)]
struct Node {
    children: imbl::HashMap<ByteString, Node>,
    subscribers: imbl::HashMap<u64, Subscriber>,
    shared: imbl::HashMap<ByteString, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// One subscriber chosen for a message (before per-session merging).
#[derive(Clone)]
pub struct Match {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
    pub shared: bool,
}

#[derive(Default)]
pub struct Router {
    root: ArcSwap<Node>,
    writer: Mutex<()>,
}

fn node_at<'a>(node: &'a mut Node, filter: &str) -> &'a mut Node {
    let mut node = node;
    for level in filter.split('/') {
        node = node.children.entry(ByteString::from(level)).or_default();
    }
    node
}

/// Remove along `levels`, pruning nodes left empty. Returns whether `f`
/// found something to remove.
fn remove_at(node: &mut Node, levels: &[&str], f: &mut dyn FnMut(&mut Node) -> bool) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return f(node);
    };
    let key = ByteString::from(*first);
    let Some(child) = node.children.get_mut(&key) else {
        return false;
    };
    let removed = remove_at(child, rest, f);
    if child.is_empty() {
        node.children.remove(&key);
    }
    removed
}

impl Router {
    pub fn new() -> Self {
        Router::default()
    }

    fn update<R>(&self, f: impl FnOnce(&mut Node) -> R) -> R {
        let _w = self.writer.lock();
        let mut root = Node::clone(&self.root.load());
        let r = f(&mut root);
        self.root.store(Arc::new(root));
        r
    }

    /// Add or replace a subscription. `share_group` is the `$share` group.
    pub fn subscribe(&self, share_group: Option<&str>, filter: &str, sub: Subscriber) {
        self.update(|root| {
            let node = node_at(root, filter);
            match share_group {
                None => {
                    node.subscribers.insert(sub.session.id, sub);
                }
                Some(g) => {
                    let group = node.shared.entry(ByteString::from(g)).or_default();
                    let id = sub.session.id;
                    match group.members.iter().position(|m| m.session.id == id) {
                        Some(i) => {
                            group.members.set(i, sub);
                        }
                        None => group.members.push_back(sub),
                    }
                }
            }
        })
    }

    /// Remove a session's subscription; returns whether it existed.
    pub fn unsubscribe(&self, share_group: Option<&str>, filter: &str, session_id: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        self.update(|root| {
            remove_at(root, &levels, &mut |node| match share_group {
                None => node.subscribers.remove(&session_id).is_some(),
                Some(g) => {
                    let key = ByteString::from(g);
                    let Some(group) = node.shared.get_mut(&key) else {
                        return false;
                    };
                    let Some(i) = group
                        .members
                        .iter()
                        .position(|m| m.session.id == session_id)
                    else {
                        return false;
                    };
                    group.members.remove(i);
                    if group.members.is_empty() {
                        node.shared.remove(&key);
                    }
                    true
                }
            })
        })
    }

    /// Every subscription matching `topic`, appended to `out`. For each
    /// shared group one member is chosen, preferring online sessions.
    pub fn matches(&self, topic: &str, out: &mut Vec<Match>) {
        let root = self.root.load();
        cirrus_codec::topic::visit_matches(&**root, topic, &mut |n| push_all(n, out));
    }

    /// One member of a shared group, round robin, preferring online
    /// sessions (the Redis store delivers shared messages per pod).
    pub fn pick_shared(&self, group: &str, filter: &str) -> Option<Match> {
        let root = self.root.load();
        let mut node: &Node = &root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        let g = node.shared.get(group)?;
        let mut out = Vec::with_capacity(1);
        let single = Node {
            shared: imbl::HashMap::unit(ByteString::from(group), g.clone()),
            ..Node::default()
        };
        push_all(&single, &mut out);
        out.pop()
    }

    /// Whether a shared group has a member online on this pod.
    pub fn has_online_shared(&self, group: &str, filter: &str) -> bool {
        let root = self.root.load();
        let mut node: &Node = &root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return false,
            }
        }
        node.shared
            .get(group)
            .is_some_and(|g| g.members.iter().any(|m| m.session.is_online()))
    }

    /// Number of filters in the trie (for tests and metrics).
    pub fn count(&self) -> usize {
        fn walk(n: &Node) -> usize {
            n.subscribers.len()
                + n.shared.values().map(|g| g.members.len()).sum::<usize>()
                + n.children.values().map(walk).sum::<usize>()
        }
        walk(&self.root.load())
    }
}

fn push_all(node: &Node, out: &mut Vec<Match>) {
    for s in node.subscribers.values() {
        out.push(Match {
            session: s.session.clone(),
            options: s.options,
            sub_id: s.sub_id,
            shared: false,
        });
    }
    for g in node.shared.values() {
        let n = g.members.len();
        if n == 0 {
            continue;
        }
        let start = g.next.fetch_add(1, Ordering::Relaxed);
        let pick = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| g.members.get(i).is_some_and(|m| m.session.is_online()))
            .unwrap_or(start % n);
        if let Some(m) = g.members.get(pick) {
            out.push(Match {
                session: m.session.clone(),
                options: m.options,
                sub_id: m.sub_id,
                shared: true,
            });
        }
    }
}

impl cirrus_codec::topic::LevelTrie for Node {
    fn child(&self, level: &str) -> Option<&Self> {
        self.children.get(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cirrus_codec::{Protocol, QoS};

    fn sub(id: u64) -> Subscriber {
        Subscriber {
            session: Session::new(id, ByteString::from(format!("c{id}")), Protocol::V5),
            options: SubscriptionOptions::new(QoS::AtLeastOnce),
            sub_id: None,
        }
    }

    fn ids(r: &Router, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        r.matches(topic, &mut out);
        let mut v: Vec<u64> = out.iter().map(|m| m.session.id).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar() {
        let r = Router::new();
        r.subscribe(None, "a/b", sub(1));
        r.subscribe(None, "a/+", sub(2));
        r.subscribe(None, "a/#", sub(3));
        r.subscribe(None, "#", sub(4));
        r.subscribe(None, "+/b", sub(5));
        r.subscribe(None, "$SYS/#", sub(6));
        assert_eq!(ids(&r, "a/b"), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(&r, "a"), vec![3, 4]);
        assert_eq!(ids(&r, "a/b/c"), vec![3, 4]);
        assert_eq!(ids(&r, "$SYS/x"), vec![6]);
        assert!(r.unsubscribe(None, "a/+", 2));
        assert!(!r.unsubscribe(None, "a/+", 2));
        assert_eq!(ids(&r, "a/b"), vec![1, 3, 4, 5]);
        for (f, id) in [("a/b", 1), ("a/#", 3), ("#", 4), ("+/b", 5), ("$SYS/#", 6)] {
            assert!(r.unsubscribe(None, f, id));
        }
        assert_eq!(r.count(), 0);
        assert!(r.root.load().is_empty());
    }

    #[test]
    fn shared_round_robin() {
        let r = Router::new();
        r.subscribe(Some("g"), "t/+", sub(1));
        r.subscribe(Some("g"), "t/+", sub(2));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend(ids(&r, "t/x"));
        }
        seen.sort();
        // all offline: strict rotation between the two members
        assert_eq!(seen, vec![1, 1, 2, 2]);
        assert!(r.unsubscribe(Some("g"), "t/+", 1));
        assert_eq!(ids(&r, "t/x"), vec![2]);
    }

    #[test]
    fn snapshot_is_stable_while_writing() {
        let r = Router::new();
        r.subscribe(None, "x", sub(1));
        let before = r.root.load_full();
        r.subscribe(None, "x", sub(2));
        assert_eq!(
            before.children.get("x").map(|n| n.subscribers.len()),
            Some(1)
        );
        assert_eq!(ids(&r, "x"), vec![1, 2]);
    }
}
