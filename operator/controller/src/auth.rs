//! Passwords and the aggregated auth file.
//!
//! A broker's users are spread over its auth file and up to
//! [`MAX_USER_FILES`] user files (Secrets `<broker>-auth-<n>`), each kept
//! under [`FILE_BUDGET`] bytes, because one Secret holds at most 1 MiB. A
//! user stays in the file it is in; new users go to the first file with
//! room, so adding or removing a user rewrites one file.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use cirrus_config::auth::{Access, AclRule, AuthFile, Permission, User};
use cirrus_operator_api::{AclAccess, AclPermission, MqttUser};
use rand::distributions::Alphanumeric;
use rand::Rng;

/// A new random password: 32 alphanumerics (~190 bits).
pub fn generate_password() -> String {
    rand::rngs::OsRng
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// User files beside the auth file, at most: with [`FILE_BUDGET`] that is
/// 32 × 900 KiB, about 100,000 users with one ACL rule each (a user with a
/// generated password and one rule takes about 270 bytes).
pub const MAX_USER_FILES: usize = 31;

/// Bytes of users in one file, at most (a Secret holds at most 1 MiB; the
/// rest is room for the auth file's own settings).
pub const FILE_BUDGET: usize = 900 * 1024;

/// How strong a password's hash must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strength {
    /// A password the operator generated: 32 random alphanumerics, about
    /// 190 bits. No guessing reaches it, so a slow hash adds nothing but
    /// CPU at every login: argon2id with 1 MiB and one pass (about 1 ms).
    Generated,
    /// A password a person chose (from a Secret the user names): argon2id
    /// with the OWASP parameters (19 MiB, two passes; tens of ms).
    Chosen,
}

impl Strength {
    fn argon2(self) -> Argon2<'static> {
        match self {
            Strength::Generated => Params::new(1024, 1, 1, None)
                .map(|p| Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p))
                .unwrap_or_default(),
            Strength::Chosen => Argon2::default(),
        }
    }
}

/// An argon2id PHC string for `password`, reusing `previous` when it still
/// verifies, so an unchanged password keeps an unchanged auth file.
pub fn hash_password(
    password: &str,
    previous: Option<&str>,
) -> Result<String, argon2::password_hash::Error> {
    hash_password_as(password, previous, Strength::Chosen)
}

/// [`hash_password`] with the given strength (a `previous` hash that
/// verifies is kept, whatever its parameters).
pub fn hash_password_as(
    password: &str,
    previous: Option<&str>,
    strength: Strength,
) -> Result<String, argon2::password_hash::Error> {
    if let Some(prev) = previous {
        if let Ok(parsed) = PasswordHash::new(prev) {
            if Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
            {
                return Ok(prev.to_string());
            }
        }
    }
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Ok(strength
        .argon2()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// A password to hash (or whose previous hash to check).
pub struct HashJob {
    pub password: String,
    pub previous: Option<String>,
    pub strength: Strength,
}

/// Hash every job on the blocking pool, spread over the machine's cores
/// (never on the async runtime, whose threads also serve the watches).
pub async fn hash_all(jobs: Vec<HashJob>) -> Result<Vec<String>, argon2::password_hash::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = jobs.len().div_ceil(cores);
    let mut chunks = Vec::new();
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        let chunk: Vec<HashJob> = jobs.by_ref().take(per).collect();
        chunks.push(tokio::task::spawn_blocking(move || {
            chunk
                .iter()
                .map(|j| hash_password_as(&j.password, j.previous.as_deref(), j.strength))
                .collect::<Result<Vec<String>, _>>()
        }));
    }
    let mut out = Vec::new();
    for c in chunks {
        out.extend(
            c.await
                .map_err(|_| argon2::password_hash::Error::Crypto)??,
        );
    }
    Ok(out)
}

