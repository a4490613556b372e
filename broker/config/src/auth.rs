//! The auth file, version 1: the contract between the operator (which writes
//! it into the broker's auth Secret) and the broker (which enforces it).
//!
//! ```yaml
//! version: 1
//! allow_anonymous: false        # clients without a user name
//! anonymous_acl: []             # rules for anonymous clients, when allowed
//! default: deny                 # when no rule matches: allow | deny
//! users:
//!   - username: alice
//!     password_hash: "$argon2id$v=19$m=19456,t=2,p=1$...$..."   # PHC string; never plaintext
//!     # during a password rotation, the hash before and until when (unix
//!     # seconds) it also logs in:
//!     # previous_password_hash: "$argon2id$..."
//!     # previous_valid_until: 1796000000
//!     acl:
//!       - { topic: "sensors/%u/#", access: publish, permission: allow }
//!       - { topic: "#", access: subscribe, permission: allow }
//! ```
//!
//! Rules are checked in order; the first whose topic filter matches decides.
//! `%u` and `%c` in a filter stand for the user name and the client id.
//!
//! Many users need not fit one file (a Kubernetes Secret holds 1 MiB):
//! `user_files` names more files beside this one, each `users: [...]`
//! ([`UsersFile`]); the broker reads them all as one list, a user name
//! once in all of them.

use serde::{Deserialize, Serialize};

/// The only version this code writes and reads.
pub const AUTH_FILE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub version: u32,
    #[serde(default)]
    pub allow_anonymous: bool,
    #[serde(default)]
    pub anonymous_acl: Vec<AclRule>,
    #[serde(default)]
    pub default: Permission,
    #[serde(default)]
    pub users: Vec<User>,
    /// More users: files in this file's directory (plain names), each a
    /// [`UsersFile`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_files: Vec<String>,
}

impl Default for AuthFile {
    fn default() -> Self {
        AuthFile {
            version: AUTH_FILE_VERSION,
            allow_anonymous: false,
            anonymous_acl: Vec::new(),
            default: Permission::Deny,
            users: Vec::new(),
            user_files: Vec::new(),
        }
    }
}

/// A file of more users, named in an auth file's `user_files`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default)]
    pub users: Vec<User>,
}

impl UsersFile {
    pub fn from_yaml(text: &str) -> Result<UsersFile, AuthFileError> {
        Ok(serde_yaml::from_str(text)?)
    }

    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    /// A PHC string (argon2id recommended). Plaintext is never accepted.
    pub password_hash: String,
    /// During a password rotation: the hash of the password before, which
    /// also logs in until `previous_valid_until` (unix seconds), so that
    /// clients can move to the new password without being cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<u64>,
    /// Where the password came from, for the writer's bookkeeping (the
    /// operator: the password Secret's uid and resourceVersion, so that an
    /// unchanged Secret keeps its hash without hashing again). Nothing
    /// derived from the password; the broker does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_source: Option<String>,
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// A topic filter; `%u` and `%c` are replaced by user name and client id.
    pub topic: String,
    pub access: Access,
    pub permission: Permission,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Publish,
    Subscribe,
    All,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    #[default]
    Deny,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("auth file is not valid YAML for version {AUTH_FILE_VERSION}: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error(
        "auth file version {0} is not supported (this broker reads version {AUTH_FILE_VERSION})"
    )]
    Version(u32),
    #[error("user {0:?} appears more than once")]
    DuplicateUser(String),
    #[error("user {user:?}: the password hash is not a PHC string")]
    NotAHash { user: String },
    #[error("user file {0:?} is not a plain file name beside the auth file")]
    BadUserFile(String),
}

