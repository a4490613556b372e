//! Authentication and authorization from the auth file
//! (`cirrus_config::auth`, the contract with the operator).
//!
//! The file is compiled into an immutable [`Policy`] behind an `ArcSwap`:
//! connections read it without a lock, and a reload swaps in a new one with
//! a higher generation. A reload that fails to parse keeps the last good
//! policy, logs why and counts it. Passwords are verified with argon2 on the
//! blocking pool; an unknown user name costs the same verification, so the
//! answer (and its timing) never tells whether a user exists. No password,
//! hash or file content is ever logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use cirrus_config::auth::{Access, AclRule, AuthFile, Permission, UsersFile};
use parking_lot::Mutex;
use tracing::{error, info};

/// A verified client: who it is and the rules that apply to it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub username: Option<String>,
    /// The user's hash when it logged in: a reload that changes or removes
    /// it ends the connection.
    hash: Option<String>,
    rules: Arc<[AclRule]>,
    default: Permission,
    /// Authenticated by a client certificate rather than a password.
    certified: bool,
}

/// Why a login failed. One variant for unknown user and wrong password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    BadCredentials,
    /// No user name, and anonymous clients are not allowed.
    AnonymousNotAllowed,
}

/// The compiled auth file.
#[derive(Debug)]
pub struct Policy {
    pub generation: u64,
    /// What an unknown user name is verified against, when not the
    /// start-up dummy (see `dummy_like`).
    dummy: Option<String>,
    users: HashMap<String, Entry>,
    allow_anonymous: bool,
    anonymous: Arc<[AclRule]>,
    default: Permission,
}

/// A user of the auth file: its hash, during a rotation the previous one
/// with the unix time it stops logging in, and its rules.
#[derive(Debug)]
struct Entry {
    hash: String,
    previous: Option<(String, u64)>,
    rules: Arc<[AclRule]>,
}

impl Entry {
    /// The hashes that log in now: the current one, and the previous one
    /// while its overlap lasts.
    fn valid_hashes(&self) -> impl Iterator<Item = &String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::iter::once(&self.hash).chain(
            self.previous
                .as_ref()
                .filter(|(_, until)| now < *until)
                .map(|(h, _)| h),
        )
    }
}

/// The argon2id PHC string of `password` (default parameters, a random
/// salt): what the auth file holds, never the password itself.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// A hash of a random password, made at start-up, so that an unknown user
/// name costs a real verification too.
fn dummy_hash() -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    let mut secret = [0u8; 32];
    argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut secret);
    Argon2::default()
        .hash_password(&secret, &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

/// A dummy hash with the parameters most users' hashes have, when those are
/// not argon2's defaults (the operator hashes its generated passwords
/// lighter): an unknown user name then costs what most known ones do.
fn dummy_like(users: &[cirrus_config::auth::User]) -> Option<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let mut count: HashMap<&str, usize> = HashMap::new();
    for u in users {
        if let Some(params) = u.password_hash.split('$').nth(3) {
            *count.entry(params).or_default() += 1;
        }
    }
    let (params, _) = count.into_iter().max_by_key(|(p, n)| (*n, *p))?;
    let sample = users
        .iter()
        .find(|u| u.password_hash.split('$').nth(3) == Some(params))?;
    let parsed = PasswordHash::new(&sample.password_hash).ok()?;
    let params = argon2::Params::try_from(&parsed).ok()?;
    if params == argon2::Params::default() {
        return None;
    }
    let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut secret = [0u8; 32];
    argon2::password_hash::rand_core::RngCore::fill_bytes(&mut OsRng, &mut secret);
    argon
        .hash_password(&secret, &SaltString::generate(&mut OsRng))
        .map(|h| h.to_string())
        .ok()
}

impl Policy {
    fn compile(f: AuthFile, generation: u64) -> Policy {
        Policy {
            generation,
            dummy: dummy_like(&f.users),
            users: f
                .users
                .into_iter()
                .map(|u| {
                    let previous = u.previous_password_hash.zip(u.previous_valid_until);
                    let entry = Entry {
                        hash: u.password_hash,
                        previous,
                        rules: u.acl.into(),
                    };
                    (u.username, entry)
                })
                .collect(),
            allow_anonymous: f.allow_anonymous,
            anonymous: f.anonymous_acl.into(),
            default: f.default,
        }
    }