/// What this process last wrote into a broker's auth files: by file
/// number (0 the auth file, n the user file `<broker>-auth-<n>`), the
/// Secret's resourceVersion and the users in it.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub files: HashMap<usize, (String, Arc<Vec<User>>)>,
    /// When the last write was.
    pub last_write: Option<std::time::Instant>,
    /// The header of the auth file last written (see `broker::AuthPlan`).
    pub main_header: Option<String>,
}

/// The bytes `u` takes in a file at most: each line's key and indent, and
/// each string as if quoted (and escaped, when not plain ASCII).
pub fn estimated_size(u: &User) -> usize {
    let s = |x: &str| {
        if x.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            x.len() + 2
        } else {
            x.len() * 6 + 2
        }
    };
    let opt = |key: usize, x: &Option<String>| x.as_ref().map_or(0, |x| key + s(x) + 1);
    (13 + s(&u.username))
        + (18 + s(&u.password_hash))
        + opt(26, &u.previous_password_hash)
        + u.previous_valid_until.map_or(0, |_| 45)
        + opt(19, &u.password_source)
        + 10
        + u.acl.iter().map(|r| 56 + s(&r.topic)).sum::<usize>()
}

/// Users spread over files (index 0 the auth file), each under `budget`
/// bytes: a user stays in the file it was in (`was_in`) while that file
/// has room, the others go to the first file with room, at most
/// `1 + MAX_USER_FILES` files. Each file sorted by user name; the user
/// names left out for want of room.
pub fn spread(
    users: Vec<User>,
    was_in: &HashMap<String, usize>,
    budget: usize,
) -> (Vec<Vec<User>>, Vec<String>) {
    let max = 1 + MAX_USER_FILES;
    let mut files: Vec<Vec<User>> = vec![Vec::new(); max];
    let mut sizes = vec![0usize; max];
    let mut homeless = Vec::new();
    // Those with a file first, so that they keep it.
    let (mut placed, new): (Vec<User>, Vec<User>) = users
        .into_iter()
        .partition(|u| was_in.get(&u.username).is_some_and(|&i| i < max));
    placed.sort_by(|a, b| a.username.cmp(&b.username));
    for u in placed {
        let i = was_in[&u.username];
        let size = estimated_size(&u);
        if sizes[i] + size <= budget {
            sizes[i] += size;
            files[i].push(u);
        } else {
            homeless.push(u);
        }
    }
    homeless.extend(new);
    let mut left_out = Vec::new();
    for u in homeless {
        let size = estimated_size(&u);
        match (0..max).find(|&i| sizes[i] + size <= budget) {
            Some(i) => {
                sizes[i] += size;
                files[i].push(u);
            }
            None => left_out.push(u.username),
        }
    }
    for f in &mut files {
        f.sort_by(|a, b| a.username.cmp(&b.username));
    }
    // No empty files after the last one used.
    while files.len() > 1 && files.last().is_some_and(Vec::is_empty) {
        files.pop();
    }
    (files, left_out)
}

/// The MQTT user name of a user resource.
pub fn username(u: &MqttUser) -> String {
    u.spec
        .username
        .clone()
        .unwrap_or_else(|| kube::ResourceExt::name_any(u))
}

/// [`username`] without a copy.
pub fn username_ref(u: &MqttUser) -> &str {
    u.spec
        .username
        .as_deref()
        .or(u.metadata.name.as_deref())
        .unwrap_or_default()
}

/// An ACL rule whose filter is not a valid MQTT topic filter, if any.
pub fn invalid_acl_filter(rules: &[cirrus_operator_api::AclRule]) -> Option<String> {
    rules
        .iter()
        .find(|r| {
            // %u and %c expand to single levels; check the filter with them filled in.
            // (Copied only when it has them: this runs for every user at
            // every broker reconcile.)
            if r.topic.contains('%') {
                let f = r.topic.replace("%u", "u").replace("%c", "c");
                !cirrus_codec::topic::valid_topic_filter(&f)
            } else {
                !cirrus_codec::topic::valid_topic_filter(&r.topic)
            }
        })
        .map(|r| r.topic.clone())
}