impl AuthFile {
    pub fn from_yaml(text: &str) -> Result<AuthFile, AuthFileError> {
        let f: AuthFile = serde_yaml::from_str(text)?;
        f.validate()?;
        Ok(f)
    }

    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// Structural checks. Errors name the user but never carry a hash.
    pub fn validate(&self) -> Result<(), AuthFileError> {
        if self.version != AUTH_FILE_VERSION {
            return Err(AuthFileError::Version(self.version));
        }
        if let Some(f) = self
            .user_files
            .iter()
            .find(|f| f.is_empty() || f.contains('/') || f.starts_with('.'))
        {
            return Err(AuthFileError::BadUserFile(f.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if !seen.insert(u.username.as_str()) {
                return Err(AuthFileError::DuplicateUser(u.username.clone()));
            }
            let not_a_hash = |h: &str| !h.starts_with('$') || h.split('$').count() < 4;
            if not_a_hash(&u.password_hash)
                || u.previous_password_hash.as_deref().is_some_and(not_a_hash)
            {
                return Err(AuthFileError::NotAHash {
                    user: u.username.clone(),
                });
            }
        }
        Ok(())
    }
}

/// How [`set_password`] changed the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// A new file was made.
    Created,
    /// The user's line was replaced or its entry appended; the rest of the
    /// text (comments included) is as it was.
    InPlace,
    /// The file was written anew from its parsed form (its layout did not
    /// allow an edit in place): comments are gone, everything else kept.
    Rewritten,
}

/// A YAML double-quoted scalar.
fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The scalar a `key: value` line holds, quotes removed (plain, single- or
/// double-quoted without escapes), if the line is that key.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line
        .trim_start()
        .strip_prefix("- ")
        .unwrap_or(line.trim_start());
    let v = rest
        .trim_start()
        .strip_prefix(key)?
        .strip_prefix(':')?
        .trim();
    let v = match v.find(" #") {
        Some(i) => v[..i].trim_end(),
        None => v,
    };
    Some(
        v.strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v),
    )
}

/// Add `username` with `password_hash` to an auth file's text, or replace
/// that user's hash, keeping everything else: the text is edited in place
/// when its layout is the usual block style, and the result is parsed
/// again and compared with the original, so an edit can never change
/// another user, rule or setting. Otherwise the file is written anew from
/// its parsed form. An empty text makes a new file in which users may do
/// everything (`default: allow`), as a broker with only a password file
/// would; ACL rules narrow that.
pub fn set_password(
    text: &str,
    username: &str,
    password_hash: &str,
) -> Result<(String, Edit), AuthFileError> {
    let entry = |indent: &str| {
        format!(
            "{indent}- username: {}\n{indent}  password_hash: {}\n",
            quoted(username),
            quoted(password_hash)
        )
    };
    if text.trim().is_empty() {
        let new = format!(
            "# Cirrus auth file (docs/auth.md). Users may do everything unless\n\
             # rules say otherwise: add `acl:` rules per user, or set `default: deny`.\n\
             version: {AUTH_FILE_VERSION}\nallow_anonymous: false\ndefault: allow\nusers:\n{}",
            entry("  ")
        );
        AuthFile::from_yaml(&new)?;
        return Ok((new, Edit::Created));
    }
    let before = AuthFile::from_yaml(text)?;
    let mut want = before.clone();
    match want.users.iter_mut().find(|u| u.username == username) {
        Some(u) => u.password_hash = password_hash.to_string(),
        None => want.users.push(User {
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            previous_password_hash: None,
            previous_valid_until: None,
            password_source: None,
            acl: Vec::new(),
        }),
    }
    if let Some(edited) = edit_in_place(text, username, password_hash, &entry) {
        if AuthFile::from_yaml(&edited).ok().as_ref() == Some(&want) {
            return Ok((edited, Edit::InPlace));
        }
    }
    let rewritten = want.to_yaml()?;
    Ok((rewritten, Edit::Rewritten))
}

