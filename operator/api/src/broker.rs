//! `MqttBroker`: one broker deployment and everything it needs.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The broker image of this operator's own version: what an `MqttBroker`
/// without `image` runs, so that upgrading the operator upgrades them.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/cirrus-mqtt/cirrus-broker:",
    env!("CARGO_PKG_VERSION")
);

/// A Cirrus MQTT broker: its pods, Service, TLS, autoscaling and the
/// configuration and auth files the pods read.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "mqtt.cirrus.dev",
    version = "v1alpha1",
    kind = "MqttBroker",
    plural = "mqttbrokers",
    shortname = "mqb",
    namespaced,
    status = "MqttBrokerStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updatedReplicas","priority":1}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MqttBrokerSpec {
    /// Container image of the broker. Empty (the default): the broker of
    /// the operator's own version, so that upgrading the operator upgrades
    /// the brokers that do not pin an image (the API server stores no
    /// default here).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Pods when autoscaling is off.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// HorizontalPodAutoscaler (autoscaling/v2); replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Where broker state lives. Without Redis each pod is a separate broker
    /// with in-memory state, so `replicas` should then be 1.
    #[serde(default)]
    pub redis: RedisSpec,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default)]
    pub tls: TlsSpec,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Allow clients without a user name.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// What clients without a user name may do (with `allowAnonymous`);
    /// empty: nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anonymous_acl: Vec<crate::AclRule>,
    /// How a changed pod template (a new image, configuration or TLS
    /// setting) replaces the pods.
    #[serde(default)]
    pub rollout: Rollout,
    /// How a terminating pod (scale-down, rollout, node drain) sends its
    /// clients to the other pods.
    #[serde(default)]
    pub drain: DrainSpec,
    /// How pods holding clearly more than their share of the clients (new
    /// pods after a scale-up or a rollout) send the excess to the others.
    #[serde(default)]
    pub rebalance: RebalanceSpec,
    /// Pods that may be unavailable during voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
    /// The broker container's requests and limits. A resource with neither
    /// a request nor a limit here is requested at the default: CPU `100m`,
    /// memory `128Mi` (the HPA's CPU utilization is a share of the CPU
    /// request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// More for the broker pods: labels, annotations, topology spread,
    /// image pull secrets, priority class, service account, env, volumes.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub pod_template: PodTemplate,
}

/// Additions to the broker pods. The operator's own settings win where
/// they meet: its labels (the Deployment selects by them) and its volume
/// names (`config`, `auth`, `tls`, `client-ca`; another volume of such a
/// name is `InvalidSpec`). `env` comes after the operator's own variables,
/// so the same name overrides one of them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The pods' service account (its token is still not mounted: the
    /// broker never calls the Kubernetes API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Mounts of `volumes` in the broker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

impl PodTemplate {
    pub fn is_empty(&self) -> bool {
        *self == PodTemplate::default()
    }
}

impl MqttBrokerSpec {
    /// The image the pods run: `image`, or [`DEFAULT_IMAGE`] when empty.
    pub fn image_or_default(&self) -> &str {
        if self.image.is_empty() {
            DEFAULT_IMAGE
        } else {
            &self.image
        }
    }
}
fn default_replicas() -> i32 {
    1
}
fn default_max_unavailable() -> i32 {
    1
}

/// A plain enum rather than an `Option`: schemars renders an optional enum
/// with `null` among its values, which Kubernetes 1.20 refuses in a CRD.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation to aim for, in percent of the pods' CPU
    /// request (needs metrics-server). Default: 70 when
    /// `targetConnectionsPerPod` is not set, else none (the HPA does not
    /// scale down while one of its metrics is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,
    /// Average MQTT connections per pod to aim for (the broker's
    /// `cirrus_connections`, from the operator's custom metrics API or a
    /// Prometheus adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: Option<i64>,
    /// The HPA's scaling behaviour (`autoscaling/v2`). Default: Kubernetes'
    /// own for scaling up; scaling down removes at most one pod per drain
    /// (`drain.timeoutSeconds` + 5 s), after Kubernetes' 300 s
    /// stabilization window, so that it never outruns the drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<HorizontalPodAutoscalerBehavior>,
}

/// CPU target when none is given and connections are not the target.
pub const DEFAULT_CPU_UTILIZATION: i32 = 70;

