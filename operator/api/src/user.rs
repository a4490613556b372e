//! `MqttUser`: a user of one broker, its password and its ACL.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::broker::SecretKeyRef;

/// A broker user. The operator generates a password into a Secret (unless
/// `passwordSecretRef` names one) and adds the user's password hash and ACL
/// to the auth file of the broker it references.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mqtt.cirrus.dev",
    version = "v1alpha1",
    kind = "MqttUser",
    plural = "mqttusers",
    shortname = "mqu",
    namespaced,
    status = "MqttUserStatus",
    printcolumn = r#"{"name":"Broker","type":"string","jsonPath":".spec.brokerRef"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MqttUserSpec {
    /// Name of the MqttBroker (same namespace) this user belongs to.
    #[schemars(length(min = 1, max = 253))]
    pub broker_ref: String,
    /// MQTT user name; defaults to the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^\s:]+$"))]
    pub username: Option<String>,
    /// Use this Secret key as the password instead of a generated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// When the password changes (a new value in `passwordSecretRef`, or a
    /// generated one renewed by the annotation
    /// `mqtt.cirrus.dev/rotate-password`), the previous password also logs
    /// in for this many seconds, and clients logged in with it stay
    /// connected until then. 0 (the default): the old password stops at
    /// once, as for a leaked one.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 604800))]
    pub password_overlap_seconds: u32,
    /// Rules in order; the first whose topic filter matches decides, and
    /// what no rule allows is refused. Empty: the user can connect and do
    /// nothing else (every publish and subscription refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct AclRule {
    /// Topic filter; `%u` and `%c` stand for user name and client id.
    #[schemars(length(min = 1, max = 65535))]
    pub topic: String,
    pub access: AclAccess,
    #[serde(default)]
    pub permission: AclPermission,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AclAccess {
    Publish,
    Subscribe,
    All,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AclPermission {
    #[default]
    Allow,
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttUserStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Secret holding this user's password (key `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
