//! Passwords and the aggregated auth file.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
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

/// An argon2id PHC string for `password`, reusing `previous` when it still
/// verifies, so an unchanged password keeps an unchanged auth file.
pub fn hash_password(
    password: &str,
    previous: Option<&str>,
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
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// The MQTT user name of a user resource.
pub fn username(u: &MqttUser) -> String {
    u.spec
        .username
        .clone()
        .unwrap_or_else(|| kube::ResourceExt::name_any(u))
}

/// An ACL rule whose filter is not a valid MQTT topic filter, if any.
pub fn invalid_acl_filter(u: &MqttUser) -> Option<String> {
    u.spec
        .acl
        .iter()
        .find(|r| {
            // %u and %c expand to single levels; check the filter with them filled in.
            let f = r.topic.replace("%u", "u").replace("%c", "c");
            !cirrus_codec::topic::valid_topic_filter(&f)
        })
        .map(|r| r.topic.clone())
}

pub fn acl(u: &MqttUser) -> Vec<AclRule> {
    u.spec
        .acl
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

/// The auth file for a broker from its users' entries (already hashed).
pub fn auth_file(allow_anonymous: bool, mut users: Vec<User>) -> AuthFile {
    users.sort_by(|a, b| a.username.cmp(&b.username));
    AuthFile {
        allow_anonymous,
        users,
        ..AuthFile::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