/// The rolling update of the broker's Deployment: by default every new pod
/// at once (a blue-green change), and no old pod goes before its
/// replacement is available.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// New pods started at once above the desired count. Default: all of
    /// them (100 %). The old pods then drain together, into new pods only,
    /// and each client moves once; with fewer, clients that an old pod
    /// sends away may land on another old pod and move again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_surge: Option<i32>,
    /// Old pods taken down at once before their replacements are available
    /// (0: never fewer pods than desired). Each drains at
    /// `drain.connectionsPerSecond`, so the clients the others see
    /// reconnecting per second grow with it.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_unavailable: i32,
    /// Seconds a new pod must be ready before it counts as available (and
    /// the next old pod goes).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,
    /// Seconds without progress after which a rollout counts as stuck:
    /// `Progressing` turns False and `Degraded` True with reason
    /// `ProgressDeadlineExceeded` (a bad image, pods that never get ready).
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: i32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_surge: None,
            max_unavailable: 0,
            min_ready_seconds: 0,
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// After SIGTERM a pod turns not-ready, keeps serving 5 s while the Service
/// stops sending it clients, then sends its clients away at a paced rate:
/// MQTT 5 clients get DISCONNECT 0x9C "Use another server" (with
/// `serverReference` when set), MQTT 3.1.1 clients a closed socket. The
/// pod's `terminationGracePeriodSeconds` is `timeoutSeconds` + 15.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Clients sent away per second, by all the pods draining at the same
    /// time together (they share it through Redis), so the pods that stay
    /// see at most this many reconnects a second. A pod with more clients
    /// than fit in `timeoutSeconds` at its share goes faster, so as to
    /// finish in time.
    #[serde(default = "default_drain_rate")]
    #[schemars(range(min = 1, max = 100000))]
    pub connections_per_second: u32,
    /// Seconds the drain may take.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub timeout_seconds: u32,
    /// Server Reference for MQTT 5 clients (for example the external host
    /// name and port); without it they reconnect where they connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub server_reference: Option<String>,
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec {
            connections_per_second: default_drain_rate(),
            timeout_seconds: default_drain_timeout(),
            server_reference: None,
        }
    }
}