    /// Whether a client logged in as `id` may stay after this policy came in.
    pub fn still_valid(&self, id: &Identity) -> bool {
        if id.certified {
            return true;
        }
        match (&id.username, &id.hash) {
            (Some(u), Some(h)) => self
                .users
                .get(u)
                .is_some_and(|e| e.valid_hashes().any(|v| v == h)),
            (None, _) => self.allow_anonymous,
            _ => false,
        }
    }

    /// The identity for a client already logged in, with this policy's rules.
    pub fn refresh(&self, id: &Identity) -> Identity {
        let rules = match &id.username {
            Some(u) => self
                .users
                .get(u)
                .map(|e| e.rules.clone())
                .unwrap_or_else(|| Arc::from(Vec::new())),
            None => self.anonymous.clone(),
        };
        Identity {
            username: id.username.clone(),
            hash: id.hash.clone(),
            rules,
            default: self.default,
            certified: id.certified,
        }
    }
}

pub struct Auth {
    path: Option<PathBuf>,
    policy: ArcSwap<Option<Policy>>,
    generation: AtomicU64,
    pub reload_failures: AtomicU64,
    pub login_failures: AtomicU64,
    failed: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    max_failed_per_minute: u32,
    last_seen: Mutex<Option<Seen>>,
    dummy: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthLoadError {
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid auth file {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: cirrus_config::auth::AuthFileError,
    },
}

/// What a load read: the auth file's bytes, and the user files it names
/// with their length and modification time (a mounted Secret's update
/// replaces the files, so both move).
#[derive(Debug, PartialEq)]
struct Seen {
    main: Vec<u8>,
    files: Vec<(PathBuf, FileStamp)>,
}

type FileStamp = Option<(u64, std::time::SystemTime)>;

fn stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?)))
}

