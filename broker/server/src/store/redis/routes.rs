//! The cluster's route table as every pod keeps it in memory: which pods
//! have subscribers for which filters, which shared groups exist, and which
//! persistent sessions subscribe to what. A publish is matched here, so a
//! pod pays Redis work only for the pods and sessions that want a message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cirrus_codec::{ByteString, QoS};

/// A persistent session's interest in one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSub {
    pub qos: QoS,
    pub no_local: bool,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Pods with at least one (non-shared) subscriber for this filter.
    nodes: HashSet<Arc<str>>,
    /// `$share/{group}/{filter}` → pods with members.
    shares: HashMap<ByteString, HashSet<Arc<str>>>,
    /// Persistent sessions subscribed to this filter.
    sessions: HashMap<ByteString, SessionSub>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.nodes.is_empty()
            && self.shares.is_empty()
            && self.sessions.is_empty()
    }
}

/// Where one publish has to go.
#[derive(Debug, Default)]
pub struct Targets {
    pub nodes: Vec<Arc<str>>,
    pub shares: Vec<ByteString>,
    /// Persistent sessions, with the highest QoS of their matching filters.
    pub sessions: Vec<(ByteString, QoS)>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.shares.is_empty() && self.sessions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nodes.len() + self.shares.len() + self.sessions.len()
    }
}

#[derive(Default)]
pub struct RemoteRoutes {
    root: Node,
    /// Filters by pod, to drop a dead pod's routes at once.
    by_node: HashMap<Arc<str>, HashSet<ByteString>>,
}

fn split_share(full: &str) -> (Option<&str>, &str) {
    match cirrus_codec::topic::parse_filter(full) {
        Ok(f) => (f.share_group, f.filter),
        Err(_) => (None, full),
    }
}

fn node_at<'a>(root: &'a mut Node, filter: &str) -> &'a mut Node {
    let mut n = root;
    for l in filter.split('/') {
        n = n.children.entry(Box::from(l)).or_default();
    }
    n
}

fn remove_at(node: &mut Node, levels: &[&str], f: &mut dyn FnMut(&mut Node)) {
    let Some((first, rest)) = levels.split_first() else {
        f(node);
        return;
    };
    if let Some(child) = node.children.get_mut(*first) {
        remove_at(child, rest, f);
        if child.is_empty() {
            node.children.remove(*first);
        }
    }
}

impl RemoteRoutes {
    pub fn add_node_route(&mut self, node: &Arc<str>, full: &ByteString) {
        let (group, filter) = split_share(full);
        let n = node_at(&mut self.root, filter);
        if group.is_some() {
            n.shares
                .entry(full.clone())
                .or_default()
                .insert(node.clone());
        } else {
            n.nodes.insert(node.clone());
        }
        self.by_node
            .entry(node.clone())
            .or_default()
            .insert(full.clone());
    }

    pub fn remove_node_route(&mut self, node: &str, full: &str) {
        let (group, filter) = split_share(full);
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, &mut |n| {
            if group.is_some() {
                if let Some(set) = n.shares.get_mut(full) {
                    set.remove(node);
                    if set.is_empty() {
                        n.shares.remove(full);
                    }
                }
            } else {
                n.nodes.remove(node);
            }
        });
        if let Some(set) = self.by_node.get_mut(node) {
            set.remove(full);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// Forget every route of a pod (it died, or it restarted and will
    /// announce its routes again).
    pub fn drop_node(&mut self, node: &str) {
        let Some(filters) = self.by_node.remove(node) else {
            return;
        };
        for f in filters {
            self.remove_node_route(node, &f);
        }
    }

    pub fn add_session(&mut self, client_id: &ByteString, filter: &str, sub: SessionSub) {
        node_at(&mut self.root, filter)
            .sessions
            .insert(client_id.clone(), sub);
    }

    pub fn remove_session(&mut self, client_id: &str, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, &mut |n| {
            n.sessions.remove(client_id);
        });
    }

    /// Everything that wants `topic`, except pod `me`'s own node routes
    /// (its local subscribers are served without Redis).
    pub fn matches(&self, topic: &str, publisher: Option<&str>, me: &str, out: &mut Targets) {
        cirrus_codec::topic::visit_matches(&self.root, topic, &mut |n: &Node| {
            for p in &n.nodes {
                if &**p != me && !out.nodes.contains(p) {
                    out.nodes.push(p.clone());
                }
            }
            for (full, pods) in &n.shares {
                if !pods.is_empty() && !out.shares.contains(full) {
                    out.shares.push(full.clone());
                }
            }
            for (cid, s) in &n.sessions {
                if s.no_local && publisher == Some(&**cid) {
                    continue;
                }
                match out.sessions.iter_mut().find(|(c, _)| c == cid) {
                    Some((_, q)) => *q = (*q).max(s.qos),
                    None => out.sessions.push((cid.clone(), s.qos)),
                }
            }
        });
    }

    pub fn route_count(&self) -> usize {
        self.by_node.values().map(HashSet::len).sum()
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

    fn n(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn only_interested_pods_and_sessions_match() {
        let mut r = RemoteRoutes::default();
        r.add_node_route(&n("a"), &ByteString::from("x/+"));
        r.add_node_route(&n("b"), &ByteString::from("x/#"));
        r.add_node_route(&n("b"), &ByteString::from("$share/g/x/y"));
        r.add_node_route(&n("c"), &ByteString::from("$share/g/x/y"));
        r.add_node_route(&n("c"), &ByteString::from("other"));
        r.add_session(
            &ByteString::from("s1"),
            "x/y",
            SessionSub {
                qos: QoS::AtLeastOnce,
                no_local: false,
            },
        );
        r.add_session(
            &ByteString::from("s1"),
            "#",
            SessionSub {
                qos: QoS::ExactlyOnce,
                no_local: false,
            },
        );
        let mut t = Targets::default();
        r.matches("x/y", None, "a", &mut t);
        assert_eq!(t.nodes, vec![n("b")]);
        assert_eq!(t.shares, vec![ByteString::from("$share/g/x/y")]);
        assert_eq!(t.sessions, vec![(ByteString::from("s1"), QoS::ExactlyOnce)]);

        r.drop_node("b");
        let mut t = Targets::default();
        r.matches("x/y", None, "a", &mut t);
        assert!(t.nodes.is_empty());
        assert_eq!(t.shares.len(), 1, "pod c still has a member");
        r.remove_node_route("c", "$share/g/x/y");
        r.remove_session("s1", "x/y");
        r.remove_session("s1", "#");
        let mut t = Targets::default();
        r.matches("x/y", Some("s1"), "z", &mut t);
        assert_eq!(t.nodes, vec![n("a")]);
        assert!(t.shares.is_empty() && t.sessions.is_empty());
        assert_eq!(r.route_count(), 2);
    }

    #[test]
    fn dollar_topics_skip_wildcards_and_no_local_skips_publisher() {
        let mut r = RemoteRoutes::default();
        r.add_node_route(&n("a"), &ByteString::from("#"));
        r.add_session(
            &ByteString::from("me"),
            "t",
            SessionSub {
                qos: QoS::AtLeastOnce,
                no_local: true,
            },
        );
        let mut t = Targets::default();
        r.matches("$SYS/x", None, "z", &mut t);
        assert!(t.is_empty());
        r.matches("t", Some("me"), "z", &mut t);
        assert_eq!(t.nodes, vec![n("a")]);
        assert!(t.sessions.is_empty());
    }
}