/// Every 5 s each pod compares its connections with the mean of the pods
/// (through Redis); when any pod is more than `thresholdPercent` away from
/// it, each pod above the mean sends its excess over the mean away as the
/// drain does (0x9C), at most `connectionsPerSecond`,
/// the longest-connected first and only those connected for at least
/// `minConnectionAgeSeconds` (so a client just moved is not moved again),
/// then waits a round for fresh counts; never while a pod drains. Counted in
/// `cirrus_rebalanced_connections_total`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_rebalance_threshold")]
    #[schemars(range(min = 5, max = 1000))]
    pub threshold_percent: u32,
    #[serde(default = "default_rebalance_rate")]
    #[schemars(range(min = 1, max = 100000))]
    pub connections_per_second: u32,
    #[serde(default = "default_rebalance_age")]
    #[schemars(range(min = 0, max = 86400))]
    pub min_connection_age_seconds: u32,
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        RebalanceSpec {
            enabled: true,
            threshold_percent: default_rebalance_threshold(),
            connections_per_second: default_rebalance_rate(),
            min_connection_age_seconds: default_rebalance_age(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_rebalance_threshold() -> u32 {
    20
}
fn default_rebalance_rate() -> u32 {
    50
}
fn default_rebalance_age() -> u32 {
    60
}

fn default_drain_rate() -> u32 {
    200
}
fn default_drain_timeout() -> u32 {
    30
}

fn default_progress_deadline() -> i32 {
    600
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://` or `rediss://` URL (several, comma-separated, for a
    /// Redis Cluster's seed nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^rediss?://"))]
    pub url: Option<String>,
    /// A Secret key holding the URL (for URLs with a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// The URL points at a Redis Cluster.
    #[serde(default)]
    pub cluster: bool,
    /// Run a single Redis for this broker (development only: one pod, no
    /// persistence, no password; its data goes with the pod).
    #[serde(default)]
    pub managed: bool,
    /// Image of the managed Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub managed_image: Option<String>,
    /// When a PUBACK, PUBREC or SUBACK may be sent: `Async` once the Redis
    /// primary has the write; `Replicated` once `waitReplicas` replicas
    /// have it too (Redis `WAIT`), so that it survives the primary's loss.
    #[serde(default)]
    pub durability: RedisDurability,
    /// `Replicated`: replicas that must hold each write (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub wait_replicas: Option<u32>,
    /// `Replicated`: how long to wait for them (default 1000); an
    /// unconfirmed write gets an error code, never success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub wait_timeout_ms: Option<u64>,
}

/// See [`RedisSpec::durability`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RedisDurability {
    #[default]
    Async,
    Replicated,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listeners {
    /// Plain MQTT over TCP; `0` turns it off (a TLS-only broker with
    /// `mqtts`: the Service then has no plain port).
    #[serde(default = "default_mqtt_port")]
    #[schemars(range(min = 0, max = 65535))]
    pub mqtt: i32,
    /// MQTT over TLS; needs `tls.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub mqtts: Option<i32>,
    /// MQTT over WebSocket (path /mqtt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub websocket: Option<i32>,
    /// MQTT over secure WebSocket (path /mqtt, the same certificate as
    /// `mqtts`); needs `tls.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub wss: Option<i32>,
}

impl Listeners {
    /// The listeners that are on, by name (`mqtt`, `mqtts`, `websocket`,
    /// `wss`), in that order.
    pub fn enabled(&self) -> Vec<(&'static str, i32)> {
        let mut on = Vec::new();
        if self.mqtt > 0 {
            on.push(("mqtt", self.mqtt));
        }
        if let Some(p) = self.mqtts {
            on.push(("mqtts", p));
        }
        if let Some(p) = self.websocket {
            on.push(("websocket", p));
        }
        if let Some(p) = self.wss {
            on.push(("wss", p));
        }
        on
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: default_mqtt_port(),
            mqtts: None,
            websocket: None,
            wss: None,
        }
    }
}

fn default_mqtt_port() -> i32 {
    1883
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Issue a server certificate from the operator's CA (or use
    /// `secretName`) and mount it in the pods.
    #[serde(default)]
    pub enabled: bool,
    /// A `kubernetes.io/tls` Secret to use instead of the operator's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// A cert-manager issuer to get the server certificate from instead of
    /// the operator's CA: the operator writes a cert-manager `Certificate`
    /// `<broker>-tls` for the same names (the Service's, `extraSans`, a
    /// LoadBalancer's addresses) and the pods mount the Secret cert-manager
    /// fills. Needs cert-manager in the cluster; excludes `secretName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// More names the operator's certificate covers besides the Service's
    /// own (DNS names or IP addresses), e.g. the public name of a
    /// LoadBalancer. The addresses a LoadBalancer Service gets are added by
    /// themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub extra_sans: Vec<String>,
    /// Mutual TLS: a Secret key holding the CA bundle (PEM) that client
    /// certificates must chain to; clients without one are refused in the
    /// handshake (on `mqtts` and `wss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_secret_ref: Option<SecretKeyRef>,
    /// With `clientCaSecretRef`: the client certificate's Common Name is
    /// the MQTT user name (the certificate stands for the password; the
    /// user's ACL applies).
    #[serde(default)]
    pub cert_as_username: bool,
}

/// A cert-manager issuer (`spec.issuerRef` of a cert-manager Certificate).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// The issuer's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (in the broker's namespace), `ClusterIssuer`, or an
    /// external issuer's kind; cert-manager's default (`Issuer`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: Option<String>,
    /// The issuer's API group; `cert-manager.io` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub group: Option<String>,
}

/// Broker limits; unset fields keep the broker's defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 268435460))]
    pub max_packet_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_inflight: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub receive_maximum: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_queued_messages: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub max_keep_alive: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    /// OTLP endpoint for traces (OTEL_EXPORTER_OTLP_ENDPOINT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces sampled, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttBrokerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods already on the current pod template (a rollout's progress).
    #[serde(default)]
    pub updated_replicas: i32,
    /// `host:port` of the MQTT listener inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Every listener's endpoint, by name (mqtt, mqtts, websocket, wss),
    /// and `<name>-external` at a LoadBalancer's address once it has one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
    /// When the server certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiry: Option<String>,
    /// The Secret holding the aggregated auth file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<String>,
    /// The Redis the pods were given (`managed`, `url:<hosts>` without
    /// credentials, `secret:<name>/<key>`, or `memory`). A running broker
    /// is not moved to another one: that would split it in two while the
    /// rollout lasts (see docs/operator.md, "Moving a broker to another
    /// Redis").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