fn read(path: &Path) -> Result<Vec<u8>, AuthLoadError> {
    std::fs::read(path).map_err(|source| AuthLoadError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The auth file with the users of its user files joined in.
fn load(path: &Path) -> Result<(AuthFile, Seen), AuthLoadError> {
    let bytes = read(path)?;
    load_bytes(path, bytes)
}

fn load_bytes(path: &Path, bytes: Vec<u8>) -> Result<(AuthFile, Seen), AuthLoadError> {
    let invalid = |p: &Path, source| AuthLoadError::Invalid {
        path: p.to_owned(),
        source,
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut f = AuthFile::from_yaml(&text).map_err(|e| invalid(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = Vec::with_capacity(f.user_files.len());
    for name in &f.user_files {
        let p = dir.join(name);
        let before = stamp(&p);
        let more = read(&p)?;
        let more =
            UsersFile::from_yaml(&String::from_utf8_lossy(&more)).map_err(|e| invalid(&p, e))?;
        f.users.extend(more.users);
        files.push((p, before));
    }
    // A user name once in all the files, every hash a PHC string.
    f.validate().map_err(|e| invalid(path, e))?;
    Ok((f, Seen { main: bytes, files }))
}

impl Auth {
    /// Without a path everything is allowed. With one, the file must load
    /// now: a broker does not start with an auth file it cannot read.
    pub fn new(path: Option<PathBuf>, max_failed_per_minute: u32) -> Result<Auth, AuthLoadError> {
        let auth = Auth {
            path: path.clone(),
            policy: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            login_failures: AtomicU64::new(0),
            failed: Mutex::new(HashMap::new()),
            max_failed_per_minute,
            last_seen: Mutex::new(None),
            dummy: if path.is_some() {
                dummy_hash()
            } else {
                String::new()
            },
        };
        if let Some(p) = &path {
            let (f, seen) = load(p)?;
            info!(path = %p.display(), users = f.users.len(), files = seen.files.len() + 1, "auth file loaded");
            auth.install(f, seen);
        }
        Ok(auth)
    }

    fn install(&self, f: AuthFile, seen: Seen) {
        // Installs come one at a time (start-up, then the reload task).
        // The generation moves after the policy: a connection that read it
        // before logging in knows whether its login may predate the policy.
        let generation = self.generation.load(Ordering::Acquire) + 1;
        self.policy
            .store(Arc::new(Some(Policy::compile(f, generation))));
        self.generation.store(generation, Ordering::Release);
        *self.last_seen.lock() = Some(seen);
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn policy(&self) -> arc_swap::Guard<Arc<Option<Policy>>> {
        self.policy.load()
    }

    /// Re-read the file if its content changed. Returns true when a new
    /// policy was installed.
    pub fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.path else { return false };
        let Ok(bytes) = std::fs::read(path) else {
            // Mid-swap of a mounted Secret, or gone: keep the last good one.
            return false;
        };
        let unchanged = self.last_seen.lock().as_ref().is_some_and(|seen| {
            seen.main == bytes && seen.files.iter().all(|(p, st)| stamp(p) == *st)
        });
        if unchanged {
            return false;
        }
        match load_bytes(path, bytes.clone()) {
            Ok((f, seen)) => {
                let users = f.users.len();
                self.install(f, seen);
                info!(path = %path.display(), users, generation = self.generation(), "auth file reloaded");
                true
            }
            Err(e) => {
                // Remember the bad content so it is reported once, not
                // every poll (a user file that comes later is looked for
                // again: its stamp is "missing" until then).
                let files = AuthFile::from_yaml(&String::from_utf8_lossy(&bytes))
                    .map(|f| {
                        let dir = path.parent().unwrap_or(Path::new("."));
                        f.user_files
                            .iter()
                            .map(|n| (dir.join(n), stamp(&dir.join(n))))
                            .collect()
                    })
                    .unwrap_or_default();
                *self.last_seen.lock() = Some(Seen { main: bytes, files });
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "auth file reload failed; keeping the last good one");
                false
            }
        }
    }

    /// Whether `addr` has used up its failed logins for this minute.
    pub fn blocked(&self, addr: IpAddr) -> bool {
        let mut failed = self.failed.lock();
        match failed.get(&addr) {
            Some(&(n, since)) if since.elapsed() < Duration::from_secs(60) => {
                n >= self.max_failed_per_minute
            }
            Some(_) => {
                failed.remove(&addr);
                false
            }
            None => false,
        }
    }

    fn record_failure(&self, addr: IpAddr) {
        self.login_failures.fetch_add(1, Ordering::Relaxed);
        let mut failed = self.failed.lock();
        // Bounded: forget expired windows when the table grows.
        if failed.len() > 100_000 {
            failed.retain(|_, (_, since)| since.elapsed() < Duration::from_secs(60));
        }
        let e = failed.entry(addr).or_insert((0, Instant::now()));
        if e.1.elapsed() >= Duration::from_secs(60) {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    /// A client whose certificate (verified by the TLS layer) names `user`.
    pub fn login_certified(&self, user: &str) -> Result<Identity, LoginError> {
        let guard = self.policy.load_full();
        let (hash, rules, default) = match guard.as_ref() {
            None => (None, Arc::from(Vec::new()), Permission::Allow),
            Some(p) => match p.users.get(user) {
                Some(e) => (Some(e.hash.clone()), e.rules.clone(), p.default),
                None => (None, Arc::from(Vec::new()), p.default),
            },
        };
        Ok(Identity {
            username: Some(user.to_owned()),
            hash,
            rules,
            default,
            certified: true,
        })
    }

    /// Check a CONNECT's credentials.
    pub async fn login(
        &self,
        addr: IpAddr,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, LoginError> {
        let guard = self.policy.load_full();
        let Some(policy) = guard.as_ref() else {
            return Ok(Identity {
                username: username.map(str::to_owned),
                hash: None,
                rules: Arc::from(Vec::new()),
                default: Permission::Allow,
                certified: false,
            });
        };
        let Some(username) = username else {
            if policy.allow_anonymous {
                return Ok(Identity {
                    username: None,
                    hash: None,
                    rules: policy.anonymous.clone(),
                    default: policy.default,
                    certified: false,
                });
            }
            self.record_failure(addr);
            return Err(LoginError::AnonymousNotAllowed);
        };
        let entry = policy.users.get(username);
        // An unknown user costs the same hashing as a known one.
        let hashes: Vec<String> = match entry {
            Some(e) => e.valid_hashes().cloned().collect(),
            None => vec![policy.dummy.clone().unwrap_or_else(|| self.dummy.clone())],
        };
        let password = password.unwrap_or_default().to_vec();
        let matched = tokio::task::spawn_blocking(move || {
            hashes
                .into_iter()
                .find(|hash| match PasswordHash::new(hash) {
                    Ok(parsed) => Argon2::default()
                        .verify_password(&password, &parsed)
                        .is_ok(),
                    Err(_) => false,
                })
        })
        .await
        .ok()
        .flatten();
        match (entry, matched) {
            (Some(e), Some(hash)) => Ok(Identity {
                username: Some(username.to_owned()),
                hash: Some(hash),
                rules: e.rules.clone(),
                default: policy.default,
                certified: false,
            }),
            _ => {
                self.record_failure(addr);
                Err(LoginError::BadCredentials)
            }
        }
    }
}

/// Substitute `%u` and `%c` in a rule's filter.
fn expand(filter: &str, username: Option<&str>, client_id: &str) -> String {
    filter
        .replace("%u", username.unwrap_or(""))
        .replace("%c", client_id)
}

/// Whether the rule filter `rule` covers every topic the filter `sub` can
/// match (so subscribing to `sub` is within the rule).
fn covers(rule: &str, sub: &str) -> bool {
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Identity {
    /// May this client publish to `topic` / subscribe to `filter`? The first
    /// rule that matches decides; otherwise the file's default.
    pub fn allowed(&self, client_id: &str, access: Access, topic_or_filter: &str) -> bool {
        for rule in self.rules.iter() {
            if rule.access != access && rule.access != Access::All {
                continue;
            }
            let f = expand(&rule.topic, self.username.as_deref(), client_id);
            let hit = match access {
                Access::Publish => cirrus_codec::topic::matches(&f, topic_or_filter),
                _ => covers(&f, topic_or_filter),
            };
            if hit {
                return rule.permission == Permission::Allow;
            }
        }
        self.default == Permission::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(rules: Vec<(&str, Access, Permission)>) -> Identity {
        Identity {
            username: Some("alice".into()),
            hash: None,
            rules: rules
                .into_iter()
                .map(|(t, a, p)| AclRule {
                    topic: t.into(),
                    access: a,
                    permission: p,
                })
                .collect::<Vec<_>>()
                .into(),
            default: Permission::Deny,
            certified: false,
        }
    }

    /// An auth file with alice's new password and, during an overlap
    /// ending at `until`, the one before.
    fn rotating(until: u64) -> (Auth, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "cirrus-auth-rotation-{}-{until}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.yaml");
        let f = AuthFile {
            users: vec![cirrus_config::auth::User {
                username: "alice".into(),
                password_hash: hash_password("new").unwrap(),
                previous_password_hash: Some(hash_password("old").unwrap()),
                previous_valid_until: Some(until),
                password_source: None,
                acl: Vec::new(),
            }],
            ..AuthFile::default()
        };
        std::fs::write(&path, f.to_yaml().unwrap()).unwrap();
        (Auth::new(Some(path.clone()), 0).unwrap(), path)
    }

    #[tokio::test]
    async fn during_an_overlap_both_passwords_log_in_and_after_it_the_old_one_does_not() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let (auth, _) = rotating(later);
        let new = auth.login(ip, Some("alice"), Some(b"new")).await.unwrap();
        let old = auth.login(ip, Some("alice"), Some(b"old")).await.unwrap();
        assert!(auth.login(ip, Some("alice"), Some(b"other")).await.is_err());
        let guard = auth.policy();
        let policy = guard.as_ref().as_ref().unwrap();
        assert!(policy.still_valid(&new) && policy.still_valid(&old));

        // The overlap is over: the old password is refused, and a client
        // that logged in with it is let go at the next reload.
        let (ended, _) = rotating(1);
        assert!(ended.login(ip, Some("alice"), Some(b"old")).await.is_err());
        assert!(ended.login(ip, Some("alice"), Some(b"new")).await.is_ok());
        let guard = ended.policy();
        let policy = guard.as_ref().as_ref().unwrap();
        assert!(!policy.still_valid(&old));
        assert!(
            !policy.still_valid(&new),
            "new was another hash of the same password"
        );
    }

    #[tokio::test]
    async fn users_from_the_user_files_log_in_and_a_changed_file_is_reloaded() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let dir = std::env::temp_dir().join(format!("cirrus-auth-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let user = |name: &str, pw: &str| cirrus_config::auth::User {
            username: name.into(),
            password_hash: hash_password(pw).unwrap(),
            previous_password_hash: None,
            previous_valid_until: None,
            password_source: Some("uid/1".into()),
            acl: Vec::new(),
        };
        let shard = |users| UsersFile { users }.to_yaml().unwrap();
        std::fs::write(dir.join("users-1.yaml"), shard(vec![user("bob", "b")])).unwrap();
        std::fs::write(dir.join("users-2.yaml"), shard(vec![user("carol", "c")])).unwrap();
        let main = AuthFile {
            users: vec![user("alice", "a")],
            user_files: vec!["users-1.yaml".into(), "users-2.yaml".into()],
            ..AuthFile::default()
        };
        let path = dir.join("auth.yaml");
        std::fs::write(&path, main.to_yaml().unwrap()).unwrap();
        let auth = Auth::new(Some(path.clone()), 0).unwrap();
        for (u, p) in [("alice", "a"), ("bob", "b"), ("carol", "c")] {
            assert!(
                auth.login(ip, Some(u), Some(p.as_bytes())).await.is_ok(),
                "{u}"
            );
        }
        assert!(!auth.reload_if_changed(), "nothing changed");

        // A user file alone changes: dave is in, bob is out.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("users-1.yaml"), shard(vec![user("dave", "d")])).unwrap();
        assert!(auth.reload_if_changed());
        assert!(auth.login(ip, Some("dave"), Some(b"d")).await.is_ok());
        assert!(auth.login(ip, Some("bob"), Some(b"b")).await.is_err());

        // A user name twice across the files, or a file that is missing,
        // is refused; the last good policy stays.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("users-2.yaml"), shard(vec![user("alice", "x")])).unwrap();
        assert!(!auth.reload_if_changed());
        std::fs::remove_file(dir.join("users-2.yaml")).unwrap();
        assert!(!auth.reload_if_changed());
        assert!(auth.login(ip, Some("carol"), Some(b"c")).await.is_ok());
        assert!(Auth::new(Some(path.clone()), 0).is_err());
        // Named outside the directory: refused.
        let escape = AuthFile {
            user_files: vec!["../users-1.yaml".into()],
            ..AuthFile::default()
        };
        assert!(AuthFile::from_yaml(&escape.to_yaml().unwrap()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn first_match_decides_and_placeholders_expand() {
        let i = id(vec![
            ("sensors/%u/private/#", Access::Publish, Permission::Deny),
            ("sensors/%u/#", Access::Publish, Permission::Allow),
            ("clients/%c/#", Access::All, Permission::Allow),
            ("public/#", Access::Subscribe, Permission::Allow),
        ]);
        assert!(i.allowed("c1", Access::Publish, "sensors/alice/temp"));
        assert!(!i.allowed("c1", Access::Publish, "sensors/alice/private/x"));
        assert!(!i.allowed("c1", Access::Publish, "sensors/bob/temp"));
        assert!(i.allowed("c1", Access::Publish, "clients/c1/x"));
        assert!(!i.allowed("c2x", Access::Publish, "clients/c1/x"));
        assert!(i.allowed("c1", Access::Subscribe, "public/+/news"));
        assert!(i.allowed("c1", Access::Subscribe, "public/#"));
        assert!(!i.allowed("c1", Access::Subscribe, "#"));
        assert!(!i.allowed("c1", Access::Subscribe, "+/x"));
        assert!(!i.allowed("c1", Access::Publish, "public/x"));
    }

    #[test]
    fn covers_filters() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "#"));
    }
}
