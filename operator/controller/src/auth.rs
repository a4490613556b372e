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
pub fn invalid_acl_filter(rules: &[cirrus_operator_api::AclRule]) -> Option<String> {
    rules
        .iter()
        .find(|r| {
            // %u and %c expand to single levels; check the filter with them filled in.
            let f = r.topic.replace("%u", "u").replace("%c", "c");
            !cirrus_codec::topic::valid_topic_filter(&f)
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

/// The auth file for a broker from its users' entries (already hashed).
pub fn auth_file(
    allow_anonymous: bool,
    anonymous_acl: &[cirrus_operator_api::AclRule],
    mut users: Vec<User>,
) -> AuthFile {
    users.sort_by(|a, b| a.username.cmp(&b.username));
    AuthFile {
        allow_anonymous,
        anonymous_acl: acl(anonymous_acl),
        users,
        ..AuthFile::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_clients_get_the_brokers_anonymous_acl() {
        let rules: Vec<cirrus_operator_api::AclRule> =
            serde_yaml::from_str("[{topic: 'public/#', access: subscribe}, {topic: 'x/+', access: all, permission: deny}]").unwrap();
        let f = auth_file(true, &rules, Vec::new());
        assert!(f.allow_anonymous);
        assert_eq!(f.anonymous_acl.len(), 2);
        assert_eq!(f.anonymous_acl[0].access, Access::Subscribe);
        assert_eq!(f.anonymous_acl[1].permission, Permission::Deny);
        assert_eq!(invalid_acl_filter(&rules), None);
        let bad: Vec<cirrus_operator_api::AclRule> =
            serde_yaml::from_str("[{topic: 'a/#/b', access: all}]").unwrap();
        assert_eq!(invalid_acl_filter(&bad).as_deref(), Some("a/#/b"));
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
