//! # cirrus-operator-api
//!
//! The custom resources of group `mqtt.cirrus.dev`, version `v1alpha1`,
//! defined once in Rust; `crdgen` writes them to `crds/*.yaml`.
//! - [`MqttBroker`] (`mqb`): a broker deployment.
//! - [`MqttUser`] (`mqu`): a user of one broker, with its ACL.
//!
//! Validation is in the OpenAPI schema (ranges, enums, patterns), not in
//! CEL rules, so the CRDs install on every supported API server.

pub mod broker;
pub mod user;

pub use broker::*;
pub use user::*;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

pub const GROUP: &str = "mqtt.cirrus.dev";
pub const VERSION: &str = "v1alpha1";

/// Set or update the condition of `type_`, keeping its transition time when
/// the status does not change. Returns whether anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(c) => {
            if c.status == new.status
                && c.reason == new.reason
                && c.message == new.message
                && c.observed_generation == new.observed_generation
            {
                return false;
            }
            if c.status == new.status {
                new.last_transition_time = c.last_transition_time.clone();
            }
            *c = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// All CRDs, in the order `crdgen` writes them.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![MqttBroker::crd(), MqttUser::crd()]
}
