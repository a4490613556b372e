//! `tls.issuerRef`: the server certificate from a cert-manager issuer. The
//! test API server gets cert-manager's `Certificate` kind (its CRD, reduced
//! to what the operator uses), and the test does cert-manager's part: it
//! signs the certificate the Certificate asks for, writes its Secret and
//! marks it Ready.

use super::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject};

const CRD_NAME: &str = "certificates.cert-manager.io";

/// cert-manager's Certificate CRD as far as the operator and this test
/// use it: namespaced, `v1`, a status subresource, fields kept as given.
const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: certificates.cert-manager.io}
spec:
  group: cert-manager.io
  scope: Namespaced
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

fn certificates(c: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        c.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
            "certificates",
        ),
    )
}

/// Whether the API server serves Certificates in `ns` (a list answers).
async fn served(c: &Client, ns: &str) -> bool {
    certificates(c, ns).list(&Default::default()).await.is_ok()
}

/// The cluster without cert-manager's kind (a CRD a failed earlier run
/// left behind is deleted first).
async fn remove_crd(c: &Client, ns: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let _ = crds.delete(CRD_NAME, &DeleteParams::default()).await;
    eventually(Duration::from_secs(60), "Certificate kind gone", || async {
        let gone = crds.get_opt(CRD_NAME).await.ok()?.is_none();
        (gone && !served(c, ns).await).then_some(())
    })
    .await;
}

async fn install_crd(c: &Client, ns: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let crd: CustomResourceDefinition = serde_yaml::from_str(CRD).unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "Certificate kind served",
        || async { served(c, ns).await.then_some(()) },
    )
    .await;
}

fn tls_ready(b: &MqttBroker) -> Option<(String, String, String)> {
    b.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "TLSReady")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn tls_ready_is(c: &Client, ns: &str, name: &str, status: &str, reason: &str) -> MqttBroker {
    eventually(WAIT, &format!("TLSReady={status} {reason}"), || async {
        let b: MqttBroker = get(c, ns, name).await?;
        let (s, r, _) = tls_ready(&b)?;
        (s == status && r == reason).then_some(b)
    })
    .await
}

/// Without cert-manager the broker says so; with it, the operator asks for
/// the certificate (the Service's names, the extra ones, the issuer), waits
/// for it, mounts the Secret cert-manager wrote (which a real broker then
/// serves) and never writes that Secret itself; without `issuerRef` again,
/// the Certificate goes and the operator's CA issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cert_manager_issuer_gives_the_server_certificate() {
    let c = client().await;
    let ns = namespace(&c, "op-certmgr").await;
    remove_crd(&c, &ns).await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: edge}\nspec: {listeners: {mqtt: 0, mqtts: 8883}, tls: {enabled: true, extraSans: [mqtt.example.com, 192.0.2.10], issuerRef: {name: corp-ca, kind: ClusterIssuer}}}\n").await;
    let b = tls_ready_is(&c, &ns, "edge", "False", "CertManagerMissing").await;
    assert!(tls_ready(&b).unwrap().2.contains("cert-manager"));
    // The operator's own CA stays out of it.
    assert!(get::<Secret>(&c, &ns, "edge-tls").await.is_none());
    assert!(get::<Secret>(&c, &ns, "cirrus-ca").await.is_none());

    install_crd(&c, &ns).await;
    let cert = eventually(WAIT, "the broker's Certificate", || async {
        certificates(&c, &ns).get_opt("edge-tls").await.ok()?
    })
    .await;
    let spec = &cert.data["spec"];
    assert_eq!(spec["secretName"], "edge-tls");
    assert_eq!(
        spec["issuerRef"],
        serde_json::json!({"name": "corp-ca", "kind": "ClusterIssuer"})
    );
    let dns: Vec<&str> = spec["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(dns.contains(&format!("edge.{ns}.svc").as_str()), "{dns:?}");
    assert!(dns.contains(&"mqtt.example.com"), "{dns:?}");
    assert_eq!(spec["ipAddresses"], serde_json::json!(["192.0.2.10"]));
    assert_eq!(
        cert.metadata.owner_references.as_ref().unwrap()[0].name,
        "edge"
    );
    tls_ready_is(&c, &ns, "edge", "False", "CertificatePending").await;
    // The pods mount the Certificate's Secret.
    let d: Deployment = eventually(WAIT, "Deployment", || async {
        get::<Deployment>(&c, &ns, "edge").await
    })
    .await;
    let vols = d.spec.template.spec.unwrap().volumes.unwrap();
    let tls_vol = vols.iter().find(|v| v.name == "tls").unwrap();
    assert_eq!(
        tls_vol.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("edge-tls")
    );

    // cert-manager's part: sign, write the Secret, report Ready.
    let ca = cirrus_e2e::certs::ca("corp-ca");
    let mut sans: Vec<&str> = dns.clone();
    sans.push("192.0.2.10");
    let (crt, key) = cirrus_e2e::certs::leaf(&ca, "edge", &sans, false, false);
    let ca_pem = ca.cert.pem();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "edge-tls", "annotations": {"cert-manager.io/certificate-name": "edge-tls"}},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": crt, "tls.key": key, "ca.crt": ca_pem},
    }))
    .unwrap();
    Api::<Secret>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let not_after = "2027-03-01T00:00:00Z";
    certificates(&c, &ns)
        .patch_status(
            "edge-tls",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "notAfter": not_after,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "Certificate is up to date and has not expired"}],
            }})),
        )
        .await
        .unwrap();
    let b = tls_ready_is(&c, &ns, "edge", "True", "CertManagerIssued").await;
    assert_eq!(
        b.status.unwrap().certificate_expiry.as_deref(),
        Some(not_after)
    );
    // The operator left cert-manager's Secret as it was.
    tokio::time::sleep(2 * RESYNC).await;
    assert_eq!(secret_value(&c, &ns, "edge-tls", "tls.crt").await, crt);

    // A real broker with the operator's config and that Secret: a client
    // that trusts only the issuer's CA verifies its chain (not the name:
    // it dials 127.0.0.1, which the certificate does not cover).
    let cm: ConfigMap = get(&c, &ns, "edge-config").await.unwrap();
    let yaml = cm.data.unwrap()["config.yaml"].clone();
    let served_crt = secret_value(&c, &ns, "edge-tls", "tls.crt").await;
    let served_key = secret_value(&c, &ns, "edge-tls", "tls.key").await;
    publishes_over_tls(&yaml, &served_crt, &served_key, &ca_pem);

    // Back to the operator's CA: the Certificate is deleted (cert-manager
    // would otherwise keep writing the Secret) and the CA issues.
    Api::<MqttBroker>::namespaced(c.clone(), &ns)
        .patch(
            "edge",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"tls": {"issuerRef": null}}})),
        )
        .await
        .unwrap();
    eventually(WAIT, "the Certificate deleted", || async {
        certificates(&c, &ns)
            .get_opt("edge-tls")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let b = tls_ready_is(&c, &ns, "edge", "True", "Issued").await;
    assert!(tls_ready(&b).unwrap().2.contains("operator's CA"));
    let own = secret_value(&c, &ns, "edge-tls", "ca.crt").await;
    assert_eq!(own, secret_value(&c, &ns, "cirrus-ca", "tls.crt").await);

    remove_crd(&c, &ns).await;
}