/// The block-style edit of [`set_password`]; `None` when the layout is not
/// the one it knows (the caller then rewrites the file).
fn edit_in_place(
    text: &str,
    username: &str,
    hash: &str,
    entry: &dyn Fn(&str) -> String,
) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let top = |l: &str| !l.is_empty() && !l.starts_with([' ', '\t', '#', '-']);
    let Some(users) = lines.iter().position(|l| {
        l.starts_with("users:") && {
            let v = l["users:".len()..].trim();
            v.is_empty() || v.starts_with('#')
        }
    }) else {
        // No block `users:` key at all: append one (a flow `users: []`
        // is left to the rewrite).
        if lines.iter().any(|l| l.starts_with("users:")) {
            return None;
        }
        let mut out = text.to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("users:\n");
        out.push_str(&entry("  "));
        return Some(out);
    };
    // The block: every line after `users:` until the next top-level key.
    let end = lines[users + 1..]
        .iter()
        .position(|l| top(l))
        .map_or(lines.len(), |i| users + 1 + i);
    let items: Vec<usize> = (users + 1..end)
        .filter(|&i| lines[i].trim_start().starts_with("- "))
        .collect();
    let dash = items
        .first()
        .map(|&i| &lines[i][..lines[i].len() - lines[i].trim_start().len()])
        .unwrap_or("  ");
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    for (k, &start) in items.iter().enumerate() {
        let stop = items.get(k + 1).copied().unwrap_or(end);
        let ours = (start..stop).any(|i| value_of(lines[i], "username") == Some(username));
        if !ours {
            continue;
        }
        let at = (start..stop).find(|&i| value_of(lines[i], "password_hash").is_some())?;
        let line = lines[at];
        let key = line.find("password_hash")?;
        out[at] = format!("{}password_hash: {}", &line[..key], quoted(hash));
        let mut s = out.join("\n");
        if text.ends_with('\n') {
            s.push('\n');
        }
        return Some(s);
    }
    // A new user: after the last non-blank line of the block.
    let last = (users..end).rev().find(|&i| !lines[i].trim().is_empty())?;
    let new = entry(dash);
    out.insert(last + 1, new.trim_end_matches('\n').to_string());
    let mut s = out.join("\n");
    if text.ends_with('\n') || last + 2 >= out.len() {
        s.push('\n');
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";
    const H2: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdDI$aGFzaDI";

    #[test]
    fn set_password_makes_edits_and_keeps_comments() {
        let (new, how) = set_password("", "alice", H1).unwrap();
        assert_eq!(how, Edit::Created);
        let f = AuthFile::from_yaml(&new).unwrap();
        assert_eq!(f.users[0].password_hash, H1);
        assert_eq!(f.default, Permission::Allow);

        let text = "version: 1  # the format\n\
                    default: deny\n\
                    # people\n\
                    users:\n\
                    \x20\x20- username: alice   # the first\n\
                    \x20\x20\x20\x20password_hash: \"$old$x$y$z\"\n\
                    \x20\x20\x20\x20acl:\n\
                    \x20\x20\x20\x20\x20\x20- {topic: \"a/#\", access: all, permission: allow}\n\
                    \x20\x20- username: 'carol'\n\
                    \x20\x20\x20\x20password_hash: $p$q$r$s\n\
                    anonymous_acl: []\n";
        // Replace carol's hash: one line changes.
        let (t2, how) = set_password(text, "carol", H1).unwrap();
        assert_eq!(how, Edit::InPlace);
        assert!(
            t2.contains("# people") && t2.contains("# the first"),
            "{t2}"
        );
        let f = AuthFile::from_yaml(&t2).unwrap();
        assert_eq!(f.users[1].password_hash, H1);
        assert_eq!(f.users[0].password_hash, "$old$x$y$z");
        assert_eq!(f.users[0].acl.len(), 1);
        // Add bob: appended to the block, before `anonymous_acl`.
        let (t3, how) = set_password(&t2, "bob \"b\"", H2).unwrap();
        assert_eq!(how, Edit::InPlace);
        let f = AuthFile::from_yaml(&t3).unwrap();
        assert_eq!(f.users.len(), 3);
        assert_eq!(f.users[2].username, "bob \"b\"");
        assert_eq!(f.users[2].password_hash, H2);
        assert!(t3.contains("# people"));
        // A flow-style file is rewritten, nothing lost but comments.
        let flow = "version: 1 # c\nusers: [{username: a, password_hash: \"$a$b$c\"}]\n";
        let (t4, how) = set_password(flow, "a", H2).unwrap();
        assert_eq!(how, Edit::Rewritten);
        assert_eq!(AuthFile::from_yaml(&t4).unwrap().users[0].password_hash, H2);
        // A file that is not an auth file is refused, not overwritten.
        assert!(set_password("version: 7\n", "a", H1).is_err());
    }

    #[test]
    fn round_trip_and_checks() {
        let f = AuthFile {
            users: vec![User {
                username: "alice".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                previous_password_hash: None,
                previous_valid_until: None,
                password_source: None,
                acl: vec![AclRule {
                    topic: "sensors/%u/#".into(),
                    access: Access::Publish,
                    permission: Permission::Allow,
                }],
            }],
            ..AuthFile::default()
        };
        let text = f.to_yaml().unwrap();
        assert_eq!(AuthFile::from_yaml(&text).unwrap(), f);
        assert!(text.contains("access: publish"));
        let plain = text.replace("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA", "hunter2");
        let err = AuthFile::from_yaml(&plain).unwrap_err().to_string();
        assert!(err.contains("alice") && !err.contains("hunter2"), "{err}");
        assert!(matches!(
            AuthFile::from_yaml("version: 2\n"),
            Err(AuthFileError::Version(2))
        ));
    }
}
