//! Server certificates from a cert-manager issuer (`tls.issuerRef`): the
//! operator writes a cert-manager `Certificate` `<broker>-tls` (owned by the
//! broker) whose Secret is the one the pods mount, and reads back whether
//! cert-manager has issued it. cert-manager is optional: its kind is used
//! as a dynamic resource (no cert-manager crate, no watch that would fail
//! without its CRD), and a cluster without it gets a condition that says so.

use std::net::IpAddr;

use cirrus_operator_api::{IssuerRef, MqttBroker};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kube::ResourceExt;
use serde_json::{json, Value};

use crate::{resources, Error, FIELD_MANAGER};

/// The TLSReady reasons of a broker whose certificate comes from
/// cert-manager (so that a later spec without `issuerRef` knows there is a
/// Certificate to delete).
pub const REASONS: [&str; 3] = [
    "CertManagerIssued",
    "CertificatePending",
    "CertManagerMissing",
];

/// cert-manager's `Certificate` (cert-manager.io/v1).
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// The Certificate's name, which is also its Secret's: the Secret the pods
/// mount when no `tls.secretName` is given.
pub fn certificate_name(b: &MqttBroker) -> String {
    format!("{}-tls", b.name_any())
}

/// The Certificate the operator applies for `names` (DNS names and IP
/// addresses, as the operator's own certificate would cover).
pub fn certificate(b: &MqttBroker, issuer: &IssuerRef, names: &[String]) -> Value {
    let name = certificate_name(b);
    let labels = resources::labels(&b.name_any());
    let meta = resources::meta(b, name.clone(), labels.clone());
    let (ips, dns): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| n.parse::<IpAddr>().is_ok());
    let mut issuer_ref = json!({ "name": issuer.name });
    if let Some(k) = &issuer.kind {
        issuer_ref["kind"] = json!(k);
    }
    if let Some(g) = &issuer.group {
        issuer_ref["group"] = json!(g);
    }
    let mut spec = json!({
        "secretName": name,
        "dnsNames": dns,
        "issuerRef": issuer_ref,
        "usages": ["digital signature", "key encipherment", "server auth"],
        // A renewal gets a new key, as the operator's own certificates do.
        "privateKey": { "rotationPolicy": "Always" },
        // The Secret carries the broker's labels, so that it is found with
        // the broker's other children.
        "secretTemplate": { "labels": labels },
    });
    if !ips.is_empty() {
        spec["ipAddresses"] = json!(ips);
    }
    json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": meta,
        "spec": spec,
    })
}

/// What cert-manager says of the Certificate.
#[derive(Debug, PartialEq)]
pub enum State {
    /// Issued: its `Ready` condition is True; the certificate's end
    /// (`status.notAfter`, RFC 3339) when given.
    Issued { not_after: Option<String> },
    /// Not (yet) issued: the `Ready` condition's reason and message, if any.
    Pending { reason: String, message: String },
    /// The cluster has no cert-manager `Certificate` kind.
    Missing,
}

/// Read a Certificate's state from its status.
pub fn state_of(cert: &Value) -> State {
    let status = &cert["status"];
    let ready = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
    match ready {
        Some(c) if c["status"] == "True" => State::Issued {
            not_after: status["notAfter"].as_str().map(str::to_string),
        },
        Some(c) => State::Pending {
            reason: c["reason"].as_str().unwrap_or("NotReady").to_string(),
            message: c["message"].as_str().unwrap_or_default().to_string(),
        },
        None => State::Pending {
            reason: "NotIssued".into(),
            message: "cert-manager has not reported on it yet".into(),
        },
    }
}

fn api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource())
}

/// A 404 on cert-manager's path: the kind is not served (no CRD), or,
/// for a delete, the object is gone.
fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 404)
}

/// Apply the broker's Certificate and return what cert-manager says of it.
pub async fn ensure(
    client: &kube::Client,
    b: &MqttBroker,
    ns: &str,
    issuer: &IssuerRef,
    names: &[String],
) -> Result<State, Error> {
    let name = certificate_name(b);
    let obj = certificate(b, issuer, names);
    match api(client, ns)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
    {
        Ok(applied) => {
            let v = serde_json::to_value(&applied)
                .map_err(|_| Error::Serialize("a cert-manager Certificate".into()))?;
            Ok(state_of(&v))
        }
        Err(e) if not_found(&e) => Ok(State::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Delete the broker's Certificate (its spec no longer names an issuer),
/// if it is there and the broker controls it.
pub async fn remove(client: &kube::Client, b: &MqttBroker, ns: &str) -> Result<(), Error> {
    let name = certificate_name(b);
    let api = api(client, ns);
    let cert = match api.get_opt(&name).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(()),
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let uid = b.metadata.uid.as_deref();
    let owned = cert
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
    if owned {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn broker() -> MqttBroker {
        let mut b: MqttBroker = serde_yaml::from_str(
            "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: edge, namespace: iot, uid: u-1}\nspec: {tls: {enabled: true, issuerRef: {name: letsencrypt, kind: ClusterIssuer}}}\n",
        )
        .unwrap();
        b.metadata.uid = Some("u-1".into());
        b
    }

    #[test]
    fn the_certificate_names_the_issuer_the_names_and_the_mounted_secret() {
        let b = broker();
        let issuer = b.spec.tls.issuer_ref.clone().unwrap();
        let names = vec![
            "edge.iot.svc".to_string(),
            "mqtt.example.com".to_string(),
            "203.0.113.7".to_string(),
        ];
        let c = certificate(&b, &issuer, &names);
        assert_eq!(c["metadata"]["name"], "edge-tls");
        assert_eq!(c["spec"]["secretName"], "edge-tls");
        assert_eq!(
            c["spec"]["dnsNames"],
            json!(["edge.iot.svc", "mqtt.example.com"])
        );
        assert_eq!(c["spec"]["ipAddresses"], json!(["203.0.113.7"]));
        assert_eq!(
            c["spec"]["issuerRef"],
            json!({"name": "letsencrypt", "kind": "ClusterIssuer"})
        );
        assert_eq!(c["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            c["spec"]["secretTemplate"]["labels"]["app.kubernetes.io/instance"],
            "edge"
        );
    }

    #[test]
    fn the_state_follows_the_ready_condition() {
        assert_eq!(
            state_of(
                &json!({"status": {"notAfter": "2027-03-01T00:00:00Z", "conditions": [{"type": "Ready", "status": "True"}]}})
            ),
            State::Issued {
                not_after: Some("2027-03-01T00:00:00Z".into())
            }
        );
        assert_eq!(
            state_of(
                &json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "DoesNotExist", "message": "issuer not found"}]}})
            ),
            State::Pending {
                reason: "DoesNotExist".into(),
                message: "issuer not found".into()
            }
        );
        assert!(matches!(state_of(&json!({})), State::Pending { .. }));
    }
}
