//! The operator's CA and the brokers' server certificates.
//!
//! Per namespace the operator keeps one CA in the Secret `cirrus-ca`
//! (created on first use, valid ten years). A broker with `tls.enabled` and
//! no `tls.secretName` gets a `kubernetes.io/tls` Secret `{broker}-tls`
//! signed by it for the Service's DNS names, valid 90 days and issued again
//! when less than 30 days remain, when its names changed or when it does
//! not parse. Brokers re-read the mounted files by themselves, so a renewal
//! rolls no pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The namespace's CA Secret.
pub const CA_SECRET: &str = "cirrus-ca";
const CA_DAYS: i64 = 3650;
pub const SERVER_DAYS: i64 = 90;
/// Renew when less than this is left.
pub const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA Secret {CA_SECRET} is unreadable: {0}")]
    BadCa(&'static str),
}

/// PEM certificate and key.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// The names a broker's certificate covers: its Service, in every form a
/// client inside the cluster may use.
pub fn dns_names(service: &str, ns: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{ns}"),
        format!("{service}.{ns}.svc"),
        format!("{service}.{ns}.svc.cluster.local"),
    ]
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

pub fn new_ca(ns: &str) -> Result<Pair, TlsError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(DnType::CommonName, format!("cirrus operator CA ({ns})"));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_DAYS);
    let cert = p.self_signed(&key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A server certificate for `names`, signed by the CA.
pub fn issue(ca: &Pair, names: &[String]) -> Result<Pair, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|_| TlsError::BadCa("key"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert)
        .map_err(|_| TlsError::BadCa("certificate"))?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut p, SERVER_DAYS);
    let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// What an existing certificate says: when it expires (unix seconds) and
/// its DNS names. `None` when it does not parse.
pub fn inspect(cert_pem: &str) -> Option<(i64, Vec<String>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Some((not_after, names))
}

/// Whether a certificate must be issued again.
pub fn needs_renewal(cert_pem: Option<&str>, names: &[String], now_unix: i64) -> bool {
    let Some((not_after, have)) = cert_pem.and_then(inspect) else {
        return true;
    };
    let mut want = names.to_vec();
    let mut have = have;
    want.sort();
    have.sort();
    not_after - now_unix < RENEW_BEFORE_DAYS * 86_400 || want != have
}

fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The CA held in a Secret.
pub fn ca_from_secret(s: &Secret) -> Option<Pair> {
    Some(Pair {
        cert: data(s, "tls.crt")?,
        key: data(s, "tls.key")?,
    })
}

/// The server certificate in a broker's TLS Secret.
pub fn cert_of(s: &Secret) -> Option<String> {
    data(s, "tls.crt")
}

/// A `kubernetes.io/tls` Secret: `tls.crt`, `tls.key`, and `ca.crt` for
/// clients that want to verify the broker.
pub fn tls_secret(meta: ObjectMeta, pair: &Pair, ca_cert: &str) -> Secret {
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(pair.cert.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(pair.key.clone().into_bytes()),
            ),
            (
                "ca.crt".to_string(),
                ByteString(ca_cert.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_cover_the_service_and_renew_in_time() {
        let ca = new_ca("ns").unwrap();
        let names = dns_names("main", "ns");
        let server = issue(&ca, &names).unwrap();
        let (not_after, have) = inspect(&server.cert).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((not_after - now) > 89 * 86_400);
        assert!(have.contains(&"main.ns.svc".to_string()));
        assert!(!needs_renewal(Some(&server.cert), &names, now));
        // 61 days later less than 30 remain.
        assert!(needs_renewal(Some(&server.cert), &names, now + 61 * 86_400));
        // A renamed Service needs a new certificate.
        assert!(needs_renewal(
            Some(&server.cert),
            &dns_names("other", "ns"),
            now
        ));
        assert!(needs_renewal(Some("garbage"), &names, now));
        assert!(needs_renewal(None, &names, now));
    }
}