/// The broker's ACL rules from the custom resource's.
pub fn acl(rules: &[cirrus_operator_api::AclRule]) -> Vec<AclRule> {
    rules
        .iter()
        .map(|r| AclRule {
            topic: r.topic.clone(),
            access: match r.access {
                AclAccess::Publish => Access::Publish,
                AclAccess::Subscribe => Access::Subscribe,
                AclAccess::All => Access::All,
            },
            permission: match r.permission {
                AclPermission::Allow => Permission::Allow,
                AclPermission::Deny => Permission::Deny,
            },
        })
        .collect()
}

/// The name of user file `n` in the broker's pods (beside the auth file).
pub fn user_file_name(n: usize) -> String {
    format!("users-{n}.yaml")
}

/// The auth file for a broker from its users' entries (already hashed):
/// the users of file 0, and the names of user files 1 to `user_files`.
pub fn auth_file(
    allow_anonymous: bool,
    anonymous_acl: &[cirrus_operator_api::AclRule],
    mut users: Vec<User>,
    user_files: usize,
) -> AuthFile {
    users.sort_by(|a, b| a.username.cmp(&b.username));
    AuthFile {
        allow_anonymous,
        anonymous_acl: acl(anonymous_acl),
        users,
        user_files: (1..=user_files).map(user_file_name).collect(),
        ..AuthFile::default()
    }
}

/// The users as a YAML block sequence, one user a line, each a JSON
/// object (which YAML reads as a flow mapping): the same file to the
/// broker, written many times faster than a YAML emitter writes it (at
/// 50,000 users the emitter was a quarter of the operator's CPU), and still
/// one user a line to a reader.
fn user_lines(out: &mut String, users: &[User]) -> Result<(), serde_json::Error> {
    for u in users {
        out.push_str("- ");
        out.push_str(&serde_json::to_string(u)?);
        out.push('\n');
    }
    Ok(())
}

/// The text of a users file.
pub fn users_file_text(users: &[User]) -> Result<String, serde_json::Error> {
    if users.is_empty() {
        return Ok("users: []\n".into());
    }
    let mut out = String::with_capacity(users.iter().map(estimated_size).sum::<usize>() + 16);
    out.push_str("users:\n");
    user_lines(&mut out, users)?;
    Ok(out)
}

