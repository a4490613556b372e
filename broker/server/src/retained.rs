//! Retained messages: one per topic, in a trie so that a wildcard subscribe
//! visits only the branches its filter can match.

use std::collections::HashMap;
use std::sync::Arc;

use cirrus_codec::ByteString;
use parking_lot::Mutex;

use crate::message::Message;

#[derive(Default)]
struct Node {
    children: HashMap<ByteString, Node>,
    message: Option<Arc<Message>>,
}

/// Taken only by publishes with RETAIN set and by subscribes; ordinary
/// publishes never touch it.
#[derive(Default)]
pub struct RetainedStore {
    inner: Mutex<(Node, usize)>,
}

/// Outcome of [`RetainedStore::set`].
#[derive(Debug, PartialEq, Eq)]
pub enum SetOutcome {
    Stored,
    Deleted,
    Full,
}

impl RetainedStore {
    pub fn new() -> Self {
        RetainedStore::default()
    }

    /// Store `msg` for its topic, or delete the topic's message when the
    /// payload is empty ([MQTT-3.3.1-6]).
    pub fn set(&self, msg: Arc<Message>, max: usize) -> SetOutcome {
        let mut guard = self.inner.lock();
        let (root, count) = &mut *guard;
        let levels: Vec<&str> = msg.topic.split('/').collect();
        if msg.payload.is_empty() {
            if remove(root, &levels) {
                *count -= 1;
            }
            return SetOutcome::Deleted;
        }
        let mut node = &mut *root;
        for l in &levels {
            node = node.children.entry(ByteString::from(*l)).or_default();
        }
        if node.message.is_none() {
            if *count >= max {
                return SetOutcome::Full;
            }
            *count += 1;
        }
        node.message = Some(msg);
        SetOutcome::Stored
    }

    /// Retained messages whose topic matches `filter`.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let guard = self.inner.lock();
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&guard.0, &levels, true, out);
    }

    /// Replace everything (a pod reloading the Redis store's retained set).
    pub fn replace(&self, msgs: Vec<Arc<Message>>, max: usize) {
        *self.inner.lock() = (Node::default(), 0);
        for m in msgs {
            self.set(m, max);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn all(node: &Node, out: &mut Vec<Arc<Message>>) {
    if let Some(m) = &node.message {
        out.push(m.clone());
    }
    for c in node.children.values() {
        all(c, out);
    }
}

fn walk(node: &Node, levels: &[&str], first: bool, out: &mut Vec<Arc<Message>>) {
    let Some((level, rest)) = levels.split_first() else {
        if let Some(m) = &node.message {
            out.push(m.clone());
        }
        return;
    };
    let skip_dollar = |k: &ByteString| first && k.starts_with('$');
    match *level {
        "#" => {
            if let Some(m) = &node.message {
                if !first {
                    out.push(m.clone());
                }
            }
            for (k, c) in &node.children {
                if !skip_dollar(k) {
                    all(c, out);
                }
            }
        }
        "+" => {
            for (k, c) in &node.children {
                if !skip_dollar(k) {
                    walk(c, rest, false, out);
                }
            }
        }
        l => {
            if let Some(c) = node.children.get(l) {
                walk(c, rest, false, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cirrus_codec::{Bytes, Properties, QoS};

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: ByteString::from(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            expires_at: None,
            publisher: None,
            received: std::time::Instant::now(),
        })
    }

    fn topics(s: &RetainedStore, f: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.matching(f, &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn set_match_delete() {
        let s = RetainedStore::new();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up"] {
            assert_eq!(s.set(msg(t, b"1"), 100), SetOutcome::Stored);
        }
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&s, "+/b"), vec!["a/b", "x/b"]);
        assert_eq!(topics(&s, "#"), vec!["a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS/up"]);
        assert_eq!(s.len(), 5);
        assert_eq!(s.set(msg("a/b", b""), 100), SetOutcome::Deleted);
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b/c"]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.set(msg("new", b"1"), 4), SetOutcome::Full);
    }
}
