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
//!     acl:
//!       - { topic: "sensors/%u/#", access: publish, permission: allow }
//!       - { topic: "#", access: subscribe, permission: allow }
//! ```
//!
//! Rules are checked in order; the first whose topic filter matches decides.
//! `%u` and `%c` in a filter stand for the user name and the client id.

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
}

impl Default for AuthFile {
    fn default() -> Self {
        AuthFile {
            version: AUTH_FILE_VERSION,
            allow_anonymous: false,
            anonymous_acl: Vec::new(),
            default: Permission::Deny,
            users: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    /// A PHC string (argon2id recommended). Plaintext is never accepted.
    pub password_hash: String,
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
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if !seen.insert(u.username.as_str()) {
                return Err(AuthFileError::DuplicateUser(u.username.clone()));
            }
            if !u.password_hash.starts_with('$') || u.password_hash.split('$').count() < 4 {
                return Err(AuthFileError::NotAHash {
                    user: u.username.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let f = AuthFile {
            users: vec![User {
                username: "alice".into(),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
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