/// The text of an auth file: its settings as YAML, then its users as in
/// [`users_file_text`].
pub fn auth_file_text(f: &AuthFile) -> Result<String, String> {
    // The settings alone (the users are not copied to be left out).
    let settings = AuthFile {
        version: f.version,
        allow_anonymous: f.allow_anonymous,
        anonymous_acl: f.anonymous_acl.clone(),
        default: f.default,
        users: Vec::new(),
        user_files: f.user_files.clone(),
    };
    let yaml = settings.to_yaml().map_err(|e| e.to_string())?;
    if f.users.is_empty() {
        return Ok(yaml);
    }
    // `users: []` is where the users go.
    let (before, after) = yaml
        .split_once("\nusers: []\n")
        .ok_or("no users key in the auth file")?;
    let mut out =
        String::with_capacity(yaml.len() + f.users.iter().map(estimated_size).sum::<usize>());
    out.push_str(before);
    out.push_str("\nusers:\n");
    user_lines(&mut out, &f.users).map_err(|e| e.to_string())?;
    out.push_str(after);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn odd_user(name: &str) -> User {
        User {
            username: name.into(),
            password_hash: "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$aGFzaA".into(),
            previous_password_hash: Some("$argon2id$v=19$x".into()),
            previous_valid_until: Some(1_900_000_000),
            password_source: Some("uid/12/password".into()),
            acl: vec![AclRule {
                topic: format!("{name}/#"),
                access: Access::All,
                permission: Permission::Allow,
            }],
        }
    }

    #[test]
    fn files_written_as_lines_read_back_as_written() {
        let names = [
            "plain",
            "with space",
            "quote\"s and 'single'",
            "colon: hash # tab\t",
            "- dash",
            "{brace}, [bracket]",
            "ünïcødé ✓",
            "back\\slash\nnewline",
            "yes",
            "null",
            "0x1F",
            "~",
            "&anchor *alias !tag % @ `",
        ];
        let users: Vec<User> = names.iter().map(|n| odd_user(n)).collect();
        let text = users_file_text(&users).unwrap();
        assert_eq!(text.lines().count(), users.len() + 1);
        assert_eq!(
            cirrus_config::auth::UsersFile::from_yaml(&text)
                .unwrap()
                .users,
            users
        );
        assert_eq!(
            cirrus_config::auth::UsersFile::from_yaml(&users_file_text(&[]).unwrap())
                .unwrap()
                .users,
            Vec::new()
        );
        let rules: Vec<cirrus_operator_api::AclRule> =
            serde_yaml::from_str("[{topic: 'public/#', access: subscribe}]").unwrap();
        for (users, files) in [(users.clone(), 3), (Vec::new(), 0), (users, 0)] {
            let f = auth_file(true, &rules, users, files);
            let text = auth_file_text(&f).unwrap();
            let back = AuthFile::from_yaml(&text).unwrap();
            assert_eq!(back.users, f.users);
            assert_eq!(back.user_files, f.user_files);
            assert_eq!(back.anonymous_acl, f.anonymous_acl);
            assert!(back.allow_anonymous);
            back.validate().unwrap();
        }
    }

    #[test]
    fn anonymous_clients_get_the_brokers_anonymous_acl() {
        let rules: Vec<cirrus_operator_api::AclRule> =
            serde_yaml::from_str("[{topic: 'public/#', access: subscribe}, {topic: 'x/+', access: all, permission: deny}]").unwrap();
        let f = auth_file(true, &rules, Vec::new(), 0);
        assert!(f.allow_anonymous);
        assert_eq!(f.anonymous_acl.len(), 2);
        assert_eq!(f.anonymous_acl[0].access, Access::Subscribe);
        assert_eq!(f.anonymous_acl[1].permission, Permission::Deny);
        assert_eq!(invalid_acl_filter(&rules), None);
        let bad: Vec<cirrus_operator_api::AclRule> =
            serde_yaml::from_str("[{topic: 'a/#/b', access: all}]").unwrap();
        assert_eq!(invalid_acl_filter(&bad).as_deref(), Some("a/#/b"));
    }

    fn user(name: &str, rules: usize) -> User {
        User {
            username: name.into(),
            password_hash: "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
                .into(),
            previous_password_hash: None,
            previous_valid_until: None,
            password_source: Some("0b7c2f0e-8a6e-4c1e-9d2b-5f1e2d3c4b5a/123456/password".into()),
            acl: (0..rules)
                .map(|i| AclRule {
                    topic: format!("devices/%u/topic-{i}/#"),
                    access: Access::All,
                    permission: Permission::Allow,
                })
                .collect(),
        }
    }

    #[test]
    fn the_size_estimate_is_never_under_the_text() {
        let mut odd = user("ünïcödé \"quoted\" #name\u{1}", 1);
        odd.acl[0].topic = "a/'b'/#/\u{7f}".into();
        let text = users_file_text(std::slice::from_ref(&odd)).unwrap();
        assert!(estimated_size(&odd) >= text.len(), "{text}");
        for rules in [0, 1, 5] {
            let mut u = user("a-fairly-long-user-name-0001", rules);
            // One user's bytes: the file less its `users:` line.
            let one = |u: &User| {
                users_file_text(std::slice::from_ref(u)).unwrap().len() - "users:\n".len()
            };
            assert!(
                estimated_size(&u) >= one(&u),
                "{rules} rules: {} < {}",
                estimated_size(&u),
                one(&u)
            );
            // Close, too: a file holds about as many users as fit.
            assert!(
                estimated_size(&u) <= one(&u) + 16 + 12 * rules,
                "{rules} rules: {} for {}",
                estimated_size(&u),
                one(&u)
            );
            u.previous_password_hash = Some(u.password_hash.clone());
            u.previous_valid_until = Some(1_800_000_000);
            assert!(estimated_size(&u) >= one(&u), "{rules} rules, rotating");
        }
    }

    #[test]
    fn users_keep_their_file_and_new_ones_fill_the_first_with_room() {
        let budget = estimated_size(&user("u-0000", 1)) * 10;
        let users: Vec<User> = (0..25).map(|i| user(&format!("u-{i:04}"), 1)).collect();
        let (files, left) = spread(users.clone(), &HashMap::new(), budget);
        assert!(left.is_empty());
        assert_eq!(files.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        // Every file within the budget, by the real YAML too.
        for f in &files {
            let yaml = cirrus_config::auth::UsersFile { users: f.clone() }
                .to_yaml()
                .unwrap();
            assert!(yaml.len() <= budget);
        }
        let was_in: HashMap<String, usize> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.iter().map(move |u| (u.username.clone(), i)))
            .collect();
        // Remove one user of file 0 and add two: the new ones fill the gap
        // in file 0 then file 2; nobody else moves.
        let mut next: Vec<User> = users
            .into_iter()
            .filter(|u| u.username != "u-0003")
            .collect();
        next.push(user("new-a", 1));
        next.push(user("new-b", 1));
        let (after, left) = spread(next, &was_in, budget);
        assert!(left.is_empty());
        for (i, f) in after.iter().enumerate() {
            for u in f {
                if let Some(&j) = was_in.get(&u.username) {
                    assert_eq!(i, j, "{} moved", u.username);
                }
            }
        }
        assert!(after[0].iter().any(|u| u.username == "new-a"));
        assert!(after[2].iter().any(|u| u.username == "new-b"));
        // No room left anywhere: the rest is named, not silently dropped.
        let tiny = estimated_size(&user("u-0000", 1));
        let many: Vec<User> = (0..40).map(|i| user(&format!("u-{i:04}"), 1)).collect();
        let (files, left) = spread(many, &HashMap::new(), tiny);
        assert_eq!(files.len(), 1 + MAX_USER_FILES);
        assert_eq!(left.len(), 40 - (1 + MAX_USER_FILES));
        // Emptied files at the end go.
        let (files, _) = spread(
            vec![user("solo", 0)],
            &HashMap::from([("solo".to_string(), 0)]),
            budget,
        );
        assert_eq!(files.len(), 1);
    }

    #[tokio::test]
    async fn generated_passwords_get_a_light_hash_chosen_ones_the_strong_one() {
        let jobs = vec![
            HashJob {
                password: "generated".into(),
                previous: None,
                strength: Strength::Generated,
            },
            HashJob {
                password: "chosen".into(),
                previous: None,
                strength: Strength::Chosen,
            },
        ];
        let h = hash_all(jobs).await.unwrap();
        assert!(
            h[0].starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
            "{}",
            h[0]
        );
        assert!(
            h[1].starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            h[1]
        );
        // Both verify with the broker's verifier (parameters from the hash).
        for (hash, pw) in [(&h[0], "generated"), (&h[1], "chosen")] {
            let parsed = PasswordHash::new(hash).unwrap();
            assert!(Argon2::default()
                .verify_password(pw.as_bytes(), &parsed)
                .is_ok());
        }
        // A previous hash that still verifies is kept, whatever its strength.
        let again = hash_all(vec![HashJob {
            password: "chosen".into(),
            previous: Some(h[1].clone()),
            strength: Strength::Generated,
        }])
        .await
        .unwrap();
        assert_eq!(again[0], h[1]);
    }

    #[test]
    fn hashes_are_phc_and_reused_while_the_password_holds() {
        let p = generate_password();
        assert_eq!(p.len(), 32);
        let h = hash_password(&p, None).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains(&p));
        assert_eq!(hash_password(&p, Some(&h)).unwrap(), h);
        let h2 = hash_password("other", Some(&h)).unwrap();
        assert_ne!(h2, h);
    }
}
