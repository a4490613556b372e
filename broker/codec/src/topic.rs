//! Topic names and filters (4.7): validation, shared-subscription parsing and
//! matching.

/// A topic name a PUBLISH may carry: not empty, no wildcard, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 65535
        && !topic.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// A topic filter: `#` only as the whole last level, `+` only as a whole level.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65535 || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// A subscription filter split into its share group and its topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRef<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Why a filter in SUBSCRIBE or UNSUBSCRIBE is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterError {
    Invalid,
    BadShare,
}

/// Parse `$share/{group}/{filter}` or a plain filter, validating both parts.
pub fn parse_filter(full: &str) -> Result<FilterRef<'_>, FilterError> {
    if let Some(rest) = full.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(FilterError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || !valid_topic_filter(filter) {
            return Err(FilterError::BadShare);
        }
        return Ok(FilterRef {
            share_group: Some(group),
            filter,
        });
    }
    if full == "$share" || !valid_topic_filter(full) {
        return Err(FilterError::Invalid);
    }
    Ok(FilterRef {
        share_group: None,
        filter: full,
    })
}

/// A trie whose edges are topic levels (`+` and `#` are edges too), as the
/// broker's route tables are.
pub trait LevelTrie {
    fn child(&self, level: &str) -> Option<&Self>;
}

/// Call `f` on every node of `root` reached by a filter that matches
/// `topic`: exact levels, `+`, and `#` (which also matches the parent
/// level); wildcards at the first level do not match `$` topics.
pub fn visit_matches<N: LevelTrie>(root: &N, topic: &str, f: &mut dyn FnMut(&N)) {
    fn walk<'a, N: LevelTrie>(
        node: &N,
        mut levels: impl Iterator<Item = &'a str> + Clone,
        first: bool,
        dollar: bool,
        f: &mut dyn FnMut(&N),
    ) {
        let wild_ok = !(first && dollar);
        if wild_ok {
            if let Some(hash) = node.child("#") {
                f(hash);
            }
        }
        let Some(level) = levels.next() else {
            f(node);
            return;
        };
        if let Some(child) = node.child(level) {
            walk(child, levels.clone(), false, dollar, f);
        }
        if wild_ok {
            if let Some(plus) = node.child("+") {
                walk(plus, levels, false, dollar, f);
            }
        }
    }
    walk(root, topic.split('/'), true, topic.starts_with('$'), f);
}

/// Whether `filter` matches `topic`, with the rule that `+` and `#` at the
/// first level do not match topics starting with `$` ([MQTT-4.7.2-1]).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "a", "a/b", "#", "+", "a/+/c", "a/#", "+/+", "/", "//", "$SYS/#", "+/",
        ] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "##", "a\0b"] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name(""));
    }

    #[test]
    fn shared() {
        let f = parse_filter("$share/g/a/+").unwrap();
        assert_eq!(f.share_group, Some("g"));
        assert_eq!(f.filter, "a/+");
        assert_eq!(parse_filter("$share/g"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share//a"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/g+/a"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("a/#/b"), Err(FilterError::Invalid));
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/+", "a/"));
    }
}
